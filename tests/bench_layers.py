"""Benchmark: where DeepSparse spends its time on the Table 7 variants, block by block.

    python tests/bench_layers.py                          # WRN-28-10, batch 64: single, nt:0.95, nt:0.99
    python tests/bench_layers.py --threads 1 --json layers.json

The stop rule of the inference issue (paper Sec. 5.4, Table 7): when NeuroTrails at S = 0.95 does
not run 2x the single dense network, say where the time goes. DeepSparse's debug analysis times
every fused group of layers it runs (a "pyramid": several convolutions with their BatchNorm and
ReLU), and the group's canonical names say which component (backbone, head i) and which block of
the network it computes. A group that spans several blocks has its time split between them in
proportion to their dense FLOPs; groups without a name (stand-alone BatchNorm + ReLU, graph glue)
are counted apart.

Per block, for each sparse variant against the single dense network on the same engine:
  copies   1 in the backbone, M in the heads (the stem is block "stem", the classifier "tail")
  density  nonzero weights / weights of the block's copies
  speedup  per copy: single's time for the block x copies / the variant's time for the block
  limit    1 / density: what the speedup would be if time followed the nonzero FLOPs
  share    speedup / limit
and for the whole network the achieved GFLOP/s (nonzero multiply-adds x 2 / time) against the CPU's
fp32 peak, cores x clock x 32 FLOP per cycle (two 256-bit FMA pipes: Zen 2-4 and most Intel
cores; Intel server cores with two 512-bit FMA units reach twice that; --peak-gflops overrides).
"""
import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import export_bench  # noqa: E402
import neurotrails  # noqa: E402

PART = re.compile(r"(backbone|heads\.\d+)[./](stem|tail|block\d+)")


def block_of(name):
    """'heads.2.block11.conv1.weight' or '/net/heads.2/block11/conv1/Conv_output_0' -> ('heads.2', 'block11')."""
    m = PART.search(name)
    return (m.group(1), m.group(2)) if m else None


def block_weights(net):
    """Per block: copies (components holding it), weights and nonzero weights over the copies."""
    out = {}
    for name, p in net.named_parameters():
        part = block_of(name)
        if p.dim() < 2 or part is None:
            continue
        b = out.setdefault(part[1], {"components": set(), "weights": 0, "nonzero": 0})
        b["components"].add(part[0])
        b["weights"] += p.numel()
        b["nonzero"] += int(torch.count_nonzero(p))
    for b in out.values():
        b["copies"] = len(b.pop("components"))
    return out


def analyze(path, batch_size, threads, iterations, shape=(3, 32, 32)):
    """DeepSparse's per-group timing of one batch: [(blocks it covers, ms)], total ms."""
    from deepsparse.engine import model_debug_analysis
    x = np.random.default_rng(0).standard_normal((batch_size, *shape), dtype=np.float32)
    r = model_debug_analysis(str(path), [x], batch_size=batch_size, num_cores=threads or None,
                             num_iterations=iterations, num_warmup_iterations=2)
    groups = []
    for li in r["layer_info"]:
        names = li["canonical_name"].split(",") if li["canonical_name"] != "<none>" else []
        parts = sorted({p for p in map(block_of, names) if p})
        groups.append((parts, li["average_run_time_in_ms"]))
    return groups, r["average_total_time"]


def time_per_block(groups, dense_macs):
    """ms per block name; a group spanning several blocks split by the blocks' dense FLOPs."""
    out = {"(unnamed)": 0.0}
    for parts, ms in groups:
        blocks = sorted({b for _, b in parts})
        if not blocks:
            out["(unnamed)"] += ms
            continue
        w = [dense_macs.get(b, 1.0) * sum(1 for _, b2 in parts if b2 == b) for b in blocks]
        for b, wi in zip(blocks, w):
            out[b] = out.get(b, 0.0) + ms * wi / sum(w)
    return out


def merge_untimed(weights, macs, per_block):
    """A block no group names (the stem, fused into the first block's group) joins the next block
    in network order, as "stem+block0"."""
    names, out_w, out_m, pending = list(weights), {}, {}, []
    for b in names:
        if b not in per_block:
            pending.append(b)
            continue
        key = "+".join(pending + [b])
        w = [weights[x] for x in pending + [b]]
        out_w[key] = {"weights": sum(x["weights"] for x in w), "nonzero": sum(x["nonzero"] for x in w),
                      "copies": weights[b]["copies"]}
        out_m[key] = sum(macs.get(x, 0) for x in pending + [b])
        if pending:
            per_block[key] = per_block.pop(b)
        pending = []
    return out_w, out_m


def peak_gflops():
    """cores x clock (GHz, /proc/cpuinfo) x 32 fp32 FLOP per cycle; None where the clock is unknown."""
    try:
        mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("cpu MHz")]
    except OSError:
        return None
    return len(mhz) * sum(mhz) / len(mhz) / 1000 * 32 if mhz else None


def block_macs(net, shape):
    """Dense multiply-adds per item of one copy of each block (conv and linear weights x output positions)."""
    macs, hooks = {}, []
    for name, mod in net.named_modules():
        part = block_of(name)
        if part is None or not isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            continue

        def hook(m, inp, out, part=part):
            positions = out.shape[2] * out.shape[3] if out.dim() == 4 else 1
            key = part[1]
            if part[0] in ("backbone", "heads.0"):  # one copy
                macs[key] = macs.get(key, 0) + m.weight.numel() * positions
        hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        net.eval()(torch.zeros(1, *shape))
    for h in hooks:
        h.remove()
    return macs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="wrn28-10", help="base network")
    ap.add_argument("--num-heads", type=int, default=3, help="heads M")
    ap.add_argument("--blocks-in-head", type=int, default=8, help="blocks per head")
    ap.add_argument("--allocation", default="global", choices=["global", "per-component"], help="sparsity allocation")
    ap.add_argument("--variants", nargs="+", default=["nt:0.95", "nt:0.99"], help="sparse variants, beside single")
    ap.add_argument("--batch-size", type=int, default=64, help="items per batch")
    ap.add_argument("--threads", type=int, default=0, help="cores (0: all)")
    ap.add_argument("--iterations", type=int, default=10, help="timed iterations of the analysis")
    ap.add_argument("--peak-gflops", type=float, default=None, help="the CPU's fp32 peak (default: estimated)")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()
    os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
    shape, peak = (3, 32, 32), args.peak_gflops or peak_gflops()
    info = neurotrails.machine_info()
    print(f"# {info['cpu']}, {info['cores']} cores, {' '.join(info['isa'])}; fp32 peak "
          f"{peak:.0f} GFLOP/s (estimated: cores x clock x 32)" if peak else "")
    results = {"machine": info, "versions": neurotrails.package_versions(), "peak_gflops": peak,
               "args": vars(args), "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for v in ["single", *args.variants]:
            net = export_bench.variant_net(v, args.model, args.num_heads, args.blocks_in_head, args.allocation, 100, 3)
            path = Path(tmp) / f"{v}.onnx"
            export_bench.export(net, path, shape)
            weights, macs = block_weights(net), block_macs(net, shape)
            groups, total = analyze(path, args.batch_size, args.threads, args.iterations, shape)
            per_block = time_per_block(groups, macs)
            weights, macs = merge_untimed(weights, macs, per_block)
            nonzero_macs = sum(macs[b] * weights[b]["nonzero"] / weights[b]["weights"] * weights[b]["copies"]
                               for b in weights if b in macs)
            blocks = {b: {**w, "dense_macs_per_copy": macs.get(b)} for b, w in weights.items()}
            results["variants"][v] = {"total_ms": total, "per_block_ms": per_block, "blocks": blocks,
                                      "gflops": 2 * nonzero_macs * args.batch_size / total / 1e6}
    report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")


def report(results, args):
    single = results["variants"]["single"]
    order = [*single["blocks"], "(unnamed)"]  # network order
    for v, r in results["variants"].items():
        peak = results["peak_gflops"]
        share = f", {100 * r['gflops'] / peak:.1f} % of the fp32 peak" if peak else ""
        print(f"\n## {v}: {r['total_ms']:.1f} ms per batch of {args.batch_size} "
              f"({single['total_ms'] / r['total_ms']:.2f}x single); {r['gflops']:.1f} GFLOP/s of nonzero work{share}")
        print(f"{'block':<12} {'copies':>6} {'density':>8} {'ms':>8} {'% time':>7} {'speedup':>8} {'limit':>7} "
              f"{'share':>6}")
        for b in order + [b for b in r["blocks"] if b not in order]:
            ms = r["per_block_ms"].get(b, 0.0)
            w = r["blocks"].get(b)
            if w is None:
                print(f"{b:<12} {'':>6} {'':>8} {ms:>8.2f} {100 * ms / r['total_ms']:>7.1f}")
                continue
            density = w["nonzero"] / w["weights"]
            speedup = single["per_block_ms"].get(b, 0.0) * w["copies"] / ms if ms else float("nan")
            print(f"{b:<12} {w['copies']:>6} {density:>8.3f} {ms:>8.2f} {100 * ms / r['total_ms']:>7.1f} "
                  f"{speedup:>8.2f} {1 / density:>7.1f} {speedup * density:>6.2f}")


if __name__ == "__main__":
    main()
