"""Exports of a model package: ONNX (dynamic batch axis), TorchScript, a MONAI bundle, a SageMaker tarball.

Every export takes normalised NCHW float32 input — the output of the package's eval preset — and
returns logits, exactly like the eager model; the preprocessing spec and class names travel with it
(``model.json`` next to an ONNX/TorchScript file, ``metadata.json`` in a bundle).

    medpipe export --model RUN/model --format onnx --out model.onnx
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import torch

from medpipe.errors import MedpipeError

log = logging.getLogger(__name__)

ONNX_OPSET = 18
INPUT_NAME = "image"
OUTPUT_NAME = "logits"


class ExportError(MedpipeError):
    pass


def onnx_bytes(model: torch.nn.Module, image_size: int) -> bytes:
    """Serialise ``model`` (eval mode, on CPU) to ONNX with a dynamic batch axis.

    Uses the TorchScript-based exporter (about 1 s for DenseNet121) and falls back to the
    ``torch.export`` one where the former is unavailable.
    """
    model = model.eval()
    example = torch.zeros(2, 3, image_size, image_size)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (example,), buf, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              opset_version=ONNX_OPSET, dynamo=False)
        except Exception as first:  # noqa: BLE001 - try the other exporter, then report both
            buf = io.BytesIO()
            try:
                torch.onnx.export(model, (example,), buf, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},), dynamo=True)
            except Exception as second:  # noqa: BLE001
                raise ExportError(f"ONNX export failed ({first.__class__.__name__}: {str(first)[:120]}; "
                                  f"{second.__class__.__name__}: {str(second)[:120]})") from None
    return buf.getvalue()


def onnx_session(data: bytes | str, threads: int | None = None):
    """An ONNX Runtime CPU session that does not spin its threads against torch's."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("the ONNX backend needs onnxruntime: pip install 'medpipe[onnx]'") from None
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = int(threads)
    # Idle worker threads spin by default; that steals the cores decoding and torch need.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


FORMATS = ("onnx", "torchscript", "bundle", "sagemaker")
BUNDLE_REQUIRED = ("version", "monai_version", "pytorch_version", "numpy_version", "optional_packages_version",
                   "task", "description", "authors", "copyright", "network_data_format")
TENSOR_REQUIRED = ("type", "format", "modality", "num_channels", "spatial_shape", "dtype", "value_range",
                   "is_patch_data", "channel_def")


def _random_check(model: torch.nn.Module, run, image_size: int, tol: float = 1e-4) -> float:
    """Max |exported - eager| over random normalised inputs at batch sizes 1 and 3; raises over ``tol``."""
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


def export_model(package: str, fmt: str, out: str) -> dict:
    """Write ``package`` as ``fmt`` to ``out``; every format is checked against the eager model."""
    from medpipe.package import build_sagemaker_tarball, load_package
    from medpipe.utils import atomic_write_bytes, atomic_write_text

    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    model, meta = load_package(package)
    size = int(meta["preprocessing"]["image_size"])
    out_path = Path(out)
    result = {"format": fmt, "out": str(out_path)}
    if fmt == "onnx":
        data = onnx_bytes(model, size)
        sess = onnx_session(data)
        result["max_abs_diff"] = _random_check(model, lambda x: sess.run(None, {INPUT_NAME: x.numpy()})[0], size)
        atomic_write_bytes(out_path, data)
        atomic_write_text(out_path.with_suffix(".json"), _sidecar(meta, fmt))
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
        result["out"] = str(build_sagemaker_tarball(meta["_dir"], out_path))
    return result


def _sidecar(meta: dict, fmt: str) -> str:
    import json

    keep = ("name", "version", "architecture", "classes", "preprocessing", "calibration", "weights_sha256")
    return json.dumps({"exported_as": fmt, "input": f"{INPUT_NAME}: float32 N x 3 x H x W, the eval preset's "
                       "output", "output": f"{OUTPUT_NAME}: N x classes (softmax(logits / temperature) gives the "
                       "calibrated probabilities)", **{k: meta[k] for k in keep if k in meta}}, indent=2)


def bundle_metadata(meta: dict) -> dict:
    import monai
    import numpy as np

    from medpipe import __version__

    spec = meta["preprocessing"]
    size = int(spec["image_size"])
    classes = list(meta["classes"])
    lo = [round((0.0 - m) / s, 4) for m, s in zip(spec["mean"], spec["std"])]
    hi = [round((1.0 - m) / s, 4) for m, s in zip(spec["mean"], spec["std"])]
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                  "meta_schema_20220324.json",
        "version": f"{meta.get('version', '1')}.0.0",
        "changelog": {f"{meta.get('version', '1')}.0.0": "exported by medpipe"},
        "monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__, "optional_packages_version": {"medpipe": __version__},
        "name": meta.get("name", "medpipe"),
        "task": f"2D image classification into {len(classes)} classes: {', '.join(classes)}",
        "description": f"MONAI {meta['architecture']} trained with medpipe on dermatoscopy images; outputs "
                       "logits, softmax(logits / temperature) gives calibrated class probabilities "
                       f"(temperature {meta.get('calibration', {}).get('temperature', 1.0):.4f}).",
        "authors": "medpipe", "copyright": "Copyright (c) the model's trainer",
        "intended_use": "Research only; not for diagnostic use.",
        "data_type": "RGB dermatoscopy images",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "dermoscopy", "num_channels": 3,
                "spatial_shape": [size, size], "dtype": "float32", "value_range": [min(lo), max(hi)],
                "is_patch_data": False, "channel_def": {"0": "R", "1": "G", "2": "B"},
                "preprocessing": f"RGB resized to {size}x{size} ({spec['interpolation']}), scaled to [0, 1], "
                                 f"normalised with mean {spec['mean']} and std {spec['std']}"}},
            "outputs": {"pred": {
                "type": "probabilities", "format": "classes", "modality": "n/a", "num_channels": len(classes), "spatial_shape": [],
                "dtype": "float32", "value_range": [], "is_patch_data": False,
                "channel_def": {str(i): c for i, c in enumerate(classes)}}},
        },
        "medpipe": {"classes": classes, "preprocessing": spec, "calibration": meta.get("calibration", {}),
                    "weights_sha256": meta.get("weights_sha256")},
    }


def check_bundle_metadata(md: dict) -> list[str]:
    """Problems with a bundle's metadata.json against the MONAI bundle specification's required keys."""
    problems = [f"missing key {k!r}" for k in BUNDLE_REQUIRED if k not in md]
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


def write_bundle(model: torch.nn.Module, meta: dict, out: Path) -> dict:
    import json

    from medpipe.models import bundle_target
    from medpipe.utils import atomic_write_bytes, atomic_write_text

    out = Path(out)
    spec = meta["preprocessing"]
    size = int(spec["image_size"])
    md = bundle_metadata(meta)
    problems = check_bundle_metadata(md)
    if problems:
        raise ExportError("bundle metadata: " + "; ".join(problems))
    inference = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": bundle_target(meta["architecture"], len(meta["classes"])),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image", "reader": "PILReader", "reverse_indexing": False,
             "image_only": True},
            {"_target_": "EnsureChannelFirstd", "keys": "image", "channel_dim": -1},
            {"_target_": "Resized", "keys": "image", "spatial_size": [size, size], "mode": "bicubic"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 0.0, "a_max": 255.0, "b_min": 0.0,
             "b_max": 1.0, "clip": True},
            {"_target_": "NormalizeIntensityd", "keys": "image", "subtrahend": [[[m]] for m in spec["mean"]],
             "divisor": [[[s]] for s in spec["std"]]},
        ]},
        "postprocessing": {"_target_": "Activations", "softmax": True},
        "temperature": float(meta.get("calibration", {}).get("temperature", 1.0)),
        "class_names": list(meta["classes"]),
    }
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(parents=True, exist_ok=True)
    (out / "docs").mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "configs" / "metadata.json", json.dumps(md, indent=2))
    atomic_write_text(out / "configs" / "inference.json", json.dumps(inference, indent=2))
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buf)
    atomic_write_bytes(out / "models" / "model.pt", buf.getvalue())
    atomic_write_text(out / "docs" / "README.md", f"""# {md['name']}

{md['description']}

Classes (output channel order): {', '.join(meta['classes'])}.

Input: {md['network_data_format']['inputs']['image']['preprocessing']}. `configs/inference.json`
holds the network definition and MONAI preprocessing (its resize is MONAI's bicubic, not Pillow's,
so probabilities can differ slightly from medpipe's, which decodes with Pillow). For identical
results use the medpipe package this bundle was exported from.

`models/model.pt` is a plain state dict: load it with `torch.load(path, weights_only=True)`.
Research use only; not for diagnosis. Exported by medpipe.
""")
    atomic_write_text(out / "LICENSE", "The model weights carry the licence of their training data and of their "
                      "trainer. HAM10000 is CC BY-NC 4.0.\n")
    # round trip through monai.bundle: parse the config, build the network, load the weights, compare
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(out / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(out / "models" / "model.pt", weights_only=True))
    net.eval()
    return {"max_abs_diff": _random_check(model, lambda x: net(x).detach(), size)}
