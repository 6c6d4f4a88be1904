"""Sparse masks and dynamic sparse training (DST) for NeuroTrails.

Paper map (Grooten, Hasanov et al. 2025, arXiv 2505.17909):
  Sec. 2.2 masks m in {0,1}, sparsity S = 1 - |m|_0 / nk  -> random_mask(), Masks
  App. B   uniform / ER / ERK layerwise densities          -> layer_densities(), er_densities()
  Sec. 3   topology update every delta_t steps             -> Masks.update()
           prune by magnitude (vision)                     -> prune_magnitude()
           prune by soft magnitude (language, Zhang 2025)  -> prune_soft_magnitude()
           regrow by RigL (largest |grad|) or SET (random) -> grow_rigl(), grow_random()
  App. E.2 drop fraction 0.5 * cosine_decay(t)             -> drop_fraction()
  App. E.2 static sparse and pruning baselines             -> Masks(delta_t=0), global_magnitude_masks()

Conventions: functions that allocate take a DENSITY d = 1 - S (fraction of weights kept).
Masks are torch.bool. A layer at density 1 is not stored in Masks and never touched.

Imports: torch and the standard library only, so this file can be copied alone into another project.

Deviations from the released code (github.com/bramgrooten/neurotrails, see README "Deviations"):
  Deviation: mask sampling. Released code: Bernoulli draw per element. Ours: exactly
    round(d_i * N_i) active weights per layer, because the budget then holds exactly.
  Optimizer state (as the released code): SGD momentum is zeroed outside the mask; Adam's moments
    are never masked. Adam's step count is global, so a zeroed exp_avg_sq would be bias-corrected
    as if settled and a regrown weight's first steps would be several times a surviving weight's
    (measured 8x after 1 step on a toy problem); warm moments (the dense gradient's statistics,
    which the dense backward provides for inactive weights too) give it a normal-size first step.
  Deviation: RigL ties. Released code (topk): the lowest indices win a tie, so rows of tokens absent
    from a batch (exactly zero gradient) are grown in token-id order. Ours: ties at random, drawn
    from the mask generator (reproducible and resumable).
  Deviation: soft magnitude on large tensors. Released code: moves tensors over 2^24 elements to
    numpy. Ours: Gumbel-top-k on the tensor's own device, any size.
  Deviation: drop-fraction floor. Released code: floors p(t) at 0.005. Ours: cosine to exactly 0
    at T_end, as the paper states.
"""
import math

import torch

# ----------------------------------------------------------------------------------------------
# Layerwise densities (App. B)


def er_scores(shapes):
    """ER / ERK raw score per layer: sum(shape) / prod(shape).

    For a linear (n_out, n_in) this is ER, (n_in + n_out) / (n_in * n_out) (Mocanu 2018); for a
    conv (out, in, kh, kw) it is ERK (Evci 2020). Larger layers get smaller scores.
    """
    return {name: sum(shape) / math.prod(shape) for name, shape in shapes.items()}


def er_densities(shapes, density):
    """ER/ERK densities d_i = eps * score_i that keep the global budget.

    Solves  sum_i d_i N_i = density * sum_i N_i  for eps. If the largest eps * score_i exceeds 1,
    every layer with that maximal score is made dense (d_i = 1), its weights are taken out of the
    right-hand side, and eps is solved again, until no layer exceeds 1 (RigL's ERK loop).
    """
    scores = er_scores(shapes)
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    budget = density * sum(numel.values())
    dense = set()
    while True:
        sparse = [n for n in shapes if n not in dense]
        if not sparse:
            break
        # eps * sum_{i sparse} score_i N_i = budget - sum_{i dense} N_i
        rhs = budget - sum(numel[n] for n in dense)
        eps = rhs / sum(scores[n] * numel[n] for n in sparse)
        top = max(scores[n] for n in sparse)
        if eps * top <= 1.0:
            break
        dense.update(n for n in sparse if scores[n] == top)
    # d_i = eps * (sum of dims / prod of dims)_i, and 1 for the saturated layers
    return {n: 1.0 if n in dense else eps * scores[n] for n in shapes}


def layer_densities(shapes, density, method="er", groups=None):
    """Density per layer for a target `density` (= 1 - S).

    method: "er" (ER for linears, ERK for convs) or "uniform" (every layer at `density`).
    groups: optional {name: group}; each group is solved to the target on its own (NeuroTrails
    Algorithm 1, "per-component" scope). None solves one budget over all layers ("global" scope,
    what the released code does).
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if method not in ("er", "uniform"):
        raise ValueError(f"unknown allocation method {method!r}; choose er or uniform")
    if groups is None:
        groups = {name: None for name in shapes}
    out = {}
    for group in dict.fromkeys(groups.values()):
        part = {n: s for n, s in shapes.items() if groups[n] == group}
        out.update(er_densities(part, density) if method == "er" else {n: density for n in part})
    return out


# ----------------------------------------------------------------------------------------------
# Masks with exact counts (Sec. 2.2): S = 1 - |m|_0 / N per layer


def random_mask(shape, density, generator=None, device=None):
    """Exactly round(density * N) active positions, chosen uniformly at random."""
    count = round(density * math.prod(shape))
    scores = torch.rand(shape, generator=generator, device=device)
    return topk_mask(scores, count)


def global_magnitude_masks(weights, density):
    """One-shot GLOBAL magnitude pruning (pruning baseline, App. E.2).

    Keeps exactly round(density * total) weights with the largest |w| over all tensors together.
    """
    names = list(weights)
    flat = torch.cat([weights[n].detach().abs().reshape(-1).float().cpu() for n in names])
    keep = topk_mask(flat, round(density * flat.numel()))
    out, start = {}, 0
    for n in names:
        w = weights[n]
        out[n] = keep[start:start + w.numel()].view(w.shape).to(w.device)
        start += w.numel()
    return out


# ----------------------------------------------------------------------------------------------
# Topology update: drop fraction, prune, grow (Sec. 2.2, 3; App. E.2)


def drop_fraction(step, p0, t_end):
    """Cosine-decayed drop fraction: p(t) = p0 * (1 + cos(pi * t / T_end)) / 2; 0 from T_end on."""
    if step >= t_end:
        return 0.0
    # p(t) = p0 * (1 + cos(pi t / T_end)) / 2
    return p0 * (1.0 + math.cos(math.pi * step / t_end)) / 2.0


def prune_magnitude(weight, mask, k):
    """Drop the k active weights with the smallest |w|: returns the mask of survivors."""
    # survivors = the (active - k) largest |w_i| among active i (inactive ones score -inf)
    scores = weight.detach().float().abs().masked_fill_(~mask, float("-inf"))
    return topk_mask(scores, active_count(mask) - k)


def prune_soft_magnitude(weight, mask, k, temperature, generator=None, scratch=None):
    """Soft-magnitude pruning (Zhang et al. 2025): drop k active weights at random.

    The n = active - k survivors are a sample WITHOUT replacement with P(i) proportional to
    |w_i|^T. Gumbel-top-k makes that exact: the n largest keys T*log|w_i| + G_i with
    G_i = -log(E_i), E_i ~ Exp(1), are such a sample (Kool et al. 2019). Runs on the weight's
    device. Exactly-zero weights get the smallest finite log, so they go first but in random order.
    scratch: optional two float32 buffers of the weight's shape, reused instead of allocated.
    """
    tiny = torch.finfo(torch.float32).tiny
    keys, u = scratch or (torch.empty_like(weight, dtype=torch.float32) for _ in range(2))
    torch.rand(weight.shape, generator=generator, device=weight.device, out=u).clamp_(min=tiny)
    # E = -log U ~ Exp(1);  key = T * log|w| - log E
    keys.copy_(weight.detach()).abs_().clamp_(min=tiny).log_().mul_(temperature)
    keys.sub_(u.log_().neg_().log_()).masked_fill_(~mask, float("-inf"))
    return topk_mask(keys, active_count(mask) - k)


def grow_rigl(grad, mask, k, scratch=None, generator=None):
    """RigL growth (Evci 2020): activate the k inactive positions with the largest |grad|, ties at
    the threshold broken at random with `generator` (lowest indices without one).
    scratch: optional float32 buffer of the gradient's shape, reused instead of allocated."""
    scores = torch.empty_like(grad, dtype=torch.float32) if scratch is None else scratch
    # grown = argtop-k over inactive i of |g_i| (active ones score -inf)
    scores.copy_(grad.detach()).abs_().masked_fill_(mask, float("-inf"))
    return mask | topk_mask(scores, k, generator)


def grow_random(mask, k, generator=None):
    """SET growth (Mocanu 2018): activate k inactive positions uniformly at random."""
    scores = torch.rand(mask.shape, generator=generator, device=mask.device)
    scores.masked_fill_(mask, float("-inf"))
    return mask | topk_mask(scores, k)


# ----------------------------------------------------------------------------------------------
# The one stateful object: masks of a model's weights, enforced and evolved


class Masks:
    """Bool masks for named weights, enforced after every optimizer step and evolved by DST.

    Training loop contract:
        loss.backward()
        if masks.is_update_step(step): masks.update(step, optimizer)   # before the step: p.grad is
        optimizer.step(); masks.apply_(optimizer)                       # the loss gradient (a foreach
                                                                        # SGD adds momentum into it)

    prune: "magnitude" | "soft_magnitude";  grow: "rigl" | "set";  delta_t = 0 (the default):
    static sparse. DST (delta_t > 0) needs t_end, the step at which the drop fraction reaches 0
    (usually the run's total steps): no default, so a copied module cannot switch DST off by accident.
    """

    def __init__(self, weights, masks, *, prune="magnitude", grow="rigl", temperature=3.0,
                 p0=0.5, delta_t=0, t_end=None, seed=0):
        if prune not in ("magnitude", "soft_magnitude"):
            raise ValueError(f"unknown prune method {prune!r}; choose magnitude or soft_magnitude")
        if grow not in ("rigl", "set"):
            raise ValueError(f"unknown grow method {grow!r}; choose rigl or set")
        if delta_t > 0 and not t_end:
            raise ValueError("DST (delta_t > 0) needs t_end > 0: the step at which the drop fraction reaches 0, "
                             "usually the total number of optimizer steps")
        self.weights = dict(weights)
        # Layers at density 1 are not stored: they stay dense and cost nothing.
        self.masks = {n: m.to(torch.bool) for n, m in masks.items() if not bool(m.all())}
        self.prune, self.grow, self.temperature = prune, grow, temperature
        self.p0, self.delta_t, self.t_end = p0, delta_t, t_end  # delta_t: steps between updates
        self.generator = torch.Generator().manual_seed(seed)
        self.num_updates = 0
        self._buffers = {}  # device -> float32 scratch for update(), see _scratch()

    @torch.no_grad()
    def apply_(self, optimizer=None):
        """Set weights outside the mask, and their optimizer state, to exactly 0."""
        for name, mask in self.masks.items():
            weight = self.weights[name]
            weight.mul_(mask)
            for buf in _state_tensors(optimizer, weight):
                buf.mul_(mask)

    def is_update_step(self, step):
        """Every delta_t steps, strictly before t_end (at t_end the drop fraction is 0)."""
        return self.delta_t > 0 and step % self.delta_t == 0 and 0 < step < self.t_end

    @torch.no_grad()
    def update(self, step, optimizer=None, sync=None):
        """One topology update: per layer prune k = ceil(p(t) * active), then grow the same k.

        Uses each weight's current .grad (the dense, accumulated gradient) for RigL. Returns the
        number of weights moved per layer. Active counts are unchanged, exactly. sync: optional
        function applied to each new mask before it takes effect (multi-process training passes a
        broadcast from rank 0, so every process applies the same topology).
        """
        p = drop_fraction(step, self.p0, self.t_end)
        moved = {}
        for name, old in self.masks.items():
            weight = self.weights[name]
            k = math.ceil(p * active_count(old))
            if k == 0:
                continue
            gen = self._device_generator(weight.device)
            scratch = self._scratch(weight)
            if self.prune == "magnitude":
                kept = prune_magnitude(weight, old, k)
            else:
                kept = prune_soft_magnitude(weight, old, k, self.temperature, gen, scratch)
            if self.grow == "rigl":
                if weight.grad is None:
                    raise RuntimeError(f"RigL growth needs the gradient of {name}; call update "
                                       "after backward and before optimizer.step()")
                new = grow_rigl(weight.grad, kept, k, scratch[0], gen)
            else:
                new = grow_random(kept, k, gen)
            if sync is not None:
                new = sync(new)
            # Pruned weights go to 0; new connections start at 0 (SGD momentum 0, Adam moments
            # warm); a weight pruned and regrown in the same update keeps its value (as in RigL).
            keep = old & new
            weight.mul_(keep)
            for buf in _state_tensors(optimizer, weight):
                buf.mul_(keep)
            self.masks[name] = new
            moved[name] = k
        self.num_updates += 1
        return moved

    def _scratch(self, weight):
        """Two float32 buffers shaped like `weight`, views of per-device buffers kept across
        updates: fresh 100 MB temporaries cost page faults on every update on a CPU."""
        size = 2 * weight.numel()
        buf = self._buffers.get(weight.device)
        if buf is None or buf.numel() < size:
            largest = 2 * max(w.numel() for n, w in self.weights.items() if n in self.masks)
            buf = self._buffers[weight.device] = torch.empty(largest, device=weight.device)
        return buf[:weight.numel()].view(weight.shape), buf[weight.numel():size].view(weight.shape)

    def _device_generator(self, device):
        """A generator on `device`, seeded from the CPU generator, so one state resumes all."""
        seed = int(torch.randint(2**62, (1,), generator=self.generator))
        return torch.Generator(device=device).manual_seed(seed)

    def density(self, name):
        mask = self.masks.get(name)
        return 1.0 if mask is None else active_count(mask) / mask.numel()

    def state_dict(self):
        return {
            "masks": {n: m.cpu() for n, m in self.masks.items()},
            "generator": self.generator.get_state(),
            "num_updates": self.num_updates,
            "config": {"prune": self.prune, "grow": self.grow, "temperature": self.temperature,
                       "p0": self.p0, "delta_t": self.delta_t, "t_end": self.t_end},
        }

    def load_state_dict(self, state):
        names = set(state["masks"])
        if not names <= set(self.weights):
            raise ValueError(f"mask state names weights this model lacks: {sorted(names - set(self.weights))[:3]}")
        for key, value in state["config"].items():
            setattr(self, key, value)
        self.masks = {n: m.to(device=self.weights[n].device, dtype=torch.bool)
                      for n, m in state["masks"].items()}
        self.generator.set_state(state["generator"])
        self.num_updates = state["num_updates"]


def broadcast_mask(mask):
    """Rank 0's mask on every process of a torch.distributed group: the `sync` of Masks.update
    (gloo has no bool broadcast, so it goes through uint8)."""
    import torch.distributed as dist
    t = mask.to(torch.uint8)
    dist.broadcast(t, 0)
    return t.bool()


def _state_tensors(optimizer, weight):
    """The optimizer state that is masked with the weight: SGD's momentum_buffer. Adam's exp_avg
    and exp_avg_sq stay warm (see the module docstring: zeroing them under a global step count
    makes a regrown weight's first steps too large)."""
    if optimizer is None:
        return []
    state = optimizer.state.get(weight, {})
    buf = state.get("momentum_buffer")
    return [buf] if torch.is_tensor(buf) and buf.shape == weight.shape else []


# ----------------------------------------------------------------------------------------------
# Internals: exact top-k selection, the primitive under every mask decision (speed-ups below
# the paper's functions: nothing above depends on how they are fast)


def _kth_largest(flat, k):
    """Value of the k-th largest entry of a 1-D tensor (1 <= k <= numel).

    Large tensors: bracket the answer with quantiles of a strided sample of 65,536 entries, then
    run kthvalue on the entries inside the bracket only. This is exact (the bracket is verified
    by counting, with a full kthvalue as fallback) and about 3x faster than kthvalue on 24.6M
    entries on a 2-core CPU.
    """
    n = flat.numel()
    if k * 1000 < n:  # few entries wanted: a partial sort is cheapest
        return flat.topk(k).values[-1]
    if n <= 1 << 18:
        return flat.kthvalue(n - k + 1).values
    sample = flat[:: n // (1 << 16)].sort().values
    s = sample.numel()
    q, margin = 1.0 - k / n, 5.0 / math.sqrt(s) + 1.0 / s
    lo = sample[max(int((q - margin) * s), 1) - 1]
    hi = sample[min(math.ceil((q + margin) * s), s) - 1]
    above = flat > hi
    need = k - int(torch.count_nonzero(above))
    if need > 0 and lo < hi:
        band = flat[(flat > lo).logical_xor_(above)]  # lo < x <= hi
        if need <= band.numel():
            return band.kthvalue(band.numel() - need + 1).values
    return flat.kthvalue(n - k + 1).values


def topk_mask(scores, k, generator=None):
    """Bool mask (shape of `scores`) with exactly k True at the k largest scores.

    Ties at the threshold go to the lowest flat indices (deterministic), or, given a generator
    (on the scores' device), to a uniformly random subset of the tied positions.
    """
    flat = scores.reshape(-1)
    if k <= 0 or k >= flat.numel():
        return torch.full_like(scores, k > 0, dtype=torch.bool)
    thr = _kth_largest(flat, k)
    mask = flat >= thr
    if int(torch.count_nonzero(mask)) > k:  # ties at thr: keep the lowest indices among them
        torch.gt(flat, thr, out=mask)
        need = k - int(torch.count_nonzero(mask))
        tied = (flat == thr).nonzero().squeeze(1)
        if generator is not None:
            tied = tied[torch.randperm(len(tied), generator=generator, device=tied.device)]
        mask[tied[:need]] = True
    return mask.view_as(scores)


def active_count(mask):
    """Number of True entries (count_nonzero: ~25x faster than bool .sum() on CPU)."""
    return int(torch.count_nonzero(mask))
