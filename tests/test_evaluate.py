"""Metrics on hand-computed inputs, and FLOP counting against torch's own counter."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import evaluate
import neurotrails

LABELS = torch.tensor([0, 1, 2, 0])
PROBS = torch.tensor([[0.7, 0.2, 0.1],     # correct, conf 0.7
                      [0.5, 0.4, 0.1],     # wrong,   conf 0.5
                      [0.1, 0.1, 0.8],     # correct, conf 0.8
                      [0.3, 0.6, 0.1]])    # wrong,   conf 0.6


def test_accuracy_and_nll_by_hand():
    assert evaluate.accuracy(PROBS, LABELS) == 0.5
    expected = -(math.log(0.7) + math.log(0.4) + math.log(0.8) + math.log(0.3)) / 4
    assert evaluate.nll(PROBS, LABELS) == pytest.approx(expected, rel=1e-6)


def test_ece_by_hand():
    # 15 bins of width 1/15: 0.5 -> bin 7 (7/15=0.467, 8/15=0.533]; 0.6 -> bin 8 (0.533, 0.6];
    # 0.7 -> bin 10 (0.667, 0.733]; 0.8 -> bin 11 (0.733, 0.8]. One sample per bin:
    # |1-0.7| + |0-0.5| + |1-0.8| + |0-0.6| = 0.3 + 0.5 + 0.2 + 0.6 = 1.6, / 4 = 0.4
    assert evaluate.ece(PROBS, LABELS) == pytest.approx(0.4, abs=1e-6)
    # two samples in one bin average before the absolute value: conf 0.7 right + conf 0.7 wrong
    probs = torch.tensor([[0.7, 0.3], [0.7, 0.3]])
    assert evaluate.ece(probs, torch.tensor([0, 1])) == pytest.approx(abs(0.5 - 0.7), abs=1e-6)
    # perfectly calibrated one-hot predictions
    assert evaluate.ece(torch.eye(3), torch.arange(3)) == 0.0


def test_disagreement_both_definitions_by_hand():
    # predictions of 3 heads on 4 samples
    preds = torch.tensor([[0, 1, 2, 0],
                          [0, 1, 1, 1],
                          [0, 2, 2, 1]])
    head_probs = torch.nn.functional.one_hot(preds, 3).float()
    any_, pair = evaluate.disagreement(head_probs)
    assert any_ == 0.75  # samples 1, 2, 3 have some disagreement
    # pairs (0,1): 2/4, (0,2): 2/4, (1,2): 2/4  -> 0.5 (the released M x M mean would give 1/3)
    assert pair == pytest.approx(0.5)
    assert evaluate.disagreement(head_probs[:1]) == (0.0, 0.0)


def test_summarize_uses_the_soft_vote_and_reports_each_head():
    logits = torch.randn(3, 50, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 4, (50,), generator=torch.Generator().manual_seed(1))
    out = evaluate.summarize(logits, labels)
    probs = logits.softmax(-1)
    assert out["acc"] == evaluate.accuracy(probs.mean(0), labels)
    assert out["head_acc"] == [evaluate.accuracy(p, labels) for p in probs]
    assert evaluate.summarize(logits, labels, "logits")["nll"] == pytest.approx(
        evaluate.nll(logits.mean(0).softmax(-1), labels), rel=1e-6)


def test_dense_flops_match_torch_flop_counter_and_backbone_counts_once():
    torch.manual_seed(0)
    single = neurotrails.build("wrn10-2", 1, 2, num_classes=10)
    x = torch.randn(1, 3, 16, 16)
    with FlopCounterMode(display=False) as counter:
        single.eval()(x)
    convs_and_fc = sum(v for k, v in counter.get_flop_counts()["Global"].items()
                       if "conv" in str(k) or "mm" in str(k))
    assert evaluate.inference_flops(single, x)["dense"] == convs_and_fc
    torch.manual_seed(0)
    three = neurotrails.build("wrn10-2", 3, 2, num_classes=10)
    f1, f3 = evaluate.inference_flops(single, x)["dense"], evaluate.inference_flops(three, x)["dense"]
    backbone = evaluate.inference_flops(torch.nn.Sequential(three.backbone), x)["dense"]
    assert f3 == backbone + 3 * (f1 - backbone)


def test_sparse_flops_count_only_active_weights():
    torch.manual_seed(0)
    net = neurotrails.build("wrn10-2", 3, 2, num_classes=10)
    x = torch.randn(1, 3, 16, 16)
    dense = evaluate.inference_flops(net, x)
    neurotrails.build_masks(net, 0.5, init="uniform")
    sparse = evaluate.inference_flops(net, x)
    assert sparse["dense"] == dense["dense"]
    assert sparse["sparse"] == pytest.approx(0.5 * dense["dense"], rel=1e-3)
    counts = evaluate.parameter_counts(net)
    masked = sum(p.numel() for p in neurotrails.masked_weights(net).values())
    assert counts["params"] - counts["active_params"] == pytest.approx(0.5 * masked, abs=len(neurotrails.masked_weights(net)))


def test_training_flops_follow_rigl_appendix_h():
    assert evaluate.train_flops_per_example(2.0, 10.0, 0) == 6.0
    # (3 f_S dt + 2 f_S + f_D) / (dt + 1) with f_S = 2, f_D = 10, dt = 4: (24 + 4 + 10) / 5
    assert evaluate.train_flops_per_example(2.0, 10.0, 4) == pytest.approx(38 / 5)


def test_flops_report_on_the_meta_device_matches_real_masks():
    kw = dict(model="wrn10-2", num_heads=3, blocks_in_head=2, sparsity_=0.8, num_classes=10, image_size=16)
    report = evaluate.flops_report(**kw, epochs=3, single_epochs=2, train_examples=100, delta_t=0)
    torch.manual_seed(0)
    net = neurotrails.build("wrn10-2", 3, 2, num_classes=10)
    neurotrails.build_masks(net, 0.8)
    real = evaluate.inference_flops(net, torch.randn(1, 3, 16, 16))
    assert report["infer_flops_sparse"] == real["sparse"] and report["infer_flops_dense"] == real["dense"]
    torch.manual_seed(0)
    single = evaluate.inference_flops(neurotrails.build("wrn10-2", 1, 2, num_classes=10), torch.randn(1, 3, 16, 16))
    assert report["infer_flops_vs_single"] == pytest.approx(real["sparse"] / single["dense"])
    assert report["train_flops_vs_single_run"] == pytest.approx(3 * 3 * real["sparse"] / (3 * 2 * single["dense"]))
    assert report["train_flops_per_step"] == 128 * 3 * real["sparse"]
    assert report["infer_flops_dense_vs_single"] == pytest.approx(real["dense"] / single["dense"])
    counts = evaluate.parameter_counts(net)
    assert report["params"] == counts["params"]
    assert abs(report["active_params"] - counts["active_params"]) <= len(neurotrails.masked_weights(net))


def test_treenet_parameter_ratio_is_the_papers_2_91_and_its_flop_ratio_is_not():
    r = evaluate.flops_report("wrn28-10", 3, 8, 0.0)
    assert round(r["params_vs_single"], 2) == 2.91
    assert round(r["infer_flops_vs_single"], 2) == 2.36


def test_heads_grid_picks_images_where_the_votes_differ_then_where_heads_disagree():
    def logits(preds):  # (M, N) predicted classes -> one-hot-ish logits (M, N, 3)
        return 10 * torch.nn.functional.one_hot(torch.tensor(preds), 3).float()
    a = logits([[0, 1, 2, 0, 1], [0, 1, 2, 2, 1]])  # heads disagree on image 3
    b = logits([[0, 2, 2, 0, 1]])                    # votes differ from a's on image 1
    picked = evaluate.pick_grid_images([0, 1, 2, 0, 1], [("a", a), ("b", b)], count=5)
    assert picked[0] == 1 and picked[1] == 3 and sorted(picked) == [0, 1, 2, 3, 4]
    assert evaluate.pick_grid_images([0] * 5, [("a", a)], count=2) == [3, 0]
