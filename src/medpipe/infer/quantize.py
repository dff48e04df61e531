"""INT8 inference: ONNX Runtime static quantization (QDQ), calibrated on the package's own validation
images, behind an accuracy gate that cannot be skipped.

    medpipe quantize --model RUN/model --data DATA          # gate, then RUN/model/model.int8.onnx + int8.json
    medpipe export --model RUN/model --format onnx-int8 --out m.int8.onnx [--data DATA]
    medpipe serve --model RUN/model --backend int8           # `auto` picks it once gated AND measured >= 1.1x FP32 here

Quantization: the FP32 ONNX graph of the package (the same one the ``onnx`` backend runs) goes
through ``quant_pre_process`` (shape inference, graph optimisation) and ``quantize_static`` in QDQ
form, convolutions and matrix products only (``QUANT_DEFAULTS``): uint8 activations with MinMax ranges
from the calibration images, int8 per-channel weights (the U8S8 form ONNX Runtime's VNNI/AMX kernels run). The calibration images are the validation
split of the package's run (``RUN/splits.csv``, else ``DATA/splits.csv``), or a folder given with
``--calibration``.
The FP32 graph's second output, ``embedding`` (the penultimate-layer features, for monitoring), stays an
output of the INT8 graph, after the logits; the gate below compares the logits only.

The gate compares INT8 with FP32 on the validation split, each with its own temperature (INT8 gets
its own, fitted on the same split): macro ROC AUC within ``MAX_AUC_DIFF``, top-1 agreement at least
``MIN_AGREEMENT``, the largest probability difference reported. A model that fails is not written
(the error names the figure) unless ``force=True``; a forced model records that it failed, and the
``auto`` backend never picks it.

In the package the INT8 model is an optional pair of files: ``model.int8.onnx`` and ``int8.json``
(format, sha256 of the ONNX file, sha256 of the FP32 weights it was made from, temperature, gate
figures, toolchain versions, the speed figures ``auto`` decides on, and, when OpenVINO is installed at
quantize time, ``openvino``: the gate run again on OpenVINO's outputs of the same graph, with its own
temperature, the inference precision and the OpenVINO version; see infer/openvino_runtime.py). Loading checks both hashes, so a stale or altered INT8 model is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tempfile
from pathlib import Path

import numpy as np

from medpipe.calibration import fit_temperature
from medpipe.data.cache import build_cache
from medpipe.data.sources import load_records
from medpipe.errors import GateError, QuantizeError
from medpipe.infer import openvino_runtime as ovr
from medpipe.infer.onnx_runtime import INPUT_NAME, onnx_bytes, onnx_session, with_onnx_metadata
from medpipe.infer.openvino_runtime import OpenVinoSession
from medpipe.metrics import macro_auc
from medpipe.package import Calibration, PackageMeta, load_package, read_meta
from medpipe.preprocess import eval_batch
from medpipe.utils import atomic_write_bytes, atomic_write_text, to_json

log = logging.getLogger(__name__)

INT8_FILE = "model.int8.onnx"
INT8_META = "int8.json"
INT8_FORMAT = "medpipe-int8-1"
MAX_AUC_DIFF = 0.005
MIN_AGREEMENT = 0.98
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
MAX_CALIBRATION = 512  # images; the validation split is strided down to this many


def cpu_int8_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> list[str]:
    """The INT8 dot-product features this CPU reports (VNNI, AMX); empty where unknown."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return [f for f in VNNI_FLAGS if f in flags]


# -- the INT8 model inside a package ---------------------------------------------------------------

def int8_paths(pkg_dir: str | Path) -> tuple[Path, Path]:
    return Path(pkg_dir) / INT8_FILE, Path(pkg_dir) / INT8_META


def load_int8(meta: PackageMeta) -> tuple[bytes, dict]:
    """The package's INT8 model and its record, both verified; QuantizeError naming what is wrong."""
    import hashlib

    onnx_path, info_path = int8_paths(meta.dir)
    if not info_path.is_file():
        raise QuantizeError(f"{meta.dir} has no INT8 model; make one with "
                            f"'medpipe quantize --model {meta.dir} --data DATA'")
    try:
        info = json.loads(info_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise QuantizeError(f"{info_path}: not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(info, dict) or info.get("format") != INT8_FORMAT:
        raise QuantizeError(f"{info_path}: not a medpipe INT8 record (format {info.get('format')!r})"
                            if isinstance(info, dict) else f"{info_path}: not a medpipe INT8 record")
    for key in ("sha256", "weights_sha256", "temperature", "gate"):
        if key not in info:
            raise QuantizeError(f"{info_path}: missing key '{key}'")
    if info["weights_sha256"] != meta.weights_sha256:
        raise QuantizeError(f"{info_path}: made from other weights ({str(info['weights_sha256'])[:12]}...) than "
                            f"this package's ({meta.weights_sha256[:12]}...); run 'medpipe quantize' again")
    if not onnx_path.is_file():
        raise QuantizeError(f"{onnx_path} is missing ({INT8_META} refers to it)")
    import os
    import time

    # `--backend auto` verifies the file to choose the backend and again to start it: the second read of
    # the same unchanged file reuses the first digest. "Unchanged": the open file's inode, size, mtime and
    # ctime (any write moves the ctime, which utime cannot set back) the same before and after the read, so
    # neither a replacement between stat and read nor a write during it is taken for the verified file; and
    # a file written in the last second is always hashed (a write within one timestamp tick of a
    # verification would keep its times)
    with open(onnx_path, "rb") as fh:
        before = os.fstat(fh.fileno())
        data = fh.read()
        after = os.fstat(fh.fileno())
    real = str(onnx_path.resolve())
    key = lambda st: (real, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)  # noqa: E731
    seen = key(before) if key(before) == key(after) and time.time_ns() - after.st_ctime_ns > 1_000_000_000 \
        else None
    digest = (_INT8_DIGESTS.get(seen) if seen else None) or hashlib.sha256(data).hexdigest()
    if digest != info["sha256"]:
        raise QuantizeError(f"{onnx_path}: sha256 {digest[:12]}... does not match {INT8_META} "
                            f"({str(info['sha256'])[:12]}...); the file was changed or truncated")
    t = info["temperature"]
    if not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise QuantizeError(f"{info_path}: temperature {t!r} is not a positive number")
    if seen:
        _INT8_DIGESTS[seen] = digest
    return data, info


_INT8_DIGESTS: dict[tuple, str] = {}  # verified INT8 files of this process: (path, inode, size, mtime, ctime) -> sha256


MIN_SPEEDUP = 1.1  # auto picks INT8 only where it measured at least this much faster than FP32 ONNX
SPEED_BATCHES = (1, 8)  # batch 1 (a lone request) and the batch the server forms under load
# OpenVINO is timed as ONNX Runtime is, one batch at a time on one infer request using every thread (latency):
# with N streams a batch of 1 would run on one stream's share of the threads, and the ratio against ONNX
# Runtime would mix the engine with the server's throughput setting (--streams, measured in serving.md)
OPENVINO_TIMING_STREAMS = 1


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name ("Intel(R) Xeon(R) ..."), or platform.processor() where /proc/cpuinfo has none."""
    import platform

    try:
        for line in Path(cpuinfo).read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[-1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_description() -> dict:
    """What a speed figure was measured on: the model name, its INT8 instructions, its logical CPUs."""
    import os

    return {"model": cpu_model(), "int8_flags": cpu_int8_flags(), "logical_cpus": os.cpu_count()}


def measure_speedup(fp32: bytes, int8: bytes, image_size: int, *, batches: tuple[int, ...] = SPEED_BATCHES,
                    threads: int | None = None, warmup: int = 2, rounds: int = 5,
                    openvino: str | None = None, sessions: dict | None = None) -> dict:
    """Time ONNX Runtime FP32 against INT8 on this CPU, in this process: both sessions built the way the
    backends build them, ``warmup`` runs each, then ``rounds`` rounds (the order rotated every round so
    drift in the machine's load hits all) at each batch size on random inputs. Returns per batch the
    median milliseconds and the median of the per-round FP32/INT8 ratios, and ``speedup``: the smallest
    of those ratios (INT8 must win at every batch size). ``openvino``: also time OpenVINO running the
    INT8 graph in that precision (``bf16``/``f32``), reported as ``openvino_ms``/``openvino_speedup``, with
    ``openvino_streams``: the session is timed with :data:`OPENVINO_TIMING_STREAMS` stream(s), whatever the
    server's ``--streams``, so every figure is one batch's latency on one session using all the threads.
    ``sessions``: the caller's ONNX Runtime sessions of these two graphs (``{"fp32": ..., "int8": ...}``,
    built by ``onnx_session`` with these ``threads``), instead of building them again."""
    import time

    sessions = dict(sessions) if sessions else {"fp32": onnx_session(fp32, threads=threads),
                                                "int8": onnx_session(int8, threads=threads)}
    if openvino:
        sessions["openvino"] = OpenVinoSession(int8, threads=threads, precision=openvino, max_batch=max(batches),
                                               streams=OPENVINO_TIMING_STREAMS)
    names = list(sessions)
    rng = np.random.default_rng(0)
    out: dict = {}
    for b in batches:
        feed = {INPUT_NAME: rng.standard_normal((b, 3, image_size, image_size), dtype=np.float32)}
        for _ in range(warmup):
            for s in sessions.values():
                s.run(None, feed)
        ms: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                t = time.perf_counter()
                sessions[name].run(None, feed)
                ms[name].append(1000 * (time.perf_counter() - t))
        row = {"fp32_ms": float(np.median(ms["fp32"])), "int8_ms": float(np.median(ms["int8"])),
               "speedup": float(np.median([a / c for a, c in zip(ms["fp32"], ms["int8"])]))}
        if openvino:
            row.update(openvino_ms=float(np.median(ms["openvino"])),
                       openvino_speedup=float(np.median([a / c for a, c in zip(ms["fp32"], ms["openvino"])])))
        out[str(b)] = row
    result = {"batches": out, "speedup": min(v["speedup"] for v in out.values()), "threads": threads,
              "warmup": warmup, "rounds": rounds}
    if openvino:
        result.update(openvino_speedup=min(v["openvino_speedup"] for v in out.values()), openvino_precision=openvino,
                      openvino_streams=sessions["openvino"].streams)
    return result


def format_speed(speed: dict) -> str:
    per = ", ".join(f"batch {b}: {v['fp32_ms']:.1f} -> {v['int8_ms']:.1f} ms ({v['speedup']:.2f}x)"
                    for b, v in speed["batches"].items())
    text = f"INT8 {speed['speedup']:.2f}x FP32 ONNX ({per})"
    if isinstance(speed.get("openvino_speedup"), (int, float)):
        per = ", ".join(f"batch {b}: {v['openvino_ms']:.1f} ms ({v['openvino_speedup']:.2f}x)"
                        for b, v in speed["batches"].items() if "openvino_ms" in v)
        text += f"; OpenVINO INT8 {speed['openvino_speedup']:.2f}x FP32 ONNX ({per})"
    return text


# -- quantization ----------------------------------------------------------------------------------

def _float_nodes(path: Path) -> list[str]:
    """Nodes kept in FP32, as is usual for post-training quantization: the first convolution (it sees raw
    normalised pixels) and the node(s) producing the outputs (uint8 logits would be coarse steps; the
    ``embedding`` output's node is a Flatten, which is not quantized anyway)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    outputs = {o.name for o in graph.output}
    head = [n.name for n in graph.node if set(n.output) & outputs]
    first = next((n.name for n in graph.node if n.op_type == "Conv"), None)
    return head + ([first] if first else [])


# Only the convolutions (and matrix products) are quantized: DenseNet is mostly Concat/BatchNorm/Relu between
# its convolutions, and quantizing those too put Quantize/Dequantize pairs on every concatenated feature map.
# benchmarks/int8_variants.py measured this 1.55-1.99x FP32 ONNX against 1.27-1.55x for quantizing every op
# (DenseNet121 224x224, batch 1 and 8, interleaved rounds, three runs; docs/benchmarks/index.md "INT8 variants"). It stays QDQ, plain
# ONNX ops other runtimes read too: QOperator (ONNX Runtime contrib ops) was within the run-to-run spread.
QUANT_DEFAULTS = {"pre_process": True, "quant_format": "qdq", "per_channel": True, "reduce_range": False,
                  "op_types": ["Conv", "MatMul", "Gemm"], "keep_ends_fp32": True, "activation": "uint8",
                  "extra_options": None}


def quantize_onnx(fp32: bytes, calibration: list[np.ndarray], **options) -> bytes:
    """Static quantization of an FP32 ONNX graph; ``calibration`` is a list of NCHW float32 batches.

    ``options`` (defaults in ``QUANT_DEFAULTS``, the configuration medpipe ships; the others are what
    benchmarks/int8_variants.py compares): ``pre_process`` (``quant_pre_process``: shape inference and
    graph optimisation first), ``quant_format`` ``qdq``|``qoperator``, ``per_channel`` weights,
    ``reduce_range`` (7-bit weights), ``op_types`` (None: every op ONNX Runtime can quantize; else a
    list such as ["Conv", "MatMul", "Gemm"]), ``keep_ends_fp32`` (first convolution and logits in FP32),
    ``activation`` ``uint8``|``int8``, ``extra_options`` (passed to ``quantize_static``)."""

    unknown = set(options) - set(QUANT_DEFAULTS)
    if unknown:
        raise QuantizeError(f"unknown quantization option(s): {', '.join(sorted(unknown))}")
    opt = {**QUANT_DEFAULTS, **options}
    try:
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quant_pre_process, quantize_static)
    except ImportError:
        raise QuantizeError("INT8 quantization needs onnxruntime: pip install 'medpipe-imaging[onnx]'") from None

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(calibration)

        def get_next(self):
            x = next(self._it, None)
            return None if x is None else {INPUT_NAME: x}

    with tempfile.TemporaryDirectory(prefix="medpipe-int8-") as tmp:
        src, pre, out = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantizer logs one warning per BatchNorm weight
        try:
            if opt["pre_process"]:
                quant_pre_process(str(src), str(pre))
            else:
                pre = src
            keep = _float_nodes(pre) if opt["keep_ends_fp32"] else []
            quantize_static(str(pre), str(out), Reader(),
                            quant_format=QuantFormat.QOperator if opt["quant_format"] == "qoperator"
                            else QuantFormat.QDQ,
                            per_channel=bool(opt["per_channel"]), reduce_range=bool(opt["reduce_range"]),
                            op_types_to_quantize=opt["op_types"],
                            activation_type=QuantType.QInt8 if opt["activation"] == "int8" else QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_exclude=keep, extra_options=opt["extra_options"])
        finally:
            root.setLevel(level)
        return out.read_bytes()


def _softmax(logits: np.ndarray, t: float) -> np.ndarray:
    z = logits / t
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def gate(y: np.ndarray, fp32_logits: np.ndarray, fp32_temperature: float, int8_logits: np.ndarray) -> dict:
    """The accuracy gate's figures on the validation split, INT8's own temperature, and what failed."""
    import torch

    y = np.array(y, dtype=np.int64)  # a writable copy
    t8 = fit_temperature(torch.from_numpy(int8_logits.astype(np.float32)), torch.from_numpy(y))
    p32, p8 = _softmax(fp32_logits, fp32_temperature), _softmax(int8_logits, t8)
    auc32, auc8 = macro_auc(y, p32), macro_auc(y, p8)
    agreement = float((p32.argmax(1) == p8.argmax(1)).mean())
    figures = {"n": int(len(y)), "fp32_macro_auc": auc32, "int8_macro_auc": auc8,
               "auc_diff": abs(auc8 - auc32) if math.isfinite(auc32) and math.isfinite(auc8) else float("nan"),
               "agreement": agreement, "max_prob_diff": float(np.abs(p32 - p8).max()),
               "temperature": float(t8), "thresholds": {"max_auc_diff": MAX_AUC_DIFF, "min_agreement": MIN_AGREEMENT}}
    failures = []
    if not math.isfinite(figures["auc_diff"]):
        failures.append(f"macro AUC is undefined on these {len(y)} validation images (a class needs positives "
                        "and negatives), so the gate cannot be checked")
    elif figures["auc_diff"] > MAX_AUC_DIFF:
        failures.append(f"macro AUC differs from FP32 by {figures['auc_diff']:.4f} (FP32 {auc32:.4f}, INT8 "
                        f"{auc8:.4f}; allowed {MAX_AUC_DIFF})")
    if agreement < MIN_AGREEMENT:
        failures.append(f"top-1 agreement with FP32 is {agreement:.1%} (at least {MIN_AGREEMENT:.0%} required)")
    figures["failures"] = failures
    figures["passed"] = not failures
    return figures


def _validation_pixels(meta: PackageMeta, data: str | Path, size: int, interpolation: str):
    """uint8 pixels and class indices of the package's validation split, decoded like serving does."""
    import pandas as pd

    data = Path(data)
    table, classes = load_records(data)
    if list(classes) != list(meta.classes):
        raise QuantizeError(f"--data {data}: classes {classes} differ from the model's {list(meta.classes)}")
    run_splits = meta.dir.parent / "splits.csv"
    sp_path = run_splits if run_splits.is_file() else data / "splits.csv"
    if not sp_path.is_file():
        raise QuantizeError(f"no split file: neither {run_splits} nor {data / 'splits.csv'} exists "
                            f"(run 'medpipe split --data {data}')")
    sp = pd.read_csv(sp_path, dtype=str, keep_default_na=False)
    ids = set(sp.loc[sp["split"] == "val", "image_id"])
    table = table[table["image_id"].isin(ids)]
    if len(table) < 2:
        raise QuantizeError(f"{sp_path}: the validation split of {data} has {len(table)} images; the gate needs "
                            "a validation split")
    cache = build_cache(table, data / "cache", (size, size), interpolation)
    return np.asarray(cache.pixels[cache.rows(table["image_id"])]), table["class_index"].to_numpy()


def _folder_pixels(folder: str | Path, spec) -> np.ndarray:
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in
                   (".jpg", ".jpeg", ".png", ".bmp", ".webp"))
    if not files:
        raise QuantizeError(f"--calibration {folder}: no images (jpg, png, bmp, webp) found")
    return np.stack([spec.read(f) for f in files])


def _logits(session, pixels: np.ndarray, spec, batch: int = 32) -> np.ndarray:
    return np.concatenate([session.run(None, {INPUT_NAME: eval_batch(list(pixels[i:i + batch]), spec).numpy()})[0]
                           for i in range(0, len(pixels), batch)])


def quantize_package(package: str | Path, data: str | Path | None, *, calibration: str | Path | None = None,
                     force: bool = False, max_calibration: int = MAX_CALIBRATION) -> tuple[bytes, dict]:
    """Quantize ``package`` and run the gate; returns (INT8 ONNX bytes, the int8.json record).

    Raises GateError (naming each failed figure) unless the gate passes or ``force`` is set.
    """
    import hashlib

    import onnxruntime

    model, meta = load_package(package)
    spec = meta.preprocessing
    if data is None:
        raise QuantizeError("give --data DATA: the ingested data folder the package was trained on (its "
                            "validation split calibrates the INT8 model and checks the gate)")
    val_px, val_y = _validation_pixels(meta, data, spec.image_size, spec.interpolation)
    calib_px = _folder_pixels(calibration, spec) if calibration else val_px
    if len(calib_px) > max_calibration:
        calib_px = calib_px[np.linspace(0, len(calib_px) - 1, max_calibration).round().astype(int)]

    calib = [eval_batch(list(calib_px[i:i + 16]), spec).numpy() for i in range(0, len(calib_px), 16)]
    fp32 = onnx_bytes(model, spec.image_size)
    int8 = quantize_onnx(fp32, calib)
    t32 = meta.temperature
    # the gate's sessions are timed below too (the metadata _self_describing adds does not change the graph)
    built = {"fp32": onnx_session(fp32), "int8": onnx_session(int8)}
    fp32_logits = _logits(built["fp32"], val_px, spec)
    figures = gate(val_y, fp32_logits, t32, _logits(built["int8"], val_px, spec))
    if not figures["passed"] and not force:
        raise GateError("the INT8 model failed the accuracy gate on the validation split: "
                        + "; ".join(figures["failures"]) + ". Nothing was written (--force writes it anyway, "
                        "marked as failed; --backend auto never picks it)")
    if not figures["passed"]:
        log.warning("writing an INT8 model that FAILED the accuracy gate (--force): %s", "; ".join(figures["failures"]))
    t8 = figures.pop("temperature")
    int8 = _self_describing(int8, meta, t8, figures)
    info = {"format": INT8_FORMAT, "file": INT8_FILE, "sha256": hashlib.sha256(int8).hexdigest(),
            "weights_sha256": meta.weights_sha256, "temperature": t8,
            "gate": figures, "forced": bool(force and not figures["passed"]),
            "method": {"toolchain": f"onnxruntime {onnxruntime.__version__}",
                       "format": "QOperator" if QUANT_DEFAULTS["quant_format"] == "qoperator" else "QDQ",
                       "activations": f"{QUANT_DEFAULTS['activation']}, per tensor, MinMax",
                       "weights": "int8, " + ("per channel" if QUANT_DEFAULTS["per_channel"] else "per tensor"),
                       "quantized_ops": QUANT_DEFAULTS["op_types"] or "all ONNX Runtime can quantize",
                       "options": dict(QUANT_DEFAULTS),
                       "calibration_images": int(len(calib_px)),
                       "calibration_source": str(calibration) if calibration else f"validation split of {data}"},
            "cpu_int8_flags": cpu_int8_flags()}

    speed = None
    if ovr.available():  # the same graph on OpenVINO: its own outputs, so its own gate and temperature
        try:
            info["openvino"] = openvino_gate(int8, val_y, fp32_logits, t32, val_px, spec)
            log.info("OpenVINO %s: %s", info["openvino"]["precision"], "gate passed" if info["openvino"]["gate"]
                     ["passed"] else "gate FAILED: " + "; ".join(info["openvino"]["gate"]["failures"]))
            if info["openvino"]["gate"]["passed"]:
                speed = measure_speedup(fp32, int8, spec.image_size, openvino=info["openvino"]["precision"],
                                        sessions=built)
        except Exception as exc:  # noqa: BLE001 - OpenVINO is optional: the ONNX Runtime model stands alone
            log.warning("OpenVINO could not run the INT8 model (%s: %s); no OpenVINO gate recorded",
                        exc.__class__.__name__, exc)
            info.pop("openvino", None)
    # what `auto` decides on: INT8 (and OpenVINO) against FP32 ONNX timed here, recorded with the CPU it ran on
    info["speed"] = {**(speed or measure_speedup(fp32, int8, spec.image_size, sessions=built)), "cpu": cpu_description(),
                     "min_speedup": MIN_SPEEDUP}
    return int8, info


def openvino_gate(int8: bytes, y: np.ndarray, fp32_logits: np.ndarray, fp32_temperature: float,
                  pixels: np.ndarray, spec) -> dict:
    """The accuracy gate on OpenVINO's outputs for the INT8 graph, in this CPU's inference precision."""

    precision = ovr.cpu_precision()
    session = ovr.OpenVinoSession(int8, precision=precision, max_batch=32)
    figures = gate(y, fp32_logits, fp32_temperature, _logits(session, pixels, spec))
    return {"version": ovr.version(), "precision": precision, "temperature": figures.pop("temperature"),
            "gate": figures}


def _self_describing(int8: bytes, meta: PackageMeta, temperature: float, figures: dict) -> bytes:
    """The INT8 graph with the same metadata_props as an FP32 ONNX export (its own temperature) + the gate."""
    import onnx

    own = dataclasses.replace(meta, calibration=Calibration(float(temperature)))
    m = onnx.load_from_string(with_onnx_metadata(int8, own))
    m.metadata_props.add(key="int8_gate", value=json.dumps(figures, default=float))
    return m.SerializeToString()


def install_int8(package: str | Path, int8: bytes, info: dict) -> Path:
    """Write the INT8 model into the package folder (ONNX first, then its record)."""

    onnx_path, info_path = int8_paths(read_meta(package).dir)
    atomic_write_bytes(onnx_path, int8)
    atomic_write_text(info_path, to_json(info, indent=2))
    return onnx_path


def format_gate(info: dict) -> str:
    g = info["gate"]
    return (f"gate on {g['n']} validation images: macro AUC FP32 {g['fp32_macro_auc']:.4f} / INT8 "
            f"{g['int8_macro_auc']:.4f} (difference {g['auc_diff']:.4f}, allowed {MAX_AUC_DIFF}), top-1 agreement "
            f"{g['agreement']:.1%} (>= {MIN_AGREEMENT:.0%}), max probability difference {g['max_prob_diff']:.4f}; "
            f"INT8 temperature {info['temperature']:.3f}; " + ("PASSED" if g["passed"] else "FAILED (forced)")
            + (f"\nspeed on {info['speed']['cpu']['model']}: {format_speed(info['speed'])}; --backend auto "
               + _auto_says(info) if isinstance(info.get("speed"), dict) else "")
            + (_format_openvino(info["openvino"]) if isinstance(info.get("openvino"), dict) else
               "\nOpenVINO: no OpenVINO gate recorded (quantized without OpenVINO; the openvino backend needs one)"))


def _auto_says(info: dict) -> str:
    speed, ov = info["speed"], info.get("openvino")
    ovs = speed.get("openvino_speedup")
    if (isinstance(ov, dict) and ov["gate"]["passed"] and isinstance(ovs, (int, float)) and ovs >= MIN_SPEEDUP
            and ovs > speed["speedup"] and info["gate"]["passed"]):
        return "picks OpenVINO INT8 on this CPU model"
    if speed["speedup"] >= MIN_SPEEDUP and info["gate"]["passed"]:
        return "picks INT8 (ONNX Runtime) on this CPU model"
    return "keeps FP32 ONNX on this CPU model"


def _format_openvino(rec: dict) -> str:
    g = rec["gate"]
    return (f"\nOpenVINO {rec['version']} ({rec['precision']}) on the same graph: macro AUC {g['int8_macro_auc']:.4f} "
            f"(difference {g['auc_diff']:.4f}), top-1 agreement {g['agreement']:.1%}, max probability difference "
            f"{g['max_prob_diff']:.4f}; temperature {rec['temperature']:.3f}; "
            + ("PASSED" if g["passed"] else "FAILED: " + "; ".join(g["failures"])
               + " (auto never picks it; --backend openvino runs it with a warning)"))
