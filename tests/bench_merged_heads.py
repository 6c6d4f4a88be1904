"""Benchmark: the M heads' convolutions as one operator instead of M, on DeepSparse.

    python tests/bench_merged_heads.py                         # batch 1, densities 0.035 and 0.2
    python tests/bench_merged_heads.py --batch-size 64 --densities 0.035

A lever of the inference issue (paper Sec. 5.4, Table 7): at batch 1 the three heads' last stage
(WRN-28-10: 640 -> 640 3 x 3 convolutions at 8 x 8 positions, ERK density 0.035-0.055 at S = 0.95)
takes most of NeuroTrails' time, and each head's convolution is a small operator. Since every head
reads the same backbone output, the M convolutions of one layer can be written as one operator over
the heads' concatenated channels, with the same results:

  separate   M chains of `--layers` sparse convolutions (+ ReLU), as export_bench.py exports them
  grouped    one convolution per layer with groups = M (weights of head h in group h)
  blockdiag  one ordinary convolution per layer over M x C channels whose weight is block-diagonal
             (the heads' sparse weights on the diagonal, exact zeros elsewhere: density / M)

Each network is checked against `separate` (max abs difference printed), compiled by DeepSparse,
and timed in interleaved rounds; medians and the paired ratio separate / merged (> 1: merged is
faster) are printed. Weights are random at the given density: speed depends on where the zeros
are, not on their values.
"""
import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")  # before deepsparse is imported
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402


def sparse_conv(c_in, c_out, density, groups=1):
    conv = nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False, groups=groups)
    with torch.no_grad():
        conv.weight.mul_((torch.rand_like(conv.weight) < density).float())
    return conv


class Separate(nn.Module):
    """M heads, each a chain of sparse convolutions + ReLU; output: the sum of the heads."""

    def __init__(self, heads, layers, channels, density):
        super().__init__()
        self.heads = nn.ModuleList(nn.Sequential(*[m for _ in range(layers) for m in (
            sparse_conv(channels, channels, density), nn.ReLU())]) for _ in range(heads))

    def forward(self, x):
        return sum(head(x) for head in self.heads)


class Merged(nn.Module):
    """The same heads as one chain over M x C channels; input: the backbone output repeated M times."""

    def __init__(self, separate, blockdiag):
        super().__init__()
        m = len(separate.heads)
        layers = []
        for i in range(0, len(separate.heads[0]), 2):
            w = [head[i].weight for head in separate.heads]
            c = w[0].shape[0]
            conv = nn.Conv2d(m * c, m * c, 3, 1, 1, bias=False, groups=1 if blockdiag else m)
            with torch.no_grad():
                if blockdiag:
                    conv.weight.zero_()
                    for h in range(m):
                        conv.weight[h * c:(h + 1) * c, h * c:(h + 1) * c] = w[h]
                else:
                    conv.weight.copy_(torch.cat(w))
            layers += [conv, nn.ReLU()]
        self.body, self.m, self.c = nn.Sequential(*layers), m, c

    def forward(self, x):
        y = self.body(x)
        return sum(y[:, h * self.c:(h + 1) * self.c] for h in range(self.m))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=3, help="heads M")
    ap.add_argument("--layers", type=int, default=4, help="convolutions per head")
    ap.add_argument("--channels", type=int, default=640, help="channels C of each head's convolutions")
    ap.add_argument("--size", type=int, default=8, help="feature map height = width")
    ap.add_argument("--densities", type=float, nargs="+", default=[0.035, 0.2], help="densities of the heads' weights")
    ap.add_argument("--batch-size", type=int, default=1, help="items per batch")
    ap.add_argument("--threads", type=int, default=0, help="cores (0: all)")
    ap.add_argument("--rounds", type=int, default=200, help="interleaved timing rounds")
    args = ap.parse_args()
    import tempfile
    import warnings
    from deepsparse import Engine
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, args.channels, args.size, args.size)
    wide = x.repeat(1, args.heads, 1, 1)
    print(f"{args.heads} heads x {args.layers} convolutions {args.channels} -> {args.channels} at "
          f"{args.size} x {args.size}, batch {args.batch_size}, threads {args.threads or 'all'}, {args.rounds} rounds")
    for density in args.densities:
        separate = Separate(args.heads, args.layers, args.channels, density).eval()
        nets = {"separate": (separate, x), "grouped": (Merged(separate, False).eval(), wide),
                "blockdiag": (Merged(separate, True).eval(), wide)}
        engines, times = {}, {}
        with torch.no_grad(), tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = separate(x)
            for name, (net, inp) in nets.items():
                diff = float((net(inp) - expected).abs().max())
                path = os.path.join(tmp, f"{name}.onnx")
                torch.onnx.export(net, (inp,), path, dynamo=False, opset_version=13, input_names=["input"])
                engines[name] = (Engine(path, batch_size=args.batch_size, num_cores=args.threads or None),
                                 [inp.numpy()], diff)
                times[name] = []
        for engine, inp, _ in engines.values():
            for _ in range(5):
                engine.run(inp)
        for _ in range(args.rounds):
            for name, (engine, inp, _) in engines.items():
                t = time.perf_counter()
                engine.run(inp)
                times[name].append(time.perf_counter() - t)
        print(f"density {density}:")
        for name, (_, _, diff) in engines.items():
            paired = statistics.median(a / b for a, b in zip(times["separate"], times[name]))
            print(f"  {name:9s} median {1000 * statistics.median(times[name]):7.2f} ms | separate / this, paired "
                  f"{paired:.2f} | max abs diff to separate {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
