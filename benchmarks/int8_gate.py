"""INT8 on real images: the accuracy gate's figures and the INT8/FP32 forward speed, in one run.

    python benchmarks/int8_gate.py [--data ../shared/data/ham10000-dev] [--size 224] [--epochs 4] [--run RUN]

Trains DenseNet121 with `medpipe train` on the real HAM10000 dev images (or reuses --run), then runs
`medpipe quantize` (ONNX Runtime static QDQ, calibrated on the run's validation split) and prints
its gate: macro AUC FP32 vs INT8, top-1 agreement, largest probability difference. Then times the
FP32 ONNX graph (what `--backend onnx` runs) against the INT8 one at batch 1 and 8 in the same
process, alternating, and prints the speed-up. A gate that fails is reported, not forced.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def forward_rate(session, x: np.ndarray, seconds: float) -> float:
    session.run(None, {"image": x})
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        session.run(None, {"image": x})
        n += len(x)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ham10000-dev"))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--run", help="an existing run folder to quantize instead of training one")
    ap.add_argument("--seconds", type=float, default=10.0, help="timing per (precision, batch) pair, x2 rounds")
    args = ap.parse_args()

    from medpipe.cli import main as medpipe
    from medpipe.export import onnx_bytes, onnx_session
    from medpipe.infer.quantize import GateError, format_gate, install_int8, quantize_package
    from medpipe.package import load_package

    work = Path(tempfile.mkdtemp(prefix="int8_gate_"))
    data = work / "data"
    assert medpipe(["ingest", args.data, "--out", str(data)]) == 0
    run = Path(args.run) if args.run else work / "run"
    if not args.run:
        assert medpipe(["train", "--data", str(data), "--out", str(run), "--image-size", str(args.size),
                        "--epochs", str(args.epochs), "--bootstrap", "200"]) == 0
    try:
        int8, info = quantize_package(run / "model", data)
    except GateError as exc:
        print(f"gate FAILED: {exc}")
        int8, info = quantize_package(run / "model", data, force=True)
    install_int8(run / "model", int8, info)
    print(format_gate(info))

    model, meta = load_package(run / "model")
    size = meta.preprocessing.image_size
    fp32 = onnx_session(onnx_bytes(model, size))
    q8 = onnx_session(int8)
    rng = np.random.default_rng(0)
    speed = {}
    for batch in (1, 8):
        x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
        rates = {"fp32": [], "int8": []}
        for _ in range(2):  # alternate, so a load change on a shared machine hits both
            rates["fp32"].append(forward_rate(fp32, x, args.seconds))
            rates["int8"].append(forward_rate(q8, x, args.seconds))
        speed[batch] = {k: max(v) for k, v in rates.items()}
        print(f"batch {batch}: FP32 {speed[batch]['fp32']:.1f}, INT8 {speed[batch]['int8']:.1f} images/s: "
              f"{speed[batch]['int8'] / speed[batch]['fp32']:.2f}x")
    path = write_result(f"int8_gate_{size}", {"settings": vars(args), "gate": info["gate"],
                                              "int8_temperature": info["temperature"], "method": info["method"],
                                              "cpu_int8_flags": info["cpu_int8_flags"],
                                              "forward_images_per_s": speed,
                                              "run_metrics": json.loads((run / "model" / "model.json").read_text())
                                              .get("metrics", {})})
    print(f"wrote {path} (run folder {run})")


if __name__ == "__main__":
    main()
