"""Patient metadata as a model input: which columns may be one, their canonical names, and their encoding.

Three inputs, the ones every HAM10000 and ISIC export carries per image::

    age   years (HAM10000 ``age``, ISIC ``age_approx``)          -> (age - mean) / std, and a "given" flag
    sex   a word (``male``, ``female``)                          -> one-hot over the training vocabulary
    site  anatomical site (HAM10000 ``localization``,            -> one-hot over the training vocabulary
          ISIC ``anatom_site_general``)

Ingest keeps them as the record table's columns ``age``, ``sex`` and ``site`` (:func:`canonical_columns`,
with a mapping for other column names). Nothing that says how the label was obtained (``dx_type``,
ISIC's ``diagnosis_confirm_type``...) nor the label itself can ever be chosen as an input
(:func:`check_input_name`): that would be label leakage.

:class:`MetadataSpec` is what a package records: the inputs, the vocabularies and the age normalisation,
fitted on the training split. :meth:`MetadataSpec.encode` turns one image's values into the model's
metadata vector. A missing value (absent, empty, ``unknown``) encodes as all zeros for its field: the model
was trained with fields masked at random (:meth:`MetadataSpec.mask`), so it falls back to the image.
Any other value outside the vocabulary or range is a :class:`MetadataError` naming the field, never a
silent default.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from medpipe.errors import ConfigError, MetadataError
from medpipe.utils import read_csv_table

FIELDS = ("age", "sex", "site")
# canonical name -> the column names it is read from (first found wins), lower case
ALIASES = {"age": ("age", "age_approx"), "sex": ("sex", "gender"),
           "site": ("site", "localization", "anatom_site_general", "anatom_site_general_challenge")}
# columns that say what the label is or how it was obtained: never a model input (label leakage)
FORBIDDEN = ("dx_type", "dx", "diagnosis", "diagnosis_confirm_type", "diagnosis_1", "benign_malignant", "target",
             "label", "class_index", "lesion_id", "group_id", "mel_class", "mel_mitotic_index", "mel_thick_mm")
MISSING = ("", "unknown", "nan", "none", "na", "n/a")
AGE_RANGE = (0.0, 120.0)
FUSIONS = ("concat", "metablock")  # how the model combines metadata and image (medpipe.models)
VALUE_MAX = 64  # characters of a vocabulary word


def check_input_name(name: str, where: str = "metadata") -> None:
    """ConfigError when ``name`` may not be a model input: a column that carries the label or how it was
    obtained (``dx_type``: histopathology vs follow-up is decided by what the lesion is), or an unknown one."""
    key = str(name).strip().lower()
    if key in FORBIDDEN:
        raise ConfigError(f"{where}: '{name}' says what the label is or how it was obtained; it can never be a "
                          f"model input (label leakage). Inputs: {', '.join(FIELDS)}")
    if key not in FIELDS:
        raise ConfigError(f"{where}: unknown metadata input '{name}'; choose from {', '.join(FIELDS)}")


def parse_fields(text: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"age,sex,site"`` / a list -> the chosen inputs in canonical order; ``none``/empty -> ();
    ``auto``/``all`` -> every input. ConfigError naming a forbidden or unknown one."""
    if text is None:
        return ()
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if str(t).strip()]
    if not items or items == ["none"]:
        return ()
    if items in (["auto"], ["all"]):
        return FIELDS
    for item in items:
        check_input_name(item, "config key 'metadata'")
    return tuple(f for f in FIELDS if f in {i.lower() for i in items})


def parse_mapping(text: str | Mapping | None) -> dict[str, str]:
    """``"age=patient_age,site=location"`` -> {"age": "patient_age", ...}: where each input is read from.
    ConfigError naming a forbidden target (``sex=dx_type``) or an unknown input."""
    if not text:
        return {}
    pairs = text.items() if isinstance(text, Mapping) else [p.split("=", 1) for p in text.split(",") if p.strip()]
    out = {}
    for pair in pairs:
        if len(pair) != 2 or not str(pair[0]).strip() or not str(pair[1]).strip():
            raise ConfigError(f"--metadata-columns: '{'='.join(pair)}' must be INPUT=COLUMN, e.g. age=patient_age")
        name, column = str(pair[0]).strip().lower(), str(pair[1]).strip()
        check_input_name(name, "--metadata-columns")
        if column.lower() in FORBIDDEN:
            raise ConfigError(f"--metadata-columns: column '{column}' says what the label is or how it was obtained; "
                              "it can never be a model input (label leakage)")
        out[name] = column
    return out


def canonical_columns(row: Mapping[str, Any], mapping: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``age``, ``sex`` and ``site`` of a source row (its other columns untouched), read from the mapped
    column or the first alias present; values as text, words lower case, ``""`` where absent."""
    lower = {str(k).strip().lower(): k for k in row}
    out = {}
    for name in FIELDS:
        column = (mapping or {}).get(name)
        key = column if column in row else lower.get(column.lower()) if column else next(
            (lower[a] for a in ALIASES[name] if a in lower), None)
        value = row.get(key, "") if key is not None else ""
        value = "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value).strip()
        out[name] = value if name == "age" else value.lower()
    return out


def keep_metadata(rows: list[dict], mapping: dict[str, str]) -> bool:
    """Give every row the canonical ``age``, ``sex``, ``site`` columns when the source has any of them
    (a mapped column the source lacks is refused, naming it); False when it has none."""
    if not rows:
        return False
    for name, column in mapping.items():
        if not any(column in r or column.lower() in {str(k).lower() for k in r} for r in rows[:1]):
            raise ConfigError(f"--metadata-columns: the source has no column {column!r} for {name} "
                              f"(its columns: {', '.join(sorted(map(str, rows[0])))})")
    found = [canonical_columns(r, mapping) for r in rows]
    if not any(v for f in found for v in f.values()):
        return False
    for r, f in zip(rows, found):
        r.update(f)
    return True


def _age(value: Any, where: str) -> float | None:
    """An age in years, None when missing; MetadataError naming the field otherwise."""
    if value is None or (isinstance(value, str) and value.strip().lower() in MISSING):
        return None
    if isinstance(value, bool):
        raise MetadataError(f"{where}age: must be a number of years, got {value!r}")
    try:
        age = float(value)
    except (TypeError, ValueError):
        raise MetadataError(f"{where}age: must be a number of years, got {str(value)[:40]!r}") from None
    if math.isnan(age):
        return None
    if not AGE_RANGE[0] <= age <= AGE_RANGE[1]:
        raise MetadataError(f"{where}age: {age:g} is outside the range {AGE_RANGE[0]:g}-{AGE_RANGE[1]:g} years")
    return age


@dataclass(frozen=True)
class MetadataSpec:
    """The metadata inputs of a package: which, their vocabularies and the age normalisation.

    The encoded vector is, in this order: ``[age given, (age - age_mean) / age_std]`` when age is an input,
    then one slot per ``sex`` word, then one per ``site`` word (all zeros for a missing value)."""

    fields: tuple[str, ...] = field(metadata={"doc": "the metadata inputs, in encoding order (age, sex, site)"})
    age_mean: float = field(default=50.0, metadata={"doc": "mean age of the training split (years)"})
    age_std: float = field(default=17.0, metadata={"doc": "standard deviation of age in the training split"})
    sex: tuple[str, ...] = field(default=(), metadata={"doc": "the sex vocabulary (one-hot order)"})
    site: tuple[str, ...] = field(default=(), metadata={"doc": "the anatomical-site vocabulary (one-hot order)"})
    mask_prob: float = field(default=0.25, metadata={"doc": "probability each field was hidden per training image"})
    fusion: str = field(default="concat", metadata={"doc": "how the model combines metadata and image: concat "
                                                           "(late fusion) or metablock (gated feature maps)"})

    @property
    def dim(self) -> int:
        return (2 if "age" in self.fields else 0) + len(self.sex) + len(self.site)

    def slices(self) -> dict[str, slice]:
        """Where each field sits in the vector."""
        out, at = {}, 0
        for name in self.fields:
            n = 2 if name == "age" else len(getattr(self, name))
            out[name], at = slice(at, at + n), at + n
        return out

    @classmethod
    def fit(cls, rows: Iterable[Mapping[str, Any]], fields: tuple[str, ...], mask_prob: float = 0.25) -> "MetadataSpec":
        """The spec of ``rows`` (the training split's canonical columns): vocabularies of the words seen
        (``unknown`` and empty are missing, never a word), age mean and std of the ages given."""
        rows = list(rows)
        ages = [a for a in (_age(r.get("age"), "training data: ") for r in rows) if a is not None]
        vocab = {name: tuple(sorted({str(r.get(name) or "").strip().lower() for r in rows} - set(MISSING)))
                 for name in ("sex", "site")}
        for name, words in vocab.items():
            for word in words:
                if len(word) > VALUE_MAX or not all(ch.isalnum() or ch in " _-/()." for ch in word):
                    raise ConfigError(f"metadata: training value {word!r} of '{name}' is not a plain word")
        mean = float(np.mean(ages)) if ages else 50.0
        std = float(np.std(ages)) if len(ages) > 1 and np.std(ages) > 0 else 17.0
        used = tuple(f for f in fields if f == "age" or vocab[f])
        return cls(used, round(mean, 4), round(std, 4), vocab["sex"] if "sex" in used else (),
                   vocab["site"] if "site" in used else (), float(mask_prob))

    def encode(self, values: Mapping[str, Any] | None, where: str = "") -> np.ndarray:
        """One image's metadata vector (float32, ``dim``). ``values``: field -> value (None or missing fields:
        not given). MetadataError naming the field for an unknown key, a word outside the vocabulary or an
        age outside 0-120; a field this package does not take is refused too, never ignored silently."""
        vec = np.zeros(self.dim, np.float32)
        if values is None:
            return vec
        if not isinstance(values, Mapping):
            raise MetadataError(f"{where}metadata: must be an object with {', '.join(self.fields)}, "
                                f"got {type(values).__name__}")
        for key in values:
            if str(key).lower() in FORBIDDEN:
                raise MetadataError(f"{where}{key}: says what the label is or how it was obtained; never a model "
                                    "input (label leakage)")
            if key not in self.fields:
                raise MetadataError(f"{where}{key}: not a metadata input of this model (it takes "
                                    f"{', '.join(self.fields)})")
        at = self.slices()
        for name in self.fields:
            value = values.get(name)
            if name == "age":
                age = _age(value, where)
                if age is not None:
                    vec[at[name]] = (1.0, (age - self.age_mean) / self.age_std)
                continue
            if value is None:
                continue
            if not isinstance(value, str):
                raise MetadataError(f"{where}{name}: must be a word, got {type(value).__name__}")
            word = value.strip().lower()
            if word in MISSING:
                continue
            vocab = getattr(self, name)
            if word not in vocab:
                raise MetadataError(f"{where}{name}: {value[:40]!r} is not in this model's vocabulary "
                                    f"({', '.join(vocab)}, or unknown)")
            vec[at[name].start + vocab.index(word)] = 1.0
        return vec

    def encode_many(self, items: Iterable[Mapping[str, Any] | None], names: Iterable[str] | None = None) -> np.ndarray:
        """Rows of :meth:`encode` (N x dim); each error names its item."""
        items = list(items)
        names = list(names) if names is not None else [f"item {i}" for i in range(len(items))]
        out = np.zeros((len(items), self.dim), np.float32)
        for i, (values, name) in enumerate(zip(items, names)):
            out[i] = self.encode(values, f"{name}: ")
        return out

    def mask(self, vectors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A copy with each field of each row hidden (zeroed) with probability ``mask_prob``: what training
        feeds, so that a request without (some) metadata is a case the model has met."""
        out = np.array(vectors, np.float32, copy=True)
        for sl in self.slices().values():
            hide = rng.random(len(out)) < self.mask_prob
            out[hide, sl] = 0.0
        return out

    def to_dict(self) -> dict:
        return {"fields": list(self.fields), "age_mean": self.age_mean, "age_std": self.age_std,
                "sex": list(self.sex), "site": list(self.site), "mask_prob": self.mask_prob, "dim": self.dim,
                "fusion": self.fusion,
                "missing": "absent, empty or 'unknown': the field's slots are zero"}

    @classmethod
    def from_dict(cls, d: Mapping) -> "MetadataSpec":
        """ValueError naming the key when ``d`` is malformed."""
        if not isinstance(d, Mapping):
            raise ValueError("must be an object")
        fields = tuple(d.get("fields") or ())
        if not fields or any(f not in FIELDS for f in fields):
            raise ValueError(f"'fields' must list some of {', '.join(FIELDS)}")
        for key in ("sex", "site"):
            if not isinstance(d.get(key, []), list) or not all(isinstance(w, str) for w in d.get(key, [])):
                raise ValueError(f"'{key}' must be a list of words")
        std = d.get("age_std", 17.0)
        if not isinstance(std, (int, float)) or not std > 0:
            raise ValueError("'age_std' must be a number > 0")
        fusion = d.get("fusion", "concat")  # packages written before the option have concat
        if fusion not in FUSIONS:
            raise ValueError(f"'fusion' must be one of {', '.join(FUSIONS)}, got {fusion!r}")
        spec = cls(fields, float(d.get("age_mean", 50.0)), float(std), tuple(d.get("sex", [])),
                   tuple(d.get("site", [])), float(d.get("mask_prob", 0.25)), fusion)
        if "dim" in d and d["dim"] != spec.dim:
            raise ValueError(f"'dim' is {d['dim']} but the fields and vocabularies give {spec.dim}")
        return spec


def per_image_metadata(images: list[str], options: Mapping[str, Any], csv_path: str | None = None
                       ) -> dict[str, dict] | None:
    """``medpipe predict``'s metadata: image -> {field: value}, from options that apply to every image and a
    CSV (column ``image``: the path as given or its file name; columns among age, sex, site) whose values win.
    None when nothing was given. ConfigError naming the CSV column that may not be an input (``dx_type``) or
    an image the CSV does not know; the values themselves are checked by the model's spec."""
    common = {k: v for k, v in options.items() if v is not None}
    by_image = {img: dict(common) for img in images} if common else {}
    if csv_path:
        if not os.path.isfile(csv_path):
            raise ConfigError(f"--metadata-csv: no file {csv_path}")
        table = read_csv_table(csv_path)
        if "image" not in table.columns:
            raise ConfigError(f"--metadata-csv {csv_path}: needs a column 'image' (found {list(table.columns)})")
        for column in table.columns:
            if column != "image":
                check_input_name(column, f"--metadata-csv {csv_path}: column")
        names = {os.path.basename(img): img for img in images}
        for line, rec in enumerate(table.to_dict("records"), start=2):
            img = rec["image"] if rec["image"] in images else names.get(os.path.basename(rec["image"]))
            if img is None:
                raise ConfigError(f"--metadata-csv {csv_path} line {line}: image {rec['image']!r} is not among "
                                  "the images given")
            values = {k: v for k, v in rec.items() if k != "image" and str(v).strip() != ""}
            by_image.setdefault(img, dict(common)).update(values)
    return by_image or None
