"""Claims of neurotrails.py: the split, independent heads, one backbone pass, loss, soft vote,
mask allocation over components, argument validation and the summary CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import models
import neurotrails

ROOT = Path(__file__).resolve().parents[1]


def tiny(num_heads=3, blocks_in_head=2, seed=0, **kw):
    torch.manual_seed(seed)
    return neurotrails.build("wrn10-1", num_heads, blocks_in_head, num_classes=10, **kw)


def test_split_puts_the_last_blocks_in_every_head():
    net = tiny(3, 2)
    assert [n for n, _ in net.backbone.named_children()] == ["stem", "block0"]
    for head in net.heads:
        assert [n for n, _ in head.named_children()] == ["block1", "block2", "tail"]
    assert net(torch.randn(4, 3, 16, 16)).shape == (3, 4, 10)


def test_heads_are_independently_initialised_and_share_one_backbone():
    net = tiny(3, 2)
    names = [n for n, _ in net.heads[0].named_parameters()]
    for name in names:
        params = [dict(h.named_parameters())[name] for h in net.heads]
        assert params[0] is not params[1]
        if params[0].dim() >= 2:  # weights drawn at random must differ between heads
            assert not torch.equal(params[0], params[1]) and not torch.equal(params[1], params[2])
    backbone_ids = {id(p) for p in net.backbone.parameters()}
    assert not backbone_ids & {id(p) for h in net.heads for p in h.parameters()}
    assert len(list(net.parameters())) == len(backbone_ids) + 3 * len(names)


def test_backbone_is_computed_once_per_forward():
    net = tiny(4, 2)
    calls = []
    net.backbone.register_forward_hook(lambda *a: calls.append(1))
    head_calls = []
    for h in net.heads:
        h.register_forward_hook(lambda *a: head_calls.append(1))
    net(torch.randn(2, 3, 16, 16))
    assert len(calls) == 1 and len(head_calls) == 4


def test_single_head_equals_the_base_model():
    torch.manual_seed(7)
    base = models.build("wrn10-1", num_classes=10)
    net = tiny(1, 2, seed=7)
    base.eval(), net.eval()
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(net(x)[0], base(x), rtol=0, atol=0)


def test_full_ensemble_members_are_whole_independent_models():
    net = tiny(3, full_ensemble=True)
    assert isinstance(net.backbone, torch.nn.Identity)
    for h in net.heads:
        assert "stem" in dict(h.named_children())
    assert sum(p.numel() for p in net.parameters()) == 3 * sum(
        p.numel() for p in models.build("wrn10-1", num_classes=10).parameters())


def test_soft_vote_is_the_mean_of_softmaxes():
    logits = torch.randn(3, 5, 7)
    expected = (logits[0].softmax(-1) + logits[1].softmax(-1) + logits[2].softmax(-1)) / 3
    torch.testing.assert_close(neurotrails.soft_vote(logits), expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(neurotrails.soft_vote(logits, "logits"), logits.mean(0).softmax(-1))
    assert not torch.allclose(neurotrails.soft_vote(logits), neurotrails.soft_vote(logits, "logits"))
    with pytest.raises(ValueError, match="--aggregate"):
        neurotrails.soft_vote(logits, "votes")


def test_loss_is_the_mean_of_the_heads_cross_entropies():
    logits, y = torch.randn(3, 6, 5), torch.randint(0, 5, (6,))
    expected = sum(F.cross_entropy(logits[i], y) for i in range(3)) / 3
    torch.testing.assert_close(neurotrails.ensemble_loss(logits, y), expected)
    # language model shape with ignored positions
    logits, y = torch.randn(2, 2, 4, 9), torch.randint(0, 9, (2, 4))
    y[0, 3] = -100
    expected = sum(F.cross_entropy(logits[i].reshape(-1, 9), y.reshape(-1)) for i in range(2)) / 2
    torch.testing.assert_close(neurotrails.ensemble_loss(logits, y), expected)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_heads": 0}, r"--num-heads must be in \[1, 64\], got 0"),
    ({"blocks_in_head": 0}, r"--blocks-in-head must be in \[1, 3\] for wrn10-1, got 0"),
    ({"blocks_in_head": 4}, r"--blocks-in-head must be in \[1, 3\]"),
])
def test_bad_arguments_get_one_line_naming_the_flag(kwargs, match):
    args = {"num_heads": 3, "blocks_in_head": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        neurotrails.build("wrn10-1", args["num_heads"], args["blocks_in_head"], num_classes=10)


@pytest.mark.parametrize("s", [-0.1, 1.0, 1.5])
def test_sparsity_outside_0_1_is_rejected(s):
    with pytest.raises(ValueError, match=r"--sparsity must be in \[0, 1\)"):
        neurotrails.build_masks(tiny(), s)


def test_masks_have_exact_counts_and_meet_the_global_budget():
    net = tiny(3, 2)
    masks = neurotrails.build_masks(net, 0.8)
    dens = neurotrails.densities(net, 0.8)
    weights = neurotrails.masked_weights(net)
    for name, w in weights.items():
        expect = round(dens[name] * w.numel())
        assert int((w != 0).sum()) == expect  # applied: weights outside the mask are zero
        if name in masks.masks:
            assert int(masks.masks[name].sum()) == expect
    total = sum(w.numel() for w in weights.values())
    active = sum(round(dens[n] * w.numel()) for n, w in weights.items())
    assert abs(active - round(0.2 * total)) <= len(weights)


def test_per_component_allocation_meets_the_target_in_backbone_and_each_head():
    net = tiny(3, 2)
    dens = neurotrails.densities(net, 0.7, allocation="per-component")
    weights = neurotrails.masked_weights(net)
    for comp in ["backbone", "head0", "head1", "head2"]:
        names = [n for n in weights if neurotrails.component(n) == comp]
        total = sum(weights[n].numel() for n in names)
        assert sum(dens[n] * weights[n].numel() for n in names) == pytest.approx(0.3 * total)


def test_llama_130m_global_solve_leaves_attention_projections_dense():
    with torch.device("meta"):
        net = neurotrails.build("llama-130m", 3, 8)
    dens = neurotrails.densities(net, 0.1)
    attn = [n for n in dens if any(f"self_attn.{p}_proj" in n for p in "qkvo")]
    assert len(attn) == 4 * (4 + 3 * 8)
    assert all(dens[n] == 1.0 for n in attn)
    # the sparsity went to the embeddings, lm_heads and MLPs instead
    assert dens["backbone.stem.weight"] < 0.9 and dens["heads.0.tail.1.weight"] < 0.9
    assert all(dens[n] < 1.0 for n in dens if "mlp" in n)


def test_the_method_above_the_banner_runs_alone_copied_with_models_and_sparsity(tmp_path):
    """What a user copies: the lines of neurotrails.py above the run-plumbing banner, beside
    models.py and sparsity.py. They import nothing else and name nothing below the banner: a net is
    built, masked at S, trained three steps with the mean loss and topology updates, and voted."""
    source = (ROOT / "neurotrails.py").read_text().splitlines()
    banner = next(i for i, line in enumerate(source) if line.startswith("# Run plumbing"))
    (tmp_path / "neurotrails.py").write_text("\n".join(source[:banner - 1]) + "\n")
    for name in ("models.py", "sparsity.py"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    code = """
import torch, neurotrails
torch.manual_seed(0)
net = neurotrails.build("wrn10-1", 3, 2, num_classes=10)
masks = neurotrails.build_masks(net, 0.8, delta_t=1, t_end=10)
opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
for step in range(1, 4):
    loss = neurotrails.ensemble_loss(net(x), y)
    opt.zero_grad(); loss.backward()
    moved = masks.update(step, opt) if masks.is_update_step(step) else {}
    opt.step(); masks.apply_(opt)
active = sum(int(m.sum()) for m in masks.masks.values())
probs = neurotrails.soft_vote(net(x))
print(len(moved) > 0, active, round(float(probs.sum(-1).mean()), 4), neurotrails.__file__, "argparse" in dir(neurotrails))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    grew, active, prob_sum, path, plumbing = out.stdout.split()
    assert grew == "True" and prob_sum == "1.0" and plumbing == "False"
    assert path == str(tmp_path / "neurotrails.py")
    torch.manual_seed(0)  # the same masks as the whole module allocates: same counts
    full = neurotrails.build_masks(tiny(), 0.8, delta_t=1, t_end=10)
    assert int(active) == sum(int(m.sum()) for m in full.masks.values())


def test_two_runs_with_one_seed_give_bitwise_equal_weights():
    def run():
        net = tiny(2, 2, seed=11)
        masks = neurotrails.build_masks(net, 0.5, seed=11, delta_t=2, t_end=20)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        g = torch.Generator().manual_seed(11)
        for step in range(1, 7):
            x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
            opt.zero_grad()
            neurotrails.ensemble_loss(net(x), y).backward()
            if masks.is_update_step(step):
                masks.update(step, opt)
            opt.step()
            masks.apply_(opt)
        return net.state_dict()
    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "neurotrails.py"), *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def test_summary_cli_json_is_consistent():
    out = run_cli("--model", "wrn28-10", "--num-heads", "3", "--blocks-in-head", "8", "--sparsity", "0.8",
                  "--json")
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert s["config"]["blocks_in_head"] == 8
    assert set(s["components"]) == {"backbone", "head0", "head1", "head2"}
    assert s["total"]["params"] == sum(c["params"] for c in s["components"].values())
    masked = sum(t["active"] for t in s["tensors"])
    total_masked = sum(torch.Size(t["shape"]).numel() for t in s["tensors"])
    assert abs(masked - round(0.2 * total_masked)) <= len(s["tensors"])
    assert {t["component"] for t in s["tensors"]} == {"backbone", "head0", "head1", "head2"}


def test_summary_cli_tables_and_bad_flags():
    out = run_cli("--model", "llama-9m", "--num-heads", "2", "--blocks-in-head", "2", "--sparsity", "0.1")
    assert out.returncode == 0, out.stderr
    assert "heads.1.tail.1.weight" in out.stdout and "total" in out.stdout
    bad = run_cli("--model", "wrn28-10", "--blocks-in-head", "13")
    assert bad.returncode == 2
    assert "--blocks-in-head must be in [1, 12] for wrn28-10, got 13" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    bad = run_cli("--sparsity", "1")
    assert bad.returncode == 2 and "argument --sparsity: must be a finite number in [0, 1), got 1" in bad.stderr


@pytest.mark.parametrize("method", ["neurotrails", "ensemble"])
def test_a_checkpoint_rebuilds_its_network_and_refuses_weights_that_do_not_fit(method):
    config = {"model": "wrn10-1", "method": method, "num_heads": 2, "blocks_in_head": None if method == "ensemble"
              else 2}
    torch.manual_seed(0)
    net = neurotrails.build_from_config(config, num_classes=7, in_channels=1).eval()
    x = torch.randn(3, 1, 16, 16)
    state = {"config": config, "model": net.state_dict(), "model_kwargs": {"num_classes": 7, "in_channels": 1}}
    again = neurotrails.model_from_checkpoint(state).eval()
    torch.testing.assert_close(again(x), net(x), rtol=0, atol=0)
    lacking = {**state, "model": {k: v for k, v in net.state_dict().items() if not k.endswith("tail.4.weight")}}
    with pytest.raises(ValueError, match="its weights do not fit the network its config names"):
        neurotrails.model_from_checkpoint(lacking)
    with pytest.raises(ValueError, match="its config lacks num_heads"):
        neurotrails.model_from_checkpoint({**state, "config": {k: v for k, v in config.items() if k != "num_heads"}})


def test_a_checkpoint_of_an_older_format_is_refused_in_one_line(tmp_path):
    torch.save({"format": "neurotrails", "version": 1, "script": "train_vision.py", "config": {}}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="checkpoint format 1, this code reads format 2 only"):
        neurotrails.load_checkpoint(tmp_path / "old.pt")


def test_logged_density_counts_mask_entries_not_nonzero_weights():
    net = tiny()
    masks = neurotrails.build_masks(net, 0.5)
    name, mask = next(iter(masks.masks.items()))
    with torch.no_grad():
        masks.weights[name][mask] = 0.0  # active weights that happen to be 0 (e.g. regrown at 0)
    by_masks = neurotrails.component_densities(net, masks)
    expected = {}
    for n, w in neurotrails.masked_weights(net).items():
        a, t = expected.get(neurotrails.component(n), (0, 0))
        active = int(masks.masks[n].sum()) if n in masks.masks else w.numel()
        expected[neurotrails.component(n)] = (a + active, t + w.numel())
    assert by_masks == {k: round(a / t, 6) for k, (a, t) in expected.items()}
    assert neurotrails.component_densities(net) == {k: 1.0 for k in expected}  # no masks: dense


def test_heartbeat_prints_step_loss_speed_and_eta_only_when_due(capsys):
    beat = neurotrails.Heartbeat("epoch 2", 10, every=0.0, enabled=True)
    beat.beat(4, torch.tensor(1.5))
    line = capsys.readouterr().out.strip()
    assert line.startswith("epoch 2: step 4/10 | loss 1.500 | ") and "ms/step | ETA " in line
    quiet = neurotrails.Heartbeat("epoch 2", 10, every=3600.0, enabled=True)
    quiet.beat(4, torch.tensor(1.5))
    neurotrails.Heartbeat("epoch 2", 10, every=0.0, enabled=False).beat(4, torch.tensor(1.5))
    assert capsys.readouterr().out == ""
