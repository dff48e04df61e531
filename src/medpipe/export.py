"""Exports of a model package, each proven with the runtime that consumes it.

    medpipe export --model RUN/model --format onnx --out exports/model.onnx
    medpipe export --model RUN/model --format bundle --out exports/bundle
    cd exports/bundle && python -m monai.bundle run --config_file configs/inference.json --dataset_dir IMAGES

| format      | consumer                                   | carries                                        |
|-------------|--------------------------------------------|------------------------------------------------|
| onnx        | onnxruntime (no medpipe needed)            | metadata_props: classes, preprocessing, temperature, decision (rule, offsets), weights_sha256, medpipe version |
| torchscript | ``torch.jit.load``                         | ``medpipe_model.json`` extra file              |
| bundle      | ``python -m monai.bundle run`` / ``ConfigWorkflow`` (medpipe installed: its decoder is the loader) | configs/metadata.json, models/model.pt + model.ts, docs/README.md (model card) |
| sagemaker   | SageMaker PyTorch inference toolkit        | model.tar.gz with code/                        |

The networks take normalised NCHW float32 input (the package's eval preset) and return logits;
``softmax(logits / temperature)`` gives the calibrated probabilities. An export writes only its target
and a ``<out>.medpipe.json`` sidecar; it refuses to write into a model package or over an existing
path unless ``force=True`` (``--force``), and creates the parent folder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: importing this module loads neither torch nor MONAI
    import torch

import io
import json
import logging
import warnings
from pathlib import Path

from medpipe import decision
from medpipe.decision import apply_offsets
from medpipe.errors import ExportError, GateError
from medpipe.infer.onnx_runtime import (EMBEDDING_NAME, INPUT_NAME, METADATA_INPUT_NAME, METADATA_TEXT,  # noqa: F401
                                        ONNX_OPSET, OUTPUT_NAME, export_about, input_text, onnx_bytes, onnx_session,
                                        output_names, with_embedding, with_onnx_metadata)
from medpipe.infer.quantize import int8_paths, load_int8, quantize_package
from medpipe.models import bundle_target
from medpipe.package import META, WEIGHTS, PackageMeta, load_package, read_meta
from medpipe.preprocess import PreprocessSpec, eval_batch, shades_of_gray
from medpipe.sagemaker import layout
from medpipe.utils import atomic_write_bytes, atomic_write_text, to_json

log = logging.getLogger(__name__)

FORMATS = ("onnx", "onnx-int8", "torchscript", "bundle", "sagemaker")
SIDECAR_SUFFIX = ".medpipe.json"
BUNDLE_REQUIRED = ("version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
                   "task", "description", "authors", "copyright", "network_data_format")
TENSOR_REQUIRED = ("type", "format", "modality", "num_channels", "spatial_shape", "dtype", "value_range",
                   "is_patch_data", "channel_def")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _random_check(model: torch.nn.Module, run, image_size: int, tol: float = 1e-4) -> float:
    """Max |exported - eager| over random normalised inputs at batch sizes 1 and 3; raises over ``tol``."""
    import torch

    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for n in (1, 3):
        x = torch.randn(n, 3, image_size, image_size, generator=g)
        with torch.inference_mode():
            ref = model(x).float()
        got = torch.as_tensor(run(x)).float()
        worst = max(worst, float((got - ref).abs().max()))
    if worst > tol:
        raise ExportError(f"exported model differs from eager by {worst:.2e} (> {tol:g})")
    return worst


def _embedding_check(model: torch.nn.Module, sess, x, tol: float = 1e-4) -> float | None:
    """Max |exported embedding - eager classifier-head input| on ``x`` (the graph's input, numpy); raises over
    ``tol``. None for a graph without the ``embedding`` output (a model with no linear head)."""
    import torch

    if EMBEDDING_NAME not in output_names(sess):
        return None
    with torch.inference_mode():
        ref = with_embedding(model)(torch.as_tensor(x))[1].float()
    got = torch.as_tensor(sess.run(None, {INPUT_NAME: x})[output_names(sess).index(EMBEDDING_NAME)])
    worst = float((got - ref).abs().max())
    if worst > tol:
        raise ExportError(f"the exported embedding output differs from eager by {worst:.2e} (> {tol:g})")
    return worst


# -- where an export may write ------------------------------------------------------------------
def sidecar_path(out: Path) -> Path:
    return out.with_name(out.name + SIDECAR_SUFFIX)


def _package_folder(path: Path) -> Path | None:
    """The model package folder ``path`` is in (or is), if any."""

    for folder in (path, *path.parents):
        if (folder / META).is_file() and (folder / WEIGHTS).is_file():
            return folder
    return None


def check_target(out: Path, fmt: str, force: bool = False) -> list[Path]:
    """Refuse an export target that would damage something; returns the paths the export will write.

    Never: over a package's own files. Without ``force``: into a model package folder, over an
    existing file (or a non-empty bundle folder), or with an existing sidecar."""

    out = Path(out).absolute()
    targets = [out] if fmt in ("bundle", "sagemaker", "torchscript") else [out, sidecar_path(out)]
    if fmt != "bundle" and out.is_dir():
        raise ExportError(f"--out {out} is a directory; give a file name, e.g. {out / ('model.' + fmt)}")
    if fmt == "bundle" and out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; a bundle is written as a folder")
    for t in targets:
        pkg = _package_folder(t if fmt == "bundle" and t == out else t.parent)
        if pkg is not None and (t.name in (META, WEIGHTS) and t.parent == pkg or t == pkg):
            raise ExportError(f"--out {t} would overwrite the model package in {pkg}; export somewhere else")
        if pkg is not None and not force:
            raise ExportError(f"--out {t} is inside the model package {pkg}; export somewhere else "
                              "(or --force to add the file to that folder)")
        if t.exists() and not force and not (t.is_dir() and not any(t.iterdir())):
            raise ExportError(f"--out {t} exists; choose another path or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return targets


def preprocessing_wrapper(model: torch.nn.Module, spec: PreprocessSpec) -> torch.nn.Module:
    """The network with the float half of the eval preset in front: uint8 RGB N x S x S x 3, already decoded
    and resized by the spec's rule (``PreprocessSpec.decode``), -> logits."""
    import torch

    class WithPreprocessing(torch.nn.Module):  # built here so that importing this module needs no torch

        def __init__(self, model: torch.nn.Module, spec: PreprocessSpec):
            super().__init__()
            self.model, self.spec = model, spec
            self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.permute(0, 3, 1, 2).float() / 255.0
            if self.spec.color_constancy == "shades_of_gray":
                x = shades_of_gray(x, self.spec.color_constancy_power)
            return self.model((x - self.mean) / self.std)

    return WithPreprocessing(model, spec)


def _uint8_check(model: torch.nn.Module, spec: PreprocessSpec, run, tol: float = 1e-4) -> float:
    """Max |exported(uint8 pixels) - eager(eval preset(pixels))| over random images; raises over ``tol``."""
    import numpy as np
    import torch

    pixels = np.random.default_rng(0).integers(0, 256, (3, *spec.size, 3), dtype=np.uint8)
    with torch.inference_mode():
        ref = model(eval_batch(pixels, spec)).float()
    worst = float((torch.as_tensor(run(pixels)).float() - ref).abs().max())
    if worst > tol:
        raise ExportError(f"exported model differs from eager by {worst:.2e} (> {tol:g})")
    return worst


def export_model(package: str, fmt: str, out: str, force: bool = False, with_preprocessing: bool = False,
                 **int8_options) -> dict:
    """Write ``package`` as ``fmt`` to ``out``; every format is checked against the eager model (onnx-int8
    against FP32 by its accuracy gate; ``int8_options``: data, calibration, see infer/quantize.py).
    ``with_preprocessing`` (ONNX only): the graph takes uint8 RGB N x S x S x 3 pixels, already decoded and
    resized by the package's rule, and does the rest of the eval preset itself."""
    import numpy as np
    import torch

    if with_preprocessing and fmt != "onnx":
        raise ExportError("--with-preprocessing applies to --format onnx only")
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "onnx-int8":
        if read_meta(package).metadata is not None:
            raise ExportError("--format onnx-int8: this package takes patient metadata, which the INT8 model does not "
                              "carry yet; export --format onnx (two inputs: image and metadata)")
        return export_int8(package, out, force=force, **int8_options)
    model, meta = load_package(package)
    if meta.metadata is not None:
        return export_with_metadata(model, meta, fmt, Path(out), force, with_preprocessing)
    size = meta.preprocessing.image_size
    out_path = Path(out)
    check_target(out_path, fmt, force)
    result = {"format": fmt, "out": str(out_path)}
    if fmt == "onnx" and with_preprocessing:
        spec = meta.preprocessing
        wrapped = preprocessing_wrapper(model, spec).eval()
        data = onnx_bytes(wrapped, size, torch.zeros(2, size, size, 3, dtype=torch.uint8))
        sess = onnx_session(data)
        result["max_abs_diff"] = _uint8_check(model, spec, lambda x: sess.run(None, {INPUT_NAME: x})[0])
        pixels = np.random.default_rng(1).integers(0, 256, (3, *spec.size, 3), dtype=np.uint8)
        result["embedding_max_abs_diff"] = _embedding_check(wrapped, sess, pixels)
        atomic_write_bytes(out_path, with_onnx_metadata(data, meta, with_preprocessing=True))
        atomic_write_text(sidecar_path(out_path), _sidecar(meta, fmt, with_preprocessing=True))
        result["sidecar"] = str(sidecar_path(out_path))
    elif fmt == "onnx":
        data = onnx_bytes(model, size)
        sess = onnx_session(data)
        result["max_abs_diff"] = _random_check(model, lambda x: sess.run(None, {INPUT_NAME: x.numpy()})[0], size)
        x = np.random.default_rng(1).standard_normal((3, 3, size, size), dtype=np.float32)
        result["embedding_max_abs_diff"] = _embedding_check(model, sess, x)
        atomic_write_bytes(out_path, with_onnx_metadata(data, meta))
        atomic_write_text(sidecar_path(out_path), _sidecar(meta, fmt))
        result["sidecar"] = str(sidecar_path(out_path))
    elif fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, torch.zeros(2, 3, size, size), check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={"medpipe_model.json": _sidecar(meta, fmt)})
        loaded = torch.jit.load(io.BytesIO(buf.getvalue()))
        result["max_abs_diff"] = _random_check(model, lambda x: loaded(x).detach(), size)
        atomic_write_bytes(out_path, buf.getvalue())
    elif fmt == "bundle":
        result.update(write_bundle(model, meta, out_path))
    else:
        result["out"] = str(layout.package(meta.dir, out_path))
    return result


def export_with_metadata(model: torch.nn.Module, meta: PackageMeta, fmt: str, out_path: Path, force: bool,
                         with_preprocessing: bool) -> dict:
    """A package that takes patient metadata: ONNX and TorchScript with two inputs (``image``: the eval preset's
    N x 3 x S x S, ``metadata``: the encoded N x dim vectors, described in metadata_props / the extra file); the
    SageMaker tarball as it is (its handler takes metadata). The MONAI bundle's workflow feeds one image tensor
    to the network, so a metadata model is refused there, saying so."""
    import torch

    if fmt == "bundle":
        raise ExportError("--format bundle: this package takes patient metadata beside the image, and the MONAI "
                          "bundle's inference workflow feeds the network one image tensor; export --format onnx or "
                          "torchscript (two inputs), or train without --metadata for a bundle")
    if with_preprocessing:
        raise ExportError("--with-preprocessing: not available for a package that takes patient metadata; export "
                          "the plain ONNX graph (two inputs)")
    check_target(out_path, fmt, force)
    if fmt == "sagemaker":
        return {"format": fmt, "out": str(layout.package(meta.dir, out_path))}
    size, dim = meta.preprocessing.image_size, meta.metadata.dim
    g = torch.Generator().manual_seed(0)
    checks = [(torch.randn(n, 3, size, size, generator=g), torch.rand(n, dim, generator=g)) for n in (1, 3)]
    with torch.inference_mode():
        refs = [model(x, m).float() for x, m in checks]
    result = {"format": fmt, "out": str(out_path)}
    if fmt == "onnx":
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), (torch.zeros(2, 3, size, size), torch.zeros(2, dim)), buf,
                              input_names=[INPUT_NAME, METADATA_INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, METADATA_INPUT_NAME: {0: "batch"},
                                            OUTPUT_NAME: {0: "batch"}}, opset_version=ONNX_OPSET, dynamo=False)
        sess = onnx_session(buf.getvalue())
        outs = [torch.as_tensor(sess.run(None, {INPUT_NAME: x.numpy(), METADATA_INPUT_NAME: m.numpy()})[0])
                for x, m in checks]
        data = with_onnx_metadata(buf.getvalue(), meta)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model.eval(), (torch.zeros(2, 3, size, size), torch.zeros(2, dim)),
                                     check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={"medpipe_model.json": _sidecar(meta, fmt)})
        loaded = torch.jit.load(io.BytesIO(buf.getvalue()))
        outs = [loaded(x, m).detach() for x, m in checks]
        data = buf.getvalue()
    result["max_abs_diff"] = worst = max(float((o - r).abs().max()) for o, r in zip(outs, refs))
    if worst > 1e-4:
        raise ExportError(f"exported model differs from eager by {worst:.2e} (> 1e-4)")
    atomic_write_bytes(out_path, data)
    if fmt == "onnx":
        atomic_write_text(sidecar_path(out_path), _sidecar(meta, fmt))
        result["sidecar"] = str(sidecar_path(out_path))
    return result


def export_int8(package: str | Path, out: str | Path, *, data: str | Path | None = None,
                calibration: str | Path | None = None, force: bool = False) -> dict:
    """``medpipe export --format onnx-int8``: the package's gated INT8 model (made now if it has none, or
    if --data/--calibration ask for a fresh one) written to ``out`` with a JSON sidecar holding the gate."""
    meta = read_meta(package)
    out = Path(out)
    check_target(out, "onnx-int8", force)
    int8 = info = None
    if data is None and calibration is None and int8_paths(meta.dir)[1].is_file():
        int8, info = load_int8(meta)
        if not info["gate"].get("passed") and not force:
            raise GateError(f"the package's INT8 model failed its accuracy gate ({'; '.join(info['gate']['failures'])}); "
                            "not exported (--force exports it anyway)")
    if int8 is None:
        int8, info = quantize_package(package, data, calibration=calibration, force=force)
    sidecar = json.loads(_sidecar(meta, "onnx-int8"))
    sidecar["calibration"] = {"method": "temperature", "temperature": info["temperature"]}
    sidecar["int8"] = info
    atomic_write_bytes(out, int8)
    atomic_write_text(sidecar_path(out), to_json(sidecar, indent=2))
    return {"format": "onnx-int8", "out": str(out), "int8": info}


def _sidecar(meta: PackageMeta, fmt: str, with_preprocessing: bool = False) -> str:
    text = input_text(with_preprocessing) + ("; " + METADATA_TEXT if meta.metadata is not None else "")
    return json.dumps({"exported_as": fmt, "input": text, "output": f"{OUTPUT_NAME}: N x classes (softmax(logits / temperature) gives the "
                       "calibrated probabilities)", **export_about(meta), "calibration": meta.calibration.to_dict()},
                      indent=2)


# -- MONAI bundle -------------------------------------------------------------------------------
_CONFIG_SPECIAL = ("$", "@", "%", "#", "::")


def config_literal(text: str) -> str:
    """A string from outside (class name, model name) made inert for MONAI's ``ConfigParser``.

    The parser evaluates strings starting with ``$``, resolves ``@id`` references and ``%`` macros
    (which read other files) and rewrites ``::``; a string with any of those characters is written as
    an expression that only decodes its own hex digits back to the same text."""
    text = str(text)
    if not any(c in text for c in _CONFIG_SPECIAL):
        return text
    return f"$bytes.fromhex('{text.encode().hex()}').decode()"


def _escape_tree(obj):
    if isinstance(obj, str):
        return config_literal(obj)
    if isinstance(obj, list):
        return [_escape_tree(v) for v in obj]
    if isinstance(obj, dict):
        return {config_literal(k) if isinstance(k, str) else k: _escape_tree(v) for k, v in obj.items()}
    return obj


def bundle_metadata(meta: PackageMeta) -> dict:
    import monai
    import numpy as np
    import torch

    about = export_about(meta)
    spec = meta.preprocessing
    size, classes = spec.image_size, about["classes"]
    lo = [round((0.0 - m) / s, 4) for m, s in zip(spec.mean, spec.std)]
    hi = [round((1.0 - m) / s, 4) for m, s in zip(spec.mean, spec.std)]
    required = {"medpipe-imaging": about["medpipe_version"]}  # distribution names (pip)
    try:
        import ignite

        required["pytorch-ignite"] = ignite.__version__
    except ImportError:
        pass
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                  "meta_schema_20240725.json",
        "version": f"{about['version']}.0.0",
        "changelog": {f"{about['version']}.0.0": "exported by medpipe"},
        "monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__, "required_packages_version": required,
        "name": about["name"],
        "task": f"2D image classification into {len(classes)} classes",
        "description": f"MONAI {about['architecture']} trained with medpipe on dermatoscopy images; "
                       f"softmax(logits / {about['temperature']:.4f}) gives calibrated class probabilities.",
        "authors": "medpipe", "copyright": "Copyright (c) the model's trainer",
        "intended_use": meta.intended_use.purpose,
        "data_source": "see docs/README.md", "data_type": "RGB dermatoscopy images (JPEG, PNG, BMP, WebP)",
        "image_classes": "RGB, 3 channels",
        "label_classes": "one class per output channel, see channel_def",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "dermoscopy", "num_channels": 3,
                "spatial_shape": [size, size], "dtype": "float32", "value_range": [min(lo), max(hi)],
                "is_patch_data": False, "channel_def": {"0": "R", "1": "G", "2": "B"}}},
            "outputs": {"pred": {
                "type": "probabilities", "format": "classes", "modality": "n/a", "num_channels": len(classes),
                "spatial_shape": [len(classes)], "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
                "channel_def": {str(i): c for i, c in enumerate(classes)}}},
        },
        "medpipe": {**about, "calibration": meta.calibration.to_dict()},
    }


def check_bundle_metadata(md: dict) -> list[str]:
    """Problems with a bundle's metadata.json against the MONAI bundle specification's required keys."""
    problems = [f"missing key {k!r}" for k in BUNDLE_REQUIRED if k not in md]
    if "optional_packages_version" in md:
        problems.append("'optional_packages_version' is deprecated; use 'required_packages_version'")
    ndf = md.get("network_data_format", {})
    for side in ("inputs", "outputs"):
        if not isinstance(ndf.get(side), dict) or not ndf[side]:
            problems.append(f"network_data_format.{side} is missing or empty")
            continue
        for name, t in ndf[side].items():
            problems += [f"network_data_format.{side}.{name}: missing {k!r}" for k in TENSOR_REQUIRED if k not in t]
            if t.get("channel_def") is not None and len(t["channel_def"]) != t.get("num_channels"):
                problems.append(f"network_data_format.{side}.{name}: channel_def has {len(t['channel_def'])} "
                                f"entries for {t.get('num_channels')} channels")
    return problems


def bundle_inference_config(meta: PackageMeta) -> dict:
    """``configs/inference.json``: MONAI's standard inference workflow (dataset -> evaluator -> run).

    The loader is medpipe's decoder (``LoadPreprocessd``, the spec's decode + resize: pixels identical to
    ``medpipe predict``); the rest of the eval preset is MONAI transforms; the calibration temperature is
    applied before the softmax; ``BundlePredictionWriter`` writes one JSON line per image."""

    spec = meta.preprocessing
    about = export_about(meta)
    rule, offsets = decision.resolve(meta.decision, None, len(about["classes"]))
    exts = ", ".join(repr(e) for e in IMAGE_SUFFIXES)
    return {
        "imports": ["$import functools", "$import glob", "$import os", "$import medpipe.preprocess",
                    "$import medpipe.export"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data",
        "datalist": "$sorted(f for f in glob.glob(os.path.join(@dataset_dir, '**', '*'), recursive=True) "
                    f"if f.lower().endswith(({exts})))",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "temperature": about["temperature"],
        "class_names": _escape_tree(about["classes"]),
        # the package's decision rule picks the label (medpipe.decision); probabilities are unaffected
        "decision_rule": config_literal(rule),
        "decision_offsets": None if offsets is None else [float(v) for v in offsets],
        "network_def": bundle_target(meta.architecture, len(about["classes"])),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "medpipe.preprocess.LoadPreprocessd", "keys": "image", "image_size": spec.image_size,
             "interpolation": spec.interpolation, "error_key": "error"},
            {"_target_": "Transposed", "keys": "image", "indices": [2, 0, 1]},
            {"_target_": "EnsureTyped", "keys": "image", "data_type": "tensor", "dtype": "$torch.float32",
             "track_meta": False},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 0.0, "a_max": 255.0, "b_min": 0.0,
             "b_max": 1.0, "clip": True},
            *([] if spec.color_constancy == "none" else [
                {"_target_": "Lambdad", "keys": "image", "func": "$functools.partial(medpipe.preprocess.shades_of_gray, "
                 f"power={float(spec.color_constancy_power)!r})"}]),
            {"_target_": "NormalizeIntensityd", "keys": "image", "subtrahend": list(spec.mean),
             "divisor": list(spec.std), "channel_wise": True},
        ]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': f, 'path': f} for f in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 8, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Lambdad", "keys": "pred", "func": "$lambda x: x / @temperature"},
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        ]},
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
             "load_dict": {"model": "@network"}, "map_location": "@device"},
            {"_target_": "medpipe.export.BundlePredictionWriter", "output_dir": "@output_dir",
             "class_names": "@class_names", "decision_rule": "@decision_rule",
             "decision_offsets": "@decision_offsets"},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


class BundlePredictionWriter:
    """Ignite handler of the exported bundle: ``OUTPUT_DIR/predictions.jsonl``, one line per image
    (path, label, class_index, probabilities by class; or error and message for an unreadable file, as
    ``medpipe predict`` writes them), written atomically when the run completes."""

    def __init__(self, output_dir: str, class_names: list[str], decision_rule: str = "argmax",
                 decision_offsets: list[float] | None = None, filename: str = "predictions.jsonl"):
        self.path = Path(output_dir) / filename
        self.classes = [str(c) for c in class_names]
        self.rule, self.offsets = str(decision_rule), decision_offsets
        self.rows: list[str] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def __call__(self, engine) -> None:
        import torch

        for item, out in zip(engine.state.batch, engine.state.output):
            if item.get("error"):  # unreadable image: reported, the run goes on
                code, _, message = str(item["error"]).partition(": ")
                self.rows.append(json.dumps({"image": str(item["path"]), "error": code, "message": message}))
                continue
            p = [float(v) for v in torch.as_tensor(out["pred"]).flatten()]
            k = int(apply_offsets([p], self.offsets)[0])
            self.rows.append(json.dumps({"image": str(item["path"]), "label": self.classes[k], "class_index": k,
                                         "probabilities": dict(zip(self.classes, p)), "decision_rule": self.rule}))

    def write(self, _engine=None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, "".join(r + "\n" for r in self.rows))
        log.info("bundle: %d predictions written to %s", len(self.rows), self.path)


def _model_card(meta: PackageMeta, md: dict) -> str:
    about = export_about(meta)
    spec = meta.preprocessing
    lines = [f"# {about['name']} (v{about['version']}): {about['architecture']} dermatoscopy classifier", "",
             "## What it is", "",
             f"A MONAI {about['architecture']} that classifies one RGB dermatoscopy image into "
             f"{len(about['classes'])} classes, trained with medpipe {about['medpipe_version']}. "
             f"Output channel order: {', '.join(f'`{c}`' for c in about['classes'])}. "
             f"Probabilities are `softmax(logits / {about['temperature']:.4f})` (temperature scaling fitted on "
             "the validation split).", "",
             "## How to run it", "",
             "```", "pip install medpipe-imaging pytorch-ignite   # medpipe's decoder is this bundle's image loader",
             "python -m monai.bundle run --config_file configs/inference.json --dataset_dir /path/to/images",
             "```", "",
             "This writes `eval/predictions.jsonl` (one line per image: path, label, probabilities). "
             "`models/model.pt` is a plain state dict (loaded with `torch.load(weights_only=True)`); "
             "`models/model.ts` is the same network as TorchScript (input: normalised float32 N x 3 x "
             f"{spec.image_size} x {spec.image_size}, output: logits).", "",
             "## Preprocessing", "",
             *spec.describe_lines(), "",
             "## Data", ""]
    cfg = meta.training_config
    lines.append(f"Trained on the record table with sha256 `{meta.provenance.records_sha256 or 'unknown'}`"
                 + (f" (data folder `{cfg['data']}`)" if isinstance(cfg.get("data"), str) else "")
                 + ". HAM10000 (ISIC 2018 task 3) is the intended source: 10,015 dermatoscopy images of 7 classes, "
                   "CC BY-NC 4.0, split by lesion so no lesion is in two splits.")
    lines += ["", "## Metrics", ""]
    lines += _metric_lines(meta.metrics)
    lines += ["", "## Limits", "",
              f"- Intended use: {meta.intended_use.purpose}.",
              f"- The figures above come from the {meta.intended_use.figures_from}.",
              "- Dermatoscopy images only; other modalities, clinical photos and non-skin images get a "
              "confident but meaningless answer.",
              "- HAM10000 is dominated by nevi (about 67%) and by light skin types; rare classes are estimated "
              "from few images: read the per-class confidence intervals above.",
              "- An unreadable image gets an error line (code and reason naming the file) in "
              "`eval/predictions.jsonl`; the other images are still predicted.",
              "", f"Weights sha256: `{about['weights_sha256']}`."]
    return "\n".join(lines) + "\n"


def _metric_lines(metrics: dict) -> list[str]:
    """A markdown table of the package's split metrics, each with its 95% bootstrap CI where recorded."""
    import math

    splits = {k: v for k, v in metrics.items() if isinstance(v, dict)}
    if not splits:
        return ["No metrics were recorded in the package (run `medpipe evaluate`)."]

    def cell(m: dict, key: str) -> str:
        v = m.get(key)
        if isinstance(v, dict):  # per-class figures
            return ", ".join(f"{c} {x:.3f}" for c, x in v.items() if isinstance(x, (int, float)))
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return "" if v is None else str(v)
        text = f"{v:.3f}" if isinstance(v, float) else str(v)
        ci = m.get(f"{key}_ci95")
        if isinstance(ci, list) and len(ci) == 2:
            ok = all(isinstance(x, (int, float)) and math.isfinite(x) for x in ci)
            text += f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ok else " (95% CI not estimable: too few images)"
        return text

    keys = [k for k in dict.fromkeys(k for m in splits.values() for k in m) if not k.endswith("_ci95")]
    lines = ["| metric | " + " | ".join(splits) + " |", "|---" * (len(splits) + 1) + "|"]
    lines += [f"| {k} | " + " | ".join(cell(m, k) for m in splits.values()) + " |" for k in keys]
    lines += ["", "Figures from a handful of images per class are unreliable whatever their value; `n` is the number "
              "of images in each split."]
    return lines


def write_bundle(model: torch.nn.Module, meta: PackageMeta, out: Path) -> dict:
    import torch

    out = Path(out)
    size = meta.preprocessing.image_size
    md = bundle_metadata(meta)
    problems = check_bundle_metadata(md)
    if problems:
        raise ExportError("bundle metadata: " + "; ".join(problems))
    for sub in ("configs", "models", "docs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "configs" / "metadata.json", json.dumps(_escape_tree(md), indent=2))
    atomic_write_text(out / "configs" / "inference.json", json.dumps(bundle_inference_config(meta), indent=2))
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buf)
    atomic_write_bytes(out / "models" / "model.pt", buf.getvalue())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model.eval(), torch.zeros(2, 3, size, size), check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf, _extra_files={"metadata.json": json.dumps(md)})
    atomic_write_bytes(out / "models" / "model.ts", buf.getvalue())
    atomic_write_text(out / "docs" / "README.md", _model_card(meta, md))
    atomic_write_text(out / "LICENSE", "The model weights carry the licence of their training data and of their "
                      "trainer. HAM10000 is CC BY-NC 4.0.\n")
    # round trip through monai.bundle: parse the config, build the network, load the weights, compare
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(out / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(out / "models" / "model.pt", weights_only=True))
    net.eval()
    ts = torch.jit.load(str(out / "models" / "model.ts"))
    worst = max(_random_check(model, lambda x: net(x).detach(), size),
                _random_check(model, lambda x: ts(x).detach(), size))
    return {"max_abs_diff": worst}
