"""Benchmark of language-model training (not a test; pytest does not collect it).

    python tests/bench_lm.py [--rounds 3] [--device cpu|cuda] [--topology-model llama-130m]
        [--model llama-9m --vocab 4096 --seq-len 128 --batch-size 16 --micro-batch-size 16]

Measures, in one run:
  1. one full topology update (soft-magnitude prune T=3 + RigL grow, drop fraction 0.5) of every
     sparse tensor of a NeuroTrails LLaMA (default llama-130m, M=3, 8 blocks in head, S=0.1, global
     ER, vocabulary 32000), on the gradient of a real backward pass; median over --rounds;
  2. training throughput (target tokens per second of whole updates: micro-batches accumulated,
     Adam step, mask enforcement) of single dense, TreeNet and NeuroTrails (M=3, S=0.1) on random
     tokens, the three interleaved round by round; medians and ratios to single dense.
Prints medians and ratios; BENCHMARKS.md records runs.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import neurotrails  # noqa: E402
import train_lm  # noqa: E402


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def build(model, method, vocab, device):
    torch.manual_seed(0)
    heads = 1 if method == "single" else 3
    net = neurotrails.build(model, heads, None, vocab_size=vocab).to(device)
    masks = None
    if method == "neurotrails":
        masks = neurotrails.build_masks(net, 0.1, prune="soft_magnitude", grow="rigl", temperature=3.0, p0=0.5,
                                        delta_t=50, t_end=10**9)
    return net, masks, torch.optim.Adam(net.parameters(), lr=1e-4)


def update(net, masks, opt, ids, targets, micro, autocast):
    """One optimizer update as train_lm.train does it: accumulate, step, enforce the masks."""
    opt.zero_grad(set_to_none=True)
    count = (targets != -100).sum()
    for j in range(0, len(ids), micro):
        with autocast:
            loss = train_lm.head_nll_sums(net(ids[j:j + micro]), targets[None, j:j + micro]).mean() / count
        loss.backward()
    opt.step()
    if masks is not None:
        masks.apply_(opt)


def bench_topology(model, vocab, rounds, device, bf16):
    net, masks, opt = build(model, "neurotrails", vocab, device)
    ids = torch.randint(vocab, (4, 65), device=device)
    autocast = torch.autocast(device.split(":")[0], torch.bfloat16, enabled=bf16)
    update(net, masks, opt, ids[:, :-1], ids[:, 1:], 4, autocast)  # real gradients on every weight
    sparse = sum(m.numel() for m in masks.masks.values())
    times = [timed(lambda: masks.update(50 * (r + 1), opt), device) for r in range(rounds)]
    return {f"{model}_topology_update_s": statistics.median(times), "sparse_tensors": len(masks.masks),
            "sparse_tensor_elements": sparse}


def bench_training(model, vocab, seq_len, batch, micro, rounds, device, bf16):
    methods = ("single", "treenet", "neurotrails")
    runs = {m: build(model, m, vocab, device) for m in methods}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab, (batch, seq_len), generator=g).to(device)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    autocast = torch.autocast(device.split(":")[0], torch.bfloat16, enabled=bf16)
    for m in methods:  # warm-up: allocator, Adam state
        update(*runs[m], inputs, targets, micro, autocast)
    times = {m: [] for m in methods}
    for _ in range(rounds):  # A B C A B C ...: the same machine load for all
        for m in methods:
            times[m].append(timed(lambda: update(*runs[m], inputs, targets, micro, autocast), device))
    tokens = targets.numel()
    out = {f"{m}_tokens_per_s": tokens / statistics.median(times[m]) for m in methods}
    for m in ("treenet", "neurotrails"):
        out[f"{m}_over_single_time"] = statistics.median(a / b for a, b in zip(times[m], times["single"]))
    out["neurotrails_over_treenet_time"] = statistics.median(
        a / b for a, b in zip(times["neurotrails"], times["treenet"]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="repetitions; medians are reported")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (as train_lm.py on a GPU)")
    ap.add_argument("--topology-model", default="llama-130m", help="model of the topology-update timing ('' skips)")
    ap.add_argument("--model", default="llama-9m", help="model of the throughput comparison")
    ap.add_argument("--vocab", type=int, default=4096, help="vocabulary of the throughput comparison")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per update")
    ap.add_argument("--micro-batch-size", type=int, default=16, help="sequences per forward/backward")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, bf16 {args.bf16}")
    results = {}
    if args.topology_model:
        results.update(bench_topology(args.topology_model, 32000, args.rounds, args.device, args.bf16))
    results.update(bench_training(args.model, args.vocab, args.seq_len, args.batch_size, args.micro_batch_size,
                                  args.rounds, args.device, args.bf16))
    for key, value in results.items():
        print(f"{key:<36} {value:,.4f}" if isinstance(value, float) else f"{key:<36} {value:,}")


if __name__ == "__main__":
    main()
