"""Measurements of an ensemble: accuracy, NLL, ECE, prediction disagreement, FLOPs, plots.

Paper map (arXiv 2505.17909):
  App. F    accuracy, NLL, ECE with 15 bins (Guo 2017)           -> accuracy(), nll(), ece()
  Sec. 5.2  prediction disagreement between heads               -> disagreement()
  App. F    inference FLOPs: active weights x output positions   -> inference_flops()
  App. F    training FLOPs (RigL App. H), `evaluate.py flops`     -> train_flops_per_example(), flops_report()
  Sec. 4.1  robustness to CIFAR-100-C corruptions (Fig. 2)      -> train_vision.py (corrupted test sets are data)
  Sec. 5.2  disagreement / accuracy over training (Fig. 4)      -> plot_history(), `evaluate.py history`
  Sec. 5    the analyses as grids of runs (Fig. 3, 5, 6, 7, 8)   -> write_report(), `evaluate.py report`
  Sec. 4.2  perplexity of the soft vote, per head, mean of logits -> perplexity(), target_logprobs()
  Table 5   zero-shot tasks through lm-eval-harness              -> `evaluate.py lm-eval`, harness_model()
  App. K    each head's prediction on test images (Fig. 9)      -> plot_head_grid()
            reliability diagram                                 -> plot_reliability()

The metric functions are pure: they take per-head probabilities (M, N, C) or ensemble
probabilities (N, C) and labels (N), and touch no model. This module imports only the library
(models.py, neurotrails.py): the trainers import it for the metrics, never the other way round.
A checkpoint is evaluated by the script that wrote it (`train_vision.py --eval-only --checkpoint
PATH`), where its data loading lives: the test set, an ImageFolder, the corrupted test sets
(CIFAR-100-C files or generated) and the validation text. This module starts no process.

Deviation: prediction disagreement. Released code: averages an M x M matrix including its zero
  diagonal, which understates the pairwise mean by a factor (M-1)/M. Ours: the mean over the
  M(M-1)/2 pairs, and also the fraction of samples on which the heads do not all agree.
"""
import contextlib
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn

import models
import neurotrails
from neurotrails import float_in, int_in

# ----------------------------------------------------------------------------------------------
# Metrics (pure functions)


def accuracy(probs, labels):
    """Fraction of samples whose arg-max class is the label."""
    return (probs.argmax(-1) == labels).float().mean().item()


def nll(probs, labels, eps=1e-12):
    """Mean negative log-likelihood of the true class: -1/N sum_n log p_n[y_n]."""
    # NLL = -1/N sum_n log max(p_n[y_n], eps): eps keeps one confident mistake from being infinite
    return -probs.gather(-1, labels[:, None]).clamp_min(eps).log().mean().item()


def confidence_bins(probs, bins=15):
    """(confidence, prediction, bin index) per sample; bin b holds confidences in (b/bins, (b+1)/bins]."""
    conf, pred = probs.max(-1)
    return conf, pred, (conf * bins).ceil().long().clamp(1, bins) - 1


def ece(probs, labels, bins=15):
    """Expected calibration error with equal-width confidence bins (Guo et al. 2017):
    ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|, bins (0, 1/15], ..., (14/15, 1]."""
    conf, pred, idx = confidence_bins(probs, bins)
    correct = (pred == labels).float()
    # |B_b| * (acc(B_b) - conf(B_b)) = sum over the bin of (correct_n - conf_n); ECE = sum_b |that| / N
    gap = torch.zeros(bins).index_add_(0, idx, correct - conf)
    return (gap.abs().sum() / len(labels)).item()


def disagreement(head_probs):
    """Prediction disagreement between the M heads (Sec. 5.2).

    Returns (any, pairwise): the fraction of samples on which the heads do not all predict the
    same class, and the mean over the M(M-1)/2 head pairs of the fraction of samples they differ on.
    """
    preds = head_probs.argmax(-1)  # (M, N)
    num_heads = preds.shape[0]
    if num_heads < 2:
        return 0.0, 0.0
    # PD_any = 1/N sum_n [not all heads predict the same class for n]
    any_ = (preds != preds[:1]).any(0).float().mean().item()
    # PD_pair = 1/(M(M-1)/2) sum_{i<j} 1/N sum_n [pred_i(n) != pred_j(n)]  (no zero diagonal)
    pairs = [(preds[i] != preds[j]).float().mean() for i in range(num_heads) for j in range(i + 1, num_heads)]
    return any_, torch.stack(pairs).mean().item()


def summarize(head_logits, labels, aggregate="probs"):
    """All metrics of one evaluation from per-head logits (M, N, C) and labels (N)."""
    head_probs = head_logits.float().softmax(-1)
    probs = neurotrails.soft_vote(head_logits, aggregate)
    pd_any, pd_pair = disagreement(head_probs)
    return {"acc": accuracy(probs, labels), "nll": nll(probs, labels), "ece": ece(probs, labels),
            "pd_any": pd_any, "pd_pairwise": pd_pair,
            "head_acc": [accuracy(p, labels) for p in head_probs]}


@torch.no_grad()
def predict(net, batches):
    """Per-head logits (M, N, C) and labels (N) over `batches`, in eval mode under no_grad."""
    was_training = net.training
    device = next(net.parameters()).device
    net.eval()
    logits, labels = [], []
    for x, y in batches:
        logits.append(net(x.to(device)).float().cpu())
        labels.append(y)
    net.train(was_training)
    return torch.cat(logits, 1), torch.cat(labels)


# ----------------------------------------------------------------------------------------------
# Language models: perplexity (Sec. 4.2, Table 4)


def target_logprobs(logits, targets):
    """Log-probability of each target token from per-head logits (M, ..., V) and targets (...):
    per head (M, ...); soft vote log(1/M sum_i p_i) (...); and under the mean of the logits (...).
    Targets equal to -100 get a value too (of token 0); mask them out."""
    num_heads = logits.shape[0]
    logp = logits.float().log_softmax(-1)
    index = targets.clamp(min=0).unsqueeze(-1)
    heads = logp.gather(-1, index.expand(*logp.shape[:-1], 1)).squeeze(-1)
    # log of the mean of the heads' probabilities of the target: logsumexp_i log p_i - log M
    vote = heads.logsumexp(0) - math.log(num_heads)
    mean_logits = logits.float().mean(0).log_softmax(-1).gather(-1, index).squeeze(-1)
    return heads, vote, mean_logits


@torch.no_grad()
def perplexity(net, batches, autocast=None):
    """exp(token-weighted mean NLL) over `batches` of (input ids (B, T), targets (B, T), -100 =
    ignore): of the soft vote ('ppl', the paper's), of the mean of logits ('ppl_logits', the released
    code's rule) and of each head alone ('ppl_heads')."""
    was_training = net.training
    device = next(net.parameters()).device
    net.eval()
    sums, count = None, 0
    for ids, targets in batches:
        ids, targets = ids.to(device), targets.to(device)
        with autocast or contextlib.nullcontext():
            logits = net(ids)
        heads, vote, mean_logits = target_logprobs(logits, targets)
        valid = targets != -100
        nll = -torch.cat([vote[None], mean_logits[None], heads]).double().mul(valid).flatten(1).sum(1)
        sums = nll if sums is None else sums + nll
        count += int(valid.sum())
    net.train(was_training)
    if not count:
        raise ValueError("perplexity: no target tokens to evaluate on")
    # PPL = exp(-1/T sum_t log p(y_t)), T = target tokens of the whole budget (not a mean of batch means)
    ppl = (sums / count).exp().tolist()
    return {"ppl": ppl[0], "ppl_logits": ppl[1], "ppl_heads": ppl[2:], "eval_tokens": count}


@torch.no_grad()
def score_continuations(net, pairs, max_len, batch_size=16, aggregate="probs", pad_id=0):
    """For each (context ids, continuation ids): the log-probability of the continuation given the
    context under the ensemble, and whether it is the ensemble's greedy continuation. The last
    max_len + 1 tokens are kept (context first to go); the context must not be empty."""
    device = next(net.parameters()).device
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = [(ctx + cont)[-(max_len + 1):] for ctx, cont in pairs[i:i + batch_size]]
        width = max(len(c) for c in chunk) - 1
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        targets = torch.full((len(chunk), width), -100, dtype=torch.long)
        for row, ((_, cont), seq) in enumerate(zip(pairs[i:i + batch_size], chunk)):
            ids[row, :len(seq) - 1] = torch.tensor(seq[:-1])
            n = min(len(cont), len(seq) - 1)  # right padding: the scored tokens end at len(seq) - 1
            targets[row, len(seq) - 1 - n:len(seq) - 1] = torch.tensor(seq[-n:])
        logits = net(ids.to(device)).float()
        targets = targets.to(device)
        heads, vote, mean_logits = target_logprobs(logits, targets)
        logprob = vote if aggregate == "probs" else mean_logits
        valid = targets != -100
        greedy = neurotrails.soft_vote(logits, aggregate).argmax(-1) == targets
        for row in range(len(chunk)):
            out.append((float(logprob[row][valid[row]].double().sum()), bool(greedy[row][valid[row]].all())))
    return out


def harness_model(net, tokenizer, max_len, batch_size=16, aggregate="probs"):
    """An lm-eval-harness model (lm_eval.api.model.LM) whose log-likelihoods are the ensemble's."""
    from lm_eval.api.model import LM
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    class EnsembleLM(LM):
        def loglikelihood(self, requests, disable_tqdm=False):
            pairs = []
            for context, continuation in (r.args for r in requests):
                # as the harness' HF model: trailing spaces of the context belong to the continuation,
                # and the continuation's tokens are those of the whole string after the context's
                spaces = len(context) - len(context.rstrip())
                if spaces:
                    context, continuation = context[:-spaces], context[-spaces:] + continuation
                ctx = encode(context)
                whole = encode(context + continuation)
                pairs.append((ctx or [eos], whole[len(ctx):] if ctx else whole))
            return score_continuations(net, pairs, max_len, batch_size, aggregate, pad)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            results = []
            for (text,) in (r.args for r in requests):
                # disjoint windows (as the harness' HF model): each scores max_len tokens given the
                # token before them and the window's own earlier tokens
                tokens = [eos] + encode(text)
                pairs = [(tokens[s - 1:s], tokens[s:s + max_len]) for s in range(1, len(tokens), max_len)]
                results.append(sum(lp for lp, _ in score_continuations(net, pairs, max_len, batch_size,
                                                                     aggregate, pad)))
            return results

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError("generation tasks are not supported: the paper's zero-shot tasks "
                                      "(Table 5) are all scored by log-likelihood")

    return EnsembleLM()


# ----------------------------------------------------------------------------------------------
# FLOPs (App. F, following RigL App. H)


@torch.no_grad()
def inference_flops(net, example, active=None):
    """Dense and sparse forward FLOPs for one input of `example`'s shape (batch of 1 counted).

    Per conv / linear: FLOPs = 2 x (weights used) x (output positions); sparse counts only the
    active weights: `active` {parameter name: count} if given (works on the meta device), else the
    nonzero weights. The backbone runs once per forward, so it is counted once. Biases, norms,
    activations, pooling and attention's weight-free matmuls are left out, as in RigL's accounting.
    """
    counts = {"dense": 0, "sparse": 0}
    names = {m: n for n, m in net.named_modules()}

    def hook(module, inputs, output):
        positions = output[0].numel() // module.weight.shape[0]  # output elements per out-channel
        if active is None:
            used = int(torch.count_nonzero(module.weight))
        else:  # tensors not listed are dense
            used = active.get(f"{names[module]}.weight", module.weight.numel())
        counts["dense"] += 2 * module.weight.numel() * positions
        counts["sparse"] += 2 * used * positions

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = net.training
    net.eval()
    try:
        net(example[:1])
    finally:
        net.train(was_training)
        for h in handles:
            h.remove()
    return counts


def train_flops_per_example(f_sparse, f_dense, delta_t):
    """Training FLOPs per example and step (App. F; RigL App. H): forward f_S, backward 2 f_S; a
    RigL update step every delta_t steps also needs the dense weight gradient (f_D instead of one
    f_S): (3 f_S delta_t + 2 f_S + f_D) / (delta_t + 1). delta_t = 0: no updates, 3 f_S."""
    if not delta_t:
        return 3 * f_sparse
    return (3 * f_sparse * delta_t + 2 * f_sparse + f_dense) / (delta_t + 1)


def flops_report(model, num_heads, blocks_in_head, sparsity_, allocation="global", init="er", full_ensemble=False,
                 num_classes=100, image_size=32, seq_len=256, epochs=1, single_epochs=1, train_examples=1,
                 delta_t=0, batch_size=128, in_channels=3, vocab_size=32000):
    """Inference and training FLOPs and parameters of a configuration, absolute and vs single dense.

    Built on the meta device from the allocated densities: instant for any model size.
    """
    lm = models.is_language_model(model)
    kwargs = {"vocab_size": vocab_size} if lm else {"num_classes": num_classes, "in_channels": in_channels}
    with torch.device("meta"):
        net = neurotrails.build(model, num_heads, blocks_in_head, full_ensemble, **kwargs)
        single = neurotrails.build(model, 1, None, **kwargs)
        example = (torch.zeros(1, seq_len, dtype=torch.long) if lm
                   else torch.zeros(1, in_channels, image_size, image_size))
        dens = neurotrails.densities(net, sparsity_, allocation, init)
        weights = neurotrails.masked_weights(net)
        active = {n: round(dens[n] * w.numel()) for n, w in weights.items()}
        f = inference_flops(net, example, active)
        f_single = inference_flops(single, example, {})["dense"]
    params = sum(p.numel() for p in net.parameters())
    active_params = params - sum(w.numel() - active[n] for n, w in weights.items())
    single_params = sum(p.numel() for p in single.parameters())
    per_example = train_flops_per_example(f["sparse"], f["dense"], delta_t if sparsity_ > 0 else 0)
    train_run = per_example * train_examples * epochs
    single_run = 3 * f_single * train_examples * single_epochs
    return {"infer_flops_dense": f["dense"], "infer_flops_sparse": f["sparse"],
            "infer_flops_dense_vs_single": f["dense"] / f_single, "infer_flops_vs_single": f["sparse"] / f_single,
            "train_flops_per_example_step": per_example, "train_flops_per_step": per_example * batch_size,
            "train_flops_per_step_vs_single": per_example / (3 * f_single), "train_flops_run": train_run,
            "train_flops_vs_single_run": train_run / single_run, "single_train_flops_run": single_run,
            "params": params, "active_params": active_params, "params_vs_single": params / single_params,
            "active_params_vs_single": active_params / single_params}


def parameter_counts(net):
    """Total parameters and active (nonzero-able) parameters: zeros in masked weights don't count."""
    total = sum(p.numel() for p in net.parameters())
    active = sum(int(torch.count_nonzero(p)) if p.dim() >= 2 else p.numel() for p in net.parameters())
    return {"params": total, "active_params": active}


# ----------------------------------------------------------------------------------------------
# Plots (matplotlib, imported only when plotting)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, legend_ax, path, title):
    legend_ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def loss_axis_range(values):
    """(bottom, top) y-limits for a loss-like curve (NLL, perplexity) whose first evaluations,
    before the network has learnt anything, are many times its later values: from 0.95x the
    smallest to 1.5x the median of the plotted values when the largest is above 2x the median (the
    rise after a learning-rate decay is then visible), else None (matplotlib's own range)."""
    ordered = sorted(values)
    if len(ordered) < 10 or not ordered[-1] > 2 * ordered[len(ordered) // 2] > 0:
        return None
    return 0.95 * ordered[0], 1.5 * ordered[len(ordered) // 2]


def clip_loss_axes(axes, panels, plotted):
    """Loss-like panels (NLL, perplexity) to loss_axis_range of their plotted values, said on the axis."""
    for ax, (col, ylabel, _) in zip(axes, panels):
        limits = loss_axis_range(plotted.get(col, [])) if col in ("nll", "ppl", "ppl_logits") else None
        if limits is not None:  # the first evaluations would flatten the rest of the curve
            ax.set_ylim(*limits)
            ax.set_ylabel(f"{ylabel} (first evaluations off the axis)")


def reliability_bins(probs, labels, bins=15):
    """Per confidence bin: (bin upper edge, count, accuracy, mean confidence)."""
    conf, pred, idx = confidence_bins(probs, bins)
    rows = []
    for b in range(bins):
        sel = idx == b
        n = int(sel.sum())
        acc = (pred[sel] == labels[sel]).float().mean().item() if n else 0.0
        rows.append(((b + 1) / bins, n, acc, conf[sel].mean().item() if n else 0.0))
    return rows


def plot_reliability(probs, labels, path, title=""):
    """Reliability diagram: accuracy per confidence bin with the gap to the bin's mean confidence
    (ECE in the legend), and below it the number of test samples per bin."""
    plt = _pyplot()
    rows = reliability_bins(probs, labels)
    fig, (ax, below) = plt.subplots(2, 1, figsize=(4.4, 5.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    centers, width = [r[0] - 1 / 30 for r in rows], 1 / 15
    used = [r for r in rows if r[1]]
    ax.bar(centers, [r[2] for r in rows], width=width, edgecolor="k", color="C0", label="accuracy")
    ax.bar([r[0] - 1 / 30 for r in used], [r[3] - r[2] for r in used], bottom=[r[2] for r in used], width=width,
           color="C3", alpha=0.35, edgecolor="C3", hatch="//", label=f"gap to confidence (ECE {ece(probs, labels):.3f})")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.set_title(f"{title}\nreliability, {len(labels):,} samples".strip(), fontsize=9)
    ax.legend(loc="upper left", fontsize=7)
    below.bar(centers, [r[1] for r in rows], width=width, edgecolor="k", color="C7")
    below.set(xlabel="confidence", ylabel="samples")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def pick_grid_images(labels, models_logits, count=12):
    """Indices for the heads grid: first where the models' votes differ, then where one model's heads
    disagree, then the rest; in test-set order within each group."""
    votes = [neurotrails.soft_vote(z).argmax(-1) for _, z in models_logits]
    heads = [z.argmax(-1) for _, z in models_logits]  # (M, N) per model
    differ = torch.stack(votes).ne(votes[0]).any(0)
    split = torch.stack([(h != h[:1]).any(0) for h in heads]).any(0)
    order = torch.cat([torch.nonzero(differ).flatten(), torch.nonzero(split & ~differ).flatten(),
                       torch.nonzero(~split & ~differ).flatten()])
    return order[:count].tolist()


def plot_head_grid(images, labels, models_logits, classes, path, count=12):
    """Fig. 9 / App. K: test images, each with the true class, every head's prediction and the
    soft vote of each model (green: right, red: wrong). models_logits: [(name, (M, N, C) logits)]."""
    plt = _pyplot()
    idx = pick_grid_images(labels, models_logits, count)
    cols = min(6, len(idx))
    rows = math.ceil(len(idx) / cols)
    tags = "AB" if len(models_logits) == 2 else [str(k + 1) for k in range(len(models_logits))]
    lines = 1 + sum(z.shape[0] + 1 for _, z in models_logits)
    text_h = 0.16 * lines  # inches of text under each image
    fig = plt.figure(figsize=(2.2 * cols, rows * (2.0 + text_h) + 0.6))
    grid = fig.add_gridspec(2 * rows, cols, height_ratios=[2.0, text_h] * rows, hspace=0.05, wspace=0.08,
                            top=1 - 0.6 / (rows * (2.0 + text_h) + 0.6), bottom=0.01, left=0.01, right=0.99)
    name = lambda c: classes[c] if classes else str(c)
    for k, i in enumerate(idx):
        r, c = divmod(k, cols)
        ax, below = fig.add_subplot(grid[2 * r, c]), fig.add_subplot(grid[2 * r + 1, c])
        img = images[i].permute(1, 2, 0).numpy()
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
        ax.set_xticks([])
        ax.set_yticks([])
        below.axis("off")
        text = [(f"true: {name(labels[i])}", "black")]
        for tag, (_, z) in zip(tags, models_logits):
            preds = z[:, i].argmax(-1).tolist()
            text += [(f"{tag} head {h + 1}: {name(p)}", "green" if p == labels[i] else "red")
                     for h, p in enumerate(preds)]
            vote = int(neurotrails.soft_vote(z[:, i:i + 1]).argmax(-1))
            text.append((f"{tag} vote: {name(vote)}", "green" if vote == labels[i] else "red"))
        for n, (line, color) in enumerate(text):
            below.text(0.0, 1 - (n + 0.5) / lines, line, transform=below.transAxes, va="center", fontsize=7,
                       color=color, fontweight="bold" if "vote" in line or n == 0 else "normal")
    which = "; ".join(f"{tag} = {model}" for tag, (model, _) in zip(tags, models_logits))
    fig.suptitle(f"{which}\neach head's prediction and the soft vote (green right, red wrong)"
                 + ("; images where the votes differ first" if len(models_logits) > 1 else ""), fontsize=9)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_history(jsonl_paths, path):
    """Training curves of one or more runs from their JSONL logs, overlaid. train_vision.py logs:
    accuracy (ensemble, and each head dashed), disagreement, NLL, ECE over epochs (Fig. 4 / 5);
    train_lm.py logs: training loss, validation perplexity (soft vote, and each head) over updates."""
    runs = []
    for p in jsonl_paths:
        try:
            log = [json.loads(line) for line in open(p) if line.strip()]
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{p}: not a JSONL log (one JSON object per line)") from None
        if not log or not ({"epoch", "acc", "pd_any"} <= set(log[0]) or {"update", "loss"} <= set(log[0])):
            raise ValueError(f"{p}: not a train_vision.py log (epoch, acc, pd_any per line) nor a "
                             "train_lm.py log (update, loss per line)")
        runs.append({"config": {"run": Path(p).parent.name or str(p)}, "log": log})
    lm = ["update" in r["log"][0] for r in runs]
    if len(set(lm)) > 1:
        raise ValueError("give either vision logs or language-model logs, not both")
    keys = ["run"] if len(runs) > 1 else []
    title = Path(jsonl_paths[0]).parent.name if len(runs) == 1 else f"{len(runs)} runs"
    if lm[0]:
        plot_over_training(runs, keys, "update", [("loss", "training loss", 1), ("ppl", "validation perplexity", 1),
                                                  ("ppl_heads", "perplexity of each head", 1)], path, title, "")
    else:
        plot_over_training(runs, keys, "epoch", [("acc", "test accuracy (%)", 100), ("head_acc", "accuracy of each "
                                                 "head (%)", 100), ("pd_any", "disagreement, any (%)", 100),
                                                 ("nll", "test NLL", 1), ("ece", "test ECE", 1)], path, title, "")


# ----------------------------------------------------------------------------------------------
# Report: a folder of runs -> results.csv, summary.md and the paper's analysis figures (Sec. 5)

# Config keys that never make runs differ in result (where they ran, how they were resumed). bf16 is
# not one of them: bf16 and fp32 runs of one point are two points (the bf16 check against fp32).
NOT_AXES = {"out", "data_dir", "device", "workers", "world_size", "resumed", "seed", "channels_last",
            "data_workers", "micro_batch_size", "stop_after", "save_every", "log_every", "eval_every"}
METHOD_NAMES = {"single": "single dense", "treenet": "TreeNet", "ensemble": "full ensemble",
                "neurotrails": "NeuroTrails", "static": "static sparse", "pruning": "pruning", "set": "SET"}
BUDGET_COLUMNS = ("budget", "dense_epochs", "epochs", "dense_updates", "updates", "train_flops_vs_single")
VISION_COLUMNS = ("acc", "nll", "ece", "pd_any", "pd_pairwise", "head_acc_mean", "head_acc", "infer_flops_vs_single",
                  "active_params", "params", "train_time_s", "wall_time_s")
LM_COLUMNS = ("ppl", "ppl_logits", "ppl_heads", "infer_flops_vs_single", "active_params", "params", "train_time_s",
              "wall_time_s")
SUMMARY_COLUMNS = {  # column -> (header, scale, digits)
    "acc": ("accuracy %", 100, 2), "nll": ("NLL", 1, 3), "ece": ("ECE", 1, 3), "pd_any": ("PD any %", 100, 1),
    "pd_pairwise": ("PD pairwise %", 100, 1), "head_acc_mean": ("head acc %", 100, 2),
    "ppl": ("perplexity", 1, 2), "ppl_logits": ("ppl (mean of logits)", 1, 2),
    "best_acc": ("best-epoch acc % (test-selected)", 100, 2), "epochs": ("epochs", 1, 0),
    "infer_flops_vs_single": ("inference FLOPs vs single", 1, 3),
    "train_flops_vs_single": ("training FLOPs vs single", 1, 2), "active_params": ("active params", 1, 0),
    "train_time_s": ("train time s", 1, 0)}


def find_runs(folders, warn=lambda message: print(message, file=sys.stderr)):
    """Every run folder (config.json + log.jsonl) under `folders`, with its config, log and, for a
    finished run, results.json. Sorted by path; unfinished runs keep results None. A folder with
    an unreadable file is skipped with one warning naming the file and line; a run found twice
    (a copied folder, a folder given twice: same config and seed) is counted once."""
    runs, seen, skipped = [], {}, 0
    for folder in folders:
        for config in sorted(Path(folder).rglob("config.json")):
            run = config.parent
            if not (run / "log.jsonl").exists():
                continue
            try:
                found = {"path": run, "config": _read_json(config), "log": _read_jsonl(run / "log.jsonl"),
                         "results": _read_json(run / "results.json") if (run / "results.json").exists() else None}
                if not isinstance(found["config"], dict) or "method" not in found["config"]:
                    raise ValueError(f"{config}: not a run's config (no method)")
                results = found["results"]
                if results is not None and not (isinstance(results, dict) and isinstance(results.get("metrics"), dict)
                                                and "script" in results):
                    raise ValueError(f"{run / 'results.json'}: not a run's results (no metrics or script)")
            except ValueError as e:
                warn(f"warning: skipped {run}: {e}")
                skipped += 1
                continue
            key = json.dumps({k: v for k, v in found["config"].items() if k not in ("out", "data_dir", "resumed")},
                             sort_keys=True)
            if key in seen:
                warn(f"warning: {run} is the same run as {seen[key]} (same config and seed): counted once")
                continue
            seen[key] = run
            runs.append(found)
    if skipped:
        warn(f"warning: {skipped} unreadable run folder(s) skipped")
    return runs


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {e.lineno}: not JSON ({e.msg}; truncated?)") from None


def _read_jsonl(path):
    rows = []
    for i, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {i}: not JSON ({e.msg}; truncated?)") from None
            if not isinstance(rows[-1], dict):
                raise ValueError(f"{path} line {i}: not a log record (a JSON object)")
    return rows


def csv_value(text):
    """A results.csv cell back to the value it was written from: None, bool, int, float or text."""
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def earlier_rows(path):
    """The rows of an earlier report's results.csv / lm_results.csv (runs whose folders are not
    here: another machine, an earlier session) and that report's swept keys, the columns between
    script and seed."""
    import csv
    not_a_report = ValueError(f"--rows {path}: not a results.csv of evaluate.py report (needs run, script, "
                              f"method and seed columns)")
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if not {"run", "script", "method", "seed"} <= set(columns):
                raise not_a_report
            raw = list(reader)
    except OSError as e:
        raise ValueError(f"--rows {path}: cannot read ({e.strerror or e})") from None
    except (csv.Error, UnicodeDecodeError):  # binary or broken text
        raise not_a_report from None
    if any(None in row or None in row.values() for row in raw):  # more or fewer cells than the header
        raise not_a_report
    rows = [{k: v if k in ("run", "script") else csv_value(v) for k, v in row.items()} for row in raw]
    for i, row in enumerate(rows, 2):  # line 1 is the header
        bad = [c for c in SUMMARY_COLUMNS if isinstance(row.get(c), str)]
        if bad:
            raise ValueError(f"--rows {path} line {i}, column {bad[0]}: {row[bad[0]]!r} is not a number")
    return rows, columns[columns.index("script") + 1:columns.index("seed")]


def swept_keys(runs):
    """Config keys whose values differ between the runs (what a sweep varied), in a stable order."""
    derived = {"train_flops_vs_single", "infer_flops_vs_single"}  # follow from the other keys
    if any("dense_epochs" in r["config"] or "dense_updates" in r["config"] for r in runs):
        derived |= {"epochs", "updates"}  # each method's own length follows from E and the budget mode
    keys = sorted({k for r in runs for k in r["config"]} - NOT_AXES - derived)
    first = {k: json.dumps(runs[0]["config"].get(k)) for k in keys}
    varied = [k for k in keys if any(json.dumps(r["config"].get(k)) != first[k] for r in runs)]
    if "method" in varied:  # M, S, |F_h| or epochs that follow from the method alone are not axes
        per_method = {}
        for r in runs:
            for k in varied:
                per_method.setdefault((k, r["config"]["method"]), set()).add(json.dumps(r["config"].get(k)))
        varied = [k for k in varied if k == "method" or any(len(v) > 1 for (key, _), v in per_method.items()
                                                            if key == k)]
    return sorted(varied, key=lambda k: (k != "method", k))


def result_rows(runs, keys):
    """One row per finished run: its folder, swept values, seed and final metrics."""
    rows = []
    for r in runs:
        if r["results"] is None:
            continue
        m, cfg = r["results"]["metrics"], r["config"]
        row = {"run": str(r["path"]), "script": r["results"]["script"], **{k: cfg.get(k) for k in keys},
               "method": cfg["method"], "seed": cfg["seed"]}
        row.update({k: cfg[k] for k in BUDGET_COLUMNS if k in cfg})  # the budget: mode, E, own length, cost
        tested = [e for e in r["log"] if "acc" in e and "epoch" in e]
        if tested:  # the released code's number: the best test epoch (test-set selection)
            best = max(tested, key=lambda e: e["acc"])
            row.update(best_acc=best["acc"], best_epoch=best["epoch"])
        if "head_acc" in m:
            m = {**m, "head_acc_mean": sum(m["head_acc"]) / len(m["head_acc"])}
        for col in (LM_COLUMNS if "ppl" in m else VISION_COLUMNS):
            v = r["results"].get(col, m.get(col))
            row[col] = ";".join(f"{x:.6g}" for x in v) if isinstance(v, list) else v
        machine = r["results"].get("machine") or {}  # bf16 kernels differ between CPUs: every row says where
        row["machine"] = " ".join([machine.get("cpu") or "", "AMX" if "amx_bf16" in machine.get("isa", []) else ""]).strip()
        rows.append(row)
    return rows


def write_csv(rows, path):
    import csv
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, columns)
        w.writeheader()
        w.writerows(rows)


def mean_std(values):
    """(mean, sample standard deviation; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0


def groups(rows, keys):
    """Rows grouped by their swept values (seed aside): {values tuple: [rows]} in first-seen order."""
    out = {}
    for row in rows:
        out.setdefault(tuple(row[k] for k in keys), []).append(row)
    return out


def summary_markdown(rows, keys, title):
    """One table: per point of the grid, mean +- std over its seeds of each metric."""
    cols = [c for c in SUMMARY_COLUMNS if any(isinstance(r.get(c), (int, float)) for r in rows)]
    head = [*(k.replace("_", " ") for k in keys), "seeds", *(SUMMARY_COLUMNS[c][0] for c in cols)]
    lines = [f"# {title}", "", "Mean ± sample std over seeds; last epoch / update of each run (the test set "
             "selects nothing).", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for values, members in groups(rows, keys).items():
        cells = [METHOD_NAMES.get(v, v) if k == "method" else str(v) for k, v in zip(keys, values)]
        cells.append(",".join(str(r["seed"]) for r in members))
        for c in cols:
            _, scale, digits = SUMMARY_COLUMNS[c]
            values = [scale * r[c] for r in members if isinstance(r.get(c), (int, float))]
            if not values:  # a column that only other points have (e.g. rows of an older report)
                cells.append("—")
                continue
            mean, std = mean_std(values)
            cells.append(f"{mean:,.{digits}f}" + (f" ± {std:,.{digits}f}" if len(values) > 1 else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def group_label(values, keys, skip=(), method=None):
    """A legend entry from a point's swept values, e.g. "NeuroTrails, head lr x3" (the paper's rate,
    x1, is not named); with no swept value to show, the runs' method."""
    parts = []
    for k, v in zip(keys, values):
        if k in skip or (k == "head_lr_scale" and v in (1, 1.0)):  # the paper's head rate is not named
            continue
        parts.append(METHOD_NAMES.get(v, v) if k == "method" else f"head lr x{v:g}" if k == "head_lr_scale"
                     and isinstance(v, (int, float)) else f"{k.replace('_', ' ')} {v}")
    return ", ".join(parts) or METHOD_NAMES.get(method, method or "runs")


def run_title(runs, keys):
    """What the runs share: dataset / model / budget, for figure titles."""
    cfg = runs[0]["config"]
    parts = [cfg.get("dataset"), cfg.get("model")]
    if "train_subset" not in keys and cfg.get("train_subset"):
        parts.append(f"{cfg['train_subset']:,} train images")
    if "dense_epochs" in cfg or "dense_updates" in cfg:  # a budget: E and the mode, unless swept
        unit, e = ("epochs", "dense_epochs") if "dense_epochs" in cfg else ("updates", "dense_updates")
        if e not in keys:
            parts.append(f"E = {cfg[e]:,} {unit}")
        if "budget" not in keys:
            parts.append(f"budget: {cfg.get('budget')}")
    else:
        for key in ("epochs", "updates"):
            if key not in keys and cfg.get(key):
                parts.append(f"{cfg[key]:,} {key if cfg[key] > 1 else key[:-1]}")
    return ", ".join(str(p) for p in parts if p)


def plot_vs(rows, keys, x, panels, path, title):
    """Fig. 3 / 6 / 7 and the budget plot: each metric of `panels` against swept key `x`, a line
    per combination of the other swept values, mean +- std over seeds (error bars)."""
    plt = _pyplot()
    others = [k for k in keys if k != x]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    styles = arm_styles([(dict(zip(others, values)), members[0]["method"]) for values, members
                         in groups(rows, others).items()])
    for ax, (col, ylabel, scale) in zip(axes[0], panels):
        for (values, members), style in zip(groups(rows, others).items(), styles):
            by_x = groups(members, [x])
            xs = sorted(v[0] for v in by_x)
            stats = [mean_std([scale * r[col] for r in by_x[(v,)]]) for v in xs]
            ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=3, **style,
                        label=group_label(values, others, method=members[0]["method"]))
            if x in ("train_flops_vs_single", "epochs") and len({r.get("budget") for r in rows}) > 1:
                # budget modes side by side: which mode each point is
                for v, (m, _) in zip(xs, stats):
                    modes = "/".join(sorted({str(r["budget"]) for r in by_x[(v,)] if r.get("budget")}))
                    ax.annotate(modes, (v, m), textcoords="offset points", xytext=(4, 4), fontsize=7,
                                color=style["color"])
        if x == "train_flops_vs_single":  # equal compute with the single network at E reads off this line
            ax.axvline(1.0, color="gray", lw=0.8, ls=":")
        ax.set(xlabel=AXIS_NAMES.get(x, x.replace("_", " ")), ylabel=ylabel)
        ax.grid(alpha=0.3)
        if all(float(v).is_integer() for v in (r[x] for r in rows)):
            ax.xaxis.get_major_locator().set_params(integer=True)
    _save(plt, fig, axes[0][0], path, f"{title} ({seeds_note(rows)})")


# One colour per method and arm in every figure, from Okabe & Ito's colour-blind-safe palette;
# the budget mode is the marker.
ARM_COLORS = {"single": "#000000", "treenet": "#E69F00", "ensemble": "#0072B2", "neurotrails": "#D55E00",
              "neurotrails-head-lr": "#CC79A7", "static": "#56B4E9", "pruning": "#009E73"}
BUDGET_MARKERS = {"paper": "o", "flops": "s", "equal": "^", "density": "D"}
AXIS_NAMES = {"train_flops_vs_single": "training FLOPs / single network's at E", "dense_epochs": "E (dense epochs)",
              "blocks_in_head": "|F_h|, blocks per head", "num_heads": "M, heads", "sparsity": "sparsity S"}


def arm_styles(points):
    """matplotlib styles for [(swept values, method)]: colour by method (NeuroTrails with a head
    learning-rate scale > 1 has its own), marker by budget; points that would look alike get
    different line styles."""
    styles, seen = [], {}
    for values, method in points:
        scale = values.get("head_lr_scale")
        scaled = scale == "M" or (scale is not None and float(scale) > 1)
        arm = "neurotrails-head-lr" if method == "neurotrails" and scaled else method
        look = (ARM_COLORS.get(arm), BUDGET_MARKERS.get(values.get("budget"), "o"))
        n = seen[look] = seen.get(look, -1) + 1
        styles.append({"color": look[0], "marker": look[1], "ls": ("-", "--", ":", "-.")[n % 4]})
    return styles


def seeds_note(rows):
    seeds = sorted({r["seed"] for r in rows})
    return f"mean ± std over {len(seeds)} seeds" if len(seeds) > 1 else f"one seed, {seeds[0]}"


def plot_goldilocks(rows, keys, path, title):
    """Fig. 3 (right): disagreement vs accuracy, one line per method, points labelled by |F_h|,
    mean over seeds with +- std bars on both axes."""
    plt = _pyplot()
    others = [k for k in keys if k != "blocks_in_head"]
    fig, ax = plt.subplots(figsize=(5.5, 4.4))
    for values, members in groups([r for r in rows if r["pd_any"] or r["method"] != "single"], others).items():
        by_b = groups(members, ["blocks_in_head"])
        bs = sorted(v[0] for v in by_b)
        pd, pd_std = zip(*(mean_std([100 * r["pd_any"] for r in by_b[(b,)]]) for b in bs))
        acc, acc_std = zip(*(mean_std([100 * r["acc"] for r in by_b[(b,)]]) for b in bs))
        ax.errorbar(pd, acc, xerr=pd_std, yerr=acc_std, marker="o", capsize=3,
                    label=group_label(values, others, method=members[0]["method"]))
        for b, px, py in zip(bs, pd, acc):
            ax.annotate(f"|F_h|={b}", (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel="prediction disagreement, any (%)", ylabel="ensemble accuracy (%)")
    ax.grid(alpha=0.3)
    _save(plt, fig, ax, path, f"{title}\naccuracy vs disagreement (mean ± std over seeds)")


def plot_over_training(runs, keys, x, panels, path, title, note=None):
    """Fig. 5 and the LM curves: metrics over epochs / updates from the logs, a line per point of
    the grid (mean over its seeds, band = +- std where seeds share the x values)."""
    plt = _pyplot()
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    by_point = {}
    for r in runs:
        by_point.setdefault(tuple(r["config"].get(k) for k in keys), []).append(r)
    looks = arm_styles([(dict(zip(keys, values)), members[0]["config"].get("method"))
                        for values, members in by_point.items()])
    plotted = {}  # column -> every mean drawn, for the y-range of loss-like panels
    for i, (values, members) in enumerate(by_point.items()):
        color = looks[i]["color"] or f"C{i % 10}"
        label = group_label(values, keys, method=members[0]["config"].get("method"))
        for ax, (col, ylabel, scale) in zip(axes.flat, panels):
            logs = [log for log in ([e for e in m["log"] if col in e] for m in members) if log]
            if not logs:
                continue
            if isinstance(logs[0][0][col], list):  # per head (ppl_heads, head_acc): thin dashed, first seed
                for h in range(len(logs[0][0][col])):
                    ax.plot([e[x] for e in logs[0]], [scale * e[col][h] for e in logs[0]], color=color, lw=0.8,
                            alpha=0.7, ls="--", label=f"{label}: heads" if h == 0 else None)
            else:
                xs = sorted(set.intersection(*(set(e[x] for e in log) for log in logs)))
                at = [{e[x]: scale * e[col] for e in log} for log in logs]
                stats = [mean_std([a[v] for a in at]) for v in xs]
                ax.plot(xs, [m for m, _ in stats], color=color, ls=looks[i]["ls"], ms=3,
                        marker=looks[i]["marker"] if len(xs) <= 30 else None,
                        label=label)
                ax.fill_between(xs, [m - s for m, s in stats], [m + s for m, s in stats], color=color, alpha=0.2)
                plotted.setdefault(col, []).extend(m for m, _ in stats)
            ax.set(xlabel=x, ylabel=ylabel)
            ax.grid(alpha=0.3)
            if x == "epoch":
                ax.xaxis.get_major_locator().set_params(integer=True)
    clip_loss_axes(axes.flat, panels, plotted)
    if note is None:
        note = f" ({seeds_note([r['config'] for r in runs])})" if all("seed" in r["config"] for r in runs) else ""
    _save(plt, fig, axes[0][0], path, title + note)


def plot_speed_vs_sparsity(benches, path):
    """Fig. 8 / App. J: measured throughput ratio to the single dense model vs sparsity, per engine
    and `export_bench.py --json` file, beside the FLOP limit (1 / FLOP ratio)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    limit = {}
    for i, bench in enumerate(benches):
        rows = [r for r in bench["results"] if r["variant"].startswith("nt:")]
        settings, cpu = bench["settings"], bench["machine"]["cpu"]
        for engine in sorted({r["engine"] for r in rows}):
            mine = sorted((r for r in rows if r["engine"] == engine), key=lambda r: r["sparsity"])
            label = (f"{engine}, batch {settings['batch_size']}, threads {settings['threads'] or 'all'}"
                     + (f" ({cpu[:28]})" if len(benches) > 1 else ""))
            line, = ax.plot([r["sparsity"] for r in mine], [r["ratio"] for r in mine], marker="o", label=label)
            paired = [(r["sparsity"], r["paired_ratio_ci"]) for r in mine if r.get("paired_ratio_ci")]
            if paired:  # the paired speed-up's 95 % interval (export_bench.py's round-by-round ratios)
                ax.vlines([x for x, _ in paired], [lo for _, (lo, hi) in paired], [hi for _, (lo, hi) in paired],
                          color=line.get_color(), lw=3, alpha=0.35)
            limit.update({r["sparsity"]: 1 / r["flop_ratio"] for r in mine})
    xs = sorted(limit)
    ax.plot(xs, [limit[x] for x in xs], "k--", label="FLOP limit (1 / FLOP ratio)")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(xlabel="sparsity S of NeuroTrails", ylabel="throughput / single dense, same engine (log scale)",
           yscale="log")
    ax.grid(alpha=0.3, which="both")
    first = benches[0]["settings"]
    _save(plt, fig, ax, path, f"{first['model']}, M = {first['num_heads']}, measured vs FLOP speed-up\n"
                              f"{benches[0]['machine']['cpu']}")


def merge_rows(rows, earlier, keys):
    """`rows` (from run folders) followed by the earlier reports' rows that are not the same run
    folder or the same point and seed as one before them (a folder here wins over its CSV row)."""
    def point(row):
        return json.dumps([row.get(k) for k in keys] + [row["seed"]])
    merged = list(rows)
    seen = {r["run"] for r in rows} | {point(r) for r in rows}
    for row in earlier:
        row = {"run": row["run"], "script": row["script"], **{k: row.get(k) for k in keys}, **row}
        if row["run"] not in seen and point(row) not in seen:
            merged.append(row)
            seen |= {row["run"], point(row)}
    return merged


def vision_figures(runs, rows, keys, out, title):
    """The figures a folder of vision runs supports: Fig. 5 over training (under the paper's budgets
    when budget modes are compared), accuracy and NLL against training FLOPs and epochs, and
    Fig. 3 / 6 / 7 for a swept |F_h|, M or S. Returns the paths written."""
    written = []
    # Fig. 5: over training; with an E axis, the runs of the largest E only; with budget modes, the paper's
    finished = [r for r in runs if r["results"] is not None]  # an unfinished run would cut its curve short
    curve_keys = keys
    if "budget" in keys and any(r["config"].get("budget") == "paper" for r in finished):
        finished = [r for r in finished if r["config"].get("budget") == "paper"]
        curve_keys = [k for k in keys if k != "budget"]
    if finished:
        # E (each method then runs its own length), or, for runs before budgets, their epochs
        axis = "dense_epochs" if all("dense_epochs" in r["config"] for r in finished) else "epochs"
        longest = [r for r in finished
                   if r["config"].get(axis) == max(m["config"].get(axis) or 0 for m in finished)]
        written.append(out / "fig5_over_training.png")
        plot_over_training(longest, [k for k in curve_keys if k != axis], "epoch",
                           [("acc", "test accuracy (%)", 100), ("nll", "test NLL", 1),
                            ("pd_any", "prediction disagreement, any (%)", 100)], written[-1],
                           run_title(longest, curve_keys))
    if not rows:  # the figures per point need finished runs (or earlier reports' rows)
        return written
    accuracy_pd = [("acc", "test accuracy (%)", 100), ("pd_any", "prediction disagreement, any (%)", 100)]
    budget_axis = any(k in keys for k in ("budget", "dense_epochs", "epochs"))
    analysis_axis = any(k in keys for k in ("blocks_in_head", "num_heads", "sparsity"))
    if all(isinstance(r.get("train_flops_vs_single"), (int, float)) for r in rows) \
            and len({r["train_flops_vs_single"] for r in rows}) > 1 and (budget_axis or not analysis_axis):
        # equal compute reads off a vertical line: accuracy and NLL against training FLOPs vs single,
        # a line per method through its budgets (E values or budget modes); a sweep of |F_h|, M or S,
        # whose cost changes with the point, has its own figure instead
        written.append(out / "budget_flops.png")
        plot_vs(rows, [k for k in keys if k not in ("dense_epochs", "budget")] + ["train_flops_vs_single"],
                "train_flops_vs_single", [("acc", "test accuracy (%)", 100), ("nll", "test NLL", 1)],
                written[-1], title)
    if "budget" in keys and "dense_epochs" not in keys and \
            all(isinstance(r.get("epochs"), (int, float)) for r in rows):
        # budget modes at one E: the same against each method's own epochs
        written.append(out / "budget_epochs.png")
        plot_vs(rows, [k for k in keys if k != "budget"] + ["epochs"], "epochs",
                [("acc", "test accuracy (%)", 100), ("nll", "test NLL", 1)], written[-1], title)
    figures = {"epochs": ("budget_epochs.png", accuracy_pd + [("nll", "test NLL", 1)]),
               "dense_epochs": ("budget_epochs.png", accuracy_pd + [("nll", "test NLL", 1)]),
               "blocks_in_head": ("fig3_blocks_in_head.png", accuracy_pd),
               "num_heads": ("fig6_num_heads.png", [accuracy_pd[0], ("infer_flops_vs_single",
                                                                    "inference FLOPs vs single", 1)]),
               "sparsity": ("fig7_sparsity.png", accuracy_pd)}
    for key, (name, panels) in figures.items():
        if key in keys:
            written.append(out / name)
            mine_rows = rows
            if key == "num_heads" and "head_lr_scale" in keys:  # Fig. 6: the head lr x M arm is one line over M
                mine_rows = [dict(r, head_lr_scale="M") if r.get("head_lr_scale") not in (None, 1, 1.0)
                             and float(r["head_lr_scale"]) == float(r["num_heads"]) else r for r in rows]
            plot_vs(mine_rows, keys, key, panels, written[-1], title)
    if "blocks_in_head" in keys:
        written.append(out / "fig3_goldilocks.png")
        plot_goldilocks(rows, keys, written[-1], title)
    return written


def write_report(folders, out, benches=(), rows_files=()):
    """results.csv, summary.md and every figure the runs (and export_bench.py --json files, and
    earlier reports' results.csv rows) support; returns the paths written."""
    order = list(METHOD_NAMES)  # single, TreeNet, ensemble, NeuroTrails, ...: the same order in every table
    runs = sorted(find_runs(folders), key=lambda r: (order.index(r["config"]["method"])
                                                     if r["config"].get("method") in order else len(order)))
    earlier = [earlier_rows(path) for path in rows_files]
    if not runs and not benches and not any(rows for rows, _ in earlier):
        raise ValueError(f"no run folders (config.json + log.jsonl) under {' '.join(map(str, folders))}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if benches:
        written.append(out / "fig8_speed_vs_sparsity.png")
        plot_speed_vs_sparsity(benches, written[-1])
    # Vision and language runs apart: each gets its table, summary and figures.
    for script in ("train_vision.py", "train_lm.py"):
        lm = script == "train_lm.py"
        mine = [r for r in runs if ("updates" in r["config"]) == lm]
        before = [(rows, keys) for rows, keys in earlier if any(r["script"] == script for r in rows)]
        if not mine and not before:
            continue
        # The axes: config keys that differ between the runs (a sweep's flags, the method, the budget).
        keys = sorted(set(swept_keys(mine) if mine else []).union(*(keys for _, keys in before)),
                      key=lambda k: (k != "method", k))
        found = result_rows(mine, keys)
        rows = merge_rows(found, [r for rows, _ in before for r in rows if r["script"] == script], keys)
        # method in the table's order, then every swept value ascending (numbers as numbers), then seed
        rows.sort(key=lambda r: [(order.index(r[k]) if k == "method" and r[k] in order else 0,
                                  not isinstance(r[k], (int, float)),
                                  r[k] if isinstance(r[k], (int, float)) else str(r[k])) for k in keys] + [r["seed"]])
        prefix = "lm_" if lm else ""
        title = run_title(mine, keys) if mine else f"rows of {', '.join(map(str, rows_files))}"
        if rows:
            written.append(out / f"{prefix}results.csv")
            write_csv(rows, written[-1])
            written.append(out / f"{prefix}summary.md")
            unfinished, copied = len(mine) - len(found), len(rows) - len(found)
            written[-1].write_text(summary_markdown(rows, keys, title) + (
                f"\n{unfinished} unfinished run(s) (no results.json) are not in this table.\n" if unfinished else "")
                + (f"\n{copied} row(s) come from earlier reports (--rows), not from run folders here: they are in "
                   f"this table and the figures per point, not in the curves over training.\n" if copied else ""))
        if lm:
            if mine:  # curves over training need the logs
                written.append(out / "lm_perplexity.png")
                plot_over_training(mine, keys, "update", [("ppl", "validation perplexity (soft vote)", 1),
                                                          ("ppl_heads", "perplexity of each head", 1)], written[-1],
                                   title)
            if rows and "updates" in keys:
                written.append(out / "lm_budget.png")
                plot_vs(rows, keys, "updates", [("ppl", "validation perplexity", 1)], written[-1], title)
            continue
        written += vision_figures(mine, rows, keys, out, title)
    return written


def report_command(args, ap):
    """`evaluate.py report`: run folders (and earlier reports' rows) -> tables and figures."""
    try:
        if not args.folders and not args.bench and not args.rows:
            raise ValueError("give run folders, --rows files and/or --bench files")
        for folder in args.folders:
            if not Path(folder).is_dir():
                raise ValueError(f"{folder}: no such folder")
        benches = []
        for path in args.bench:
            try:
                bench = json.loads(Path(path).read_text())
            except (OSError, ValueError):
                bench = None
            if not isinstance(bench, dict) or not {"machine", "settings", "results"} <= set(bench):
                raise ValueError(f"--bench {path}: not an export_bench.py --json file")
            benches.append(bench)
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise ValueError(f"--out {args.out} is a file, not a folder")
        written = write_report(args.folders, args.out, benches, args.rows)
    except (ValueError, OSError) as e:  # json.JSONDecodeError is a ValueError
        ap.fail(e)
    for path in written:
        print(f"wrote {path}")


def flops_command(args, ap):
    """`evaluate.py flops`: a configuration's FLOPs and parameters, for ER/ERK and uniform side by side."""
    try:  # --init's allocation first, the other beside it: the paper's ratios are uniform's (README audit)
        inits = [args.init] + [i for i in ("er", "uniform") if i != args.init]
        reports = {init: flops_report(args.model, args.num_heads, args.blocks_in_head, args.sparsity,
                                      args.allocation, init, args.full_ensemble, args.num_classes, args.image_size,
                                      args.seq_len, args.epochs, args.single_epochs, args.train_examples,
                                      args.delta_t, args.batch_size) for init in inits}
    except ValueError as e:
        ap.error(str(e))
    if args.json:
        print(json.dumps(reports[args.init]))
        return
    print(f"{'':<30} " + " ".join(f"{'init ' + i + (' (ERK)' if i == 'er' else ''):>16}" for i in inits))
    for k, v in reports[args.init].items():
        cells = [reports[i][k] for i in inits]
        print(f"{k:<30} " + " ".join(f"{c:>16.4g}" if isinstance(v, float) else f"{c:>16,}" for c in cells))


def lm_eval_command(args, ap):
    """`evaluate.py lm-eval`: zero-shot tasks of a train_lm.py checkpoint through lm-eval-harness."""
    try:  # every flag first, then the checkpoint, then the hub: a typo fails in seconds
        tasks = [t for t in args.tasks.split(",") if t]
        if not tasks:
            raise ValueError("--tasks: give at least one task name")
        if args.include_path and not Path(args.include_path).is_dir():
            raise ValueError(f"--include-path {args.include_path}: no such folder")
        if args.device:
            neurotrails.check_device(args.device)
        net, tokenizer, config = load_language_model(args.checkpoint, args.device)
        from lm_eval.tasks import TaskManager
        manager = TaskManager(include_path=args.include_path)  # indexes every task: ~10 s
        unknown = [t for t in tasks if not manager.match_tasks([t])]
        if unknown:
            raise ValueError(f"--tasks: unknown lm-eval task {unknown[0]!r} (see `lm_eval ls tasks`)")
        if not args.include_path and not models.offline_mode() and not models.hub_reachable():
            raise ValueError("lm-eval tasks load their data from the HuggingFace hub, which cannot be reached; "
                             "set HF_DATASETS_OFFLINE=1 to use a local datasets cache, or --include-path for local tasks")
        import lm_eval
        model = harness_model(net, tokenizer, config["seq_len"] - 1, args.batch_size, args.aggregate)
        results = lm_eval.simple_evaluate(model=model, tasks=tasks, num_fewshot=args.num_fewshot,
                                          limit=args.limit, task_manager=manager, log_samples=False, bootstrap_iters=0)
    except (ValueError, OSError, KeyError) as e:
        ap.fail(e)
    table = {task: {k.split(",")[0]: v for k, v in r.items() if isinstance(v, float)}
             for task, r in results["results"].items()}
    if args.json:
        print(json.dumps(table))
        return
    for task, metrics in table.items():
        print(f"{task:<24} " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def history_command(args, ap):
    """`evaluate.py history`: training curves of run logs, overlaid."""
    try:
        for log in args.logs:
            if not Path(log).is_file():
                raise ValueError(f"{log}: no such log file")
        check_figure_path(args.plot, "--plot")
        plot_history(args.logs, args.plot)
    except (ValueError, OSError) as e:  # json.JSONDecodeError is a ValueError
        ap.fail(e)
    print(f"wrote {args.plot}")


def load_language_model(path, device=None):
    """(network in eval mode, tokenizer, config) of a train_lm.py checkpoint, through the library
    alone: the checkpoint describes its network and carries its tokenizer (or names it)."""
    state = neurotrails.load_checkpoint(path, "train_lm.py", "--checkpoint")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = dict(state["config"], device=device, bf16=device.startswith("cuda"))
    if not state.get("tokenizer_json") and not isinstance(config.get("tokenizer"), str):
        raise ValueError(f"--checkpoint {path}: it carries no tokenizer and names none (config tokenizer "
                         f"{config.get('tokenizer')!r}); its token ids cannot be read")
    tokenizer = models.load_tokenizer(config["tokenizer"], state.get("tokenizer_json"))
    return neurotrails.model_from_checkpoint(state, device, f"--checkpoint {path}").eval(), tokenizer, config
PAPER_TASKS = "mmlu,boolq,arc_easy,piqa,hellaswag,openbookqa,winogrande"  # Table 5


# ----------------------------------------------------------------------------------------------
# Checkpoint evaluation flags, shared by `train_vision.py --eval-only` and `train_lm.py --eval-only`


def add_checkpoint_arguments(ap, corruptions=()):
    """The flags of a checkpoint evaluation, declared once for `train_vision.py --eval-only` and
    `train_lm.py --eval-only`; `corruptions` names the generated corruptions (train_vision.py's)."""
    ap.add_argument("--checkpoint", help="a checkpoint written by train_vision.py or train_lm.py")
    ap.add_argument("--data-dir", default=None, help="dataset folder (default: the one stored in the checkpoint, "
                    "read only: nothing is downloaded or unpacked there unless --data-dir names it)")
    ap.add_argument("--batch-size", type=int_in(1), default=256, help="test batch size")
    ap.add_argument("--aggregate", default=None, choices=["probs", "logits"],
                    help="ensemble rule (default: the checkpoint's): mean of probabilities or of logits")
    ap.add_argument("--plot", default=None, help="write a reliability diagram PNG here (vision)")
    ap.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    ap.add_argument("--corruptions", nargs="?", const="all", default=None,
                    help="also evaluate on corrupted test images at severities 1-5: 'all' or a comma-separated "
                         "subset of " + (", ".join(corruptions) or "the vision corruptions") + " (CIFAR-100 / Fashion-MNIST checkpoints)")
    ap.add_argument("--image-folder", default=None,
                    help="evaluate on this ImageFolder (one folder per class, e.g. ImageNet-Sketch) instead")
    ap.add_argument("--corruptions-dir", default=None, metavar="DIR",
                    help="evaluate on the published CIFAR-100-C files in DIR (NAME.npy per corruption, 5 severities "
                         "stacked, and labels.npy): every corruption found, severities 1-5")
    ap.add_argument("--heads-grid", default=None, metavar="PNG",
                    help="Fig. 9 / App. K: write a grid of test images with each head's prediction and the vote")
    ap.add_argument("--grid-with", default=None, metavar="CHECKPOINT",
                    help="a second checkpoint of the same dataset for --heads-grid (e.g. another |F_h|): both "
                         "models' heads under each image, images where their votes differ first")


FIGURE_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "eps", "ps", "tif", "tiff", "webp")  # matplotlib writes these


def check_figure_path(path, flag):
    """One-line ValueError unless a figure can be written at `path` in a format named by its suffix."""
    if Path(path).suffix.lower().lstrip(".") not in FIGURE_FORMATS:
        raise ValueError(f"{flag} {path}: name a figure file ending in .{', .'.join(FIGURE_FORMATS)}")
    neurotrails.check_writable_file(path, flag)


def check_checkpoint_arguments(args, script):
    """One-line ValueError for a checkpoint-evaluation flag that cannot work, before any work."""
    if args.plot:
        check_figure_path(args.plot, "--plot")
    if args.image_folder and not Path(args.image_folder).is_dir():
        raise ValueError(f"--image-folder {args.image_folder}: no such folder")
    if args.heads_grid:
        check_figure_path(args.heads_grid, "--heads-grid")
    if args.grid_with and not args.heads_grid:
        raise ValueError("--grid-with adds a second model to --heads-grid; give --heads-grid PNG too")
    if args.grid_with:
        other = neurotrails.load_checkpoint(args.grid_with, flag="--grid-with", mmap=True)
        if other["script"] != script:
            raise ValueError(f"--grid-with {args.grid_with} was written by {other['script']}, not {script}")
    if script == "train_lm.py":
        used = [f for f in ("plot", "corruptions", "image_folder", "aggregate", "heads_grid", "corruptions_dir")
                if getattr(args, f)]
        if used:
            raise ValueError(f"--{used[0].replace('_', '-')} is for image checkpoints; {args.checkpoint} is a "
                             "train_lm.py checkpoint (its evaluation is the validation perplexity)")


def eval_only_args(argv, script, corruptions=()):
    """The parsed and checked flags of `<script> --eval-only` (a one-line error and exit 1 else)."""
    ap = neurotrails.Parser(prog=f"{script} --eval-only", description=f"Evaluate a {script} checkpoint on its own "
                            "data (its test set, an ImageFolder, corruptions; LM: validation perplexities).")
    add_checkpoint_arguments(ap, corruptions)
    args = ap.parse_args(argv)
    try:
        if not args.checkpoint:
            raise ValueError("--eval-only needs --checkpoint PATH")
        check_checkpoint_arguments(args, script)
    except (ValueError, OSError) as e:
        ap.fail(e)
    return ap.prog, args


def print_comparison(rows, columns, folder=None):
    """A table of runs {method: record}, columns [(header, record -> text)], printed aligned; with
    `folder`, also written as folder/compare.md (the same columns) and folder/compare.csv (every
    scalar metric of every record, lists joined by ';')."""
    heads = ["method", *(h for h, _ in columns)]
    cells = [[m, *(f(r) for _, f in columns)] for m, r in rows.items()]
    widths = [max(map(len, col)) for col in zip(heads, *cells)]
    print()
    for line in [heads, *cells]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
    if folder is None:
        return
    import csv
    folder = Path(folder)
    md = ["| " + " | ".join(heads) + " |", "|" + " --- |" * len(heads), *("| " + " | ".join(c) + " |" for c in cells)]
    (folder / "compare.md").write_text("\n".join(md) + "\n")
    flat = [{"method": m, **{k: ";".join(map(str, v)) if isinstance(v, list) else v for k, v in r.items()
                             if not isinstance(v, dict)}} for m, r in rows.items()]
    with open(folder / "compare.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(dict.fromkeys(k for row in flat for k in row)))
        w.writeheader()
        w.writerows(flat)
    print(f"wrote {folder / 'compare.md'}\nwrote {folder / 'compare.csv'}")


def rounded(value):
    """A metric for a human: floats to 4 significant digits, lists element-wise."""
    if isinstance(value, list):
        return "[" + ", ".join(rounded(v) for v in value) + "]"
    return f"{value:.4g}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)


# ----------------------------------------------------------------------------------------------
# Command line: `evaluate.py COMMAND ...`, one argparse subparser per command


def parser():
    ap = neurotrails.Parser(prog="evaluate.py", description="The paper's measurements from the command line. A "
                            "checkpoint is evaluated by the script that wrote it, where its data loading lives: "
                            "`train_vision.py --eval-only --checkpoint PATH` (or train_lm.py).")
    ap.add_argument("--checkpoint", default=None, dest="moved_checkpoint",
                    help="moved: `python train_vision.py --eval-only --checkpoint PATH` (or train_lm.py) evaluates it")
    commands = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=neurotrails.Parser)

    p = commands.add_parser("history", help="plot training curves of run logs", description="Training curves of "
                              "log.jsonl files of train_vision.py runs (accuracy, per-head accuracy, disagreement, "
                              "NLL, ECE; Fig. 4 / 5) or train_lm.py runs (loss, perplexity, per-head), overlaid.")
    p.add_argument("logs", nargs="+", metavar="LOG", help="log.jsonl files of runs")
    p.add_argument("--plot", default="history.png", help="output figure")
    p.set_defaults(run=history_command, parser=p)

    p = commands.add_parser("flops", help="FLOPs and parameters of a configuration (App. F)", description=(
        "Inference and training FLOPs and parameters of a configuration, and their ratios to the single dense "
        "model (App. F; RigL App. H), for ER/ERK and uniform layerwise density side by side. Nothing is trained "
        "or allocated."))
    p.add_argument("--model", default="wrn28-10", help="base network: " + ", ".join(models.model_names()))
    neurotrails.add_arguments(p, 0.0, " (default: 0, dense)")
    p.add_argument("--full-ensemble", action="store_true", help="M independent full models")
    p.add_argument("--num-classes", type=int_in(1), default=100, help="classes of a vision model")
    p.add_argument("--image-size", type=int_in(8, 4096), default=32, help="input height = width (ImageNet: 224)")
    p.add_argument("--seq-len", type=int_in(1, 1 << 20), default=256, help="tokens per sequence of a LLaMA model")
    p.add_argument("--epochs", type=float_in(0, lo_open=True), default=1,
                    help="epochs (or update steps x batch / examples) of this run, > 0")
    p.add_argument("--single-epochs", type=float_in(0, lo_open=True), default=1,
                    help="epochs of the single dense reference run, > 0")
    p.add_argument("--train-examples", type=int_in(1), default=1, help="examples per epoch (CIFAR-100: 50000)")
    p.add_argument("--delta-t", type=int_in(0), default=100, help="steps between RigL updates (0: static)")
    p.add_argument("--batch-size", type=int_in(1), default=128, help="examples per training step")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=flops_command, parser=p)

    p = commands.add_parser("report", help="tables and figures of a folder of runs (Sec. 5)", description=(
        "Collect run folders (for example the points of a --sweep) into REPORT/results.csv (a row per finished "
        "run: swept values, seed, metrics), REPORT/summary.md (mean ± std over seeds per point) and the figures the "
        "runs support: budget (accuracy and NLL vs epochs and vs training FLOPs), Fig. 3 (vs blocks in head, and "
        "the accuracy-disagreement plot), Fig. 5 (over training), Fig. 6 (vs M), Fig. 7 (vs sparsity); language "
        "runs: lm_results.csv, lm_summary.md, perplexity over updates and per head."))
    p.add_argument("folders", nargs="*", help="folders searched (recursively) for run folders")
    p.add_argument("--out", required=True, help="folder for the report (created)")
    p.add_argument("--bench", nargs="+", default=[], metavar="JSON",
                    help="export_bench.py bench/table7 --json files: Fig. 8, throughput ratio vs sparsity")
    p.add_argument("--rows", nargs="+", default=[], metavar="CSV",
                    help="results.csv / lm_results.csv of earlier reports, for runs whose folders are not here "
                         "(another machine, a lost disk): their rows join the tables and the per-point figures "
                         "(not the curves over training, which need the logs); a run folder given here wins over "
                         "a row of the same point and seed")
    p.set_defaults(run=report_command, parser=p)

    p = commands.add_parser("lm-eval", help="zero-shot tasks of a train_lm.py checkpoint (Table 5)", description=(
        "Zero-shot downstream accuracy of a train_lm.py checkpoint through lm-eval-harness (paper Table 5), scored "
        "with the ensemble's log-probabilities. The tasks' data come from the HuggingFace hub."))
    p.add_argument("--checkpoint", required=True, help="a last.pt written by train_lm.py")
    p.add_argument("--tasks", default=PAPER_TASKS, help=f"comma-separated lm-eval task names (default: {PAPER_TASKS})")
    p.add_argument("--include-path", default=None, help="folder of extra lm-eval task YAML files (e.g. local data). "
                    "A task file can run Python code (!function entries): include only folders you trust")
    p.add_argument("--num-fewshot", type=int_in(0), default=0, help="in-context examples (paper: 0)")
    p.add_argument("--limit", type=int_in(1), default=None, help="at most this many documents per task (a quick look)")
    p.add_argument("--batch-size", type=int_in(1), default=16, help="sequences per forward pass")
    p.add_argument("--aggregate", default="probs", choices=["probs", "logits"],
                    help="ensemble rule: mean of probabilities (paper) or of logits (released code)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print the harness' per-task results as one JSON object")
    p.set_defaults(run=lm_eval_command, parser=p)
    return ap


def main(argv=None):
    ap = parser()
    args, rest = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.moved_checkpoint:  # the one process that evaluates is the trainer's: name its command
        path = args.moved_checkpoint
        try:
            script = neurotrails.load_checkpoint(path, flag="--checkpoint", mmap=True)["script"]
        except (ValueError, OSError) as e:
            ap.fail(e)
        ap.error(f"a checkpoint is evaluated by the script that wrote it: python {script} --eval-only "
                 f"--checkpoint {path} {' '.join(rest)}".strip())
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command is None:
        ap.error("choose a command: history, flops, report or lm-eval (evaluate.py COMMAND --help)")
    args.run(args, args.parser)


if __name__ == "__main__":
    main()
