"""Claims of sparsity.py: ER/ERK budget, exact masks, mask enforcement, prune/grow rules, resume."""
import ast
import math
import subprocess
import sys
from itertools import permutations
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import sparsity

SHAPES = {  # a small conv net's worth of layers with very different ER scores
    "conv0": (16, 3, 3, 3), "conv1": (32, 16, 3, 3), "conv2": (64, 32, 3, 3),
    "short": (64, 32, 1, 1), "fc1": (256, 1024), "fc2": (10, 256),
}


def numel(shape):
    return math.prod(shape)


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.9])
def test_er_preserves_parameter_budget(density):
    dens = sparsity.er_densities(SHAPES, density)
    total = sum(numel(s) for s in SHAPES.values())
    active = sum(round(dens[n] * numel(s)) for n, s in SHAPES.items())
    # one weight of rounding per layer at most
    assert abs(active - round(density * total)) <= len(SHAPES)
    assert all(0 < d <= 1 for d in dens.values())


def test_er_has_equal_eps_across_non_saturated_layers():
    dens = sparsity.er_densities(SHAPES, 0.3)
    scores = sparsity.er_scores(SHAPES)
    eps = {n: dens[n] / scores[n] for n in SHAPES if dens[n] < 1}
    assert len(eps) >= 3
    values = list(eps.values())
    assert max(values) - min(values) <= 1e-12 * max(values)
    # ER: larger layers are sparser
    assert dens["fc1"] < dens["conv2"] < dens["conv1"]


def test_saturation_makes_highest_score_layers_dense_and_keeps_budget():
    dens = sparsity.er_densities(SHAPES, 0.6)
    scores = sparsity.er_scores(SHAPES)
    dense = {n for n, d in dens.items() if d == 1.0}
    sparse = set(SHAPES) - dense
    assert dense and sparse
    # every dense layer scores at least as high as every sparse one
    assert min(scores[n] for n in dense) >= max(scores[n] for n in sparse)
    total = sum(numel(s) for s in SHAPES.values())
    active = sum(dens[n] * numel(s) for n, s in SHAPES.items())
    assert active == pytest.approx(0.6 * total, rel=1e-12)
    assert max(dens.values()) <= 1.0


def test_density_one_is_all_dense_and_uniform_is_uniform():
    assert set(sparsity.er_densities(SHAPES, 1.0).values()) == {1.0}
    assert set(sparsity.layer_densities(SHAPES, 0.25, "uniform").values()) == {0.25}


def test_per_component_scope_meets_target_in_each_component():
    groups = {"conv0": "a", "conv1": "a", "short": "a", "conv2": "b", "fc1": "b", "fc2": "b"}
    dens = sparsity.layer_densities(SHAPES, 0.2, "er", groups)
    for g in ("a", "b"):
        names = [n for n in SHAPES if groups[n] == g]
        total = sum(numel(SHAPES[n]) for n in names)
        active = sum(dens[n] * numel(SHAPES[n]) for n in names)
        assert active == pytest.approx(0.2 * total, rel=1e-12)
    # the global solve differs: it does not hit the target inside each component
    glob = sparsity.layer_densities(SHAPES, 0.2, "er")
    a = [n for n in SHAPES if groups[n] == "a"]
    assert sum(glob[n] * numel(SHAPES[n]) for n in a) != pytest.approx(
        0.2 * sum(numel(SHAPES[n]) for n in a), rel=1e-3)


def test_bad_density_and_method_are_rejected():
    with pytest.raises(ValueError, match="density"):
        sparsity.layer_densities(SHAPES, 0.0)
    with pytest.raises(ValueError, match="allocation method"):
        sparsity.layer_densities(SHAPES, 0.5, "erdos")


@pytest.mark.parametrize("shape,density", [((7, 5), 0.3), ((64, 32, 3, 3), 0.137), ((1000,), 0.999)])
def test_random_mask_has_exact_count_and_is_bool(shape, density):
    m = sparsity.random_mask(shape, density, torch.Generator().manual_seed(0))
    assert m.dtype == torch.bool and m.shape == shape
    assert int(m.sum()) == round(density * numel(shape))


@pytest.mark.parametrize("n,k", [(1000, 1), (1000, 500), (300_000, 7), (1_000_000, 1), (1_000_000, 123_457),
                                 (1_000_000, 999_999), (2_000_000, 1_500_000)])
def test_topk_mask_selects_exactly_the_k_largest(n, k):
    g = torch.Generator().manual_seed(n + k)
    scores = torch.randn(n, generator=g)
    scores[: n // 10] = float("-inf")  # excluded entries, as masks use them
    scores[n // 10: n // 10 + 50] = 0.0  # ties
    k = min(k, n - n // 10)
    got = sparsity.topk_mask(scores, k)
    assert int(got.sum()) == k
    order = torch.sort(scores, descending=True, stable=True).values
    assert got.sum() == k and scores[got].min() >= order[k - 1]
    assert (scores[~got] <= order[k - 1]).all()


def test_drop_fraction_is_p0_at_start_and_zero_at_t_end():
    assert sparsity.drop_fraction(0, 0.5, 1000) == 0.5
    assert sparsity.drop_fraction(500, 0.5, 1000) == pytest.approx(0.25)
    assert sparsity.drop_fraction(1000, 0.5, 1000) == 0.0
    assert sparsity.drop_fraction(5000, 0.5, 1000) == 0.0
    values = [sparsity.drop_fraction(t, 0.5, 1000) for t in range(0, 1001, 50)]
    assert values == sorted(values, reverse=True)


def test_prune_magnitude_drops_the_smallest_active():
    w = torch.tensor([0.1, -5.0, 0.3, -0.2, 4.0, 0.05])
    mask = torch.tensor([True, True, True, True, False, True])
    kept = sparsity.prune_magnitude(w, mask, 2)
    assert kept.tolist() == [False, True, True, True, False, False]


def test_rigl_grows_exactly_the_top_grad_inactive_positions():
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(40, 30, generator=g)
    mask = sparsity.random_mask((40, 30), 0.3, g)
    new = sparsity.grow_rigl(grad, mask, 25)
    grown = new & ~mask
    assert int(grown.sum()) == 25 and (new & mask).equal(mask)
    inactive_scores = grad.abs()[~mask]
    expected = inactive_scores.topk(25).values
    assert torch.equal(grad.abs()[grown].sort(descending=True).values, expected)


def test_set_grows_only_inactive_positions_at_random():
    g = torch.Generator().manual_seed(0)
    mask = sparsity.random_mask((50, 50), 0.4, g)
    a = sparsity.grow_random(mask, 100, torch.Generator().manual_seed(1))
    b = sparsity.grow_random(mask, 100, torch.Generator().manual_seed(2))
    for new in (a, b):
        assert int((new & ~mask).sum()) == 100 and (new & mask).equal(mask)
    assert not torch.equal(a, b)


def _plackett_luce_inclusion(p, n):
    """Exact P(i among the n survivors) when drawing n without replacement with prob. ~ p."""
    incl = [0.0] * len(p)
    for seq in permutations(range(len(p)), n):
        prob, left = 1.0, sum(p)
        for i in seq:
            prob *= p[i] / left
            left -= p[i]
        for i in seq:
            incl[i] += prob
    return incl


@pytest.mark.parametrize("n_keep", [1, 2])
def test_soft_magnitude_survivors_follow_abs_w_to_the_temperature(n_keep):
    w = torch.tensor([0.2, -0.5, 0.8, -1.0, 1.2, 0.0, 3.0])
    mask = torch.tensor([True, True, True, True, True, True, False])
    temperature, trials = 3.0, 20000
    gen = torch.Generator().manual_seed(1234)
    counts = torch.zeros(7)
    for _ in range(trials):
        kept = sparsity.prune_soft_magnitude(w, mask, int(mask.sum()) - n_keep, temperature, gen)
        assert int(kept.sum()) == n_keep and not (kept & ~mask).any()
        counts += kept.float()
    p = [abs(float(x)) ** temperature if m else 0.0 for x, m in zip(w, mask)]
    expected = torch.tensor(_plackett_luce_inclusion(p, n_keep))
    freq = counts / trials
    # binomial standard error is at most sqrt(0.25 / 20000) = 0.0035; allow 5 of them
    assert torch.allclose(freq, expected, atol=0.018), (freq, expected)
    assert freq[5] == 0.0 and freq[6] == 0.0  # zero weight never preferred; inactive never kept


def test_soft_magnitude_works_on_a_tensor_larger_than_2_pow_24():
    n = (1 << 24) + 1001
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, generator=g)
    mask = sparsity.random_mask((n,), 0.6, g)
    k = 1_000_000
    kept = sparsity.prune_soft_magnitude(w, mask, k, 3.0, g)
    assert int(kept.sum()) == int(mask.sum()) - k
    assert not (kept & ~mask).any()
    # soft magnitude still prefers large weights: survivors are larger on average than the pruned
    pruned = mask & ~kept
    assert w.abs()[kept].mean() > 1.5 * w.abs()[pruned].mean()


def test_global_magnitude_pruning_keeps_the_largest_overall():
    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(20, 10, generator=g), "b": 3 * torch.randn(5, 4, 3, 3, generator=g)}
    masks = sparsity.global_magnitude_masks(weights, 0.25)
    allw = torch.cat([w.abs().reshape(-1) for w in weights.values()])
    k = round(0.25 * allw.numel())
    assert sum(int(m.sum()) for m in masks.values()) == k
    thr = allw.topk(k).values[-1]
    for n, w in weights.items():
        assert (w.abs()[masks[n]] >= thr).all() and (w.abs()[~masks[n]] <= thr).all()


# ----------------------------------------------------------------------------------------------
# The Masks object in a training loop


def _tiny_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32), nn.ReLU(),
                         nn.Linear(32, 5))


def _make_masks(net, density=0.3, seed=0, **kw):
    weights = {n: p for n, p in net.named_parameters() if p.dim() >= 2}
    dens = sparsity.layer_densities({n: tuple(p.shape) for n, p in weights.items()}, density, "uniform")
    gen = torch.Generator().manual_seed(seed)
    masks = {n: sparsity.random_mask(w.shape, dens[n], gen) for n, w in weights.items()}
    m = sparsity.Masks(weights, masks, seed=seed, **kw)
    m.apply_()
    return m


def _train(net, masks, optimizer, steps, seed=0, start=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(start):  # skip the batches of steps already done
        torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)
    history = []
    for step in range(start + 1, steps + 1):
        x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        if masks.is_update_step(step):  # before the step: RigL scores the loss gradient
            masks.update(step, optimizer)
            history.append({n: m.clone() for n, m in masks.masks.items()})
        optimizer.step()
        masks.apply_(optimizer)
    return history


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("prune,grow", [("magnitude", "rigl"), ("soft_magnitude", "set")])
def test_inactive_weights_and_sgd_momentum_are_exactly_zero_adam_moments_stay_warm(opt, prune, grow):
    net = _tiny_net(0)
    masks = _make_masks(net, prune=prune, grow=grow, delta_t=2, t_end=20, p0=0.5)
    counts = {n: int(m.sum()) for n, m in masks.masks.items()}
    if opt == "sgd":
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    else:
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    history = _train(net, masks, optimizer, 15)
    assert len(history) == 7  # updates at steps 2, 4, ..., 14
    assert any(not torch.equal(history[0][n], history[-1][n]) for n in counts)  # topology moved
    for snapshot in history:
        assert {n: int(m.sum()) for n, m in snapshot.items()} == counts
    for name, mask in masks.masks.items():
        w = masks.weights[name]
        assert torch.count_nonzero(w[~mask]) == 0
        state = optimizer.state[w]
        if opt == "sgd":
            assert torch.count_nonzero(state["momentum_buffer"][~mask]) == 0, name
            assert torch.count_nonzero(state["momentum_buffer"][mask]) > 0
        else:  # warm: the dense gradient's statistics, also where the weight is inactive
            assert torch.count_nonzero(state["exp_avg_sq"][~mask]) > 0, name  # not masked


def test_regrown_weights_start_at_zero_with_zero_sgd_momentum():
    net = _tiny_net(0)
    masks = _make_masks(net, grow="set", delta_t=1, t_end=100)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    _train(net, masks, optimizer, 3)
    old = {n: m.clone() for n, m in masks.masks.items()}
    for n, m in masks.masks.items():  # nonzero state at inactive positions, to prove update() clears it
        optimizer.state[masks.weights[n]]["momentum_buffer"][~m] = 1.0
    masks.update(4, optimizer)
    assert sum(int((new & ~old[n]).sum()) for n, new in masks.masks.items()) > 0
    for n, new in masks.masks.items():
        grown = new & ~old[n]
        assert torch.count_nonzero(masks.weights[n][grown]) == 0
        assert torch.count_nonzero(optimizer.state[masks.weights[n]]["momentum_buffer"][grown]) == 0


def test_a_regrown_weights_first_adam_steps_are_the_size_of_a_surviving_weights():
    """Adam's step count is global. Zeroed moments of a weight regrown at step t are bias-corrected
    with 1 - beta^t ~ 1, so its k-th step is ~ (1 - 0.9^k) / sqrt(1 - 0.999^k) x lr: 3x at k = 1,
    up to ~7x near k = 10. Warm moments keep it the size of a surviving weight's step. Measured
    here (90th percentiles over the 20 steps after a regrowth at step 1500): warm 1.7x, zeroed 9.1x."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(64, 64) * 0.1)
    target = torch.randn(64, 64)
    mask = sparsity.random_mask(w.shape, 0.5, torch.Generator().manual_seed(1))
    masks = sparsity.Masks({"w": w}, {"w": mask}, grow="rigl", delta_t=1500, t_end=3000)
    masks.apply_()
    opt = torch.optim.Adam([w], lr=1e-3)
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(2))
    worst = 0.0
    for step in range(1, 1521):
        opt.zero_grad()
        ((x @ w - x @ target) ** 2).mean().backward()
        if masks.is_update_step(step):
            old = masks.masks["w"].clone()
            masks.update(step, opt)
            grown, survived = masks.masks["w"] & ~old, masks.masks["w"] & old
        before = w.detach().clone()
        opt.step()
        masks.apply_(opt)
        if step >= 1500:
            moved = (w.detach() - before).abs()
            worst = max(worst, float(moved[grown].quantile(0.9) / moved[survived].quantile(0.9)))
    assert worst <= 3.0, worst


def test_rigl_scores_the_loss_gradient_also_with_a_foreach_sgd():
    """A multi-tensor (foreach) SGD with Nesterov momentum and no weight decay adds momentum into
    p.grad in place; the loop updates the topology before the step, so RigL sees the loss gradient."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(32, 32))
    mask = sparsity.random_mask(w.shape, 0.3, torch.Generator().manual_seed(1))
    masks = sparsity.Masks({"w": w}, {"w": mask}, grow="rigl", delta_t=3, t_end=100)
    masks.apply_()
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, nesterov=True, foreach=True)
    for step in range(1, 4):
        opt.zero_grad()
        (w.sum(1) ** 2 * torch.arange(32.0)).sum().backward()
        if masks.is_update_step(step):
            grad, old = w.grad.clone(), masks.masks["w"].clone()
            k = math.ceil(sparsity.drop_fraction(step, masks.p0, masks.t_end) * int(old.sum()))
            kept_before = sparsity.prune_magnitude(w, old, k)
            masks.update(step, opt)
        opt.step()
        masks.apply_(opt)
    assert not torch.equal(w.grad, grad)  # the hazard: after the step, p.grad holds momentum too
    grown = masks.masks["w"] & ~kept_before
    k = int(grown.sum())
    expected = grad.abs().masked_fill(kept_before, -1).flatten().topk(k).values
    assert torch.equal(grad.abs()[grown].sort(descending=True).values, expected)


def test_rigl_ties_go_to_random_positions_not_the_lowest_indices():
    """Rows of an embedding for tokens absent from the batch have exactly zero gradient: a tie."""
    grad = torch.zeros(1000, 8)
    grad[:10] = 1.0  # the tokens that occurred
    mask = torch.zeros(1000, 8, dtype=torch.bool)
    grown = sparsity.grow_rigl(grad, mask, 200, generator=torch.Generator().manual_seed(0))
    rows = grown.any(1).nonzero().squeeze(1)
    assert grown[:10].all() and int(grown.sum()) == 200  # the 80 nonzero-gradient positions first
    assert rows[10:].float().mean() > 200  # the other 120 spread over the zero rows, not rows 10-24
    again = sparsity.grow_rigl(grad, mask, 200, generator=torch.Generator().manual_seed(0))
    assert torch.equal(grown, again)  # reproducible from the generator


def test_dense_layers_are_not_stored_and_stay_dense():
    net = _tiny_net(0)
    weights = {n: p for n, p in net.named_parameters() if p.dim() >= 2}
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    masks["0.weight"] = sparsity.random_mask(weights["0.weight"].shape, 0.5)
    m = sparsity.Masks(weights, masks)
    assert list(m.masks) == ["0.weight"]
    assert m.density("2.weight") == 1.0 and m.density("0.weight") == 0.5


def test_rigl_update_needs_a_gradient():
    net = _tiny_net(0)
    masks = _make_masks(net, delta_t=1, t_end=10)
    with pytest.raises(RuntimeError, match="gradient"):
        masks.update(1)


def test_two_runs_with_one_seed_give_bitwise_equal_weights():
    def run():
        net = _tiny_net(3)
        masks = _make_masks(net, seed=3, prune="soft_magnitude", grow="rigl", delta_t=3, t_end=30)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        _train(net, masks, opt, 12, seed=3)
        return net.state_dict(), masks.masks
    (w1, m1), (w2, m2) = run(), run()
    for k in w1:
        assert torch.equal(w1[k], w2[k])
    for k in m1:
        assert torch.equal(m1[k], m2[k])


def test_mask_state_round_trips_and_reproduces_future_updates():
    kw = dict(prune="soft_magnitude", grow="set", delta_t=2, t_end=40, seed=5)
    net = _tiny_net(1)
    masks = _make_masks(net, **kw)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    _train(net, masks, opt, 6, seed=1)
    saved = ({k: v.clone() for k, v in net.state_dict().items()}, masks.state_dict(),
             __import__("copy").deepcopy(opt.state_dict()))
    tail_a = _train(net, masks, opt, 12, seed=1, start=6)

    net2 = _tiny_net(99)  # different init: everything must come from the saved state
    masks2 = _make_masks(net2, **{**kw, "seed": 77, "delta_t": 9, "prune": "magnitude"})
    opt2 = torch.optim.Adam(net2.parameters(), lr=1e-2)
    net2.load_state_dict(saved[0])
    masks2.load_state_dict(saved[1])
    opt2.load_state_dict(saved[2])
    tail_b = _train(net2, masks2, opt2, 12, seed=1, start=6)
    assert len(tail_a) == len(tail_b) == 3
    for a, b in zip(tail_a, tail_b):
        assert all(torch.equal(a[n], b[n]) for n in a)
    for k, v in net.state_dict().items():
        assert torch.equal(v, net2.state_dict()[k])


def test_sparsity_module_imports_alone_from_a_temp_dir(tmp_path):
    source = Path(sparsity.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported - set(sys.stdlib_module_names) == {"torch"}
    (tmp_path / "sparsity.py").write_text(source)
    code = "import sparsity; m = sparsity.random_mask((10, 10), 0.3); print(int(m.sum()), sparsity.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["30", str(tmp_path / "sparsity.py")]


def test_dst_without_t_end_is_refused_so_it_cannot_be_silently_off():
    net = _tiny_net(0)
    weights = {n: p for n, p in net.named_parameters() if p.dim() >= 2}
    masks = {n: sparsity.random_mask(w.shape, 0.5) for n, w in weights.items()}
    with pytest.raises(ValueError, match="needs t_end"):
        sparsity.Masks(weights, masks, delta_t=100)
    static = sparsity.Masks(weights, masks)  # the default: a static topology, said so by delta_t = 0
    assert static.delta_t == 0 and not any(static.is_update_step(s) for s in range(1, 1000))
