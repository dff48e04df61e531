"""Typed training configuration: defaults, then a YAML file, then command-line overrides.

Unknown keys are errors that name the key (a typo never silently falls back to a default). The
resolved configuration is written into every run directory as ``config.yaml``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from medpipe.data.imageio import resample_filter
from medpipe.data.metadata import FUSIONS as METADATA_FUSIONS
from medpipe.data.metadata import parse_fields as parse_metadata_fields
from medpipe.decision import RULES as DECISION_RULES
from medpipe.errors import ConfigError
from medpipe.models import MODEL_NAMES
from medpipe.preprocess import COLOR_CONSTANCY, Augmentation, PreprocessSpec
from medpipe.utils import atomic_write_text

IMBALANCE = ("sampler", "weighted_loss", "focal", "none")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp32")
MONITORS = ("val_auc", "val_bacc", "val_loss")
# smallest area share of the random resized crop taken from a cache larger than the training size: dermoscopy
# centres the lesion, so a crop keeps 60-100% of the area (each side 77-100%, aspect ~0.77-1.29) and rarely
# cuts the lesion's border off, where a natural-image RandomResizedCrop's 8% could
CROP_SCALE_LARGE_CACHE = 0.6


@dataclass
class TrainConfig:
    """The training options and their defaults. The recipe defaults (``imbalance: none``, ``weight_decay: 0.05``,
    ``ema_decay: 0.999``, ``mixup_alpha: 0.2``, ``decision_rule: prior``) were chosen by
    ``benchmarks/quality.py`` on real HAM10000 images (docs/benchmarks/index.md); the recipe they
    replaced is that script's ``old_default`` (class-balanced sampler, weight decay 1e-4, no EMA, no mixup,
    argmax)."""

    model: str = "densenet121"
    image_size: int = 64
    # side of the training images' pixel cache: 0 = image_size; larger, each training sample is a random resized
    # crop of the larger cached image down to image_size (validation, test and serving resize to image_size)
    cache_size: int = 0
    interpolation: str = "bicubic"
    epochs: int = 10
    budget: str | None = None  # training time, e.g. 90s, 25m, 2h: sets the epoch count after the first epoch
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    grad_clip: float = 1.0
    imbalance: str = "none"
    focal_gamma: float = 2.0
    monitor: str = "val_auc"
    patience: int = 10
    seed: int = 0
    split_seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    deterministic: bool = False
    device: str = "auto"
    # bf16 autocast (+ channels_last) for training steps and validation; auto: bf16 on CUDA, and on a CPU with
    # bf16 instructions where a start-up check times it faster (fp32 for --deterministic runs) (train.engine)
    precision: str = "auto"
    workers: int = -1  # -1 auto: a loader thread on CPU, worker processes on CUDA (train.loop.auto_workers)
    threads: int = 0
    init_weights: str | None = None
    pretrained: bool = False
    dropout: float = 0.0
    tta: bool = False
    bootstrap: int = 1000
    max_steps_per_epoch: int = 0
    # experiment tracking (medpipe.track, the track extra): "auto" = $MLFLOW_TRACKING_URI or RUN/../mlflow.db
    track: str | None = None
    experiment: str = "medpipe"
    register: str | None = None  # register the logged model under this name
    decision_rule: str = "prior"  # the label rule the package uses by default (medpipe.decision.RULES)
    # recipe options: colour constancy is part of the package's preprocessing, crop_scale /
    # color_jitter only of the train preset (preprocess.Augmentation); mixup and EMA are on by default
    color_constancy: str = "none"
    crop_scale: float | None = None  # None: CROP_SCALE_LARGE_CACHE with a larger cache_size, else 1 (no crop)
    color_jitter: float = 1.0
    mixup_alpha: float = 0.2  # batch mixing (medpipe.recipe): 0 = off
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    ema_decay: float = 0.999  # exponential moving average of the weights (medpipe.recipe): 0 = off
    # patient metadata beside the image (medpipe.data.metadata): none, auto (every input the data has) or a list
    metadata: str = "none"
    metadata_mask: float = 0.25  # probability each metadata field is hidden per training image
    metadata_fusion: str = "concat"  # how metadata meets the image (medpipe.models): concat or metablock

    def validate(self) -> "TrainConfig":
        checks = [
            (self.imbalance in IMBALANCE, "imbalance", f"one of {IMBALANCE}"),
            (self.device in DEVICES, "device", f"one of {DEVICES}"),
            (self.precision in PRECISIONS, "precision", f"one of {PRECISIONS}"),
            (self.monitor in MONITORS, "monitor", f"one of {MONITORS}"),
            (self.epochs >= 1, "epochs", ">= 1"),
            (self.batch_size >= 1, "batch_size", ">= 1"),
            (self.image_size >= 16, "image_size", ">= 16"),
            (self.lr > 0, "lr", "> 0"),
            (0 <= self.label_smoothing < 1, "label_smoothing", "in [0, 1)"),
            (self.workers >= -1, "workers", ">= -1 (auto)"),
            (self.decision_rule in DECISION_RULES, "decision_rule", f"one of {DECISION_RULES}"),
            (self.color_constancy in COLOR_CONSTANCY, "color_constancy", f"one of {COLOR_CONSTANCY}"),
            (self.cache_size == 0 or self.cache_size >= self.image_size, "cache_size",
             f">= image_size ({self.image_size}), or 0 for the image size"),
            (self.crop_scale is None or 0.05 <= self.crop_scale <= 1.0, "crop_scale",
             "in [0.05, 1] (1 = no random resized crop)"),
            (0.0 <= self.color_jitter <= 5.0, "color_jitter", "in [0, 5] (1 = the default jitter)"),
            (self.mixup_alpha >= 0, "mixup_alpha", ">= 0 (0 = off)"),
            (self.cutmix_alpha >= 0, "cutmix_alpha", ">= 0 (0 = off)"),
            (0 <= self.mix_prob <= 1, "mix_prob", "in [0, 1]"),
            (0 <= self.ema_decay < 1, "ema_decay", "in [0, 1) (0 = off)"),
            (0 <= self.metadata_mask < 1, "metadata_mask", "in [0, 1)"),
            (self.metadata_fusion in METADATA_FUSIONS, "metadata_fusion", f"one of {METADATA_FUSIONS}"),
            (self.threads >= 0, "threads", ">= 0 (0: all cores)"),
            (self.weight_decay >= 0, "weight_decay", ">= 0"),
            (self.warmup_epochs >= 0, "warmup_epochs", ">= 0"),
            (self.grad_clip >= 0, "grad_clip", ">= 0 (0: off)"),
            (self.focal_gamma >= 0, "focal_gamma", ">= 0"),
            (self.patience >= 1, "patience", ">= 1"),
            (self.bootstrap >= 0, "bootstrap", ">= 0 (0: no confidence intervals)"),
            (self.max_steps_per_epoch >= 0, "max_steps_per_epoch", ">= 0 (0: whole epoch)"),
            (0 <= self.dropout < 1, "dropout", "in [0, 1)"),
            (0 <= self.val_fraction < 1, "val_fraction", "in [0, 1)"),
            (0 <= self.test_fraction < 1, "test_fraction", "in [0, 1)"),
        ]
        for ok, key, want in checks:
            if not ok:
                raise ConfigError(f"config key '{key}' must be {want}, got {getattr(self, key)!r}")
        if self.budget is not None:
            self.budget_seconds()
        parse_metadata_fields(self.metadata)  # ConfigError for dx_type or an unknown input
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(f"config keys 'val_fraction' + 'test_fraction' must be < 1 (nothing would be left to "
                              f"train on), got {self.val_fraction} + {self.test_fraction}")
        try:
            resample_filter(self.interpolation)
        except ValueError as exc:
            raise ConfigError(f"config key 'interpolation': {exc}") from None
        if self.model not in MODEL_NAMES:
            raise ConfigError(f"config key 'model' must be one of {sorted(MODEL_NAMES)}, got {self.model!r}")
        return self

    def budget_seconds(self) -> float | None:
        """``budget`` in seconds: a number with an optional unit s, m or h (``90s``, ``25m``, ``2h``)."""
        if self.budget is None:
            return None
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(self.budget).lower())
        if not m or float(m.group(1)) <= 0:
            raise ConfigError(f"config key 'budget' must be a positive time such as 90s, 25m or 2h, got {self.budget!r}")
        return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]

    def preprocess(self) -> PreprocessSpec:
        return PreprocessSpec(image_size=self.image_size, interpolation=self.interpolation,
                              color_constancy=self.color_constancy)

    @property
    def train_cache_size(self) -> int:
        """Side of the pixels the training images are cut from (``cache_size``, 0 meaning ``image_size``)."""
        return self.cache_size or self.image_size

    def augmentation(self) -> Augmentation:
        """The train preset's options; ``crop_scale`` unset means :data:`CROP_SCALE_LARGE_CACHE` when the cache is
        larger than the training size (a random resized crop of the extra pixels), else 1 (no crop)."""
        scale = self.crop_scale
        if scale is None:
            scale = CROP_SCALE_LARGE_CACHE if self.train_cache_size > self.image_size else 1.0
        return Augmentation(crop_scale=scale, color_jitter=self.color_jitter, source_size=self.cache_size)

    def to_dict(self) -> dict:
        return asdict(self)


def _coerce(name: str, typ: Any, value: Any) -> Any:
    typ = str(typ)
    try:
        if value is None:
            return None
        if typ == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if typ == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{name}' expects {typ}, got {value!r}") from None


def make_config(overrides: dict | None = None, yaml_path: str | Path | None = None) -> TrainConfig:
    """Defaults <- YAML file <- overrides. Keys may use '-' or '_'. Unknown keys raise ConfigError."""
    known = {f.name: f.type for f in fields(TrainConfig)}
    merged: dict[str, Any] = {}
    sources = []
    if yaml_path:
        try:
            loaded = yaml.safe_load(Path(yaml_path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {yaml_path}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {yaml_path} must hold a mapping")
        sources.append((str(yaml_path), loaded))
    sources.append(("overrides", overrides or {}))
    for origin, values in sources:
        for raw_key, value in values.items():
            key = str(raw_key).replace("-", "_")
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"unknown config key '{raw_key}' in {origin}{hint}")
            typ = str(known[key]).replace("| None", "").strip()
            merged[key] = _coerce(key, typ, value)
    return TrainConfig(**merged).validate()


def write_config(cfg: TrainConfig, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=True))



# Keys a resumed run may take anew: where and how fast it runs and where it is tracked, not what it trains.
RUNTIME_KEYS = ("device", "workers", "threads", "track", "experiment", "register")

# The values of the keys whose default changed with the recipe switch as they were before it. A
# checkpoint's config that lacks one of them was written before the key existed and trained this way, so a resume
# fills it from here, not from today's default (a run must not change its recipe half-way).
LEGACY_DEFAULTS = {"imbalance": "sampler", "weight_decay": 1e-4, "ema_decay": 0.0, "mixup_alpha": 0.0,
                   "decision_rule": "argmax"}


def checkpoint_config(saved: dict) -> TrainConfig:
    """The config a checkpoint's run trained with: its saved keys, :data:`LEGACY_DEFAULTS` for those it predates,
    today's defaults for the rest (keys added without changing what a run did)."""
    known = {f.name for f in fields(TrainConfig)}
    return make_config({**LEGACY_DEFAULTS, **{k: v for k, v in saved.items() if k in known}})


def resume_differences(saved: dict, now: dict) -> list[str]:
    """What the config ``now`` (``TrainConfig.to_dict()``) would train differently from the checkpoint's run
    (every key but :data:`RUNTIME_KEYS`), each named."""
    base = checkpoint_config(saved).to_dict()
    return [f"{k.replace('_', ' ')} ('{k}'): checkpoint {base[k]!r} vs now {now.get(k)!r}"
            for k in base if k not in RUNTIME_KEYS and base[k] != now.get(k)]


def given_keys(overrides: dict | None = None, yaml_path: str | Path | None = None) -> set[str]:
    """The config keys a user set explicitly (command line or YAML file)."""
    keys = {str(k).replace("-", "_") for k in (overrides or {})}
    if yaml_path:
        loaded = yaml.safe_load(Path(yaml_path).read_text()) or {}
        keys |= {str(k).replace("-", "_") for k in loaded} if isinstance(loaded, dict) else set()
    return keys


def resume_config(saved: dict, overrides: dict | None = None, yaml_path: str | Path | None = None) -> TrainConfig:
    """The config a ``--resume`` continues with: the run's own (``saved``, from its checkpoint). Keys given
    again must match it, except :data:`RUNTIME_KEYS`; each difference is named."""
    given = make_config(overrides, yaml_path)  # validates and coerces what was given
    keys = given_keys(overrides, yaml_path)
    base = checkpoint_config(saved)
    diffs = [f"{k.replace('_', ' ')} ('{k}'): run {getattr(base, k)!r}, given {getattr(given, k)!r}"
             for k in sorted(keys - set(RUNTIME_KEYS)) if getattr(base, k) != getattr(given, k)]
    if diffs:
        raise ConfigError("--resume continues the run with its own config, and options given again must match it: "
                          + "; ".join(diffs) + " (drop them, or start a new run with --force or another --out)")
    for k in keys & set(RUNTIME_KEYS):
        setattr(base, k, getattr(given, k))
    return base.validate()
