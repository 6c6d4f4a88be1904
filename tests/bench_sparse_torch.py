"""Benchmark: PyTorch's own sparse kernels for one NeuroTrails head convolution, against dense.

    python tests/bench_sparse_torch.py --rounds 20

A lever of the inference issue (paper Sec. 5.4, App. J): a maintained sparse path that installs on
every Python. The convolution most of a WRN-28-10 head's FLOPs sit in (640 -> 640 channels, 3 x 3,
8 x 8 positions, batch 64) is computed three ways and timed interleaved: dense `F.conv2d`;
im2col (`F.unfold`) + CSR matrix product (`torch.sparse`, weight (640, 5760) at density d); and
the same with a block-sparse (BSR, 16 x 16 blocks) weight whose zeros come in whole blocks (an
unstructured ER mask has almost no all-zero blocks, so BSR needs another mask: shown for what
structure would buy). Each result is checked against the dense convolution.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.2, 0.05, 0.01])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--channels", type=int, default=640)
    ap.add_argument("--size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    c, n, s = args.channels, args.batch_size, args.size
    x = torch.randn(n, c, s, s, generator=g)
    cols = F.unfold(x, 3, padding=1)  # (n, 9c, s*s)
    cols2d = cols.transpose(0, 1).reshape(9 * c, n * s * s)  # (9c, n s s)
    w = torch.randn(c, c, 3, 3, generator=g)
    calls = {"dense conv2d": lambda wd=w: F.conv2d(x, wd, padding=1)}
    for d in args.densities:
        mask = torch.rand(c, c, 3, 3, generator=g) < d
        wd = w * mask
        csr = wd.reshape(c, 9 * c).to_sparse_csr()
        blocks = (torch.rand(c // 16, 9 * c // 16, generator=g) < d).repeat_interleave(16, 0).repeat_interleave(16, 1)
        wb = w.reshape(c, 9 * c) * blocks
        bsr = wb.to_sparse_bsr((16, 16))
        ref_u, ref_b = F.conv2d(x, wd, padding=1), (wb @ cols2d)
        out_u = (csr @ cols2d).reshape(c, n, s, s).transpose(0, 1)
        assert torch.allclose(out_u, ref_u, atol=1e-3, rtol=1e-3), "CSR result differs from the dense convolution"
        assert torch.allclose(bsr @ cols2d, ref_b, atol=1e-3, rtol=1e-3), "BSR result differs"
        calls[f"dense conv2d, d={d} (zeros)"] = lambda wd=wd: F.conv2d(x, wd, padding=1)
        calls[f"unfold + CSR mm, d={d}"] = lambda m=csr: (m @ F.unfold(x, 3, padding=1).transpose(0, 1).reshape(9 * c, -1))
        calls[f"unfold + BSR mm, d={d} (16x16 blocks)"] = \
            lambda m=bsr: (m @ F.unfold(x, 3, padding=1).transpose(0, 1).reshape(9 * c, -1))
    times = {k: [] for k in calls}
    with torch.inference_mode():
        for r in range(2 + args.rounds):
            for k, f in calls.items():
                start = time.perf_counter()
                f()
                if r >= 2:
                    times[k].append(time.perf_counter() - start)
    base = statistics.median(times["dense conv2d"])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; conv {c}->{c} 3x3 on {s}x{s}, batch {n}; "
          f"medians of {args.rounds} interleaved rounds")
    print(f"{'kernel':<40} {'ms':>8} {'speed-up vs dense':>18}")
    for k, t in times.items():
        m = statistics.median(t)
        print(f"{k:<40} {1000 * m:>8.2f} {base / m:>18.2f}")


if __name__ == "__main__":
    main()
