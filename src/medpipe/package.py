"""The model package: ``weights.safetensors`` + ``model.json`` (its SageMaker layout: medpipe.sagemaker.layout).

``model.json`` carries everything needed to use the weights: architecture, class names, the
preprocessing spec (the eval preset's parameters), the calibration temperature, the decision rules
(``medpipe.decision``: which label to give, fitted on validation), validation and test
metrics, the training config, library versions and sha256 hashes of the weights and of the record
table. Loading checks the weight hash first and reads tensors only through safetensors: nothing is
ever unpickled, so a pickle put where the weights belong is refused before any of its code can run.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from medpipe.preprocess import INTERPOLATIONS, PreprocessSpec
from medpipe.errors import PackageError
from medpipe.utils import atomic_write_bytes, atomic_write_json, sha256_file, versions
from medpipe.data.sources import class_name_problem
from medpipe.models import MODEL_NAMES, create_model

if TYPE_CHECKING:  # annotations only: reading model.json loads no torch (safetensors loads it for weights)
    import torch

log = logging.getLogger(__name__)

WEIGHTS = "weights.safetensors"
META = "model.json"
PACKAGE_FORMAT = "medpipe-package-1"


def save_package(out_dir: str | Path, model: torch.nn.Module, *, name: str, arch: str, classes: list[str],
                 spec: PreprocessSpec, temperature: float = 1.0, metrics: dict | None = None,
                 config: dict | None = None, records_sha256: str | None = None, version: str = "1",
                 decision: dict | None = None, tta_calibration: dict | None = None) -> dict:
    """``tta_calibration``: {"temperature", "decision"} fitted on flip-TTA validation logits (a run trained
    with ``tta``), used by the Predictor when it averages flips."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / WEIGHTS, weights_bytes(model.state_dict()))
    meta = {
        "format": PACKAGE_FORMAT, "name": name, "version": version, "architecture": arch,
        "num_classes": len(classes), "classes": list(classes), "preprocessing": spec.to_dict(),
        "calibration": {"method": "temperature", "temperature": float(temperature)},
        "metrics": metrics or {}, "training_config": config or {}, "versions": versions(),
        "weights_sha256": sha256_file(out_dir / WEIGHTS), "records_sha256": records_sha256,
    }
    if decision is not None:  # medpipe.decision.fit_rules: label rules fitted on val; read by the Predictor
        meta["decision"] = decision
    if tta_calibration is not None:
        meta["calibration"]["tta"] = {"temperature": float(tta_calibration["temperature"]),
                                      "decision": tta_calibration.get("decision")}
    validate_meta(meta, out_dir / META)  # never write a package that would be refused at load
    atomic_write_json(out_dir / META, meta)  # NaN metrics (a class absent from a split) are written as null
    return meta


def weights_bytes(state: dict) -> bytes:
    """The safetensors file for a state dict, byte-identical for identical weights in any process: the
    header's ``__metadata__`` map is serialised in hash order (random per process), so it holds one key
    (the architecture lives in model.json)."""
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, metadata={"format": "pt"})


# model.json, key by key: (key, check, what it must be). Checked at load (and before saving), so a tampered
# or hand-edited package is refused with the key named instead of failing on the first request.
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _class_list(v) -> bool:
    return (isinstance(v, list) and len(v) >= 2 and all(isinstance(c, str) for c in v) and len(set(v)) == len(v)
            and not any(class_name_problem(c) for c in v))


SCHEMA = [
    ("format", lambda v: v == PACKAGE_FORMAT, f"'{PACKAGE_FORMAT}'"),
    ("name", lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string"),
    ("version", lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string"),
    ("architecture", lambda v: isinstance(v, str) and v in _model_names(), "one of the registered models"),
    ("classes", _class_list, "a list of at least 2 distinct class names, each in the safe set "
                             "(medpipe.data.sources.class_name_problem)"),
    ("num_classes", _is_int, "an integer equal to the number of classes"),
    ("preprocessing", lambda v: isinstance(v, dict), "an object"),
    ("preprocessing.image_size", lambda v: _is_int(v) and 8 <= v <= 4096, "an integer in [8, 4096]"),
    ("preprocessing.interpolation", lambda v: isinstance(v, str) and v in _interpolations(), "a known interpolation"),
    ("preprocessing.mean", lambda v: isinstance(v, list) and len(v) == 3 and all(map(_is_number, v)),
     "3 finite numbers"),
    ("preprocessing.std", lambda v: isinstance(v, list) and len(v) == 3 and all(_is_number(x) and x > 0 for x in v),
     "3 finite numbers > 0"),
    ("calibration", lambda v: isinstance(v, dict), "an object"),
    ("calibration.temperature", lambda v: _is_number(v) and v > 0, "a finite number > 0"),
    ("weights_sha256", lambda v: isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v),
     "64 lowercase hex digits"),
]
OPTIONAL = {"metrics": dict, "training_config": dict, "versions": dict, "decision": dict}


def _model_names():
    return MODEL_NAMES


def _interpolations():
    return INTERPOLATIONS


def validate_meta(meta, where) -> None:
    """Check ``model.json`` against :data:`SCHEMA`; PackageError naming the first bad key and what it must be."""
    if not isinstance(meta, dict):
        raise PackageError(f"{where}: must hold a JSON object")
    missing = object()
    for key, ok, want in SCHEMA:
        value = meta
        for part in key.split("."):
            value = value.get(part, missing) if isinstance(value, dict) else missing
        if value is missing:
            raise PackageError(f"{where}: missing key '{key}' ({want})")
        if not ok(value):
            shown = repr(value) if len(repr(value)) < 80 else repr(value)[:77] + "..."
            raise PackageError(f"{where}: key '{key}' must be {want}, got {shown}")
    if meta["num_classes"] != len(meta["classes"]):
        raise PackageError(f"{where}: key 'num_classes' is {meta['num_classes']} but 'classes' lists "
                           f"{len(meta['classes'])}")
    for key, kind in OPTIONAL.items():
        if meta.get(key) is not None and not isinstance(meta[key], kind):
            raise PackageError(f"{where}: key '{key}' must be an object")
    tta = meta["calibration"].get("tta")
    if tta is not None and not (isinstance(tta, dict) and _is_number(tta.get("temperature"))
                                and tta["temperature"] > 0 and isinstance(tta.get("decision"), (dict, type(None)))):
        raise PackageError(f"{where}: key 'calibration.tta' must be an object with a finite 'temperature' > 0 "
                           "and a 'decision' object or null")
    try:
        PreprocessSpec.from_meta(meta)
    except (KeyError, TypeError, ValueError) as exc:
        raise PackageError(f"{where}: key 'preprocessing': {exc}") from None


def read_meta(pkg_dir: str | Path) -> dict:
    pkg_dir = Path(pkg_dir)
    if (pkg_dir / "model").is_dir() and not (pkg_dir / META).is_file():
        pkg_dir = pkg_dir / "model"  # a run directory was given
    meta_path = pkg_dir / META
    if not meta_path.is_file():
        raise PackageError(f"{pkg_dir}: no {META}; not a medpipe model package")
    try:
        meta = json.loads(meta_path.read_text())  # NaN from older packages is read; the schema keys must be finite
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise PackageError(f"{meta_path}: not valid JSON ({exc.__class__.__name__}: {str(exc)[:100]})") from None
    if isinstance(meta, dict) and meta.get("format") not in (None, PACKAGE_FORMAT):
        raise PackageError(f"{meta_path}: unsupported package format {meta['format']!r}")
    validate_meta(meta, meta_path)
    meta["_dir"] = str(pkg_dir)
    return meta


def load_package(pkg_dir: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Verify and load a package; returns (model in eval mode, metadata)."""
    from safetensors.torch import load_file

    meta = read_meta(pkg_dir)
    weights = Path(meta["_dir"]) / WEIGHTS
    if not weights.is_file():
        raise PackageError(f"{meta['_dir']}: {WEIGHTS} is missing")
    digest = sha256_file(weights)
    if digest != meta["weights_sha256"]:
        raise PackageError(f"{weights}: sha256 {digest[:12]}... does not match model.json "
                           f"({meta['weights_sha256'][:12]}...); the weights were changed or truncated")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types; none of them unpickles
        raise PackageError(f"{weights}: not a valid safetensors file ({exc.__class__.__name__}); "
                           "medpipe never unpickles weights") from None
    model = create_model(meta["architecture"], len(meta["classes"]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise PackageError(f"{weights}: tensors do not fit {meta['architecture']} "
                           f"({str(exc).splitlines()[0][:160]})") from None
    model.eval().to(device)
    return model, meta


def package_spec(meta: dict) -> PreprocessSpec:
    return PreprocessSpec.from_meta(meta)
