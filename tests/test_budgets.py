"""Training budgets per method (App. E.3, Tables 11-14): --budget paper | equal | flops | density
gives each method its own epochs (updates) from the single dense network's E (U), and every run
records the mode, E, its own budget and its FLOPs relative to the single network."""
import json

import pytest

import evaluate
import neurotrails
import train_lm
import train_vision

VISION_METHODS = ["single", "treenet", "ensemble", "neurotrails", "static", "pruning"]
# The paper's epochs (Tables 11, 12, 14) at the paper's E; Fashion-MNIST takes the CIFAR-100 ratios.
PAPER_EPOCHS = {
    ("cifar100", 250): [250, 250, 250, 450, 450, 500],
    ("imagenet", 90): [90, 180, 90, 270, 270, 180],
    ("tinyimagenet", 100): [100, 100, 100, 200, 200, 200],
    ("fashion-mnist", 15): [15, 15, 15, 27, 27, 30],
}
SMALL = {"cifar100": "wrn10-1", "imagenet": "wrn10-1", "tinyimagenet": "wrn10-1", "fashion-mnist": "wrn10-1"}


def vision_config(dataset, method, *extra, model=None):
    args = ["--dataset", dataset, "--method", method, "--device", "cpu", *extra]
    if model:
        args += ["--model", model]
    return train_vision.resolve_config(train_vision.parse_args(args)[1])


@pytest.mark.parametrize("dataset,dense", list(PAPER_EPOCHS))
def test_paper_budget_gives_each_method_the_papers_epochs(dataset, dense):
    got = [vision_config(dataset, m, model=SMALL[dataset])["epochs"] for m in VISION_METHODS]
    assert got == PAPER_EPOCHS[dataset, dense]
    # --epochs names E and the ratios follow it: 1.8 x 10 = 18 epochs for NeuroTrails on CIFAR-100
    assert vision_config("cifar100", "neurotrails", "--epochs", "10", model="wrn10-1")["epochs"] == 18
    assert vision_config("imagenet", "treenet", "--epochs", "10", model="wrn10-1")["epochs"] == 20


@pytest.mark.parametrize("dataset", list(SMALL))
def test_equal_and_density_budgets(dataset):
    for m in VISION_METHODS:
        cfg = vision_config(dataset, m, "--epochs", "12", "--budget", "equal", model=SMALL[dataset])
        assert (cfg["budget"], cfg["dense_epochs"], cfg["epochs"]) == ("equal", 12, 12)
        cfg = vision_config(dataset, m, "--epochs", "12", "--budget", "density", model=SMALL[dataset])
        expected = int(12 / (1 - cfg["sparsity"]) + 1e-6) if neurotrails.METHODS[m].sparse else 12
        assert cfg["epochs"] == expected


@pytest.mark.parametrize("dataset", list(SMALL))
def test_flops_budget_spends_the_single_networks_training_flops_within_half_an_epoch(dataset):
    for m in VISION_METHODS:
        cfg = vision_config(dataset, m, "--epochs", "40", "--budget", "flops", model=SMALL[dataset])
        r = train_vision.RECIPES[dataset]
        method = neurotrails.METHODS[m]
        kwargs = dict(num_classes=r["classes"], image_size=r["size"], in_channels=r["channels"])
        if method.prunes:  # dense half, then density 1 - S
            per_step = sum(evaluate.flops_report(cfg["model"], cfg["num_heads"], cfg["blocks_in_head"], s, init=i,
                                                 **kwargs)["train_flops_per_step_vs_single"]
                           for s, i in ((0.0, "er"), (cfg["sparsity"], "uniform"))) / 2
        else:
            per_step = evaluate.flops_report(cfg["model"], cfg["num_heads"], cfg["blocks_in_head"], cfg["sparsity"],
                                             full_ensemble=method.full_ensemble,
                                             delta_t=cfg["delta_t"] if method.evolves else 0,
                                             **kwargs)["train_flops_per_step_vs_single"]
        # the run's training FLOPs relative to 40 epochs of the single network: 1 within half an epoch
        assert abs(cfg["epochs"] * per_step - 40) <= per_step / 2 + 1e-9, (m, cfg["epochs"], per_step)
        assert cfg["train_flops_vs_single"] == pytest.approx(cfg["epochs"] * per_step / 40, abs=1e-4)
    # the dense multi-head and ensemble runs are shorter than E, the sparse ones longer (S = 0.8)
    epochs = {m: vision_config(dataset, m, "--epochs", "40", "--budget", "flops", model=SMALL[dataset])["epochs"]
              for m in ("single", "treenet", "ensemble", "neurotrails")}
    assert epochs["single"] == 40 and epochs["treenet"] < 40 and epochs["ensemble"] < epochs["treenet"]


def test_full_ensemble_costs_m_single_networks_and_treenet_less():
    cfg = vision_config("cifar100", "ensemble", "--num-heads", "3", model="wrn10-1")
    assert cfg["train_flops_vs_single"] == pytest.approx(3.0, rel=1e-3)
    assert cfg["infer_flops_vs_single"] == pytest.approx(3.0, rel=1e-3)
    tree = vision_config("cifar100", "treenet", "--num-heads", "3", model="wrn10-1")
    assert 1.0 < tree["train_flops_vs_single"] < 3.0


def test_language_budgets_follow_table_13():
    def cfg(method, *extra):
        return train_lm.resolve_config(train_lm.parse_args(["--model", "llama-130m", "--method", method,
                                                            "--device", "cpu", *extra])[1])
    assert [cfg(m)["updates"] for m in ("single", "treenet", "ensemble", "neurotrails", "static")] == \
        [10_000, 10_000, 10_000, 11_111, 11_111]
    assert cfg("neurotrails", "--updates", "900", "--budget", "equal")["updates"] == 900
    flops = cfg("neurotrails", "--updates", "900", "--budget", "flops")
    # S = 0.1 and three heads of 8 layers: each update costs more than a single network's
    assert flops["updates"] < 900 and abs(flops["train_flops_vs_single"] - 1) < 0.01
    assert cfg("single", "--budget", "flops")["updates"] == 10_000


def test_budget_is_recorded_and_a_stored_config_reruns_the_same_budget(tmp_path):
    cfg = vision_config("fashion-mnist", "neurotrails", "--epochs", "10", "--budget", "paper", model="wrn10-1")
    assert {k: cfg[k] for k in ("budget", "dense_epochs", "epochs")} == {"budget": "paper", "dense_epochs": 10,
                                                                        "epochs": 18}
    assert 0 < cfg["infer_flops_vs_single"] < 1 and cfg["train_flops_vs_single"] > 0
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    again = train_vision.resolve_config(train_vision.parse_args(["--config", str(tmp_path / "config.json")])[1])
    assert (again["dense_epochs"], again["epochs"]) == (10, 18)  # E is carried, not the method's 18


def test_lr_milestones_never_collapse_in_short_runs():
    # E_m = 2: decays at 0.5, 1.0 and 1.5 epochs (mid-epoch), not all three at epoch 1
    cfg = {"lr": 0.1, "epochs": 2}
    assert [train_vision.lr_at(e, cfg) for e in (0, 0.49, 0.5, 1.0, 1.49, 1.5, 1.99)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.001, 0.001, 0.0001, 0.0001])
    lrs = [train_vision.lr_at(i / 10, {"lr": 1.0, "epochs": 3}) for i in range(30)]
    assert len(set(lrs)) == 4  # three distinct decays
