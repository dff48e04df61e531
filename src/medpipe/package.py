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
from pathlib import Path

import torch

from medpipe.preprocess import PreprocessSpec
from medpipe.errors import PackageError
from medpipe.utils import atomic_write_bytes, atomic_write_text, sha256_file, versions

log = logging.getLogger(__name__)

WEIGHTS = "weights.safetensors"
META = "model.json"
PACKAGE_FORMAT = "medpipe-package-1"


def save_package(out_dir: str | Path, model: torch.nn.Module, *, name: str, arch: str, classes: list[str],
                 spec: PreprocessSpec, temperature: float = 1.0, metrics: dict | None = None,
                 config: dict | None = None, records_sha256: str | None = None, version: str = "1",
                 decision: dict | None = None) -> dict:
    from safetensors.torch import save

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(out_dir / WEIGHTS, save(state, metadata={"format": "pt", "arch": arch}))
    meta = {
        "format": PACKAGE_FORMAT, "name": name, "version": version, "architecture": arch,
        "num_classes": len(classes), "classes": list(classes), "preprocessing": spec.to_dict(),
        "calibration": {"method": "temperature", "temperature": float(temperature)},
        "metrics": metrics or {}, "training_config": config or {}, "versions": versions(),
        "weights_sha256": sha256_file(out_dir / WEIGHTS), "records_sha256": records_sha256,
    }
    if decision is not None:  # medpipe.decision.fit_rules: label rules fitted on val; read by the Predictor
        meta["decision"] = decision
    atomic_write_text(out_dir / META, json.dumps(meta, indent=2, default=float))
    return meta


def read_meta(pkg_dir: str | Path) -> dict:
    pkg_dir = Path(pkg_dir)
    if (pkg_dir / "model").is_dir() and not (pkg_dir / META).is_file():
        pkg_dir = pkg_dir / "model"  # a run directory was given
    meta_path = pkg_dir / META
    if not meta_path.is_file():
        raise PackageError(f"{pkg_dir}: no {META}; not a medpipe model package")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise PackageError(f"{meta_path}: not valid JSON ({exc.__class__.__name__})") from None
    for key in ("format", "architecture", "classes", "preprocessing", "weights_sha256"):
        if key not in meta:
            raise PackageError(f"{meta_path}: missing key '{key}'")
    if meta["format"] != PACKAGE_FORMAT:
        raise PackageError(f"{meta_path}: unsupported package format {meta['format']!r}")
    meta["_dir"] = str(pkg_dir)
    return meta


def load_package(pkg_dir: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Verify and load a package; returns (model in eval mode, metadata)."""
    from safetensors.torch import load_file

    from medpipe.models import create_model

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
