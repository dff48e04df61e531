"""The search space of ``medpipe tune``: reading and checking the YAML file (format in :mod:`medpipe.tune`).

    from medpipe.tune_space import load_space

    space = load_space("space.yaml")          # every error names the file and the key
    cfg = space.config({"lr": 1e-3})          # one trial's training config (base + values, monitor = objective)

Also the study's Optuna objects: the space's pruner and sampler (:func:`make_pruner`, :func:`make_sampler`) and
the storage that holds the study (:func:`open_storage`: SQLite in the study folder, or a database server that
processes on several machines share); Optuna is needed for those, not to check the space.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from medpipe.config import MONITORS, TrainConfig, make_config
from medpipe.errors import ConfigError, TuneError

PRUNERS = ("median", "percentile", "threshold", "none")
SAMPLERS = ("tpe", "random")
# options a search must not vary: where data goes and how the run is executed, not what it learns
NOT_SEARCHABLE = ("device", "workers", "threads", "monitor", "deterministic", "init_weights")
# options that change what the objective is measured on: every trial must see the same validation images
SPLIT_KEYS = ("split_seed", "val_fraction", "test_fraction")
TOP_KEYS = ("objective", "trials", "base", "params", "pruner", "sampler")


@dataclass
class Param:
    """One searched training option: categorical (``choices``) or a numeric range."""

    name: str
    choices: list | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False

    def suggest(self, trial):
        """Ask an Optuna trial for this option's value.

        Args:
            trial: an ``optuna.Trial``.

        Returns:
            The value (one of ``choices``, or an int / float in ``[low, high]``)."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, self.choices)
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)


@dataclass
class Space:
    """A checked search space (see :func:`load_space`)."""

    objective: str = "val_auc"
    trials: int = 20
    base: dict = field(default_factory=dict)
    params: list[Param] = field(default_factory=list)
    pruner: dict = field(default_factory=lambda: {"type": "median"})
    sampler: dict = field(default_factory=lambda: {"type": "tpe", "seed": 0})

    @property
    def direction(self) -> str:
        """``minimize`` for ``val_loss``, else ``maximize`` (Optuna's study direction)."""
        return "minimize" if self.objective == "val_loss" else "maximize"

    def config(self, values: dict) -> TrainConfig:
        """The training config of one trial (base + searched values; the objective is the monitor).

        Args:
            values: searched option -> value.

        Returns:
            The validated :class:`TrainConfig` (raises ``ConfigError`` for an invalid combination)."""
        return make_config({**self.base, **values, "monitor": self.objective})


def _closest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def load_space(path: str | Path) -> Space:
    """Read and check a search-space YAML file; every error names the file and the key.

    Args:
        path: the YAML file (read with ``yaml.safe_load``).

    Returns:
        The :class:`Space`; every corner of each range is checked to make a valid training config.

    Raises:
        ConfigError: unreadable file, unknown or misspelt key, a range or option that cannot be searched.
    """
    path = Path(path)
    raw = _read_mapping(path)
    space = Space()
    space.objective = str(raw.get("objective", space.objective))
    if space.objective not in MONITORS:
        raise ConfigError(f"{path}: objective must be one of {MONITORS}, got {space.objective!r}")
    space.trials = raw.get("trials", space.trials)
    if not isinstance(space.trials, int) or space.trials < 1:
        raise ConfigError(f"{path}: trials must be a positive integer, got {space.trials!r}")
    space.base = dict(raw.get("base") or {})
    if "monitor" in {str(k).replace("-", "_") for k in space.base}:
        raise ConfigError(f"{path}: base.monitor: the monitor of every trial is the objective; set 'objective' instead")
    params = raw.get("params") or {}
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{path}: 'params' must map at least one training option to its range")
    types = {f.name: str(f.type) for f in fields(TrainConfig)}
    space.params = [_param(f"{path}: params.{raw_name}", str(raw_name).replace("-", "_"), spec, types, space.base)
                    for raw_name, spec in params.items()]
    _search_methods(path, raw, space)
    # every corner of the space must be a valid training config (fails here, not in trial 17)
    for p in space.params:
        for v in (p.choices or [int(p.low) if p.integer else p.low, int(p.high) if p.integer else p.high]):
            try:
                space.config({p.name: v})
            except ConfigError as exc:
                raise ConfigError(f"{path}: params.{p.name} = {v!r} is not a valid training option: {exc}") from None
    return space


def _read_mapping(path: Path) -> dict:
    """The file's top-level mapping, with its keys checked."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read search space {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"search space {path} must hold a mapping")
    for key in raw:
        if key not in TOP_KEYS:
            raise ConfigError(f"{path}: unknown key '{key}'{_closest(str(key), TOP_KEYS)}")
    return raw


def _param(where: str, name: str, spec, types: dict[str, str], base: dict) -> Param:
    """One entry of ``params`` (``where`` names it in errors), checked against the training options."""
    if name not in types:
        raise ConfigError(f"{where}: not a training option{_closest(name, types)}")
    if name == "monitor":
        raise ConfigError(f"{where}: monitor is not searchable (every trial's monitor is the objective)")
    if name in NOT_SEARCHABLE:
        raise ConfigError(f"{where}: {name} is not searchable (it does not change what is learned)")
    if name in SPLIT_KEYS:
        raise ConfigError(f"{where}: {name} is not searchable (it changes the validation split the objective "
                          "is measured on, so trials could not be compared); fix it in 'base'")
    if name in base:
        raise ConfigError(f"{where}: also fixed in 'base'; keep it in one place")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: give {{choices: [...]}} or {{low: .., high: ..}}")
    unknown = set(spec) - {"choices", "low", "high", "log", "step"}
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
    if "choices" in spec:
        if not isinstance(spec["choices"], list) or not spec["choices"]:
            raise ConfigError(f"{where}: choices must be a non-empty list")
        return Param(name, choices=list(spec["choices"]))
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: needs low and high (or choices)")
    try:
        low, high = float(spec["low"]), float(spec["high"])
        step = None if spec.get("step") is None else float(spec["step"])
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: low, high and step must be numbers") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ConfigError(f"{where}: low must be below high, got {low} and {high}")
    log_scale = bool(spec.get("log", False))
    if log_scale and step is not None:
        raise ConfigError(f"{where}: give log or step, not both (Optuna cannot sample a stepped log range)")
    if log_scale and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0")
    integer = types[name].startswith("int")
    if not (integer or types[name].startswith("float")):
        raise ConfigError(f"{where}: {name} is not numeric; give choices")
    return Param(name, low=low, high=high, log=log_scale, step=step, integer=integer)


def _search_methods(path: Path, raw: dict, space: Space) -> None:
    """``pruner`` and ``sampler`` (a name or a mapping with a ``type``) into ``space``, checked."""
    for key in ("pruner", "sampler"):
        value = raw.get(key)
        if value is not None:
            if isinstance(value, str):
                value = {"type": value}
            if not isinstance(value, dict) or "type" not in value:
                raise ConfigError(f"{path}: {key} must be a mapping with a 'type'")
            setattr(space, key, dict(value))
    if space.pruner["type"] not in PRUNERS:
        raise ConfigError(f"{path}: pruner type must be one of {PRUNERS}, got {space.pruner['type']!r}")
    if space.sampler["type"] not in SAMPLERS:
        raise ConfigError(f"{path}: sampler type must be one of {SAMPLERS}, got {space.sampler['type']!r}")
    seed = space.sampler.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ConfigError(f"{path}: sampler seed must be a non-negative integer, got {seed!r}")


def require_optuna():
    """The ``optuna`` module, or a TuneError saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise TuneError("medpipe tune needs Optuna: pip install 'medpipe-imaging[tune]'") from None
    return optuna


def make_pruner(spec: dict):
    """The Optuna pruner of a space's ``pruner`` mapping.

    Args:
        spec: ``type`` (median | percentile | threshold | none) and its options (``startup_trials``,
            ``warmup_epochs``, ``percentile``, ``lower``, ``upper``).

    Returns:
        An ``optuna.pruners.BasePruner`` (``NopPruner`` for ``none``)."""
    optuna = require_optuna()
    kind = spec.get("type", "median")
    args = {k: v for k, v in spec.items() if k != "type"}
    try:
        if kind == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=int(args.get("startup_trials", 3)),
                                               n_warmup_steps=int(args.get("warmup_epochs", 1)))
        if kind == "percentile":
            return optuna.pruners.PercentilePruner(float(args.get("percentile", 25.0)),
                                                   n_startup_trials=int(args.get("startup_trials", 3)),
                                                   n_warmup_steps=int(args.get("warmup_epochs", 1)))
        if kind == "threshold":
            return optuna.pruners.ThresholdPruner(lower=args.get("lower"), upper=args.get("upper"),
                                                  n_warmup_steps=int(args.get("warmup_epochs", 0)))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"pruner {spec}: {exc}") from None
    return optuna.pruners.NopPruner()


def sampler_seed(seed: int | None, worker: int = 0, existing: int = 0, salt: int | None = None) -> int | None:
    """The seed of one process's sampler: the space's ``seed`` itself for worker 0 of a fresh study (a
    single-process study replays from it), otherwise one derived from (seed, worker index, trials already in
    the study), so parallel processes and a continued study do not draw the same parameters again. ``salt``:
    a per-process number mixed in where nothing else tells processes apart (a second shell opening a study
    another shell created a moment ago, before either recorded a trial).

    Args:
        seed: the space's sampler seed; None for an unseeded sampler.
        worker: this process's index among ``--processes``.
        existing: trials already in the study.
        salt: a per-process number, or None.

    Returns:
        The seed, or None."""
    if seed is None:
        return None
    if worker == 0 and existing == 0 and salt is None:
        return int(seed)
    import numpy as np

    entropy = [int(seed), int(worker), int(existing)] + ([int(salt)] if salt is not None else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def make_sampler(spec: dict, worker: int = 0, existing: int = 0, salt: int | None = None):
    """The Optuna sampler of a space's ``sampler`` mapping, seeded by :func:`sampler_seed`.

    Args:
        spec: ``type`` (tpe | random) and ``seed``.
        worker, existing, salt: as for :func:`sampler_seed`.

    Returns:
        A ``TPESampler`` or ``RandomSampler``."""
    optuna = require_optuna()
    seed = sampler_seed(spec.get("seed"), worker, existing, salt)
    if spec.get("type") == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


# drivers SQLAlchemy imports for a storage URL's dialect: what to install when one is missing
DRIVERS = {"postgresql": "psycopg 3 (in the tune extra: pip install 'medpipe-imaging[tune]'; SQLAlchemy 2.1 reads "
                         "postgresql:// as postgresql+psycopg://, postgresql+psycopg2:// needs psycopg2-binary)",
           "mysql": "a MySQL driver, e.g. pip install pymysql with a mysql+pymysql:// URL"}


def shown_url(url: str) -> str:
    """A storage URL with its password hidden, for messages, logs and result files."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy reads: hide what looks like user:password@
        import re

        return re.sub(r"://([^:/@]*):[^@/]*@", r"://\1:***@", url)


def open_storage(url: str, heartbeat: int, grace: int):
    """Optuna's RDB storage on ``url`` with heartbeats: a trial whose process stops beating for ``grace``
    seconds (killed, its machine lost) is marked failed by the next trial start in any process sharing the
    storage and queued again with the same parameters (``RetryHeartbeatStaleTrialCallback``, 3 retries).

    Args:
        url: a SQLAlchemy URL: ``sqlite:///PATH`` (one machine, or a file system with working locks) or a
            server (``postgresql://USER@HOST:PORT/DB``; the password from ``PGPASSWORD`` or ``~/.pgpass``
            rather than the command line).
        heartbeat: seconds between a running trial's heartbeats.
        grace: seconds without one after which a trial counts as killed.

    Returns:
        An ``optuna.storages.RDBStorage``.

    Raises:
        ConfigError: not a database URL, or its driver is not installed.
        TuneError: the database cannot be reached or opened (the reason from the server)."""
    require_optuna()
    import random
    import time
    import warnings

    import sqlalchemy.exc
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        raise ConfigError(f"--storage {shown_url(url)!r}: not a database URL (sqlite:///PATH, "
                          "postgresql://USER@HOST:PORT/DB, ...)") from None
    backend, kwargs = parsed.get_backend_name(), {"pool_pre_ping": True}  # a server restarted: reconnect
    if backend == "sqlite":
        kwargs = {"connect_args": {"timeout": 60}}  # several processes share the file
    elif backend == "postgresql" and parsed.get_driver_name() in ("psycopg2", "psycopg"):
        kwargs["connect_args"] = {"connect_timeout": 10}  # an unreachable host fails in seconds, not minutes
    shown = shown_url(url)
    try:
        for attempt in range(5):
            try:
                with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna (since v2.8): noise here
                    warnings.simplefilter("ignore", category=ExperimentalWarning)
                    return RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat, grace_period=grace,
                                      heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                # processes opening a new database at once race to create Optuna's tables: the loser finds them
                # made (a duplicate table or type) and opens them the next time
                if attempt == 4:
                    raise
                time.sleep(0.2 + random.random())
    except (ImportError, sqlalchemy.exc.NoSuchModuleError) as exc:
        need = DRIVERS.get(backend, f"the SQLAlchemy driver of {backend!r}")
        raise ConfigError(f"--storage {shown}: cannot load its database driver ({exc.__cause__ or exc}); "
                          f"install {need}") from None
    except sqlalchemy.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise TuneError(f"--storage {shown}: cannot open the study storage: {reason}") from None
    except RuntimeError as exc:  # Optuna: the tables were made by an incompatible Optuna version
        raise TuneError(f"--storage {shown}: {str(exc).replace(url, shown)}") from None
