"""Measurements of an ensemble: accuracy, NLL, ECE, prediction disagreement, FLOPs, plots.

Paper map (arXiv 2505.17909):
  App. F    accuracy, NLL, ECE with 15 bins (Guo 2017)           -> accuracy(), nll(), ece()
  Sec. 5.2  prediction disagreement between heads               -> disagreement()
  App. F    inference FLOPs: active weights x output positions   -> inference_flops()
  Sec. 5.2  disagreement / accuracy over training (Fig. 4)      -> plot_history()
            reliability diagram                                 -> plot_reliability()

The metric functions are pure: they take per-head probabilities (M, N, C) or ensemble
probabilities (N, C) and labels (N), and touch no model. train_vision.py imports this module for
them; `python evaluate.py --checkpoint PATH` evaluates a saved vision run on its test set (the data
loading it needs is train_vision.load_data, imported inside that command only).

Deviation: prediction disagreement. Released code: averages an M x M matrix including its zero
  diagonal, which understates the pairwise mean by a factor (M-1)/M. Ours: the mean over the
  M(M-1)/2 pairs, and also the fraction of samples on which the heads do not all agree.
"""
import argparse
import json
import sys

import torch
import torch.nn as nn

import neurotrails

# ----------------------------------------------------------------------------------------------
# Metrics (pure functions)


def accuracy(probs, labels):
    """Fraction of samples whose arg-max class is the label."""
    return (probs.argmax(-1) == labels).float().mean().item()


def nll(probs, labels, eps=1e-12):
    """Mean negative log-likelihood of the true class: -1/N sum_n log p_n[y_n]."""
    return -probs.gather(-1, labels[:, None]).clamp_min(eps).log().mean().item()


def ece(probs, labels, bins=15):
    """Expected calibration error with equal-width confidence bins (Guo et al. 2017):
    ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|, bins (0, 1/15], ..., (14/15, 1]."""
    conf, pred = probs.max(-1)
    correct = (pred == labels).float()
    # bin b holds confidences in (b/bins, (b+1)/bins]
    idx = (conf * bins).ceil().long().clamp(1, bins) - 1
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
    any_ = (preds != preds[:1]).any(0).float().mean().item()
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
# FLOPs (App. F, following RigL App. H)


@torch.no_grad()
def inference_flops(net, example):
    """Dense and sparse forward FLOPs for one input of `example`'s shape (batch of 1 counted).

    Per conv / linear: FLOPs = 2 x (weights used) x (output positions); sparse counts only the
    nonzero weights. The backbone runs once per forward, so it is counted once. Biases, norms,
    activations and pooling are left out, as in RigL's accounting.
    """
    counts = {"dense": 0, "sparse": 0}

    def hook(module, inputs, output):
        positions = output[0].numel() // module.weight.shape[0]  # output elements per out-channel
        counts["dense"] += 2 * module.weight.numel() * positions
        counts["sparse"] += 2 * int(torch.count_nonzero(module.weight)) * positions

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


def parameter_counts(net):
    """Total parameters and active (nonzero-able) parameters: zeros in masked weights don't count."""
    total = sum(p.numel() for p in net.parameters())
    active = sum(int(torch.count_nonzero(p)) if p.dim() >= 2 else p.numel() for p in net.parameters())
    return {"params": total, "active_params": active}


# ----------------------------------------------------------------------------------------------
# Plots (matplotlib, imported only when plotting)


def reliability_bins(probs, labels, bins=15):
    """Per confidence bin: (bin upper edge, count, accuracy, mean confidence)."""
    conf, pred = probs.max(-1)
    idx = (conf * bins).ceil().long().clamp(1, bins) - 1
    rows = []
    for b in range(bins):
        sel = idx == b
        n = int(sel.sum())
        acc = (pred[sel] == labels[sel]).float().mean().item() if n else 0.0
        rows.append(((b + 1) / bins, n, acc, conf[sel].mean().item() if n else 0.0))
    return rows


def plot_reliability(probs, labels, path, title=""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = reliability_bins(probs, labels)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.bar([r[0] - 1 / 30 for r in rows], [r[2] for r in rows], width=1 / 15, edgecolor="k", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"{title} ECE {ece(probs, labels):.3f}".strip())
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_history(jsonl_path, path):
    """Test accuracy and prediction disagreement over epochs from a training JSONL log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(jsonl_path)]
    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, [100 * r["acc"] for r in rows], label="ensemble accuracy (%)")
    ax.plot(epochs, [100 * r["pd_any"] for r in rows], label="disagreement: any (%)")
    ax.plot(epochs, [100 * r["pd_pairwise"] for r in rows], label="disagreement: pairwise (%)")
    ax.set(xlabel="epoch", ylabel="%")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Command line


def main():
    ap = argparse.ArgumentParser(description="Evaluate a saved train_vision.py checkpoint on its test set "
                                 "(accuracy, NLL, ECE, disagreement, per-head accuracy, FLOPs), or plot a log.")
    ap.add_argument("--checkpoint", help="a checkpoint written by train_vision.py")
    ap.add_argument("--data-dir", default=None, help="dataset folder (default: the one stored in the checkpoint)")
    ap.add_argument("--batch-size", type=int, default=256, help="test batch size")
    ap.add_argument("--aggregate", default=None, choices=["probs", "logits"],
                    help="ensemble rule (default: the checkpoint's): mean of probabilities or of logits")
    ap.add_argument("--plot", default=None, help="write a reliability diagram PNG here")
    ap.add_argument("--history", default=None, help="a training JSONL log: plot accuracy and disagreement")
    ap.add_argument("--history-plot", default="history.png", help="output PNG for --history")
    ap.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    args = ap.parse_args()
    if args.history:
        plot_history(args.history, args.history_plot)
        print(f"wrote {args.history_plot}")
    if not args.checkpoint:
        if not args.history:
            ap.error("give --checkpoint and/or --history")
        return
    import train_vision  # data loading and model rebuilding live with the training script
    try:
        net, config, test = train_vision.load_for_eval(args.checkpoint, args.data_dir, args.batch_size)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    logits, labels = predict(net, test)
    result = summarize(logits, labels, args.aggregate or config["aggregate"])
    result.update(parameter_counts(net))
    if args.plot:
        plot_reliability(neurotrails.soft_vote(logits, args.aggregate or config["aggregate"]), labels, args.plot)
    if args.json:
        print(json.dumps(result))
    else:
        print(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
