"""The INT8 accuracy gate on real images: `medpipe quantize` on a DenseNet121 trained on the real dev set.

    python benchmarks/int8_gate.py [--data ../shared/data/ham10000-dev] [--size 224] [--epochs 3]
                                   [--warmup-epochs 1] [--lr 0.001] [--init-weights PKG] [--run RUN]
                                   [--work DIR] [--threads 2] [--out int8_gate_real_224]
                                   [--note TEXT] [--keep-previous KEY]

Ingests the real HAM10000 dev images (split seed 0, as benchmarks/quality.py does), trains DenseNet121
with `medpipe train` at ``--size`` px for a fixed ``--epochs`` (from ``--init-weights`` when given, e.g.
a package trained at 64 px and fine-tuned here at 224: DenseNet121 pools globally, so its weights load
at any size), or reuses ``--run``, a run folder trained on that ingested data, then runs `medpipe quantize`'s code path (ONNX Runtime static QDQ INT8,
calibrated on the run's validation split) and installs the INT8 model in the package. Recorded:

- the gate on the validation split, as `medpipe quantize` checks it: macro AUC FP32 vs INT8, top-1
  agreement, largest probability difference, for ONNX Runtime INT8 and for OpenVINO running the same
  INT8 graph (when openvino is installed);
- the same figures on the held-out test split, with the temperatures fitted on validation (the test
  labels fit nothing);
- the FP32 model's own quality (the run's test metrics) and how long it trained (summed epoch times
  when ``--run`` is given), and the quality of the package it started from (``init_weights``), so a
  short-trained model is visible as such;
- the INT8/OpenVINO speed-up over FP32 ONNX that `medpipe quantize` times, and the load average.

A gate that fails is recorded, not forced silently. Writes benchmarks/results/OUT.json;
``--keep-previous KEY`` keeps the headline figures of the result it replaces under KEY.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_result

ROOT = Path(__file__).resolve().parents[1]


def split_pixels(run: Path, data: Path, split: str, size: int, interpolation: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 pixels and class indices of one split of the run, from the data folder's pixel cache."""
    import pandas as pd

    from medpipe.data.cache import build_cache
    from medpipe.data.sources import load_records

    table, _ = load_records(data)
    sp = pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
    table = table[table["image_id"].isin(set(sp.loc[sp["split"] == split, "image_id"]))]
    cache = build_cache(table, data / "cache", (size, size), interpolation)
    return np.asarray(cache.pixels[cache.rows(table["image_id"])]), table["class_index"].to_numpy()


def figures(y: np.ndarray, fp32_logits: np.ndarray, t32: float, int8_logits: np.ndarray, t8: float) -> dict:
    """The gate's figures on held-out images with temperatures fitted elsewhere (on validation)."""
    from medpipe.infer.quantize import MAX_AUC_DIFF, MIN_AGREEMENT, _softmax
    from medpipe.metrics import macro_auc

    p32, p8 = _softmax(fp32_logits, t32), _softmax(int8_logits, t8)
    auc32, auc8 = macro_auc(y, p32), macro_auc(y, p8)
    out = {"n": len(y), "fp32_macro_auc": auc32, "int8_macro_auc": auc8, "auc_diff": abs(auc8 - auc32),
           "agreement": float((p32.argmax(1) == p8.argmax(1)).mean()),
           "max_prob_diff": float(np.abs(p32 - p8).max()), "fp32_temperature": t32, "int8_temperature": t8}
    out["within_thresholds"] = out["auc_diff"] <= MAX_AUC_DIFF and out["agreement"] >= MIN_AGREEMENT
    return out


def gate_on_test_split(run: Path, data: Path, int8: bytes, info: dict) -> dict:
    """FP32 ONNX vs ONNX Runtime INT8 (and OpenVINO INT8) on the test split."""
    from medpipe.export import onnx_bytes, onnx_session
    from medpipe.infer import openvino_runtime as ovr
    from medpipe.infer.quantize import _logits
    from medpipe.package import load_package

    model, meta = load_package(run / "model")
    spec = meta.preprocessing
    px, y = split_pixels(run, data, "test", spec.image_size, spec.interpolation)
    fp32_logits = _logits(onnx_session(onnx_bytes(model, spec.image_size)), px, spec)
    out = {"onnxruntime": figures(y, fp32_logits, meta.temperature, _logits(onnx_session(int8), px, spec),
                                  info["temperature"])}
    if isinstance(info.get("openvino"), dict):
        ov = info["openvino"]
        session = ovr.OpenVinoSession(int8, precision=ov["precision"], max_batch=32)
        out["openvino"] = figures(y, fp32_logits, meta.temperature, _logits(session, px, spec), ov["temperature"])
    return out


def train(data: Path, run: Path, args) -> float:
    from medpipe.cli import main as medpipe

    t = time.perf_counter()
    extra = ["--init-weights", args.init_weights] if args.init_weights else []
    assert medpipe(["train", "--data", str(data), "--out", str(run), "--image-size", str(args.size),
                    "--epochs", str(args.epochs), "--warmup-epochs", str(args.warmup_epochs), "--lr", str(args.lr),
                    "--threads", str(args.threads), "--precision", args.precision,
                    "--split-seed", "0", "--seed", "0", "--bootstrap", "200", *extra]) == 0
    return time.perf_counter() - t


def quality(metrics: dict) -> dict:
    """Macro AUC and balanced accuracy of a package's validation and test metrics."""
    keys = ("n", "macro_auc", "macro_auc_ci95", "balanced_accuracy")
    return {split: {k: (metrics.get(split) or {}).get(k) for k in keys} for split in ("val", "test")}


def init_package(training_config: dict) -> dict | None:
    """What the run started from: the ``init_weights`` package's size, training settings and quality."""
    from medpipe.package import PackageError, read_meta

    source = training_config.get("init_weights")
    if not source:
        return None
    folder = Path(source).parent if Path(source).is_file() else Path(source)  # weights.safetensors of a package
    try:
        start = read_meta(folder)
    except PackageError as exc:  # a bare safetensors file, or a package no longer on disk
        return {"path": str(source), "package": f"not readable: {exc}"}
    cfg = dict(start.training_config)
    return {"path": str(source), "image_size": start.preprocessing.image_size,
            "training_config": {k: cfg.get(k) for k in ("model", "image_size", "epochs", "batch_size", "lr",
                                                        "warmup_epochs", "seed", "split_seed", "precision")},
            "quality": quality(json.loads(json.dumps(dict(start.metrics), default=str)))}


def previous_figures(name: str) -> dict | None:
    """The headline figures of the result file NAME.json about to be replaced (None if there is none)."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return None
    old = json.loads(path.read_text())
    fp32, int8 = old.get("fp32_model") or {}, old.get("int8") or {}
    return {"when": old.get("when"), "note": old.get("note"), "load_average": old.get("load_average"),
            "fp32_quality": quality(fp32.get("metrics") or {}), "gate": int8.get("gate"),
            "openvino_gate": (int8.get("openvino") or {}).get("gate"),
            "speed_batches": (int8.get("speed") or {}).get("batches"), "test_split": old.get("test_split")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ham10000-dev"))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--warmup-epochs", type=float, default=1.0, help="below 1 for a one- or two-epoch run")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads of the training (0 = all cores)")
    ap.add_argument("--precision", default="auto", help="training precision (bf16 on an AMX CPU is faster)")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the training")
    ap.add_argument("--init-weights", help="package or safetensors the training starts from (any image size)")
    ap.add_argument("--run", help="an existing run folder (trained on --work's ingested data) to quantize")
    ap.add_argument("--work", default=str(ROOT / ".bench" / "int8_gate"), help="ingested data and the run")
    ap.add_argument("--out", default=None, help="results name (default int8_gate_real_SIZE)")
    ap.add_argument("--note", default="", help="a sentence recorded with the result (how the run was trained)")
    ap.add_argument("--keep-previous", metavar="KEY",
                    help="keep the headline figures of the result file this run replaces under KEY")
    args = ap.parse_args()
    load_start = os.getloadavg()

    from medpipe.cli import main as medpipe
    from medpipe.infer.quantize import (
        GateError,
        format_gate,
        install_int8,
        quantize_package,
    )
    from medpipe.package import read_meta

    work = Path(args.work)
    data = work / "data"
    if not (data / "records.csv").is_file():
        assert medpipe(["ingest", args.data, "--out", str(data)]) == 0
    out = args.out or f"int8_gate_real_{args.size}"
    previous = previous_figures(out) if args.keep_previous else None
    run, train_s = (Path(args.run), None) if args.run else (work / "run", None)
    if not args.run:
        train_s = train(data, run, args)
    try:
        int8, info = quantize_package(run / "model", data)
    except GateError as exc:
        print(f"gate FAILED: {exc}")
        int8, info = quantize_package(run / "model", data, force=True)
    install_int8(run / "model", int8, info)
    print(format_gate(info))
    test = gate_on_test_split(run, data, int8, info)
    print("test split:", json.dumps(test, indent=1))

    meta = read_meta(run / "model")
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
              if line.strip() and "epoch" in json.loads(line) and "event" not in json.loads(line)] \
        if (run / "metrics.jsonl").is_file() else []
    training_config = json.loads(json.dumps(dict(meta.training_config), default=str))
    logged_s = sum(e.get("epoch_seconds") or 0 for e in epochs) or None
    path = write_result(out, {
        "settings": vars(args), "load_average": {"start": load_start, "end": os.getloadavg()}, "note": args.note,
        "fp32_model": {"architecture": meta.architecture, "image_size": meta.preprocessing.image_size,
                       "training_config": training_config, "epochs_logged": epochs, "train_seconds": train_s,
                       "epoch_seconds_sum": logged_s, "init": init_package(training_config),
                       "metrics": json.loads(json.dumps(dict(meta.metrics), default=str))},
        "int8": info, "test_split": test, **({args.keep_previous: previous} if previous else {})})
    print(f"wrote {path} (run folder {run})")


if __name__ == "__main__":
    main()
