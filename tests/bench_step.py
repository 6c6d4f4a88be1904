"""Milliseconds per training step of one configuration on the CPU: fp32, bf16 autocast or
channels-last (the converged study's pilot, BENCHMARKS.md). Median of 7 steps after 3 warm-up
steps, batch 128 of 1 x 28 x 28 images, 10 classes; NeuroTrails at S = 0.8 (masks applied).

    python tests/bench_step.py wrn16-2 neurotrails 2 bf16     # model, single|neurotrails, threads, fp32|bf16|cl
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import neurotrails  # noqa: E402


def main(model, method, threads, mode):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = neurotrails.build(model, 1 if method == "single" else 3, None, False, num_classes=10, in_channels=1)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    if mode == "cl":
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    masks = neurotrails.build_masks(net, 0.8) if method == "neurotrails" else None
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=mode == "bf16"):
            loss = neurotrails.ensemble_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if masks is not None:
            masks.apply_(opt)
        times.append(time.perf_counter() - start)
    print(f"{model} {method} threads={threads} {mode}: {1000 * sorted(times[3:])[3]:.0f} ms/step")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
