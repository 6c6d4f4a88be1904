"""ONNX export of a NeuroTrails ensemble and a CPU inference benchmark on DeepSparse and ONNX Runtime.

    python export_bench.py export --checkpoint runs/.../last.pt --out model.onnx
    python export_bench.py export --model wrn28-10 --num-heads 3 --blocks-in-head 8 --sparsity 0.95 --out m.onnx
    python export_bench.py bench --variants single ensemble nt:0.8 nt:0.95 --batch-size 64
    python export_bench.py table7                      # the paper's Table 7 set, beside its ratios
    python export_bench.py hf --checkpoint runs/lm-.../last.pt --out hf/   # each LLaMA head for transformers

Paper map (arXiv 2505.17909):
  Sec. 5.4, Table 7   throughput (items/s) and latency (ms/batch) on DeepSparse     -> bench(), table7
  App. J, Fig. 8      theoretical (FLOP) vs measured speed-up                      -> the efficiency column
  Sec. 3              one graph: backbone once, M heads, soft vote inside           -> export()
  Sec. 4.2, Table 5   each LLaMA head as a plain transformers model (lm-eval `hf`)  -> export_hf()

One ONNX graph per model: the masks are already exact zeros in the weights, BatchNorm is in eval
mode, the backbone is computed once, and the output is the ensemble's class probabilities (mean of
the heads' softmax). After export, ONNX Runtime's output is compared with PyTorch's on a fixed batch
(max abs difference must be <= 1e-4) and the zeros of every masked weight are counted again in the
graph's initialisers, per component.

DeepSparse (Neural Magic's sparse-aware CPU engine) is optional: without it (Python >= 3.12, ARM,
no AVX2) the benchmark says so in one line and runs ONNX Runtime (the dense reference) only.
NM_DISABLE_ANALYTICS=1 is set before deepsparse is imported, unless the user set it.

Variants: single (dense, M=1), ensemble (M dense members), treenet (M dense heads), nt:S
(NeuroTrails at sparsity S). Weights of bench variants are freshly initialised with random masks
at the allocated densities: speed does not depend on trained values, only on where the zeros are.
"""
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import evaluate
import models
import neurotrails
from neurotrails import int_in

# Paper Table 7 (items/s, DeepSparse, batch size not stated): throughput relative to single dense.
PAPER_TABLE7 = {"single": 1.0, "nt:0.8": 26.46 / 55.81, "nt:0.95": 52.05 / 55.81, "nt:0.99": 68.64 / 55.81,
                "ensemble": 18.65 / 55.81}


class Vote(nn.Module):
    """x -> mean of the heads' softmax: the ensemble's class probabilities, inside the graph."""

    def __init__(self, net, aggregate="probs"):
        super().__init__()
        self.net, self.aggregate = net, aggregate

    def forward(self, x):
        return neurotrails.soft_vote(self.net(x), self.aggregate)


# ----------------------------------------------------------------------------------------------
# Building what to export


def variant_net(variant, model, num_heads, blocks_in_head, allocation, num_classes, in_channels, seed=0, init="er"):
    """A network for a variant name: single | ensemble | treenet | nt:<sparsity>; init: the masks'
    layerwise densities, "er" (ERK for convolutions) or "uniform"."""
    sparsity_ = variant_sparsity(variant)
    torch.manual_seed(seed)
    kwargs = dict(num_classes=num_classes, in_channels=in_channels)
    if variant == "single":
        return neurotrails.build(model, 1, None, **kwargs)
    if variant == "ensemble":
        return neurotrails.build(model, num_heads, None, True, **kwargs)
    net = neurotrails.build(model, num_heads, blocks_in_head, **kwargs)
    if sparsity_ > 0:  # nt:S
        neurotrails.build_masks(net, sparsity_, allocation, init, seed)
    return net


def variant_sparsity(variant):
    """S of a variant name: 0 for single / ensemble / treenet, S of nt:S; ValueError otherwise."""
    if variant in ("single", "ensemble", "treenet"):
        return 0.0
    if not variant.startswith("nt:"):
        raise ValueError(f"--variants: unknown variant {variant!r}; use single, ensemble, treenet or nt:<sparsity>")
    try:
        s = float(variant[3:])
    except ValueError:
        raise ValueError(f"--variants: {variant!r} is not nt:<sparsity>") from None
    if not 0 < s < 1:  # also refuses nan and inf
        raise ValueError(f"--variants: the sparsity of {variant!r} must be in (0, 1)")
    return s


def net_from_checkpoint(path):
    """A train_vision.py checkpoint -> (network with its weights, aggregate, input shape), from
    what the checkpoint says of itself."""
    state = neurotrails.load_checkpoint(path, "train_vision.py", "--checkpoint")
    if "input_shape" not in state:
        raise ValueError(f"--checkpoint {path}: predates the self-describing format (no input_shape)")
    return (neurotrails.model_from_checkpoint(state, path=f"--checkpoint {path}"), state["config"]["aggregate"],
            tuple(state["input_shape"]))


# ----------------------------------------------------------------------------------------------
# Export and its checks


def export(net, path, shape, aggregate="probs", check_batch=4):
    """Write one ONNX graph (probabilities out) and verify it against PyTorch with ONNX Runtime.

    Returns {"max_abs_diff": float, "components": {component: (zeros in graph, zeros in model)}}.
    """
    net = net.eval()
    vote = Vote(net, aggregate).eval()
    example = torch.randn(check_batch, *shape, generator=torch.Generator().manual_seed(0))
    # Constant folding off: initialiser names stay the parameter names, so zeros can be checked
    # per tensor; both engines fold BatchNorm themselves when they load the graph.
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated but still the one
        warnings.simplefilter("ignore")  # that runs with onnx < 1.15, which deepsparse 1.8 needs
        torch.onnx.export(vote, (example,), str(path), dynamo=False, opset_version=13, do_constant_folding=False,
                          input_names=["input"], output_names=["probs"],
                          dynamic_axes={"input": {0: "batch"}, "probs": {0: "batch"}})
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = vote(example).numpy()
    diff = float(np.abs(session.run(None, {"input": example.numpy()})[0] - expected).max())
    if diff > 1e-4:
        raise RuntimeError(f"ONNX Runtime output differs from PyTorch by {diff:.2e} (> 1e-4)")
    return {"max_abs_diff": diff, "components": initializer_zeros(path, net)}


def initializer_zeros(path, net):
    """Per component: zeros in the graph's copies of the masked weights vs zeros in the model."""
    import onnx
    from onnx import numpy_helper
    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    out = {}
    for name, w in neurotrails.masked_weights(net).items():
        key = "net." + name
        key = alias.get(key, key)
        if key not in inits:
            raise RuntimeError(f"masked weight {name} not found among the ONNX initialisers")
        graph_zeros = int((numpy_helper.to_array(inits[key]) == 0).sum())
        c = out.setdefault(neurotrails.component(name), [0, 0, 0])
        c[0] += graph_zeros
        c[1] += int((w == 0).sum())
        c[2] += w.numel()
    for comp, (g, m, n) in out.items():
        if g != m:
            raise RuntimeError(f"{comp}: {g} zeros in the ONNX weights but {m} in the model")
    return out


def dead_channels(net):
    """Per component: (dead output channels, dead input channels, channels) of the masked weights.
    A dead output channel (a filter whose weights are all zero) only adds its bias / BatchNorm
    shift; a dead input channel is never read. Both could be cut from the graph before export."""
    out = {}
    for name, w in neurotrails.masked_weights(net).items():
        flat_out, flat_in = w.detach().flatten(1), w.detach().transpose(0, 1).flatten(1)
        c = out.setdefault(neurotrails.component(name), [0, 0, 0])
        c[0] += int((flat_out == 0).all(1).sum())
        c[1] += int((flat_in == 0).all(1).sum())
        c[2] += w.shape[0]
    return out


# ----------------------------------------------------------------------------------------------
# Engines and the interleaved benchmark


def deepsparse_or_none():
    """The deepsparse module, or None with the reason printed once."""
    os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")  # it phones home on import otherwise
    try:
        import deepsparse
        return deepsparse
    except Exception as e:  # ImportError on Python >= 3.12, or an unsupported CPU
        print(f"DeepSparse unavailable ({type(e).__name__}: {str(e)[:100]}); running ONNX Runtime only",
              file=sys.stderr)
        return None


def make_runner(engine, path, batch_size, threads):
    """A callable that runs one batch through `path` on `engine`."""
    if engine == "onnxruntime":
        import onnxruntime as ort
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"input": x})
    if engine == "deepsparse":
        import deepsparse
        model = deepsparse.compile_model(str(path), batch_size=batch_size, num_cores=threads or None)
        return lambda x: model.run([x])
    raise ValueError(f"--engines: unknown engine {engine!r}; use deepsparse and/or onnxruntime")


def median_ci(values, level=0.95):
    """The median with a distribution-free confidence interval: the order statistics x_(k) and
    x_(n+1-k) of the sorted sample, k the largest with 2 P(Binomial(n, 1/2) < k) <= 1 - level
    (Hollander & Wolfe, Nonparametric Statistical Methods, ch. 3); None for the bounds when n is too
    small to reach the level (n < 6 at 95 %)."""
    x, n = sorted(values), len(values)
    below, k = 0.0, 0  # below = P(B < k+1) as k grows
    while k < n // 2:
        below += math.comb(n, k) / 2 ** n
        if 2 * below > 1 - level:
            break
        k += 1
    return statistics.median(x), (x[k - 1], x[n - k]) if k else None


def bench(variants, engines, model, num_heads, blocks_in_head, allocation, batch_size, threads, rounds,
          warmup=2, num_classes=100, shape=(3, 32, 32), init="er"):
    """Throughput and latency per (engine, variant); variants interleaved round by round."""
    if "deepsparse" in engines and deepsparse_or_none() is None:
        engines = [e for e in engines if e != "deepsparse"]
        if not engines:
            raise ValueError("--engines deepsparse: DeepSparse is unavailable here (see the line above); "
                             "use --engines onnxruntime")
    if "single" not in variants:
        variants = ["single", *variants]
    x = np.random.default_rng(0).standard_normal((batch_size, *shape), dtype=np.float32)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        flops, runners = {}, {}
        for v in tqdm(variants, desc="export", disable=not sys.stderr.isatty()):
            net = variant_net(v, model, num_heads, blocks_in_head, allocation, num_classes, shape[0], init=init)
            export(net, Path(tmp) / f"{v}.onnx", shape)
            flops[v] = evaluate.inference_flops(net, torch.from_numpy(x[:1]))["sparse"]
        for engine in engines:
            for v in tqdm(variants, desc=f"compile {engine}", disable=not sys.stderr.isatty()):
                runners[engine, v] = make_runner(engine, Path(tmp) / f"{v}.onnx", batch_size, threads)
            times = {v: [] for v in variants}
            for r in tqdm(range(warmup + rounds), desc=f"rounds {engine}", disable=not sys.stderr.isatty()):
                for v in variants:  # A B C A B C ...: drift of a shared machine hits all alike
                    start = time.perf_counter()
                    runners[engine, v](x)
                    if r >= warmup:
                        times[v].append(time.perf_counter() - start)
            for v in variants:
                t = times[v]
                results[engine, v] = {"items_per_s": batch_size / statistics.median(t),
                                      "latency_ms": 1000 * statistics.mean(t),
                                      "latency_std_ms": 1000 * statistics.stdev(t) if len(t) > 1 else 0.0}
            for v in variants:
                res = results[engine, v]
                res["ratio"] = res["items_per_s"] / results[engine, "single"]["items_per_s"]
                # the speedup round by round (single and v ran back to back): its median and 95 % interval
                # say whether a ratio near 1 is a win or a tie on a noisy machine
                res["paired_ratio"], ci = median_ci([a / b for a, b in zip(times["single"], times[v])])
                res["paired_ratio_ci"] = list(ci) if ci else None
                res["flop_ratio"] = flops[v] / flops["single"]
                # efficiency 1.0: every FLOP saved (or added) shows up one-for-one in throughput
                res["efficiency"] = res["ratio"] * res["flop_ratio"]
    return results


def print_results(results, batch_size, threads, paper=None):
    machine = neurotrails.machine_info()
    isa = [f for f in machine["isa"] if f.startswith(("avx2", "avx512f", "avx512_vnni", "amx"))]
    forced = os.environ.get("NM_ARCH")  # DeepSparse's kernels for another ISA than the CPU's best
    print(f"\n{machine['cpu']} ({machine['cores']} cores; {' '.join(isa) or 'no AVX2'}"
          f"{f'; DeepSparse kernels {forced} (NM_ARCH)' if forced else ''}); batch {batch_size}, "
          f"threads {threads or 'all'}; medians over rounds, ratio = throughput / single dense on the same engine; "
          "FLOP ratio = inference FLOPs / single dense; efficiency = ratio x FLOP ratio")
    print("paired = median of the per-round speedups (single's time / the variant's, run back to back) "
          "with its 95 % interval: an interval that holds 1.00 is a tie")
    head = (f"{'engine':<12} {'variant':<9} {'items/s':>9} {'ms/batch':>16} {'ratio':>6} {'paired [95 % CI]':>20} "
            f"{'FLOP ratio':>10} {'effic.':>6}")
    print(head + (f" {'paper ratio':>11}" if paper else ""))
    for (engine, v), r in results.items():
        ci = r.get("paired_ratio_ci")
        paired = f"{r['paired_ratio']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{r['paired_ratio']:.2f}"
        line = (f"{engine:<12} {v:<9} {r['items_per_s']:>9.1f} {r['latency_ms']:>9.1f} ± {r['latency_std_ms']:>4.1f} "
                f"{r['ratio']:>6.2f} {paired:>20} {r['flop_ratio']:>10.3f} {r['efficiency']:>6.2f}")
        print(line + (f" {paper[v]:>11.2f}" if paper and v in paper else ""))


def results_json(results, args, paper=None):
    """--json: one object with the machine, versions, settings and a row per (engine, variant); the
    input of `evaluate.py report --bench` (the speed-vs-sparsity figure, paper Fig. 8)."""
    settings = {k: getattr(args, k) for k in ("command", "model", "num_heads", "blocks_in_head", "allocation",
                                                "init", "batch_size", "threads", "rounds", "image_size", "num_classes")}
    settings["deepsparse_isa"] = os.environ.get("NM_ARCH") or "auto"  # NM_ARCH=avx2: AVX2 kernels on an AVX-512 CPU
    rows = [{"engine": engine, "variant": v, "sparsity": variant_sparsity(v), **r,
             **({"paper_ratio": paper[v]} if paper and v in paper else {})} for (engine, v), r in results.items()]
    return {"machine": neurotrails.machine_info(), "versions": neurotrails.package_versions(),
            "git_commit": neurotrails.git_commit(), "settings": settings, "results": rows}


# ----------------------------------------------------------------------------------------------
# A language model's heads as plain transformers models (lm-eval-harness `--model hf`, the hub)


def head_state_dicts(net):
    """Per head i, the state dict of a plain transformers LlamaForCausalLM that computes exactly
    head i's path (backbone + head i): embed_tokens, layers 0..L-1, the head's final norm and
    lm_head. Masked weights are already exact zeros, so the file holds the sparse model."""
    shared, out = {}, []
    for key, value in net.backbone.state_dict().items():  # stem.weight, block<j>.layer.<...>
        shared["model.embed_tokens.weight" if key == "stem.weight" else
               re.sub(r"^block(\d+)\.layer\.", r"model.layers.\1.", key)] = value
    for head in net.heads:
        sd = dict(shared)
        for key, value in head.state_dict().items():
            key = re.sub(r"^block(\d+)\.layer\.", r"model.layers.\1.", key)
            sd[{"stem.weight": "model.embed_tokens.weight", "tail.0.weight": "model.norm.weight",
                "tail.1.weight": "lm_head.weight"}.get(key, key)] = value
        out.append(sd)
    return out

def export_hf(checkpoint, out):
    """Each head of a train_lm.py checkpoint (backbone + head i) as a plain transformers LLaMA folder,
    out/head1, out/head2, ...: save_pretrained (safetensors) with the tokenizer."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.glob("head*"))):
        raise ValueError(f"--out {out}: {'a file' if not out.is_dir() else 'already holds head folders'}")
    net, tokenizer, config = evaluate.load_language_model(checkpoint, "cpu")
    from transformers import LlamaForCausalLM
    hf_config = models.llama_config(config["model"], len(tokenizer), max(1024, config["seq_len"]))
    for i, sd in enumerate(head_state_dicts(net), 1):
        hf = LlamaForCausalLM(hf_config)
        hf.load_state_dict(sd, strict=True)  # every weight of the head's path, nothing left over
        folder = out / f"head{i}"
        hf.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        print(f"wrote {folder}")


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    ap = neurotrails.Parser(prog="export_bench.py", description="Export NeuroTrails to ONNX and benchmark CPU "
                            "inference (paper Sec. 5.4, Table 7).")
    sub = ap.add_subparsers(dest="command", required=True)
    texts = {"export": "write one ONNX graph (zeros baked in, backbone once, soft vote inside) and check its outputs "
                       "against PyTorch",
             "bench": "throughput / latency of several variants on DeepSparse and ONNX Runtime, interleaved round by "
                      "round, with the paired speed-up and its 95 % interval",
             "table7": "the paper's Table 7 set on WRN-28-10 (single, full ensemble, NeuroTrails at several "
                       "sparsities), beside the paper's ratios",
             "hf": "write each head of a train_lm.py checkpoint (backbone + head i, its sparse weights as exact "
                   "zeros) as a standard transformers LLaMA folder (save_pretrained, safetensors, with the "
                   "tokenizer): OUT/head1, OUT/head2, ... load with AutoModelForCausalLM.from_pretrained or "
                   "`lm_eval --model hf --model_args pretrained=OUT/head1`, without this project. The ensemble (the "
                   "soft vote of the heads) is not a transformers model: `evaluate.py lm-eval --checkpoint` scores it"}
    ex = sub.add_parser("export", help=texts["export"], description=texts["export"])
    ex.add_argument("--checkpoint", help="a train_vision.py checkpoint (else build from --model ...)")
    ex.add_argument("--out", default="model.onnx", help="output ONNX file")
    for p in (ex, sub.add_parser("bench", help=texts["bench"], description=texts["bench"]),
              sub.add_parser("table7", help=texts["table7"], description=texts["table7"])):
        p.add_argument("--model", default="wrn28-10", help="base network (vision): " + ", ".join(models.model_names()[:3]))
        neurotrails.add_arguments(p, 0.0, " of a fresh model (default: 0, dense)", with_sparsity=p is ex)
        p.add_argument("--num-classes", type=int_in(1), default=100, help="classes (CIFAR-100: 100)")
        p.add_argument("--image-size", type=int_in(8, 4096), default=32, help="input height = width")
        if p is ex:
            p.add_argument("--full-ensemble", action="store_true", help="M independent full models")
        else:
            p.add_argument("--batch-size", type=int_in(1), default=64, help="items per batch (1 for latency)")
            p.add_argument("--threads", type=int_in(0, 1024), default=0, help="CPU threads / cores (0: all)")
            p.add_argument("--rounds", type=int_in(1), default=10, help="timed rounds per variant, after 2 warm-up")
            p.add_argument("--engines", default="deepsparse,onnxruntime",
                           help="comma-separated: deepsparse, onnxruntime (default: both)")
            p.add_argument("--json", default=None, metavar="FILE",
                           help="also write the results as one JSON object (machine, CPU ISA, versions, settings, "
                                "per engine and variant: items/s, ms mean ± std, ratio, FLOP ratio, efficiency); "
                                "`evaluate.py report --bench FILE` plots it")
    hf = sub.add_parser("hf", help=texts["hf"], description=texts["hf"])
    hf.add_argument("--checkpoint", required=True, help="a last.pt written by train_lm.py")
    hf.add_argument("--out", required=True, help="folder for head1/, head2/, ... (created; must not hold them)")
    sub.choices["bench"].add_argument("--variants", nargs="+", default=["single", "ensemble", "nt:0.8", "nt:0.95"],
                                      help="single, ensemble, treenet, nt:<sparsity> (single is always included)")
    return ap, ap.parse_args(argv)


# The flags that build a fresh model for export: meaningless beside --checkpoint.
MODEL_FLAGS = ("--model", "--num-heads", "--blocks-in-head", "--sparsity", "--allocation", "--init", "--num-classes",
               "--image-size", "--full-ensemble")


def main(argv=None):
    ap, args = parse_args(argv)
    try:
        if args.command == "hf":
            return export_hf(args.checkpoint, args.out)
        if args.command == "export":
            neurotrails.check_writable_file(args.out, "--out")
            typed = sys.argv[1:] if argv is None else argv
            given = [f for f in MODEL_FLAGS if any(a == f or a.startswith(f + "=") for a in typed)]
            if args.checkpoint and given:  # the checkpoint says which network it is
                raise ValueError(f"--checkpoint names the network itself; {given[0]} cannot be combined with it")
            if args.checkpoint:
                net, aggregate, shape = net_from_checkpoint(args.checkpoint)
            else:
                net = variant_net("ensemble" if args.full_ensemble else f"nt:{args.sparsity}" if args.sparsity
                                  else "treenet" if args.num_heads > 1 else "single", args.model, args.num_heads,
                                  args.blocks_in_head, args.allocation, args.num_classes, 3, init=args.init)
                aggregate, shape = "probs", (3, args.image_size, args.image_size)
            report = export(net, Path(args.out), shape, aggregate)
            print(f"wrote {args.out}; ONNX Runtime vs PyTorch max abs diff {report['max_abs_diff']:.2e}")
            dead = dead_channels(net)
            for comp, (g, m, n) in report["components"].items():
                print(f"  {comp:<9} masked weights {n:>12,}  zeros in graph {g:>12,} = model {m:>12,}  "
                      f"density {1 - g / n:.4f}  dead filters {dead[comp][0]:,} of {dead[comp][2]:,}, "
                      f"dead inputs {dead[comp][1]:,}")
            return
        engines = args.engines.split(",")
        for e in engines:  # every argument before the engines are probed
            if e not in ("deepsparse", "onnxruntime"):
                raise ValueError(f"--engines: unknown engine {e!r}; use deepsparse and/or onnxruntime")
        variants = (["single", "ensemble", "nt:0.8", "nt:0.95", "nt:0.99"] if args.command == "table7"
                    else args.variants)
        for v in variants:
            variant_sparsity(v)
        if args.json:
            neurotrails.check_writable_file(args.json, "--json")
        with torch.device("meta"):  # the split itself (|F_h| within the model's blocks), without weights
            variant_net("treenet", args.model, args.num_heads, args.blocks_in_head, args.allocation,
                        args.num_classes, 3)
        results = bench(variants, engines, args.model, args.num_heads, args.blocks_in_head, args.allocation,
                        args.batch_size, args.threads, args.rounds, num_classes=args.num_classes,
                        shape=(3, args.image_size, args.image_size), init=args.init)
        paper = PAPER_TABLE7 if args.command == "table7" else None
        print_results(results, args.batch_size, args.threads, paper)
        if args.json:
            Path(args.json).write_text(json.dumps(results_json(results, args, paper), indent=1))
            print(f"wrote {args.json}")
    except (ValueError, OSError, RuntimeError) as e:
        ap.fail(e)


if __name__ == "__main__":
    main()
