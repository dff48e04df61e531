"""OpenVINO against ONNX Runtime on the same DenseNet121 graphs (FP32 and medpipe's INT8), one process.

OpenVINO is an optional extra (medpipe-imaging[openvino]); this comparison of raw graphs runs in two steps:

    .venv/bin/python benchmarks/int8_openvino.py make /tmp/ov          # medpipe: fp32.onnx + int8.onnx (224x224)
    python3.11 -m venv /tmp/ovenv && echo torch==2.13.0 > /tmp/c.txt && \\
      /tmp/ovenv/bin/pip install -c /tmp/c.txt openvino onnxruntime numpy
    /tmp/ovenv/bin/python benchmarks/int8_openvino.py time /tmp/ov     # writes results/int8_openvino_cpu.json

``make``: an untrained DenseNet121 package (weights do not change speed), its FP32 ONNX graph and the
INT8 graph medpipe ships (``quantize_onnx`` defaults, calibrated on real HAM10000 dev images).
``time``: ONNX Runtime FP32 and INT8 (sessions as medpipe's backends build them), OpenVINO with its
CPU default (bf16 on an AMX CPU: ``INFERENCE_PRECISION_HINT``), OpenVINO forced to f32, and OpenVINO
running the INT8 (QDQ) graph; batch 1 and 8, interleaved rounds (order rotated each round); the
figure is the median over rounds of ONNX Runtime FP32 ms / ms in the same round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def make(folder: Path, size: int) -> None:
    sys.path.insert(0, str(HERE))
    from int8_variants import calibration_batches
    from serve_load import make_package

    from medpipe.export import onnx_bytes
    from medpipe.infer.quantize import quantize_onnx
    from medpipe.package import load_package, package_spec

    folder.mkdir(parents=True, exist_ok=True)
    model, meta = load_package(make_package(folder / "pkg", size))
    fp32 = onnx_bytes(model, size)
    (folder / "fp32.onnx").write_bytes(fp32)
    calib = calibration_batches(package_spec(meta), HERE.parents[1] / "shared" / "data" / "ham10000-dev", 64)
    (folder / "int8.onnx").write_bytes(quantize_onnx(fp32, calib))
    print(f"wrote {folder}/fp32.onnx and int8.onnx ({size}x{size})")


def timing(folder: Path, size: int, rounds: int) -> None:
    import onnxruntime as ort
    import openvino as ov

    core = ov.Core()

    def ort_run(path):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return lambda x: s.run(None, {s.get_inputs()[0].name: x})

    def ov_run(path, batch, precision=None):
        m = core.read_model(str(path))
        m.reshape([batch, 3, size, size])
        cfg = {"PERFORMANCE_HINT": "LATENCY", **({"INFERENCE_PRECISION_HINT": precision} if precision else {})}
        req = core.compile_model(m, "CPU", cfg).create_infer_request()
        return lambda x: req.infer({0: x})

    rng = np.random.default_rng(0)
    out = {}
    for b in (1, 8):
        x = rng.standard_normal((b, 3, size, size), dtype=np.float32)
        runs = {"onnxruntime FP32": ort_run(folder / "fp32.onnx"), "onnxruntime INT8": ort_run(folder / "int8.onnx"),
                "OpenVINO FP32 graph, CPU default precision": ov_run(folder / "fp32.onnx", b),
                "OpenVINO FP32 graph, f32 forced": ov_run(folder / "fp32.onnx", b, "f32"),
                "OpenVINO INT8 (QDQ) graph": ov_run(folder / "int8.onnx", b)}
        names = list(runs)
        for _ in range(2):
            for f in runs.values():
                f(x)
        ms = {n: [] for n in names}
        for r in range(rounds):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                t = time.perf_counter()
                runs[n](x)
                ms[n].append(1000 * (time.perf_counter() - t))
        out[str(b)] = {n: {"speedup_over_onnxruntime_fp32": float(np.median(
            [a / c for a, c in zip(ms["onnxruntime FP32"], ms[n])])), "ms_median": float(np.median(ms[n]))}
            for n in names}
        for n in names:
            print(f"batch {b}: {n:45s} {out[str(b)][n]['speedup_over_onnxruntime_fp32']:5.2f}x", flush=True)
    path = HERE / "results" / "int8_openvino_cpu.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({
        "benchmark": "int8_openvino_cpu", "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "openvino": ov.__version__, "onnxruntime": ort.__version__, "image_size": size, "rounds": rounds,
        "openvino_default_precision": str(core.get_property("CPU", "INFERENCE_PRECISION_HINT")),
        "note": "median over interleaved rounds of onnxruntime FP32 ms / ms; untrained DenseNet121",
        "batches": out}, indent=2))
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=("make", "time"))
    ap.add_argument("folder")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()
    (make(Path(args.folder), args.size) if args.step == "make" else timing(Path(args.folder), args.size, args.rounds))


if __name__ == "__main__":
    main()
