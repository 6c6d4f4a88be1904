"""NeuroTrails: a shared sparse backbone, M independently initialised sparse heads, soft voting.

Paper map (arXiv 2505.17909):
  Sec. 3, Fig. 1   split F at block l: backbone F_s = f_l o ... o f_1, heads F_h^(i)   -> build()
  Sec. 3           loss L = 1/M sum_i L_i                                            -> ensemble_loss()
  Sec. 3, App. G   prediction = mean of the heads' class probabilities               -> soft_vote()
  Sec. 3, Alg. 1   backbone and heads initialised to sparsity S (ER/ERK)             -> build_masks()
  Sec. 4, App. E   baselines as settings: single, TreeNet, full ensemble, static, pruning -> METHODS
  App. E.3         each method's training budget (Tables 11-14)                      -> method_budget()
Below the banner "Run plumbing": what the scripts share (argparse types, run folders, checksummed
checkpoints, --config, sweeps, results files). `python neurotrails.py --model wrn28-10` prints a
configuration's split and sparsity allocation without training.

Imports: the method (everything above the banner) imports torch and the project's models.py and
sparsity.py only, and uses nothing below the banner: those lines, with the two files, are the method
on their own (a test copies them alone and trains). The plumbing imports the standard library it
needs below the banner.

Deviations from the released code (see README "Deviations"):
  Deviation: final BatchNorm of WRN. Released code: one final BN shared by all heads. Ours: each
    head owns its final BN, because it is part of the head's tail and heads are independent.
  Deviation: LLaMA final norm. Released code: applies the final RMSNorm twice. Ours: once per head.
  Deviation: loss. Released LM code sums the heads' losses. Ours: the mean (paper Sec. 3), both domains.
  Deviation: aggregation. Released code averages logits. Ours: mean of probabilities (paper App. E,
    G); aggregate="logits" gives the released behaviour, labelled as such.
"""
import math
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import models
import sparsity

MAX_HEADS = 64  # M above this is a typo, not an experiment (the paper goes to M = 20, Fig. 6)

# ----------------------------------------------------------------------------------------------
# The network: backbone + heads (Sec. 3, Fig. 1)


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


def build(model, num_heads=3, blocks_in_head=None, full_ensemble=False, **model_kwargs):
    """NeuroTrails / TreeNet / single / full-ensemble network from a base model: a name of
    models.build, or a function returning a fresh models.SplitNet (stem -> blocks -> tail).

    M base networks are built one after another from the current RNG state, so every head is
    independently initialised; the backbone is taken from the first. blocks_in_head = |F_h|;
    the backbone keeps the stem and the first L - |F_h| blocks. full_ensemble: no shared part,
    each head is a whole model. Sparsity is separate: see build_masks().
    """
    if not 1 <= num_heads <= MAX_HEADS:  # before building: 10^8 heads would never finish
        raise ValueError(f"--num-heads must be in [1, {MAX_HEADS}], got {num_heads}")
    # a name of models.build, or any function that returns a fresh models.SplitNet
    bases = [models.build(model, **model_kwargs) if isinstance(model, str) else model(**model_kwargs)
             for _ in range(num_heads)]
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
    if not 1 <= num_heads <= MAX_HEADS:
        raise ValueError(f"--num-heads must be in [1, {MAX_HEADS}], got {num_heads}")
    if not full_ensemble and not 1 <= blocks_in_head <= num_blocks:
        raise ValueError(f"--blocks-in-head must be in [1, {num_blocks}] for {model}, got {blocks_in_head}")
    if not 0.0 <= sparsity_ < 1.0:
        raise ValueError(f"--sparsity must be in [0, 1), got {sparsity_}")


def default_blocks_in_head(model, num_blocks):
    """The paper's value where it gives one (App. E.2), else about 2/3 of the blocks."""
    return models.DEFAULT_BLOCKS_IN_HEAD.get(model, max(1, round(2 * num_blocks / 3)))


# ----------------------------------------------------------------------------------------------
# Loss and prediction


def ensemble_loss(logits, targets, ignore_index=-100):
    """L = 1/M sum_i CE(y_hat^(i), y). logits: (M, ..., C); targets: (...)."""
    num_heads, num_classes = logits.shape[0], logits.shape[-1]
    per_head = F.cross_entropy(logits.reshape(-1, num_classes), targets.reshape(-1).repeat(num_heads),
                               ignore_index=ignore_index, reduction="none").view(num_heads, -1)
    valid = (targets.reshape(-1) != ignore_index).sum().clamp(min=1)
    # L = 1/M sum_i L_i, L_i = mean over the valid targets of head i's cross-entropy
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


def component_densities(net, masks=None):
    """Density of the masked tensors of the backbone and each head: active mask entries / weights
    (a weight outside `masks`, a sparsity.Masks, is dense). Mask entries, not nonzero values: a
    weight regrown at 0 is active, and so is a trained weight that happens to be 0."""
    held = masks.masks if masks is not None else {}
    counts = {}
    for name, w in masked_weights(net).items():
        c = counts.setdefault(component(name), [0, 0])
        c[0] += sparsity.active_count(held[name]) if name in held else w.numel()
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


# ----------------------------------------------------------------------------------------------
# The method table (Sec. 4, App. E.2): every method of the paper is a setting of one network and
# one training loop. Scripts ask this table; they never compare method names.


class Method(NamedTuple):
    single: bool          # M = 1 whatever --num-heads says (the dense base network)
    full_ensemble: bool   # M independent whole models, no shared backbone, each on its own data order
    sparse: bool          # trains at sparsity S (ER/ERK masks); False: dense, S = 0
    evolves: bool         # the topology changes by DST every Delta T steps (prune + regrow)
    loss: str             # "mean": L = 1/M sum_i L_i (Sec. 3); "sum": each member trains as if alone
    epochs: str           # which epoch budget of a recipe it gets: dense | treenet | sparse | pruning
    prunes: bool = False  # dense until half-way, then one-shot global magnitude pruning, then fixed

    @property
    def masked_at_start(self):
        return self.sparse and not self.prunes


METHODS = {
    "neurotrails": Method(single=False, full_ensemble=False, sparse=True, evolves=True, loss="mean", epochs="sparse"),
    "single": Method(single=True, full_ensemble=False, sparse=False, evolves=False, loss="mean", epochs="dense"),
    "treenet": Method(single=False, full_ensemble=False, sparse=False, evolves=False, loss="mean", epochs="treenet"),
    "ensemble": Method(single=False, full_ensemble=True, sparse=False, evolves=False, loss="sum", epochs="dense"),
    "static": Method(single=False, full_ensemble=False, sparse=True, evolves=False, loss="mean", epochs="sparse"),
    "pruning": Method(single=False, full_ensemble=False, sparse=True, evolves=False, loss="mean", epochs="pruning",
                      prunes=True),
}


# ----------------------------------------------------------------------------------------------
# Training budgets (App. E.3, Tables 11-14): the paper gives each method its own length, chosen so
# that training FLOPs stay near one dense network's; comparing at equal epochs is another experiment.

BUDGETS = ("paper", "equal", "flops", "density")


def method_budget(mode, dense_budget, paper_ratio, sparsity_, step_cost):
    """Epochs (vision) or updates (language) of one method, from the single dense network's E.

    paper:   round(ratio x E), the method's ratio in the paper's table for the dataset.
    equal:   E for every method.
    flops:   round(E / c), c = the method's training FLOPs per step / the single network's, so the
             run costs what E steps of the single network cost (within half an epoch).
    density: floor(E / (1 - S)), the 1/(1-S) extension limit (Evci et al. 2020), E for dense methods.
    step_cost is c (evaluate.flops_report's train_flops_per_step_vs_single).
    """
    if mode == "paper":
        return max(1, round(paper_ratio * dense_budget))
    if mode == "equal":
        return dense_budget
    if mode == "flops":
        # the run's training FLOPs = c x steps; equal to the single network's E steps at E / c
        return max(1, round(dense_budget / step_cost))
    if mode == "density":
        return math.floor(dense_budget / (1 - sparsity_) + 1e-6)  # 1e-6: 10,000 / 0.9 = 11,111
    raise ValueError(f"--budget must be one of {', '.join(BUDGETS)}, got {mode!r}")


def param_groups(net, head_lr_scale=1.0):
    """Optimizer parameter groups: the backbone at the base learning rate, the heads at
    head_lr_scale x it (the loop sets group lr = lr x group["lr_scale"]). Why: the loss is the mean
    over heads (Sec. 3), so under SGD each head's gradient, and so its step, is 1/M of what it
    would be alone; head_lr_scale = M gives every head the step size of a single network."""
    groups = [{"params": list(net.backbone.parameters()), "lr_scale": 1.0},
              {"params": list(net.heads.parameters()), "lr_scale": head_lr_scale}]
    return [g for g in groups if g["params"]]  # a full ensemble has no backbone parameters


def num_heads_of(method, num_heads):
    """M of a run: 1 for the single network, else --num-heads."""
    return 1 if METHODS[method].single else num_heads


def build_from_config(config, **model_kwargs):
    """The network of a run's config (model, method, M, |F_h|), freshly initialised."""
    return build(config["model"], config["num_heads"], config["blocks_in_head"],
                 METHODS[config["method"]].full_ensemble, **model_kwargs)


# ==============================================================================================
# Run plumbing, shared by the project's scripts; not the method. Command-line values and errors,
# run folders, checkpoints, --config, sweeps and results files. A reader of the method can stop here.
# ==============================================================================================
# (The method above imports only torch, models.py and sparsity.py, so it can be copied alone; what
# the plumbing needs is imported here.)
import argparse  # noqa: E402
import errno  # noqa: E402
import hashlib  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.parse import quote  # noqa: E402


class HelpWithDefaults(argparse.HelpFormatter):
    """--help shows every flag's default, unless its text already says it (defaults that the
    dataset's or model's recipe fills in are None here, and their help names them)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump): error() for a bad flag (exit code 2, like
    argparse's own), fail() for what went wrong after parsing (exit code 1). The project's one
    error printer: every command line reports through these two."""

    def __init__(self, *args, **kwargs):
        # No abbreviated flags: a sweep rewrites flags by their full names, and --out must not
        # hide behind --o.
        kwargs.setdefault("formatter_class", HelpWithDefaults)
        super().__init__(*args, allow_abbrev=False, **kwargs)

    context = None  # set while checking values read from a file: errors then name it

    def error(self, message):
        fail(self.prog, f"{self.context}: {message}" if self.context else message, 2)

    def fail(self, message):
        fail(self.prog, message, 1)


def fail(prog, message, code=1):
    """`prog: error: message` as one line on stderr, then exit with `code`."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(code)


def int_in(lo, hi=None):
    """argparse type: an integer in [lo, hi] (hi None: no upper bound)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {text}")
        return value
    parse.bounds = (lo, hi, False, False)  # what the bad-input tests read
    return parse


def float_in(lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False):
    """argparse type: a finite float in the interval from lo to hi (open ends as flagged).
    NaN and +-inf are refused: every float flag of the project is a finite rate or fraction."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        inside = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
        if not math.isfinite(value) or not inside:
            if hi == math.inf:
                interval = f"{'>' if lo_open else '>='} {lo:g}"
            else:
                interval = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be a finite number {interval}, got {text}")
        return value
    parse.bounds = (lo, hi, lo_open, hi_open)
    return parse


def add_arguments(ap, sparsity=0.8, sparsity_help="", with_sparsity=True, dst=False, delta_t=None, delta_t_help="",
                  blocks_help="the paper's: 8 for WRN-28-10 and llama-130m, 10 for ResNet-50, 16 for llama-350m, "
                              "else about 2/3 of the blocks"):
    """The NeuroTrails flags shared by every command line, declared once: M, |F_h|, S (unless
    with_sparsity is False), layerwise allocation and init; with dst, the DST flags too: regrowth
    rule, drop fraction p0 and Delta T."""
    ap.add_argument("--num-heads", type=int_in(1, MAX_HEADS), default=3,
                    help=f"M, heads or ensemble members, in [1, {MAX_HEADS}] (single: 1)")
    ap.add_argument("--blocks-in-head", type=int_in(1), default=None,
                    help=f"|F_h|, blocks per head (default: {blocks_help})")
    if with_sparsity:
        ap.add_argument("--sparsity", type=float_in(0, 1, hi_open=True), default=sparsity,
                        help=f"S in [0, 1), the fraction of masked weights that are zero{sparsity_help}")
    ap.add_argument("--allocation", default="global", choices=["global", "per-component"],
                    help="ER solve over all tensors at once (released code; at S=0.1 LLaMA attention comes out "
                         "dense) or per backbone / head (Alg. 1)")
    ap.add_argument("--init", default="er", choices=["er", "uniform"], help="layerwise density rule: ER/ERK or uniform")
    if dst:
        ap.add_argument("--grow", default="rigl", choices=["rigl", "set"],
                        help="regrowth: RigL (largest |grad|) or SET (random)")
        ap.add_argument("--drop-fraction", type=float_in(0, 1), default=0.5,
                        help="p0 in [0, 1], the initial DST drop fraction (cosine decay to 0)")
        ap.add_argument("--delta-t", type=int_in(1), default=delta_t,
                        help=f"Delta T >= 1, optimizer steps between topology updates{delta_t_help}")


def check_device(device):
    """One-line ValueError unless `device` is cpu, or cuda / cuda:N with that GPU present."""
    if device == "cpu":
        return device
    match = re.fullmatch(r"cuda(?::(\d+))?", device or "")
    if not match:
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if int(match[1] or 0) >= count:
        raise ValueError(f"--device {device}: this machine has {count} CUDA GPU(s); use --device cpu")
    return device


def check_writable_file(path, flag):
    """One-line ValueError unless a file can be written at `path` (checked before the work)."""
    parent = Path(path).resolve().parent
    if Path(path).is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"{flag} {path}: cannot write there ({parent} is not a writable folder)")


RUN_FILES = ("log.jsonl", "last.pt", "config.json", "tokenizer.json", "results.json")  # what a training run writes
REPLACED = ".replaced"  # --overwrite: the old run's files, kept until the new run's first checkpoint


def check_run_folder(out, resume=None, overwrite=False):
    """Refuse (one-line ValueError) an --out that would lose or mix runs; writes nothing.

    A folder that holds a run is continued only by --resume of its own last.pt, replaced only
    with --overwrite; a folder in use by a running process (its .lock held) is refused.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    holds = held_run(out)
    own = _resumes_here(resume, out)
    if holds and not own and not overwrite:
        how = f"continue it with --resume {out / 'last.pt'}, or " if (out / "last.pt").exists() else ""
        raise ValueError(f"--out {out} already holds a run ({' and '.join(holds)}); {how}replace it with --overwrite")
    if _locked(out / ".lock"):
        raise ValueError(f"--out {out} is in use by another running process (see {out / '.lock'})")
    parent = next(p for p in [out, *out.resolve().parents] if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"--out {out}: cannot create or write it ({parent} is not writable)")


def held_run(out):
    """What in `out` makes it a run: a log with lines, a checkpoint. A run that stopped before its
    first checkpoint and log line left only config.json (and an empty log): a re-run may start there."""
    out = Path(out)
    return [f for f in ("log.jsonl", "last.pt") if (out / f).exists() and (f != "log.jsonl" or (out / f).stat().st_size)]


def _resumes_here(resume, out):
    """True when --resume names a checkpoint inside --out: the run continues in its own folder."""
    return resume is not None and Path(resume).resolve().parent == Path(out).resolve()


_HELD = set()  # run folders of this process: a record lock does not exclude its own process


def _locked(path):
    """True while a run holds `path`, a run folder's .lock: this process (_HELD) or another one
    (its POSIX record lock). Record locks (fcntl.lockf) belong to a process: the kernel drops them
    when it dies, even by SIGKILL, and forked children (DataLoader workers) never hold them."""
    import fcntl  # POSIX only: imported where used, so the module itself still imports anywhere
    if path.parent.resolve() in _HELD:
        return True  # (and opening the file here would release this process's lock on closing it)
    if not path.exists():
        return False
    with open(path) as f:  # closing it releases the shared lock taken to test
        try:
            fcntl.lockf(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                return True
            raise
    return False


class run_folder:
    """Context manager: create --out, hold its .lock while training (a run of another process on
    the same folder is refused; see _locked); with --overwrite, set the run it replaces aside;
    resuming into another folder, start it with the checkpoint resumed from."""

    def __init__(self, out, resume=None, overwrite=False):
        self.out, self.resume, self.overwrite, self.lock = Path(out), resume, overwrite, None

    def __enter__(self):
        import fcntl
        check_run_folder(self.out, self.resume, self.overwrite)  # again: another run may have started since
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.lock = open(self.out / ".lock", "w")
        except OSError as e:
            raise ValueError(f"--out {self.out}: cannot create it ({e.strerror})") from None
        try:
            fcntl.lockf(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.lock.close()
            raise ValueError(f"--out {self.out} is in use by another running process") from None
        self.lock.write(f"{os.getpid()}\n")
        self.lock.flush()
        _HELD.add(self.out.resolve())
        own = _resumes_here(self.resume, self.out)
        (self.out / "last.pt.tmp").unlink(missing_ok=True)  # left by a kill during a save; we hold the lock
        if self.overwrite and not own and held_run(self.out):
            # the run it replaces goes aside, not away, until the new run saves its first checkpoint
            # (save_checkpoint removes REPLACED); a run stopped before that gets it back (__exit__)
            shutil.rmtree(self.out / REPLACED, ignore_errors=True)
            (self.out / REPLACED).mkdir()
            for name in RUN_FILES:
                if (self.out / name).exists():
                    os.replace(self.out / name, self.out / REPLACED / name)
        if self.resume is not None and not own:  # the new folder is a whole run from the start
            try:  # a hard link costs nothing; saves replace it by rename, so the original stays as it is
                os.link(self.resume, self.out / "last.pt")
            except OSError:
                shutil.copyfile(self.resume, self.out / "last.pt")
        return self.out

    def __exit__(self, *exc):
        if (self.out / REPLACED).is_dir():  # stopped before its first checkpoint: the old run comes back
            kept = {p.name for p in (self.out / REPLACED).iterdir()}
            for name in RUN_FILES:  # what this run wrote (config.json, a log) goes; the old files return
                if name in kept:
                    os.replace(self.out / REPLACED / name, self.out / name)
                else:
                    (self.out / name).unlink(missing_ok=True)
            shutil.rmtree(self.out / REPLACED, ignore_errors=True)
        _HELD.discard(self.out.resolve())
        if exc[0] is None:  # a clean exit leaves no .lock behind (after a crash it stays, unheld: harmless)
            (self.out / ".lock").unlink(missing_ok=True)
        self.lock.close()  # closing releases the lock
        return False


CHECKPOINT_VERSION = 2  # 2: a SHA-256 checksum of the state, verified on every load
CHECKPOINT_KEYS = {  # what each script needs to resume exactly
    "train_vision.py": ("config", "epoch", "step", "model", "optimizer", "masks", "rng", "model_kwargs"),
    "train_lm.py": ("config", "update", "tokens", "model", "optimizer", "masks", "rng", "data", "model_kwargs"),
}


CONFIG_KEYS = {  # what reading a checkpoint back (evaluation, export, resume) takes from its config
    "train_vision.py": ("model", "method", "num_heads", "blocks_in_head", "dataset", "aggregate"),
    "train_lm.py": ("model", "method", "num_heads", "blocks_in_head", "dataset", "seq_len", "tokenizer"),
}


def nonfinite_tensor(state, prefix=""):
    """Name of the first floating-point tensor in a nested dict/list holding NaN or inf, else None
    (weights, BatchNorm running statistics and optimizer moments alike)."""
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    for key, value in items:
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return name
        elif isinstance(value, (dict, list, tuple)):
            found = nonfinite_tensor(value, name)
            if found:
                return found
    return None


def state_checksum(state):
    """SHA-256 of a nested checkpoint state: every tensor's dtype, shape and bytes, every other
    value's repr, dict keys in sorted order. A flipped or zeroed byte anywhere changes it."""
    digest = hashlib.sha256()

    def walk(value):
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{t.dtype}{tuple(value.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                digest.update(f"K{key!r}".encode())
                walk(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"L{len(value)}".encode())
            for item in value:
                walk(item)
        else:
            digest.update(f"V{value!r}".encode())
    walk(state)
    return digest.hexdigest()


def save_checkpoint(path, script, state):
    """Write {format, version, script, **state, checksum} atomically: a temporary file in the same
    folder, fsync, rename over `path`, fsync of the folder, so a kill at any moment leaves either
    the old or the new checkpoint whole. Refuses a state with a non-finite tensor
    (FloatingPointError); a failed write (full disk, ...) removes the temporary file and raises
    OSError with one line, the previous checkpoint intact."""
    bad = nonfinite_tensor(state)
    if bad:
        raise FloatingPointError(f"{bad} holds NaN or inf")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    state = {**{k: v for k, v in state.items() if k != "checksum"}, "format": "neurotrails",
             "version": CHECKPOINT_VERSION, "script": script}
    state["checksum"] = state_checksum(state)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        shutil.rmtree(path.parent / REPLACED, ignore_errors=True)  # --overwrite: the old run is now replaced
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except (OSError, RuntimeError) as e:  # a full disk surfaces as RuntimeError from torch's zip writer
        tmp.unlink(missing_ok=True)
        kept = f"the previous {path} is intact" if path.exists() else "no checkpoint was written"
        reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
        free = shutil.disk_usage(path.parent).free / 2**20
        raise OSError(getattr(e, "errno", None) or errno.EIO,
                      f"could not write {path} ({' '.join(reason.split())[:100]}; {free:.1f} MiB free there); "
                      f"{kept}") from None


def load_checkpoint(path, script=None, flag="--resume", config=None, may_differ=(), mmap=False):
    """A checkpoint of this project as a dict (CPU tensors, weights_only), verified: one-line
    ValueError for a file that is not one, is corrupted (checksum), holds NaN or inf, was written
    by another script than `script`, or (given the resuming run's config) has a config that
    differs in a key outside may_differ. mmap: map the file and read only its config and script
    (no verification: nothing of the weights is used)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag} {path}: no such checkpoint")
    try:  # weights_only: tensors and plain values only, so loading a file never runs its code
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise ValueError(f"{flag} {path}: not a checkpoint of this project (unreadable: {type(e).__name__}; "
                         "a checkpoint of it is then corrupted or truncated)") from None
    if not isinstance(state, dict) or state.get("format") != "neurotrails" or state.get("script") not in CHECKPOINT_KEYS:
        raise ValueError(f"{flag} {path}: not a checkpoint of this project (no train_vision.py / train_lm.py state)")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{flag} {path}: checkpoint format {state.get('version')}, this code reads format "
                         f"{CHECKPOINT_VERSION} only; use the project's version that wrote it")
    # Whose and which version, then whole (checksum) and finite, then complete, then the same run.
    writer = state["script"]
    if script is not None and writer != script:
        raise ValueError(f"{flag} {path}: written by {writer}, not {script}; use {writer} for it")
    if not mmap:
        stored = state.pop("checksum", None)
        if stored != state_checksum(state):
            raise ValueError(f"{flag} {path}: corrupted (its contents do not match the checksum saved with it); "
                             "use an earlier copy or start the run again")
        bad = nonfinite_tensor(state)
        if bad:
            raise ValueError(f"{flag} {path}: {bad} holds NaN or inf; this checkpoint cannot be used")
    missing = [k for k in CHECKPOINT_KEYS[writer] if k not in state]
    if missing:
        raise ValueError(f"{flag} {path}: incomplete {writer} checkpoint (lacks {', '.join(missing)})")
    lacking = [k for k in CONFIG_KEYS[writer] if not isinstance(state["config"], dict) or k not in state["config"]]
    if lacking:
        raise ValueError(f"{flag} {path}: incomplete {writer} checkpoint (its config lacks {', '.join(lacking)})")
    if config is not None:
        old = state["config"]
        diff = sorted(k for k in set(config) | set(old) if k not in may_differ and config.get(k) != old.get(k))
        if diff:
            detail = ", ".join(f"{k}: checkpoint {old.get(k)!r} vs now {config.get(k)!r}" for k in diff[:4])
            raise ValueError(f"{flag} {path}: checkpoint is from a different configuration ({detail})")
    return state


def model_from_checkpoint(state, device="cpu", path="checkpoint"):
    """The network of a loaded checkpoint, with its weights: what evaluate.py and export_bench.py
    read. The config says which network (model, method, M, |F_h|); model_kwargs its in/out sizes."""
    config = state["config"]
    missing = [k for k in ("model", "method", "num_heads", "blocks_in_head") if k not in config]
    if missing or config.get("method") not in METHODS:
        raise ValueError(f"{path}: its config lacks {', '.join(missing) or 'a known method'}; it cannot be rebuilt")
    with torch.device(device):  # not meta: non-persistent buffers (LLaMA's rotary frequencies) are built, not saved
        net = build_from_config(config, **state["model_kwargs"])
    try:
        net.load_state_dict(state["model"])
    except RuntimeError as e:  # missing or extra weights, wrong shapes
        raise ValueError(f"{path}: its weights do not fit the network its config names "
                         f"({' '.join(str(e).split())[:160]})") from None
    return net


def restore(state, net, optimizer, **settings):
    """Put a checkpoint back: weights, optimizer state, masks (returned; None for a dense run) and
    the global RNG. settings: optimizer values that this run sets anew (a resume may change them;
    e.g. momentum, weight_decay), applied over the restored param_groups."""
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    for group in optimizer.param_groups:
        group.update(settings)
    masks = None
    if state["masks"] is not None:
        masks = sparsity.Masks(masked_weights(net), {})
        masks.load_state_dict(state["masks"])
    torch.set_rng_state(state["rng"])
    return masks


def record_resume(config, state, resume, keys, at):
    """Note a resume in config["resumed"] (kept across resumes); returns the settings among `keys`
    that this resume changes, {key: [old, new]}, or None."""
    old = state["config"]
    changed = {k: [old.get(k), config[k]] for k in keys if old.get(k) != config[k]} or None
    config["resumed"] = old.get("resumed", []) + [{at: state[at], "from": str(resume), "changed": changed}]
    return changed


def last_good(path):
    """The advice of a divergence error: the checkpoint to resume from, or that there is none."""
    return (f"the last finite checkpoint is {path}: --resume it with a lower --lr" if path else
            "no checkpoint was saved; start again with a lower --lr")


def add_run_arguments(ap, out_help):
    """The run flags of both trainers: --out, --resume, --overwrite, --device, --bf16, --head-lr-scale,
    --sweep, --seeds and --config."""
    ap.add_argument("--out", default=None, help=f"output folder (default: {out_help}); a folder that holds a run "
                    "is refused unless --resume or --overwrite")
    ap.add_argument("--resume", default=None, help="continue exactly from this last.pt (into --out, which may be "
                    "another folder: the run starts there with this checkpoint and its log)")
    ap.add_argument("--overwrite", action="store_true", help="replace the run that --out holds (kept aside until the new run has saved its first checkpoint)")
    ap.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast (default: on with CUDA)")
    ap.add_argument("--head-lr-scale", type=float_in(0, 1e3, lo_open=True), default=1.0,
                    help="learning rate of the heads = this x --lr (default 1: the paper). The loss is the mean "
                         "over the M heads, so under SGD each head steps 1/M as far as a network alone; M undoes that")
    ap.add_argument("--sweep", action="append", default=[], metavar="FLAG=V1,V2,...",
                    help="run every value of FLAG (any flag that takes a value, e.g. blocks-in-head=1,2,4,8 or "
                         "method=single,treenet); repeat for a product grid; one run folder per point under --out "
                         "(named by its values), all run in this process; re-running the same command skips finished "
                         "points (those whose stored config is the one it would run now; --overwrite re-runs points "
                         "whose stored run differs) and resumes interrupted ones; points another process is running "
                         "are left to it, so several processes can share one grid")
    ap.add_argument("--seeds", default=None, metavar="S1,S2,...",
                    help="run every point of the grid with each of these seeds (default: --seed)")
    ap.add_argument("--config", default=None, metavar="RUN.json",
                    help="start from a stored run's settings (its config.json or results.json); flags given "
                         "after it override them; where it ran (--out, --device, bf16) is not carried over")


# Keys of a stored config that describe where and how a run ran, not what it is: not carried by --config.
CONFIG_NOT_CARRIED = ("out", "device", "bf16", "channels_last", "world_size", "resumed", "sweep", "seeds", "config",
                      "resume", "overwrite", "compare")


# Keys of a stored config that follow from the others (the method's own budget and its cost).
CONFIG_DERIVED = ("epochs", "updates", "train_flops_vs_single", "infer_flops_vs_single")


def with_config(ap, argv):
    """argv with --config FILE's settings put in front as flags, so they pass the same checks as
    typed flags and every flag on the command line overrides them."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    path = pre.parse_known_args(argv)[0].config
    if path is None:
        return argv
    try:
        stored = json.loads(Path(path).read_text())
        if isinstance(stored, dict) and isinstance(stored.get("config"), dict):
            stored = stored["config"]  # results.json keeps the config under "config"
        if not isinstance(stored, dict):
            raise ValueError(f"holds a JSON {type(stored).__name__}, not an object of settings")
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        ap.error(f"--config {path}: not a run's config.json or results.json "
                 f"({e.strerror if isinstance(e, OSError) else e})")
    # every dest of this command line -> its flag (--epochs stores E as dense_epochs)
    flags = {a.dest: a.option_strings[0] for a in ap._actions if a.option_strings}
    unknown = [k for k in stored if k not in flags and k not in CONFIG_NOT_CARRIED and k not in CONFIG_DERIVED]
    if unknown:
        ap.error(f"--config {path}: unknown key {unknown[0]!r} (not a setting of {ap.prog}; check its spelling "
                 "against --help, which names each flag, key = flag without -- and with _ for -)")
    carried = []
    for key, value in stored.items():
        if key in CONFIG_NOT_CARRIED or key in CONFIG_DERIVED or value is None or value is False:
            continue
        carried += [flags[key]] + ([] if value is True else [str(value)])
    ap.context = f"--config {path}"  # a bad stored value is reported with the file it came from
    ap.parse_args(carried)
    ap.context = None
    return carried + argv


def run_command(main, argv, parse_args, resolve, run, supported, show, eval_only):
    """A trainer's command line: `--eval-only ...` -> eval_only(rest); a sweep (every point in this
    process, as main(point argv)); else --method, or each method of --compare in OUT/<method> (or
    its default folder); then show(rows {method: record}, folder for compare.md or None) on rank 0.
    parse_args(argv) -> (parser, args); resolve(args) -> a run's config; run(config, resume,
    overwrite) -> its record."""
    if argv[:1] == ["--eval-only"]:
        return eval_only(argv[1:])
    ap, args = parse_args(argv)
    try:
        if args.sweep or args.seeds is not None:
            return run_sweep(main, argv, args, lambda point: resolve(parse_args(point)[1]))
        if args.compare is not None and args.resume:
            raise ValueError("--resume continues one run; it cannot be combined with --compare")
        methods = [m.strip() for m in args.compare.split(",")] if args.compare is not None else [args.method]
        if not all(methods):
            raise ValueError(f"--compare {args.compare!r}: give comma-separated methods, e.g. single,neurotrails")
        bad = [m for m in methods if m not in supported]
        if bad:
            raise ValueError(f"--compare: unknown method {bad[0]!r}; choose from {', '.join(supported)}")
        init_distributed()
        rows = {}
        for m in methods:
            out = args.out if not args.compare else None if args.out is None else f"{args.out}/{m}"
            if args.compare:
                print(f"\n== {m}", flush=True)
            rows[m] = run(resolve(argparse.Namespace(**{**vars(args), "method": m, "out": out})),
                          args.resume, args.overwrite)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            show(rows, args.out if args.compare else None)
    except (ValueError, OSError, FloatingPointError) as e:
        ap.fail(e)


def init_distributed():
    """Under torchrun (WORLD_SIZE > 1): join the process group, NCCL on GPUs, gloo on CPU."""
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")



# ----------------------------------------------------------------------------------------------
# Sweeps and results files (paper Sec. 5: every analysis is a grid of runs over one or two flags)

# Flags a sweep owns or that would mix runs: never an axis.
SWEEP_OWNED = ("--sweep", "--seeds", "--seed", "--out", "--resume", "--overwrite", "--compare")


def sweep_grid(specs, seeds, default_seed=0):
    """[(name, [(flag, value), ...], seed)] for --sweep specs x --seeds, seeds outermost (so a
    grid cut short has every point of the first seeds). ValueError names the bad spec."""
    axes = []
    for spec in specs:
        name, sep, values = spec.partition("=")
        flag = "--" + name.strip().lstrip("-")
        values = [v.strip() for v in values.split(",")]
        if not sep or flag == "--" or not all(values):
            raise ValueError(f"--sweep {spec!r}: expected FLAG=V1,V2,... (e.g. blocks-in-head=1,2,4)")
        if flag in SWEEP_OWNED:
            raise ValueError(f"--sweep {spec!r}: {flag} cannot be swept" +
                             (" (use --seeds)" if flag == "--seed" else ""))
        if any(flag == f for f, _ in axes):
            raise ValueError(f"--sweep {spec!r}: {flag} is swept twice")
        if len(set(values)) < len(values):
            raise ValueError(f"--sweep {spec!r}: a value is repeated")
        axes.append((flag, values))
    try:
        seeds = [int(s) for s in seeds.split(",")] if seeds is not None else [default_seed]
    except ValueError:
        raise ValueError(f"--seeds {seeds!r}: expected comma-separated integers (e.g. 0,1,2)") from None
    if len(set(seeds)) < len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds {','.join(map(str, seeds))}: seeds must be distinct and >= 0")
    grid = []
    for seed in seeds:
        for values in itertools.product(*(v for _, v in axes)):
            flags = [(f, v) for (f, _), v in zip(axes, values)]
            # values quoted (/ -> %2F): distinct values never share a folder
            name = "_".join(f"{f[2:]}={quote(str(v), safe='.,+-=@')}" for f, v in flags + [("--seed", seed)])
            grid.append((name, flags, seed))
    return grid


def sweep_argv(argv):
    """The trainer's command line without the flags a sweep sets per point."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in SWEEP_OWNED:
            skip = token != "--overwrite"
        elif not token.startswith(tuple(f + "=" for f in SWEEP_OWNED)):
            kept.append(token)
    return kept


# Config keys that say where or how a run ran, not what it computes: a finished point whose stored
# config differs from the current one only in these is still finished.
SWEEP_SAME_RUN = ("out", "device", "workers", "data_workers", "world_size", "resumed", "eval_every", "log_every",
                  "save_every", "stop_after", "data_dir")


def config_differences(stored, now):
    """Keys whose values differ between a stored run config and the one a point would run now."""
    keys = (set(stored) | set(now)) - set(SWEEP_SAME_RUN)
    return sorted(k for k in keys if json.dumps(stored.get(k), sort_keys=True) != json.dumps(now.get(k), sort_keys=True))


def run_sweep(main, argv, args, resolve):
    """Run every point of `args.sweep` x `args.seeds` in this process, each as main(<point's flags>)
    in --out/<name>. resolve(point argv) -> the point's config (ValueError names a bad flag): every
    point is resolved before the first one runs. Each run seeds itself from its config (model,
    masks, data order), so a point does not depend on the points before it.

    A point is finished (skipped) when its folder holds results.json of the same config; one whose
    stored config differs is reported (re-run with --overwrite); one with a last.pt resumes from it;
    one whose folder another process has locked is left to it, so several processes (one per core or
    GPU) can share a grid. A failing point is reported and the sweep goes on; exit code 1 then.
    Ctrl-C stops the sweep; the same command continues it.
    """
    if not args.out:
        raise ValueError("--sweep / --seeds need --out DIR, the folder that holds one run folder per point")
    if args.compare or args.resume:
        raise ValueError("--sweep / --seeds run their own points: sweep method=... instead of --compare, "
                         "and re-run the same command instead of --resume")
    points = sweep_points(argv, args, resolve)
    start = time.perf_counter()
    statuses = [(name, run_point(main, Path(args.out) / name, point, config, args.overwrite,
                                 f"[{i}/{len(points)}] {name}")) for i, (name, point, config) in enumerate(points, 1)]
    failed, stale, elsewhere = ([n for n, s in statuses if s == kind] for kind in ("failed", "stale", "elsewhere"))
    total = f"{len(points)} points in {time.perf_counter() - start:.0f} s"
    if elsewhere:
        total += f" ({len(elsewhere)} left to the processes running them: {', '.join(elsewhere)})"
    if failed or stale:
        raise ValueError(f"sweep: {len(failed)} of {total} failed{': ' + ', '.join(failed) if failed else ''}"
                         + (f"; {len(stale)} differ from their stored runs (not re-run; --overwrite re-runs them): "
                            f"{', '.join(stale)}" if stale else "")
                         + "; re-run the same command to retry (finished points are skipped)")
    print(f"sweep: {total}; report: python evaluate.py report {args.out} --out REPORT", flush=True)


def sweep_points(argv, args, resolve):
    """[(name, argv, config)] of every point: the command's own flags (minus those a sweep sets) +
    the point's values, seed and folder, each resolved (checked) before the first runs, so a typo
    fails in seconds, naming its point."""
    grid, base = sweep_grid(args.sweep, args.seeds, args.seed), [t for t in sweep_argv(argv) if t != "--overwrite"]
    points = []
    for name, flags, seed in grid:
        point = [*base, *(t for f, v in flags for t in (f, v)), "--seed", str(seed), "--out", str(Path(args.out) / name)]
        try:
            points.append((name, point, resolve(point)))
        except ValueError as e:
            raise ValueError(f"sweep point {name}: {e}") from None
    return points


def run_point(main, folder, point, config, overwrite, head):
    """One point, by the state of its folder: in use by another process ("elsewhere"), a stored run
    that differs ("stale", unless overwrite), finished ("skipped"), interrupted (resumed from its
    last.pt) or new; returns what happened: elsewhere, stale, skipped, failed or done."""
    if _locked(folder / ".lock"):  # another process of the same grid runs it
        print(f"{head}: in use by another process, left to it", flush=True)
        return "elsewhere"
    stored = _stored_config(folder)
    differs = config_differences(stored, config) if stored is not None else []
    if differs and not overwrite:
        print(f"{head}: NOT re-run: its stored run differs in {', '.join(differs[:4])}; --overwrite re-runs it",
              flush=True)
        return "stale"
    if (folder / "results.json").exists() and not differs:
        print(f"{head}: finished, skipped", flush=True)
        return "skipped"
    if (folder / "last.pt").exists() and not differs:
        point, what = point + ["--resume", str(folder / "last.pt")], "resuming"
    else:  # nothing there, only a config (stopped before its first checkpoint), or a differing run
        point, what = point + (["--overwrite"] if held_run(folder) else []), "running"
    print(f"{head}: {what} -> {folder}", flush=True)
    t0 = time.perf_counter()
    try:
        main(point)
        code = 0
    except SystemExit as e:  # the trainer's one-line error was printed
        code = e.code if isinstance(e.code, int) else 1
    if code and _locked(folder / ".lock"):  # another process took the point in the same instant
        print(f"{head}: in use by another process, left to it", flush=True)
        return "elsewhere"
    if code:
        print(f"{head}: FAILED (exit code {code}); the other points go on", flush=True)
        return "failed"
    print(f"{head}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return "done"


def _stored_config(folder):
    """The config a point's folder holds (results.json's, else config.json's), or None."""
    for name in ("results.json", "config.json"):
        try:
            data = json.loads((Path(folder) / name).read_text())
        except (OSError, ValueError):
            continue
        return data.get("config", data) if name == "results.json" else data
    return None


class Heartbeat:
    """Off a terminal (no progress bar): one line every `every` seconds, e.g. `epoch 3: step 120/390
    | loss 1.234 | 212 ms/step | ETA 57 s`. `beat(done, loss)` per step; loss is read (a device
    sync) only when a line is printed."""

    def __init__(self, what, total, every=60.0, enabled=None):
        self.what, self.total, self.every = what, total, every
        self.enabled = (not sys.stdout.isatty()) if enabled is None else enabled
        self.start = self.last = time.perf_counter()

    def beat(self, done, loss):
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every and done:
            self.last, per_step = now, (now - self.start) / done
            print(f"{self.what}: step {done}/{self.total} | loss {float(loss):.3f} | {1000 * per_step:.0f} ms/step | "
                  f"ETA {per_step * (self.total - done):.0f} s", flush=True)


def machine_info():
    """CPU model, core count and the ISA flags that decide kernel speed; the GPU if any."""
    cpu, flags, ids = "", set(), {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not cpu:
                cpu = value.strip()
            elif key.strip() in ("cpu family", "model") and key.strip() not in ids:
                ids[key.strip()] = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
        if ids:  # a VM may name its CPU only "AMD EPYC": family and model say which one
            cpu += f" (family {ids.get('cpu family', '?')}, model {ids.get('model', '?')})"
    except OSError:
        import platform
        cpu = platform.processor()
    isa = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                       "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8") if f in flags]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "isa": isa, "gpu": gpu}


def package_versions():
    """Versions of Python and of every package the project uses that is installed."""
    from importlib import metadata
    out = {"python": sys.version.split()[0]}
    for name in ("torch", "torchvision", "transformers", "datasets", "numpy", "onnx", "onnxruntime", "deepsparse",
                 "lm-eval"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_commit(root=None):
    """The commit of the clone at `root` (this project's by default), read from .git without starting
    a process, or None outside a clone. In a worktree .git is a file naming its own folder, whose
    `commondir` holds the shared refs."""
    git = Path(root or Path(__file__).resolve().parent) / ".git"
    try:
        if git.is_file():  # "gitdir: /path/.git/worktrees/name"
            git = (git.parent / git.read_text().split(":", 1)[1].strip()).resolve()
        common = (git / (git / "commondir").read_text().strip()).resolve() if (git / "commondir").is_file() else git
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head  # a detached HEAD names the commit itself
        ref = head[5:]
        for folder in (git, common):
            if (folder / ref).is_file():
                return (folder / ref).read_text().strip()
        for line in (common / "packed-refs").read_text().splitlines():  # after git gc
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return None


def rounded(value, digits=7):
    """Floats of a nested record to `digits` significant digits, what a float32 metric means: logs
    and results.json read 0.843, not 0.8429999947547913."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def write_results(out, script, config, record, wall_time_s):
    """OUT/results.json, written when a run has reached its budget: final metrics, the config,
    time (this process's wall time; the training time summed over the log, resumes included),
    versions, commit, machine. Its presence marks the run finished (a sweep skips it)."""
    out = Path(out)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()] \
        if (out / "log.jsonl").exists() else []
    train_time = sum(r.get("epoch_time_s", r.get("interval_time_s", 0.0)) for r in log)
    results = {"script": script, "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]]),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "metrics": record, "config": config,
               "wall_time_s": wall_time_s, "train_time_s": train_time, "versions": package_versions(), "git_commit": git_commit(),
               "machine": machine_info()}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(rounded(results), indent=1, default=float))
    os.replace(tmp, out / "results.json")
    return out / "results.json"


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
    ap = Parser(description="Print a NeuroTrails configuration's split and sparsity allocation without "
                "training (nothing is downloaded).")
    ap.add_argument("--model", default="wrn28-10", help="base network: " + ", ".join(models.model_names()))
    add_arguments(ap, 0.8, "; 0 gives TreeNet / dense")
    ap.add_argument("--full-ensemble", action="store_true", help="M independent full models, no backbone")
    ap.add_argument("--num-classes", type=int_in(1), default=100, help="classes of a vision model")
    ap.add_argument("--vocab-size", type=int_in(1), default=32000, help="vocabulary of a LLaMA model")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = ap.parse_args()
    kwargs = ({"vocab_size": args.vocab_size} if models.is_language_model(args.model)
              else {"num_classes": args.num_classes})
    try:
        with torch.device("meta"):  # shapes only: instant even for LLaMA-350M
            net = build(args.model, args.num_heads, args.blocks_in_head, args.full_ensemble, **kwargs)
            dens = densities(net, args.sparsity, args.allocation, args.init)
    except ValueError as e:  # one line naming the flag, no usage dump
        ap.error(str(e))
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
