"""NeuroTrails: a shared sparse backbone, M independently initialised sparse heads, soft voting.

Paper map (arXiv 2505.17909):
  Sec. 3, Fig. 1  split F at block l: backbone F_s = f_l o ... o f_1, heads F_h^(i)  -> build()
  Sec. 3          composite loss L = 1/M sum_i L_i                                   -> ensemble_loss()
  Sec. 3, App. G  prediction = mean of the heads' class probabilities               -> soft_vote()
  Sec. 3, Alg. 1  backbone and heads initialised to sparsity S (ER)                 -> build_masks()
  Sec. 4          baselines: single dense (M=1, S=0), TreeNet (M heads, S=0),
                  full ensemble (M independent full models)                       -> build() flags

`python neurotrails.py --model wrn28-10 --num-heads 3 --blocks-in-head 8 --sparsity 0.8` prints the
configuration (per masked tensor: component, shape, density, active count; per component: totals)
without training. Add --json for one JSON object.

Imports: torch, and the project's models.py and sparsity.py.

Deviations from the released code (see README "Deviations"):
  Deviation: final BatchNorm of WRN. Released code: one final BN shared by all heads. Ours: each
    head owns its final BN, because it is part of the head's tail and heads are independent.
  Deviation: LLaMA final norm. Released code: applies the final RMSNorm twice. Ours: once per head.
  Deviation: loss. Released LM code sums the heads' losses. Ours: the mean (paper Sec. 3), both domains.
  Deviation: aggregation. Released code averages logits. Ours: mean of probabilities (paper App. E,
    G); aggregate="logits" gives the released behaviour, labelled as such.
"""
import argparse
import json
import sys
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

import models
import sparsity


class NeuroTrails(nn.Module):
    """backbone (computed once) -> M heads; forward returns per-head logits stacked on dim 0."""

    def __init__(self, backbone, heads, blocks_in_head=None):
        super().__init__()
        self.backbone, self.heads = backbone, nn.ModuleList(heads)
        self.blocks_in_head = blocks_in_head  # |F_h|; None for a full ensemble

    def forward(self, x):
        h = self.backbone(x)  # h_s = F_s(x), shared by every head
        # y_hat^(i) = F_h^(i)(h_s)
        return torch.stack([head(h) for head in self.heads])

    @property
    def num_heads(self):
        return len(self.heads)


class Members(nn.Module):
    """Full-ensemble forward in training: member i on its own batch xs[i] (each member has its own
    data order); one module, so DistributedDataParallel can wrap it."""

    def __init__(self, net):
        super().__init__()
        self.heads = net.heads

    def forward(self, xs):
        return torch.stack([head(x) for head, x in zip(self.heads, xs)])


def validate(model, num_heads, blocks_in_head, num_blocks, sparsity_, full_ensemble=False):
    """Raise ValueError with one line naming the flag and its valid range."""
    if num_heads < 1:
        raise ValueError(f"--num-heads must be >= 1, got {num_heads}")
    if not full_ensemble and not 1 <= blocks_in_head <= num_blocks:
        raise ValueError(f"--blocks-in-head must be in [1, {num_blocks}] for {model}, got {blocks_in_head}")
    if not 0.0 <= sparsity_ < 1.0:
        raise ValueError(f"--sparsity must be in [0, 1), got {sparsity_}")


def default_blocks_in_head(model, num_blocks):
    """The paper's value where it gives one (App. E.2), else about 2/3 of the blocks."""
    return models.DEFAULT_BLOCKS_IN_HEAD.get(model, max(1, round(2 * num_blocks / 3)))


def build(model, num_heads=3, blocks_in_head=None, full_ensemble=False, **model_kwargs):
    """NeuroTrails / TreeNet / single / full-ensemble network from a base model name.

    M base networks are built one after another from the current RNG state, so every head is
    independently initialised; the backbone is taken from the first. blocks_in_head = |F_h|;
    the backbone keeps the stem and the first L - |F_h| blocks. full_ensemble: no shared part,
    each head is a whole model. Sparsity is separate: see build_masks().
    """
    if num_heads < 1:
        raise ValueError(f"--num-heads must be >= 1, got {num_heads}")
    bases = [models.build(model, **model_kwargs) for _ in range(num_heads)]
    num_blocks = len(bases[0].blocks)  # L
    if blocks_in_head is None:
        blocks_in_head = num_blocks if full_ensemble else default_blocks_in_head(model, num_blocks)
    validate(model, num_heads, blocks_in_head, num_blocks, 0.0, full_ensemble)
    if full_ensemble:
        return NeuroTrails(nn.Identity(), [_named(b, 0, with_stem=True) for b in bases], None)
    split = num_blocks - blocks_in_head  # l, the split index
    first = bases[0]
    backbone = nn.Sequential(OrderedDict(
        [("stem", first.stem)] + [(f"block{j}", first.blocks[j]) for j in range(split)]))
    return NeuroTrails(backbone, [_named(b, split, with_stem=False) for b in bases], blocks_in_head)


def _named(base, start, with_stem):
    """Sequential of blocks[start:] + tail (+ stem first), keeping the base's block numbers."""
    parts = [("stem", base.stem)] if with_stem else []
    parts += [(f"block{j}", base.blocks[j]) for j in range(start, len(base.blocks))]
    return nn.Sequential(OrderedDict(parts + [("tail", base.tail)]))


# ----------------------------------------------------------------------------------------------
# Loss and prediction


def ensemble_loss(logits, targets, ignore_index=-100):
    """L = 1/M sum_i CE(y_hat^(i), y). logits: (M, ..., C); targets: (...)."""
    num_heads, num_classes = logits.shape[0], logits.shape[-1]
    per_head = F.cross_entropy(logits.reshape(-1, num_classes), targets.reshape(-1).repeat(num_heads),
                               ignore_index=ignore_index, reduction="none").view(num_heads, -1)
    valid = (targets.reshape(-1) != ignore_index).sum().clamp(min=1)
    return (per_head.sum(1) / valid).mean()


def soft_vote(logits, aggregate="probs"):
    """Ensemble class probabilities from per-head logits (M, ..., C).

    probs (paper): y_bar = 1/M sum_i softmax(y_hat^(i)).
    logits (released code): softmax(1/M sum_i y_hat^(i)).
    """
    if aggregate == "probs":
        # Eq. (App. G): y_bar = 1/M sum_i softmax(F_h^i(F_s(x)))
        return logits.float().softmax(-1).mean(0)
    if aggregate == "logits":
        return logits.float().mean(0).softmax(-1)
    raise ValueError(f"--aggregate must be probs or logits, got {aggregate!r}")


# ----------------------------------------------------------------------------------------------
# Sparsity of a NeuroTrails network


def component(name):
    """'backbone' or 'head<i>' for a parameter name of a NeuroTrails model."""
    parts = name.split(".")
    return "backbone" if parts[0] == "backbone" else f"head{parts[1]}"


def masked_weights(net):
    """Every conv (4-D) and linear / embedding (2-D) weight; biases and norm weights stay dense."""
    return {n: p for n, p in net.named_parameters() if p.dim() >= 2}


def densities(net, sparsity_, allocation="global", init="er"):
    """Layerwise densities for sparsity S: ER/ERK or uniform, solved globally or per component."""
    if not 0.0 <= sparsity_ < 1.0:
        raise ValueError(f"--sparsity must be in [0, 1), got {sparsity_}")
    if allocation not in ("global", "per-component"):
        raise ValueError(f"--allocation must be global or per-component, got {allocation!r}")
    shapes = {n: tuple(p.shape) for n, p in masked_weights(net).items()}
    groups = {n: component(n) for n in shapes} if allocation == "per-component" else None
    return sparsity.layer_densities(shapes, 1.0 - sparsity_, init, groups)


def component_densities(net):
    """Fraction of nonzero weights in the masked tensors of the backbone and each head."""
    counts = {}
    for name, w in masked_weights(net).items():
        c = counts.setdefault(component(name), [0, 0])
        c[0] += int(torch.count_nonzero(w))
        c[1] += w.numel()
    return {k: round(a / n, 6) for k, (a, n) in counts.items()}


def build_masks(net, sparsity_, allocation="global", init="er", seed=0, **dst):
    """Random masks with exact counts at the allocated densities, applied to the weights.

    dst: prune, grow, temperature, p0, delta_t, t_end (see sparsity.Masks).
    """
    weights = masked_weights(net)
    gen = torch.Generator().manual_seed(seed)
    dens = densities(net, sparsity_, allocation, init)
    masks = {n: sparsity.random_mask(w.shape, dens[n], gen).to(w.device)
             for n, w in weights.items() if dens[n] < 1.0}
    out = sparsity.Masks(weights, masks, seed=seed, **dst)
    out.apply_()
    return out


def summary(net, dens):
    """Per masked tensor and per component: parameters, active parameters, density."""
    tensors, comps = [], {}
    for name, p in net.named_parameters():
        d = dens.get(name, 1.0)
        active = round(d * p.numel())
        c = comps.setdefault(component(name), {"params": 0, "active": 0})
        c["params"] += p.numel()
        c["active"] += active
        if name in dens:
            tensors.append({"name": name, "shape": list(p.shape), "component": component(name),
                            "density": d, "active": active})
    total = {"params": sum(c["params"] for c in comps.values()),
             "active": sum(c["active"] for c in comps.values())}
    for c in [*comps.values(), total]:
        c["density"] = c["active"] / c["params"]
    return {"tensors": tensors, "components": comps, "total": total}


def _print_summary(config, s):
    print(" ".join(f"{k}={v}" for k, v in config.items()))
    print(f"{'tensor':<44} {'shape':<22} {'component':<9} {'density':>8} {'active':>12}")
    for t in s["tensors"]:
        print(f"{t['name']:<44} {'x'.join(map(str, t['shape'])):<22} {t['component']:<9} "
              f"{t['density']:>8.4f} {t['active']:>12,}")
    print(f"\n{'component':<10} {'params':>14} {'active':>14} {'density':>8}")
    for name, c in [*s["components"].items(), ("total", s["total"])]:
        print(f"{name:<10} {c['params']:>14,} {c['active']:>14,} {c['density']:>8.4f}")


def main():
    ap = argparse.ArgumentParser(description="Print a NeuroTrails configuration's split and "
                                 "sparsity allocation without training (nothing is downloaded).")
    ap.add_argument("--model", default="wrn28-10", help="base network: " + ", ".join(models.model_names()))
    ap.add_argument("--num-heads", type=int, default=3, help="M, number of heads (1 = single model)")
    ap.add_argument("--blocks-in-head", type=int, default=None,
                    help="|F_h|, blocks per head (default: paper's value for the model, else ~2/3 of L)")
    ap.add_argument("--sparsity", type=float, default=0.8, help="S in [0, 1); 0 gives TreeNet / dense")
    ap.add_argument("--allocation", default="global", choices=["global", "per-component"],
                    help="solve layer densities over all tensors at once, or per backbone / head")
    ap.add_argument("--init", default="er", choices=["er", "uniform"], help="layerwise density rule")
    ap.add_argument("--full-ensemble", action="store_true", help="M independent full models, no backbone")
    ap.add_argument("--num-classes", type=int, default=100, help="classes of a vision model")
    ap.add_argument("--vocab-size", type=int, default=32000, help="vocabulary of a LLaMA model")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = ap.parse_args()
    kwargs = ({"vocab_size": args.vocab_size} if models.is_language_model(args.model)
              else {"num_classes": args.num_classes})
    try:
        with torch.device("meta"):  # shapes only: instant even for LLaMA-350M
            net = build(args.model, args.num_heads, args.blocks_in_head, args.full_ensemble, **kwargs)
            dens = densities(net, args.sparsity, args.allocation, args.init)
    except ValueError as e:  # one line naming the flag, no usage dump
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    config = {"model": args.model, "num_heads": args.num_heads, "blocks_in_head": net.blocks_in_head,
              "full_ensemble": args.full_ensemble, "sparsity": args.sparsity,
              "allocation": args.allocation, "init": args.init}
    s = summary(net, dens)
    if args.json:
        print(json.dumps({"config": config, **s}))
    else:
        _print_summary(config, s)


if __name__ == "__main__":
    main()
