"""The model package: ``weights.safetensors`` + ``model.json`` (its SageMaker layout: medpipe.sagemaker.layout).

This module owns the package format. :class:`PackageMeta` is the typed, frozen description of
``model.json``: architecture, class names, the preprocessing spec (the eval preset's parameters), the
calibration (temperature, and flip TTA's own), the decision rules (``medpipe.decision``: which label to
give, fitted on validation), validation and test metrics, the training config, provenance (library
versions, sha256 of the weights and of the record table), the intended use and the format version.
:func:`read_meta` is the one reader (an older ``model.json`` is migrated on the way in, see
:data:`MIGRATIONS`), :func:`write_meta` the one writer (every write is checked against :data:`SCHEMA`
first); no other module reads or writes ``model.json``. ``PackageMeta.describe()`` lists every field
with its type and meaning for the docs.

Loading checks the weight hash first and reads tensors only through safetensors: nothing is ever
unpickled, so a pickle put where the weights belong is refused before any of its code can run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from medpipe.data.metadata import MetadataSpec
from medpipe.data.sources import class_name_problem
from medpipe.errors import PackageError
from medpipe.models import MODEL_NAMES, PACKAGE_WEIGHTS, create_model
from medpipe.preprocess import INTERPOLATIONS, PreprocessSpec
from medpipe.utils import atomic_write_bytes, atomic_write_json, sha256_file, versions

if typing.TYPE_CHECKING:  # annotations only: reading model.json loads no torch (safetensors loads it for weights)
    import torch

log = logging.getLogger(__name__)

WEIGHTS = PACKAGE_WEIGHTS
META = "model.json"
PACKAGE_FORMAT = "medpipe-package-2"

RESEARCH_ONLY = ("a research tool for classifying dermatoscopy images; not a medical device, not validated "
                 "for clinical use, never a basis for diagnosis or treatment")


def _doc(meaning: str, **kw):
    """A dataclass field with its one-line meaning (rendered by :meth:`PackageMeta.describe`)."""
    return field(metadata={"doc": meaning}, **kw)


# -- the format, as types --------------------------------------------------------------------------

@dataclass(frozen=True)
class TtaCalibration:
    """Calibration fitted on flip-TTA validation logits (a run trained with ``tta``)."""

    temperature: float = _doc("temperature applied when the predictor averages the four flips")
    decision: Mapping | None = _doc("decision rules fitted on the TTA probabilities (medpipe.decision); "
                                    "null: the plain rules apply")


@dataclass(frozen=True)
class Calibration:
    """How logits become probabilities: ``softmax(logits / temperature)``."""

    temperature: float = _doc("temperature fitted on the validation split (1.0: none fitted)", default=1.0)
    method: str = _doc("calibration method; always 'temperature'", default="temperature")
    tta: TtaCalibration | None = _doc("flip TTA's own calibration, where the run was trained with tta",
                                      default=None)

    def to_dict(self) -> dict:
        """``model.json``'s ``calibration`` object (exports copy it into their sidecars)."""
        out: dict[str, Any] = {"method": self.method, "temperature": float(self.temperature)}
        if self.tta is not None:
            out["tta"] = {"temperature": float(self.tta.temperature), "decision": _plain(self.tta.decision)}
        return out


@dataclass(frozen=True)
class Provenance:
    """Where the weights come from: hashes and library versions."""

    weights_sha256: str = _doc("sha256 of weights.safetensors; checked before the weights are read")
    records_sha256: str | None = _doc("sha256 of the record table the model was trained on (null: unknown)",
                                      default=None)
    versions: Mapping = _doc("library versions that wrote the package (medpipe, monai, torch, numpy)",
                             default_factory=dict)


@dataclass(frozen=True)
class IntendedUse:
    """What the model is for, and where its figures come from (shown by the docs and the model card)."""

    purpose: str = _doc("what the model may be used for", default=RESEARCH_ONLY)
    figures_from: str = _doc("the data and conditions the recorded metrics come from", default="unknown")

    @classmethod
    def for_training(cls, records_sha256: str | None, config: Mapping | None) -> "IntendedUse":
        """The default: research only; the figures from the run's own lesion-grouped validation/test splits."""
        cfg = config or {}
        data = f"data folder '{cfg['data']}', " if isinstance(cfg.get("data"), str) else ""
        size = f" at {cfg['image_size']}x{cfg['image_size']} pixels" if isinstance(cfg.get("image_size"), int) else ""
        return cls(figures_from=(f"validation and test splits (lesion-grouped, seeded) of the record table sha256 "
                                 f"{records_sha256 or 'unknown'} ({data}dermatoscopy images{size}); figures on "
                                 "other populations, devices or image types are unknown"))


@dataclass(frozen=True)
class PackageMeta:
    """``model.json``, typed. Frozen: change a copy with ``dataclasses.replace`` and write it with
    :func:`write_meta` (the nested JSON objects, e.g. ``metrics``, are plain values: read them, do not
    change them in place). ``directory`` is where it was read from or written to (not stored)."""

    name: str = _doc("model name, shown by the server and every export")
    architecture: str = _doc("registered model name (medpipe.models), builds the network for the weights")
    classes: tuple[str, ...] = _doc("class names in output-channel order")
    preprocessing: PreprocessSpec = _doc("the eval preset's parameters: decode, resize, normalise")
    provenance: Provenance = _doc("hashes of the weights and records, library versions")
    version: str = _doc("model version, shown by the server and every export", default="1")
    calibration: Calibration = _doc("temperature scaling, and flip TTA's own", default_factory=Calibration)
    decision: Mapping | None = _doc("label rules fitted on validation (medpipe.decision); null: argmax only",
                                    default=None)
    metrics: Mapping = _doc("validation (and test) metrics of the packaged weights", default_factory=dict)
    training_config: Mapping = _doc("the training config the weights were trained with", default_factory=dict)
    intended_use: IntendedUse = _doc("research use only, and the data the figures come from",
                                     default_factory=IntendedUse)
    federated: Mapping | None = _doc("federated training provenance (engine, strategy, rounds, sites); null: "
                                     "trained in one place", default=None)
    metadata: MetadataSpec | None = _doc("the patient-metadata input beside the image (medpipe.data.metadata): "
                                         "fields, vocabularies, age normalisation; null: image only", default=None)
    # top-level keys this medpipe does not know, kept as read so that a rewrite loses nothing
    extra: Mapping = field(default_factory=dict, metadata={"doc": None})
    format: str = _doc("package format version; older versions are migrated when read", default=PACKAGE_FORMAT)
    directory: Path | None = field(default=None, compare=False, metadata={"doc": None})

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def temperature(self) -> float:
        """The calibration temperature (the one every reader of the package applies without TTA)."""
        return self.calibration.temperature

    @property
    def weights_sha256(self) -> str:
        return self.provenance.weights_sha256

    @property
    def dir(self) -> Path:
        """The package folder; PackageError for a description that was never read or written."""
        if self.directory is None:
            raise PackageError(f"package '{self.name}': not read from or written to a folder")
        return self.directory

    @classmethod
    def load(cls, pkg_dir: str | Path) -> "PackageMeta":
        """The same as :func:`read_meta`."""
        return read_meta(pkg_dir)

    def to_dict(self) -> dict:
        """``model.json``'s content (the directory is not part of it)."""
        out: dict[str, Any] = {
            "format": self.format, "name": self.name, "version": self.version, "architecture": self.architecture,
            "num_classes": self.num_classes, "classes": list(self.classes),
            "preprocessing": self.preprocessing.to_dict(), "calibration": self.calibration.to_dict(),
            "metrics": _plain(self.metrics), "training_config": _plain(self.training_config),
            "versions": _plain(self.provenance.versions),
            "weights_sha256": self.provenance.weights_sha256, "records_sha256": self.provenance.records_sha256,
            "intended_use": dataclasses.asdict(self.intended_use)}
        if self.decision is not None:
            out["decision"] = _plain(self.decision)
        if self.federated is not None:
            out["federated"] = _plain(self.federated)
        if self.metadata is not None:
            out["metadata"] = self.metadata.to_dict()
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return out

    @classmethod
    def from_dict(cls, meta: dict, where: str | Path = META, directory: Path | None = None) -> "PackageMeta":
        """A ``model.json`` object of this or an older format: migrated, checked against :data:`SCHEMA`,
        typed; PackageError naming the key and what it must be."""
        meta = validate_meta(migrate(meta, where), where)
        cal = meta["calibration"]
        tta = cal.get("tta")
        iu = meta["intended_use"]
        return cls(
            name=meta["name"], architecture=meta["architecture"], classes=tuple(meta["classes"]),
            preprocessing=PreprocessSpec.from_dict(meta["preprocessing"]),
            provenance=Provenance(meta["weights_sha256"], meta.get("records_sha256"), meta.get("versions") or {}),
            version=meta["version"],
            calibration=Calibration(float(cal["temperature"]), cal.get("method", "temperature"),
                                    TtaCalibration(float(tta["temperature"]), tta.get("decision")) if tta else None),
            decision=meta.get("decision"), metrics=meta.get("metrics") or {},
            training_config=meta.get("training_config") or {},
            intended_use=IntendedUse(iu["purpose"], iu["figures_from"]), federated=meta.get("federated"),
            metadata=MetadataSpec.from_dict(meta["metadata"]) if meta.get("metadata") is not None else None,
            extra={k: v for k, v in meta.items() if k not in _KNOWN}, format=meta["format"], directory=directory)

    @classmethod
    def describe(cls) -> list[dict]:
        """Every field of ``model.json`` as ``{"field", "type", "meaning"}`` rows (nested parts as
        dotted names), in the order of the type; for the docs' reference page."""
        return _describe(cls, "")


_KNOWN = {"format", "name", "version", "architecture", "num_classes", "classes", "preprocessing", "calibration",
          "metrics", "training_config", "versions", "weights_sha256", "records_sha256", "decision", "intended_use",
          "federated", "metadata"}
_JSON_NAME = {"provenance": None}  # provenance's fields sit at the top level of model.json


def _plain(obj):
    """Mappings (possibly read-only views) back to plain dicts for JSON."""
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _type_name(tp) -> str:
    """A field's type in JSON words."""
    text = str(tp).replace("typing.", "")
    for py, js in (("tuple[str, ...]", "list[str]"), ("tuple[float, float, float]", "list[float]"),
                   ("Mapping", "object"), ("None", "null"), ("str", "string"), ("float", "number"),
                   ("int", "integer"), ("<class '", ""), ("'>", "")):
        text = text.replace(py, js)
    return text


def _describe(cls, prefix: str) -> list[dict]:
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("doc") is None:
            continue
        tp = hints[f.name]
        nested = next((a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)), None)
        name = f.name if f.name not in _JSON_NAME else None
        full = f"{prefix}{name}" if name else prefix.rstrip(".")
        if nested is PreprocessSpec:
            rows.append({"field": full, "type": "object", "meaning": f.metadata["doc"]})
            spec_hints = typing.get_type_hints(PreprocessSpec)
            rows += [{"field": f"{full}.{g.name}", "type": _type_name(spec_hints[g.name]),
                      "meaning": PREPROCESSING_DOCS[g.name]} for g in dataclasses.fields(PreprocessSpec)]
        elif nested is not None:
            if name:
                rows.append({"field": full, "type": "object" + (" | null" if type(None) in typing.get_args(tp)
                                                                  else ""), "meaning": f.metadata["doc"]})
            rows += _describe(nested, f"{full}." if name else prefix)
        else:
            rows.append({"field": full, "type": _type_name(f.type), "meaning": f.metadata["doc"]})
        if f.name == "classes":  # stored alongside for readers without medpipe; derived, so not a field
            rows.append({"field": "num_classes", "type": "integer", "meaning": "number of classes (len(classes))"})
    return rows


PREPROCESSING_DOCS = {  # PreprocessSpec lives in medpipe.preprocess; its fields' meanings for describe()
    "image_size": "model input side in pixels (images are resized to image_size x image_size)",
    "interpolation": "Pillow resampling filter of the resize",
    "mean": "per-channel mean subtracted after scaling to [0, 1]",
    "std": "per-channel standard deviation divided by after the mean",
    "color_constancy": "colour constancy applied before normalising ('none' or 'shades_of_gray')",
    "color_constancy_power": "Minkowski norm power of Shades-of-Gray colour constancy",
}


# -- checking and migrating ------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _text(v) -> bool:
    return isinstance(v, str) and v.strip() != ""


def _class_list(v) -> bool:
    return (isinstance(v, list) and len(v) >= 2 and all(isinstance(c, str) for c in v) and len(set(v)) == len(v)
            and not any(class_name_problem(c) for c in v))


# model.json, key by key: (key, check, what it must be). Checked at load (after migration) and before every
# write, so a tampered or hand-edited package is refused with the key named instead of failing on the first
# request, and no writer can produce a package that would be refused at load.
SCHEMA = [
    ("format", lambda v: v == PACKAGE_FORMAT, f"'{PACKAGE_FORMAT}'"),
    ("name", _text, "a non-empty string"),
    ("version", _text, "a non-empty string"),
    ("architecture", lambda v: isinstance(v, str) and v in MODEL_NAMES, "one of the registered models"),
    ("classes", _class_list, "a list of at least 2 distinct class names, each in the safe set "
                             "(medpipe.data.sources.class_name_problem)"),
    ("num_classes", _is_int, "an integer equal to the number of classes"),
    ("preprocessing", lambda v: isinstance(v, dict), "an object"),
    ("preprocessing.image_size", lambda v: _is_int(v) and 8 <= v <= 4096, "an integer in [8, 4096]"),
    ("preprocessing.interpolation", lambda v: isinstance(v, str) and v in INTERPOLATIONS, "a known interpolation"),
    ("preprocessing.mean", lambda v: isinstance(v, list) and len(v) == 3 and all(map(_is_number, v)),
     "3 finite numbers"),
    ("preprocessing.std", lambda v: isinstance(v, list) and len(v) == 3 and all(_is_number(x) and x > 0 for x in v),
     "3 finite numbers > 0"),
    ("calibration", lambda v: isinstance(v, dict), "an object"),
    ("calibration.temperature", lambda v: _is_number(v) and v > 0, "a finite number > 0"),
    ("weights_sha256", lambda v: isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v),
     "64 lowercase hex digits"),
    ("intended_use", lambda v: isinstance(v, dict), "an object"),
    ("intended_use.purpose", _text, "a non-empty string"),
    ("intended_use.figures_from", _text, "a non-empty string"),
]
OPTIONAL = {"metrics": dict, "training_config": dict, "versions": dict, "decision": dict, "federated": dict,
            "metadata": dict}


def validate_meta(meta, where) -> dict:
    """Check ``model.json`` against :data:`SCHEMA`; PackageError naming the first bad key and what it must be.
    Returns ``meta``."""
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
    rec = meta.get("records_sha256")
    if rec is not None and not isinstance(rec, str):
        raise PackageError(f"{where}: key 'records_sha256' must be a string or null")
    tta = meta["calibration"].get("tta")
    if tta is not None and not (isinstance(tta, dict) and _is_number(tta.get("temperature"))
                                and tta["temperature"] > 0 and isinstance(tta.get("decision"), (dict, type(None)))):
        raise PackageError(f"{where}: key 'calibration.tta' must be an object with a finite 'temperature' > 0 "
                           "and a 'decision' object or null")
    try:
        PreprocessSpec.from_dict(meta["preprocessing"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PackageError(f"{where}: key 'preprocessing': {exc}") from None
    if meta.get("metadata") is not None:
        try:
            MetadataSpec.from_dict(meta["metadata"])
        except (KeyError, TypeError, ValueError) as exc:
            raise PackageError(f"{where}: key 'metadata': {exc}") from None
    return meta


def _from_format_1(meta: dict) -> dict:
    """medpipe-package-1 -> 2: adds ``intended_use`` (research only; the figures from the run's splits)."""
    rec = meta.get("records_sha256")
    cfg = meta.get("training_config")
    use = IntendedUse.for_training(rec if isinstance(rec, str) else None, cfg if isinstance(cfg, dict) else None)
    return {**meta, "format": "medpipe-package-2", "intended_use": dataclasses.asdict(use)}


# format -> the function that lifts a model.json of that format one version up (chained to PACKAGE_FORMAT)
MIGRATIONS = {"medpipe-package-1": _from_format_1}


def migrate(meta, where) -> Any:
    """An older ``model.json`` object lifted to :data:`PACKAGE_FORMAT` (a new dict; the file is not
    rewritten); PackageError for a format this medpipe does not know. Anything that is not an object is
    returned as it is, for :func:`validate_meta` to refuse."""
    if not isinstance(meta, dict):
        return meta
    seen = set()
    while meta.get("format") in MIGRATIONS and meta["format"] not in seen:
        seen.add(meta["format"])
        meta = MIGRATIONS[meta["format"]](meta)
    if meta.get("format") not in (None, PACKAGE_FORMAT):
        raise PackageError(f"{where}: unsupported package format {meta['format']!r}")
    return meta


# -- the one reader and the one writer ---------------------------------------------------------------

def read_meta(pkg_dir: str | Path) -> PackageMeta:
    """The package's ``model.json`` (a run directory holding ``model/`` also works), migrated and checked."""
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
    return PackageMeta.from_dict(meta, meta_path, pkg_dir)


def write_meta(pkg_dir: str | Path, meta: PackageMeta) -> PackageMeta:
    """Write ``meta`` as ``pkg_dir/model.json`` (atomically), after checking it against :data:`SCHEMA`: a
    package that would be refused at load is never written. Returns ``meta`` with its directory set."""
    pkg_dir = Path(pkg_dir)
    data = validate_meta(meta.to_dict(), pkg_dir / META)
    atomic_write_json(pkg_dir / META, data)  # NaN metrics (a class absent from a split) are written as null
    return dataclasses.replace(meta, directory=pkg_dir)


def update_meta(meta: PackageMeta, **changes) -> PackageMeta:
    """Rewrite a package's ``model.json`` with ``changes`` (field names of :class:`PackageMeta`)."""
    return write_meta(meta.dir, dataclasses.replace(meta, **changes))


def save_package(out_dir: str | Path, model: "torch.nn.Module", *, name: str, arch: str, classes: list[str],
                 spec: PreprocessSpec, temperature: float = 1.0, metrics: dict | None = None,
                 config: dict | None = None, records_sha256: str | None = None, version: str = "1",
                 decision: dict | None = None, tta_calibration: dict | None = None,
                 intended_use: IntendedUse | None = None, federated: dict | None = None,
                 metadata: MetadataSpec | None = None) -> PackageMeta:
    """Write ``model``'s weights and their ``model.json``; returns the written :class:`PackageMeta`.

    ``tta_calibration``: {"temperature", "decision"} fitted on flip-TTA validation logits (a run trained
    with ``tta``), used by the Predictor when it averages flips. ``intended_use``: by default research
    only, the figures from the run's own splits (:meth:`IntendedUse.for_training`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / WEIGHTS, weights_bytes(model.state_dict()))
    tta = None
    if tta_calibration is not None:
        tta = TtaCalibration(float(tta_calibration["temperature"]), tta_calibration.get("decision"))
    meta = PackageMeta(
        name=name, architecture=arch, classes=tuple(classes), preprocessing=spec,
        provenance=Provenance(sha256_file(out_dir / WEIGHTS), records_sha256, versions()), version=version,
        calibration=Calibration(float(temperature), tta=tta), decision=decision, metrics=metrics or {},
        training_config=config or {}, federated=federated, metadata=metadata,
        intended_use=intended_use or IntendedUse.for_training(records_sha256, config))
    return write_meta(out_dir, meta)


def weights_bytes(state: dict) -> bytes:
    """The safetensors file for a state dict, byte-identical for identical weights in any process: the
    header's ``__metadata__`` map is serialised in hash order (random per process), so it holds one key
    (the architecture lives in model.json)."""
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, metadata={"format": "pt"})


def load_package(pkg_dir: str | Path, device: "str | torch.device" = "cpu") -> tuple["torch.nn.Module", PackageMeta]:
    """Verify and load a package; returns (model in eval mode, its :class:`PackageMeta`)."""
    from safetensors.torch import load_file

    meta = read_meta(pkg_dir)
    weights = meta.dir / WEIGHTS
    if not weights.is_file():
        raise PackageError(f"{meta.dir}: {WEIGHTS} is missing")
    digest = sha256_file(weights)
    if digest != meta.weights_sha256:
        raise PackageError(f"{weights}: sha256 {digest[:12]}... does not match model.json "
                           f"({meta.weights_sha256[:12]}...); the weights were changed or truncated")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types; none of them unpickles
        raise PackageError(f"{weights}: not a valid safetensors file ({exc.__class__.__name__}); "
                           "medpipe never unpickles weights") from None
    model = create_model(meta.architecture, meta.num_classes, metadata_dim=meta.metadata.dim if meta.metadata else 0,
                         fusion=meta.metadata.fusion if meta.metadata else "concat")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise PackageError(f"{weights}: tensors do not fit {meta.architecture} "
                           f"({str(exc).splitlines()[0][:160]})") from None
    model.eval().to(device)
    return model, meta


def package_spec(meta: PackageMeta) -> PreprocessSpec:
    """The package's preprocessing spec (the same as ``meta.preprocessing``)."""
    return meta.preprocessing
