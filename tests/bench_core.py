"""Benchmark of the sparsity core (not a test; pytest does not collect it).

    python tests/bench_core.py [--rounds 7] [--batch-size 128] [--device cpu|cuda]

Measures, in one run with the variants interleaved round by round:
  1. mask storage: bytes per masked weight (bool masks: 1);
  2. Masks.apply_ after an SGD step vs one TreeNet training step of WRN-16-4 (M=3, 4 blocks in
     head, CIFAR-sized batch) on this CPU, a whole NeuroTrails step (S=0.8, apply_ included)
     vs the TreeNet step, one topology update (magnitude + RigL) of that network, and the mask
     and DST overhead per step (apply_ + update / delta_t) relative to the TreeNet step;
  3. one full topology update (soft-magnitude prune T=3 + RigL grow, drop fraction 0.5) of a
     32000 x 768 tensor at the density the LLaMA-130M global ER solve gives it (0.728), and the
     same tensor with the plain kthvalue selection for comparison.
Prints medians and ratios; BENCHMARKS.md records a run.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import neurotrails  # noqa: E402
import sparsity  # noqa: E402


def timed(fn):
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_step(net, opt, x, y):
    opt.zero_grad(set_to_none=True)
    neurotrails.ensemble_loss(net(x), y).backward()
    opt.step()


def bench_step(rounds, batch_size, device):
    torch.manual_seed(0)
    treenet = neurotrails.build("wrn16-4", 3, 4, num_classes=100).to(device)
    torch.manual_seed(0)
    nt = neurotrails.build("wrn16-4", 3, 4, num_classes=100).to(device)
    masks = neurotrails.build_masks(nt, 0.8, delta_t=100, t_end=10_000)
    opts = [torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
            for n in (treenet, nt)]
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (batch_size,), device=device)
    for net, opt in zip((treenet, nt), opts):  # warm-up, creates the momentum buffers
        train_step(net, opt, x, y)
    masks.apply_(opts[1])
    t_tree, t_nt, t_apply = [], [], []
    for _ in range(rounds):  # A B A B ...: same machine load for both
        t_tree.append(timed(lambda: train_step(treenet, opts[0], x, y)))
        t_apply.append(0.0)

        def nt_step():
            train_step(nt, opts[1], x, y)
            t_apply[-1] = timed(lambda: masks.apply_(opts[1]))
        t_nt.append(timed(nt_step))
    t_update = [timed(lambda: masks.update(100 * (r + 1), opts[1])) for r in range(3)]  # grads still present
    stored = sum(m.numel() * m.element_size() for m in masks.masks.values())
    weights = sum(m.numel() for m in masks.masks.values())
    return {
        "mask_bytes_per_weight": stored / weights,
        "treenet_step_s": statistics.median(t_tree),
        "neurotrails_step_s": statistics.median(t_nt),
        "apply_s": statistics.median(t_apply),
        "apply_over_treenet_step": statistics.median(a / t for a, t in zip(t_apply, t_tree)),
        "neurotrails_over_treenet_step": statistics.median(n / t for n, t in zip(t_nt, t_tree)),
        "topology_update_s": statistics.median(t_update),
        # apply_ every step + one update every delta_t = 100 steps, per TreeNet step
        "mask_and_dst_overhead": (statistics.median(t_apply) + statistics.median(t_update) / 100)
        / statistics.median(t_tree),
    }


def bench_update(rounds, device):
    g = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter((torch.randn(32000, 768, generator=g) * 0.02).to(device))
    weight.grad = torch.randn(32000, 768, generator=g).to(device)
    mask = sparsity.random_mask(weight.shape, 0.7282, g).to(device)
    masks = sparsity.Masks({"w": weight}, {"w": mask}, prune="soft_magnitude", grow="rigl",
                           temperature=3.0, p0=0.5, delta_t=50, t_end=10**9)
    active = int(mask.sum())
    t_update, t_kth = [], []
    for step in range(1, rounds + 1):
        t_update.append(timed(lambda: masks.update(50 * step)))
        assert int(masks.masks["w"].sum()) == active
        flat = weight.detach().abs().reshape(-1)
        t_kth.append(timed(lambda: flat.kthvalue(flat.numel() - active // 2)))
    return {"soft_magnitude_update_s": statistics.median(t_update),
            "one_full_kthvalue_s": statistics.median(t_kth)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7, help="interleaved repetitions; medians are reported")
    ap.add_argument("--batch-size", type=int, default=128, help="images per training step")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    results = {**bench_update(args.rounds, args.device), **bench_step(args.rounds, args.batch_size, args.device)}
    for key, value in results.items():
        print(f"{key:<32} {value:.4f}")


if __name__ == "__main__":
    main()
