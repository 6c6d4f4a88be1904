"""Milliseconds per training step of one configuration on the CPU: fp32, bf16 autocast or
channels-last (the converged study's pilot, BENCHMARKS.md). Median of 7 steps after 3 warm-up
steps, batch 128 of 1 x 28 x 28 images, 10 classes; NeuroTrails at S = 0.8 (masks applied).
Mode `ops` counts instead the PyTorch ops one step dispatches, on the meta device (no data, no
arithmetic): what a GPU's host has to queue per step (the GPU leg's estimate, BENCHMARKS.md).

    python tests/bench_step.py wrn16-2 neurotrails 2 bf16     # model, single|treenet|neurotrails|ensemble,
    python tests/bench_step.py wrn16-4 ensemble 1 ops         # threads, fp32|bf16|cl|ops
"""
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import neurotrails  # noqa: E402
import sparsity  # noqa: E402


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def main(model, method, threads, mode):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    heads, ensemble = (1 if method == "single" else 3), method == "ensemble"
    net = neurotrails.build(model, heads, None, ensemble, num_classes=10, in_channels=1)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    masks = neurotrails.build_masks(net, 0.8) if method == "neurotrails" else None
    if mode == "cl":
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    if mode == "ops":  # to meta (new Parameter objects): the masks follow through their state, as on a resume
        state = masks.state_dict() if masks is not None else None
        net, x, y = net.to("meta"), x.to("meta"), y.to("meta")
        if state is not None:
            masks = sparsity.Masks(neurotrails.masked_weights(net), {})
            masks.load_state_dict(state)
    # ops: foreach, as SGD's default on a GPU (on the meta device it would default to a loop over tensors)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                          foreach=True if mode == "ops" else None)
    forward = neurotrails.Members(net) if ensemble else net
    if ensemble:
        x = torch.stack([x] * heads)
    times, counter = [], CountOps()
    for _ in range(10 if mode != "ops" else 2):  # ops: the second step, with the optimizer state made
        counter.ops, start = 0, time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=mode == "bf16"), counter if mode == "ops" else nullcontext():
            logits = forward(x)
            loss = sum(F.cross_entropy(z, y) for z in logits) if ensemble else neurotrails.ensemble_loss(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if masks is not None:
                masks.apply_(opt)
        times.append(time.perf_counter() - start)
    if mode == "ops":
        print(f"{model} {method}: {counter.ops} ops per training step")
    else:
        print(f"{model} {method} threads={threads} {mode}: {1000 * sorted(times[3:])[3]:.0f} ms/step")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
