"""Which INT8 configuration is actually faster than FP32 ONNX: quantization variants side by side.

    python benchmarks/int8_variants.py [--size 224] [--rounds 10] [--threads 2] [--run RUN --data DATA]

One process, one FP32 ONNX graph of DenseNet121 (the package in --run, else an untrained one: weights
do not change speed), quantized with ONNX Runtime in each variant below (calibrated on real
HAM10000 dev images decoded as serving does). Every session then runs ``InferenceSession.run`` at
batch 1 and 8 in interleaved rounds (each round runs every session once, the order rotated each
round), so a load change on a shared machine hits all of them; the figure per variant is the
median over rounds of FP32 time / INT8 time in the same round. Absolute milliseconds are recorded
too but only the ratios mean anything on a shared machine.

With --run RUN --data DATA (a trained package and its ingested data) each variant also goes through
medpipe's accuracy gate on the run's validation split (macro AUC within 0.005, agreement >= 98%).

Writes benchmarks/results/int8_variants_cpu.json.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEV_IMAGES, bench_package, parser, write_result  # noqa: E402

# name -> (quantize_onnx options over medpipe's QUANT_DEFAULTS, session options for the INT8 session and its
# FP32 reference)
ALL = {"op_types": None}  # every op ONNX Runtime can quantize: what medpipe shipped before this comparison
VARIANTS: dict[str, tuple[dict, dict]] = {
    "all ops (QDQ, pre-process, per-channel, U8S8, ends FP32)": (ALL, {}),
    "all ops, no quant_pre_process": ({**ALL, "pre_process": False}, {}),
    "all ops, QOperator format": ({**ALL, "quant_format": "qoperator"}, {}),
    "all ops, per-tensor weights": ({**ALL, "per_channel": False}, {}),
    "all ops, reduce_range (7-bit weights)": ({**ALL, "reduce_range": True}, {}),
    "all ops, S8S8 (int8 activations)": ({**ALL, "activation": "int8"}, {}),
    "all ops, ends quantized too": ({**ALL, "keep_ends_fp32": False}, {}),
    "Conv/MatMul/Gemm only, QDQ (shipped)": ({}, {}),
    "Conv/MatMul/Gemm only, QOperator": ({"quant_format": "qoperator"}, {}),
    "Conv/MatMul/Gemm only, graph opt EXTENDED": ({}, {"opt": "extended"}),
    "Conv/MatMul/Gemm only, 1 intra-op thread (FP32 also 1)": ({}, {"threads": 1}),
}


def session(data: bytes, threads: int | None, opt: str = "all"):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}[opt]
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = int(threads)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as medpipe's backends run it
    so.log_severity_level = 3
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def calibration_batches(spec, data_dir: Path, count: int, skip: int = 0) -> list[np.ndarray]:
    from medpipe.preprocess import eval_batch

    files = sorted(data_dir.rglob("*.jpg"))[skip::7][:count]
    if not files:
        raise SystemExit(f"no JPEGs under {data_dir}")
    px = [spec.read(f) for f in files]
    return [eval_batch(px[i:i + 8], spec).numpy() for i in range(0, len(px), 8)]


def interleaved(sessions: dict, batches: tuple[int, ...], size: int, rounds: int, warmup: int) -> dict:
    """{batch: {name: [ms per round]}}: every session once per round, order rotated each round."""
    from medpipe.export import INPUT_NAME

    rng = np.random.default_rng(0)
    names = list(sessions)
    out = {}
    for b in batches:
        feed = {INPUT_NAME: rng.standard_normal((b, 3, size, size), dtype=np.float32)}
        for _ in range(warmup):
            for s in sessions.values():
                s.run(None, feed)
        ms = {n: [] for n in names}
        for r in range(rounds):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                t = time.perf_counter()
                sessions[n].run(None, feed)
                ms[n].append(1000 * (time.perf_counter() - t))
        out[b] = ms
    return out


def main() -> None:
    ap = parser(__doc__, size=224, rounds=10, warmup=2, threads=0, images=str(DEV_IMAGES))
    ap.add_argument("--calibration", type=int, default=64, help="dev images to calibrate on")
    ap.add_argument("--run", help="a trained run folder: adds the accuracy gate per variant (needs --data)")
    ap.add_argument("--data", help="the ingested data folder of --run")
    ap.add_argument("--only", help="comma-separated substrings: measure only the variants whose name has one")
    args = ap.parse_args()
    if args.run and not args.data:
        ap.error("--run needs --data")

    from medpipe.export import onnx_bytes
    from medpipe.infer.quantize import cpu_description, gate, quantize_onnx
    from medpipe.package import load_package, package_spec

    model, meta = load_package(bench_package(args.run, args.size, "int8_variants_"))
    spec = package_spec(meta)
    size = spec.image_size
    threads = args.threads or None
    fp32 = onnx_bytes(model, size)
    calib = calibration_batches(spec, Path(args.images), args.calibration)
    variants = {k: v for k, v in VARIANTS.items()
                if not args.only or any(s.strip().lower() in k.lower() for s in args.only.split(","))}

    if args.run:
        from medpipe.infer.quantize import _logits, _validation_pixels

        val_px, val_y = _validation_pixels(meta, args.data, size, spec.interpolation)
        t32 = meta.temperature
        fp32_logits = _logits(session(fp32, threads), val_px, spec)

    models, rows = {}, {}
    for name, (qopts, _) in variants.items():
        key = repr(sorted(qopts.items()))
        t = time.perf_counter()
        if key not in models:
            try:
                models[key] = quantize_onnx(fp32, calib, **qopts)
            except Exception as exc:  # a variant ONNX Runtime cannot make is a row, not the end of the run
                models[key] = exc
        rows[name] = {"quantize": qopts, "session": variants[name][1], "quantize_s": time.perf_counter() - t}
        if isinstance(models[key], Exception):
            rows[name]["error"] = f"{models[key].__class__.__name__}: {models[key]}"
            print(f"{name}: could not quantize: {rows[name]['error']}", flush=True)
            continue
        rows[name]["int8_mb"] = len(models[key]) / 1e6
        if args.run:
            g = gate(val_y, fp32_logits, t32, _logits(session(models[key], threads), val_px, spec))
            rows[name]["gate"] = {k: g[k] for k in ("n", "auc_diff", "agreement", "max_prob_diff", "passed",
                                                    "failures")}
        print(f"quantized: {name} ({rows[name]['quantize_s']:.1f} s)", flush=True)

    # sessions: one FP32 reference per distinct session setting, one INT8 session per variant
    sessions, ref = {}, {}
    for name, (qopts, sopts) in variants.items():
        if "error" in rows[name]:
            continue
        th, opt = sopts.get("threads", threads), sopts.get("opt", "all")
        fp_name = f"FP32 (threads {th or 'default'})"
        if fp_name not in sessions:
            sessions[fp_name] = session(fp32, th)
        ref[name] = fp_name
        sessions[name] = session(models[repr(sorted(qopts.items()))], th, opt)
    print(f"timing {len(sessions)} sessions, {args.rounds} interleaved rounds at batch 1 and 8", flush=True)
    ms = interleaved(sessions, (1, 8), size, args.rounds, args.warmup)

    print(f"\n{'variant':58s} {'b1 x':>6s} {'b8 x':>6s}  gate")
    for name in variants:
        row = rows[name]
        if "error" in row:
            print(f"{name:58s} {'-':>6s} {'-':>6s}  {row['error'][:60]}")
            continue
        for b in (1, 8):
            r = [a / c for a, c in zip(ms[b][ref[name]], ms[b][name])]
            row[f"batch_{b}"] = {"speedup_median": float(np.median(r)), "speedup_min": float(min(r)),
                                 "speedup_max": float(max(r)), "int8_ms_median": float(np.median(ms[b][name])),
                                 "fp32_ms_median": float(np.median(ms[b][ref[name]]))}
        gate_txt = ("" if "gate" not in row else
                    ("passed" if row["gate"]["passed"] else "FAILED") +
                    f" (agreement {row['gate']['agreement']:.1%}, AUC diff {row['gate']['auc_diff']:.4f})")
        print(f"{name:58s} {row['batch_1']['speedup_median']:6.2f} {row['batch_8']['speedup_median']:6.2f}  "
              f"{gate_txt}")
    import onnxruntime

    path = write_result("int8_variants_cpu", {
        "settings": vars(args), "image_size": size, "model": meta.architecture,
        "trained": bool(args.run), "onnxruntime": onnxruntime.__version__, "cpu": cpu_description(),
        "note": "speedup = FP32 ms / INT8 ms in the same interleaved round, median over rounds",
        "variants": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
