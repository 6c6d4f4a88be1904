"""Benchmark: int8 (QDQ) graphs of NeuroTrails on ONNX Runtime, against fp32, and the accuracy change.

    python tests/bench_int8.py --rounds 5                                    # WRN-28-10, Table 7 variants
    python tests/bench_int8.py --checkpoint runs/.../last.pt --data-dir data # + accuracy of a trained model

A lever of the inference issue (paper Sec. 5.4): are sparse-quantized graphs faster? Each variant
is exported by export_bench.export (fp32, zeros baked in), then quantized by ONNX Runtime's
static quantizer (QDQ format, int8 weights per output channel, uint8 activations calibrated on
a few batches), and timed interleaved with its fp32 graph on ONNX Runtime. The weights' zeros
must stay zeros (symmetric weight quantization maps 0 to 0): counted in the int8 initialisers.
With --checkpoint, the trained model's test accuracy is measured in fp32 and int8 (calibration
on 512 training images). --save DIR keeps the int8 files (e.g. to time them on DeepSparse under
Python 3.11, where the quantizer itself cannot run: it needs onnx >= 1.16, deepsparse onnx < 1.15).
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import export_bench  # noqa: E402
import neurotrails  # noqa: E402


def quantize(src, dst, batches, reduce_range=None):
    """src fp32 ONNX -> dst int8 QDQ ONNX, activations calibrated on `batches` (numpy arrays).
    reduce_range: 7-bit weights, which ONNX Runtime's quantization guide recommends on x86 CPUs
    without VNNI, whose u8 x s8 kernels (VPMADDUBSW) can saturate their 16-bit sums; None: on
    exactly those CPUs."""
    if reduce_range is None:
        reduce_range = not {"avx512_vnni", "avx_vnni"} & set(neurotrails.machine_info()["isa"])
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    prepared = Path(dst).with_suffix(".pre.onnx")  # shapes inferred, constants and BatchNorm folded
    quant_pre_process(str(src), str(prepared))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"input": x}

    quantize_static(str(prepared), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                    reduce_range=reduce_range)


def int8_zeros(path):
    """Zeros among the int8 weight initialisers of a quantized graph."""
    import onnx
    from onnx import numpy_helper
    graph = onnx.load(str(path)).graph
    return sum(int((numpy_helper.to_array(i) == 0).sum()) for i in graph.initializer
               if i.data_type == onnx.TensorProto.INT8)


def session(path, threads):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def speed(args, tmp):
    shape = (3, 32, 32)
    x = np.random.default_rng(0).standard_normal((args.batch_size, *shape), dtype=np.float32)
    calib = [np.random.default_rng(i).standard_normal((8, *shape), dtype=np.float32) for i in range(4)]
    runs, zeros = {}, {}
    for v in args.variants:
        net = export_bench.variant_net(v, "wrn28-10", 3, 8, args.allocation, 100, 3)
        fp32, int8 = tmp / f"{v}.onnx", tmp / f"{v}.int8.onnx"
        export_bench.export(net, fp32, shape)
        quantize(fp32, int8, calib)
        model_zeros = sum(int((w == 0).sum()) for w in neurotrails.masked_weights(net).values())
        zeros[v] = (model_zeros, int8_zeros(int8))
        runs[v, "fp32"], runs[v, "int8"] = session(fp32, args.threads), session(int8, args.threads)
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            (Path(args.save) / int8.name).write_bytes(int8.read_bytes())
    times = {k: [] for k in runs}
    for r in range(2 + args.rounds):  # two warm-up rounds, then interleaved A B C A B C
        for k, s in runs.items():
            start = time.perf_counter()
            s.run(None, {"input": x})
            if r >= 2:
                times[k].append(time.perf_counter() - start)
    base = args.batch_size / statistics.median(times["single", "fp32"])
    rows = []
    for (v, kind), t in times.items():
        ips = args.batch_size / statistics.median(t)
        rows.append({"variant": v, "dtype": kind, "items_per_s": ips, "ratio_vs_fp32_single": ips / base,
                     "ms_mean": 1000 * statistics.mean(t), "ms_std": 1000 * statistics.stdev(t) if len(t) > 1 else 0.0,
                     "zeros_model": zeros[v][0], "zeros_int8": zeros[v][1]})
    return rows


def deepsparse_leg(args, tmp):
    """Python 3.11: the int8 graphs of --int8-dir (written by --save on 3.12+) and fresh fp32 exports,
    timed interleaved on DeepSparse."""
    import onnx
    shape = (3, 32, 32)
    x = np.random.default_rng(0).standard_normal((args.batch_size, *shape), dtype=np.float32)
    runs = {}
    for v in args.variants:
        fp32 = tmp / f"{v}.onnx"
        export_bench.export(export_bench.variant_net(v, "wrn28-10", 3, 8, args.allocation, 100, 3), fp32, shape)
        runs[v, "fp32"] = export_bench.make_runner("deepsparse", fp32, args.batch_size, args.threads)
        int8 = tmp / f"{v}.int8.onnx"  # the quantizer stamps opsets of domains no node uses; DeepSparse refuses them
        model = onnx.load(str(Path(args.int8_dir) / int8.name))
        used = {n.domain for n in model.graph.node}
        keep = [o for o in model.opset_import if o.domain in used]
        del model.opset_import[:]
        model.opset_import.extend(keep)
        onnx.save(model, str(int8))
        runs[v, "int8"] = export_bench.make_runner("deepsparse", int8, args.batch_size, args.threads)
    times = {k: [] for k in runs}
    for r in range(2 + args.rounds):
        for k, run in runs.items():
            start = time.perf_counter()
            run(x)
            if r >= 2:
                times[k].append(time.perf_counter() - start)
    base = {kind: args.batch_size / statistics.median(times["single", kind]) for kind in ("fp32", "int8")}
    return [{"engine": "deepsparse", "variant": v, "dtype": kind, "items_per_s": args.batch_size / statistics.median(t),
             "ratio_vs_fp32_single": args.batch_size / statistics.median(t) / base["fp32"],
             "ratio_same_dtype": args.batch_size / statistics.median(t) / base[kind],
             "ms_mean": 1000 * statistics.mean(t), "ms_std": 1000 * statistics.stdev(t) if len(t) > 1 else 0.0}
            for (v, kind), t in times.items()]


def accuracy(args, tmp):
    import train_vision
    state = neurotrails.load_checkpoint(args.checkpoint, "train_vision.py", "--checkpoint")  # read once
    net, cfg, shape = neurotrails.model_from_checkpoint(state), state["config"], tuple(state["input_shape"])
    aggregate = cfg["aggregate"]
    train, test = train_vision.load_data(cfg["dataset"], args.data_dir or cfg["data_dir"], None, cfg["test_subset"],
                                         download=False)
    norm = lambda x: train_vision.normalize(x, cfg["dataset"]).numpy()
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(train["y"]), generator=g)[:512]
    calib = [norm(train["x"][idx[i:i + 64]]) for i in range(0, 512, 64)]
    fp32, int8 = tmp / "ckpt.onnx", tmp / "ckpt.int8.onnx"
    export_bench.export(net, fp32, shape, aggregate)
    quantize(fp32, int8, calib)
    out = {}
    for kind, path in (("fp32", fp32), ("int8", int8)):
        s = session(path, args.threads)
        probs = np.concatenate([s.run(None, {"input": norm(test["x"][i:i + 256])})[0]
                                for i in range(0, len(test["y"]), 256)])
        out[kind] = float((probs.argmax(1) == test["y"].numpy()).mean())
    return {"checkpoint": str(args.checkpoint), "test_images": len(test["y"]), **out,
            "change_points": 100 * (out["int8"] - out["fp32"])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=["single", "nt:0.95", "nt:0.99"])
    ap.add_argument("--allocation", default="global", choices=["global", "per-component"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--checkpoint", default=None, help="a trained train_vision.py checkpoint: accuracy fp32 vs int8")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--save", default=None, help="keep the int8 graphs here")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--int8-dir", default=None, help="Python 3.11 with deepsparse: time the int8 graphs saved here "
                    "by --save (and fresh fp32 exports) on DeepSparse instead")
    args = ap.parse_args()
    if "single" not in args.variants:
        args.variants = ["single", *args.variants]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result = {"machine": neurotrails.machine_info(), "versions": neurotrails.package_versions(),
                  "git_commit": neurotrails.git_commit(), "settings": vars(args)}
        if args.int8_dir:
            result["speed"] = deepsparse_leg(args, tmp)
            for r in result["speed"]:
                print(json.dumps(r))
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=1))
            return
        if args.checkpoint:
            result["accuracy"] = accuracy(args, tmp)
            print(json.dumps(result["accuracy"]))
        result["speed"] = speed(args, tmp)
    print(f"{result['machine']['cpu']}; batch {args.batch_size}, threads {args.threads or 'all'}, "
          f"medians of {args.rounds} rounds, ONNX Runtime {result['versions'].get('onnxruntime')}")
    print(f"{'variant':<9} {'dtype':<5} {'items/s':>8} {'ms mean ± std':>18} {'vs fp32 single':>15} {'zeros kept':>11}")
    for r in result["speed"]:
        kept = "yes" if r["zeros_int8"] >= r["zeros_model"] else f"{r['zeros_int8']:,}/{r['zeros_model']:,}"
        print(f"{r['variant']:<9} {r['dtype']:<5} {r['items_per_s']:>8.1f} {r['ms_mean']:>9.1f} ± {r['ms_std']:>6.1f} "
              f"{r['ratio_vs_fp32_single']:>15.2f} {kept:>11}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
