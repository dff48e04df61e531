"""The training job: fit -> calibrate -> package -> evaluate the test split -> deployable layout.

    medpipe train --data DATA --out RUN [--epochs 10 | --budget 25m] [--resume | --force] ...
    torchrun --nproc_per_node 2 -m medpipe train --data DATA --out RUN ...

    from medpipe.pipeline import run
    result = run("DATA", "RUN", cfg)            # the same keys on every rank (None where rank 0 only)

The run folder: ``config.yaml`` (resolved), ``splits.csv``/``splits.json`` (or ``shards_index.json``),
``metrics.jsonl``, ``checkpoints/{last,best}.pt``, ``model/`` (the package), ``report/``. The deployable
SageMaker layout of ``model/``: medpipe.sagemaker.layout (a SageMaker job writes it into SM_MODEL_DIR).
Rules: a non-empty run folder needs ``resume`` (continue, with the run's own config) or ``force``
(start over; only files medpipe writes are removed); a refused start writes nothing; a run that fails
before its first checkpoint leaves no folder behind.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from medpipe import recipe
from medpipe.calibration import fit_temperature
from medpipe.config import TrainConfig, write_config
from medpipe.decision import fit_rules
from medpipe.errors import ConfigError
from medpipe.evaluate import compute_metrics, evaluate_arrays
from medpipe.infer.predictor import Predictor
from medpipe.package import save_package, update_meta
from medpipe.track import MLflowHandler, resolve_uri
from medpipe.train import distributed
from medpipe.train.checkpoint import check_compatible, load_checkpoint
from medpipe.train.data import open_source
from medpipe.train.engine import Engine, Events, NonFiniteLoss, TrainingInterrupted, predict_logits  # noqa: F401
from medpipe.train.handlers import Checkpointer, EarlyStopping, EpochLine, GracefulStop, MetricsFile, ProgressBar, \
    ResourceMetrics, TimeBudget
from medpipe.utils import atomic_write_text, resolve_device, seed_everything, to_json

log = logging.getLogger(__name__)

# What a run folder holds; --force removes these and nothing else.
RUN_ENTRIES = ("config.yaml", "splits.csv", "splits.json", "shards_index.json", "metrics.jsonl", "distributed.json",
               "mlflow_run.json", "checkpoints", "model", "report")


@dataclass
class RunLayout:
    """Where a run writes: the run folder and (overridable, e.g. by SageMaker) checkpoints, model, report."""

    run_dir: Path
    checkpoints: Path
    model: Path
    report: Path

    @classmethod
    def of(cls, run_dir, checkpoint_dir=None, model_dir=None, report_dir=None) -> "RunLayout":
        run_dir = Path(run_dir)
        return cls(run_dir, Path(checkpoint_dir or run_dir / "checkpoints"), Path(model_dir or run_dir / "model"),
                   Path(report_dir or run_dir / "report"))


def check_run_dir(layout: RunLayout, *, resume, force: bool) -> None:
    """Refuse before anything is written: a non-empty run folder without --resume/--force, a --resume without
    a checkpoint, a --force over files medpipe did not write. ``force`` removes the previous run's files."""
    run_dir = layout.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file, not a run folder")
    entries = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if resume:
        return
    if entries and not force:
        raise ConfigError(f"run folder {run_dir} is not empty ({', '.join(entries[:5])}); continue that run with "
                          "--resume, start it over with --force, or choose another --out")
    if entries and force:
        foreign = [e for e in entries if e not in RUN_ENTRIES]
        if foreign:
            raise ConfigError(f"--force: {run_dir} holds files medpipe did not write ({', '.join(foreign[:5])}); "
                              "choose another --out")
        for e in entries:
            p = run_dir / e
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    if force and layout.checkpoints.is_dir():
        for name in ("last.pt", "best.pt"):
            (layout.checkpoints / name).unlink(missing_ok=True)


def saved_config(run_dir, resume: bool | str = True, checkpoint_dir=None) -> dict:
    """The config stored in the checkpoint a ``--resume`` continues from."""

    return load_checkpoint(_resume_path(RunLayout.of(run_dir, checkpoint_dir), resume))["config"]


def _resume_path(layout: RunLayout, resume: bool | str) -> Path:
    return layout.checkpoints / "last.pt" if resume in (True, "last") else Path(resume)


def load_handler(spec: str):
    """``MODULE:NAME[:ARG,...]`` -> ``NAME(*ARGS)`` from that module (integers given as digits): a handler
    for the engine chosen on the command line (``--handler``)."""
    import importlib

    parts = spec.split(":", 2)
    if len(parts) < 2 or not all(parts[:2]):
        raise ConfigError(f"--handler {spec!r}: expected MODULE:NAME[:ARG,...]")
    try:
        factory = getattr(importlib.import_module(parts[0]), parts[1])
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--handler {spec!r}: {exc}") from None
    args = [int(a) if a.lstrip("-").isdigit() else a for a in parts[2].split(",")] if len(parts) == 3 else []
    return factory(*args)


def _setup(cfg: TrainConfig):
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    device = resolve_device(cfg.device)
    dd = distributed.init(device)
    if dd.enabled and device.type == "cuda":
        device = torch.device("cuda", dd.local_rank)
    return device, dd


def run(data, run_dir, cfg: TrainConfig, *, resume: bool | str = False, force: bool = False, checkpoint_dir=None,
        model_dir=None, report_dir=None, progress: bool = False, evaluate_test: bool = True,
        handlers=()) -> dict:
    """Train on ``data`` (ingested folder or shard set) into ``run_dir``; package and report on rank 0.
    ``handlers``: extra engine handlers (objects with ``attach(engine)``). Returns the summary dict (same
    keys on every rank)."""

    layout = RunLayout.of(run_dir, checkpoint_dir, model_dir, report_dir)
    tracker = _tracker(cfg, layout)  # before anything is written: --track without MLflow is refused here
    device, dd = _setup(cfg)
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if not resume and restarts > 0 and (layout.checkpoints / "last.pt").is_file():
        resume = True  # torchrun restarted the workers after a failure: continue from the last checkpoint
    created = not layout.run_dir.exists()
    if dd.main:
        check_run_dir(layout, resume=resume, force=force or restarts > 0)
    snap = None
    if resume:
        path = _resume_path(layout, resume)
        snap = load_checkpoint(path)
    source = None
    try:
        if not dd.main:
            dd.barrier()  # rank 0 prepares split and cache first; the others then reuse them
        source = open_source(data, cfg, rank=dd.rank, world=dd.world, progress=progress, pin=device.type == "cuda")
        if dd.main:
            dd.barrier()
        decided = None  # a budget's decided count: the schedule is built in the form the checkpoint stores
        if snap is not None and cfg.budget:
            decided = snap.get("budget_epochs") or (snap.get("max_epochs") if snap["epoch"] > 0 else None)
        engine = Engine.create(cfg, source, device, dd, epochs=decided)
        if snap is not None:
            check_compatible(snap, cfg.to_dict(), source.classes)
            engine.restore(snap)
            print(f"resumed from {path} at epoch {snap['epoch'] + 1}, batch {snap['batch_in_epoch']}", flush=True)
        if dd.main:
            layout.checkpoints.mkdir(parents=True, exist_ok=True)
            write_config(cfg, layout.run_dir / "config.yaml")
            source.write_provenance(layout.run_dir)
        _attach_handlers(engine, layout, [*handlers, *([tracker] if tracker else [])], progress)
        state = engine.fit()
    except BaseException as exc:
        _after_failure(exc, layout, created, dd)
        raise
    finally:
        if source is not None:
            source.close()
    _finish_distributed(engine, layout, dd)
    result = {"run_dir": str(layout.run_dir), "rank": dd.rank, "world_size": dd.world, "epochs": state.epoch,
              "best_epoch": state.best_epoch, "model_dir": None, "temperature": None, "val": None, "test": None,
              "report": None, "plots": None}
    if dd.main:
        try:
            result.update(package_and_report(engine, layout, evaluate_test=evaluate_test, progress=progress))
        except BaseException as exc:
            if tracker and tracker.tracker:
                tracker.tracker.end("FAILED", f"{exc.__class__.__name__}: {exc}")
                tracker.tracker.flush(seconds=10)
            raise
        if tracker:
            tracker.finish(result, layout.run_dir, layout.report)
    return result


def _tracker(cfg: TrainConfig, layout: RunLayout):
    if not cfg.track:
        return None

    return MLflowHandler(resolve_uri(cfg.track, layout.run_dir), cfg.experiment, cfg.register, layout.run_dir)


def _attach_handlers(engine: Engine, layout: RunLayout, extra: list, progress: bool) -> None:
    """The standard handlers and ``extra``; each declares its place among an event's handlers (``Order``), so
    the attach order does not matter."""
    cfg, checkpointer = engine.cfg, Checkpointer(layout.checkpoints)
    if cfg.budget and engine.state.budget_epochs is None:  # not decided yet (also a resume inside epoch 1)
        engine.attach(TimeBudget(cfg.budget_seconds()))
    engine.attach(*recipe.handlers(cfg, len(engine.classes), layout.checkpoints))  # mixing, EMA (medpipe.recipe)
    engine.attach(EpochLine(), MetricsFile(layout.run_dir / "metrics.jsonl"), ResourceMetrics(layout.run_dir),
                  checkpointer, EarlyStopping(cfg.patience, cfg.monitor), *extra, GracefulStop(checkpointer))
    if progress:
        engine.attach(ProgressBar())


def _after_failure(exc: BaseException, layout: RunLayout, created: bool, dd) -> None:
    """A run that never wrote a checkpoint leaves nothing behind; otherwise say where the good state is."""
    last = layout.checkpoints / "last.pt"
    if not dd.main:
        return
    if created and not last.is_file() and layout.run_dir.is_dir():
        shutil.rmtree(layout.run_dir, ignore_errors=True)
    elif isinstance(exc, NonFiniteLoss) and last.is_file():
        exc.args = (f"{exc}; the last good checkpoint is {last}",)


def _finish_distributed(engine: Engine, layout: RunLayout, dd) -> None:
    if not dd.enabled:
        return
    digests = dd.gather(distributed.params_digest(engine.net))
    if dd.main:
        atomic_write_text(layout.run_dir / "distributed.json", to_json(
            {"world_size": dd.world, "ranks_in_sync": len(set(digests)) == 1, "weights_sha256": digests}, indent=2))
    dd.barrier()
    engine.model = engine.net  # drop the DDP wrapper first: its reducer holds the process group
    import gc

    gc.collect()
    dd.close()


def _compact(m: dict) -> dict:
    keys = ("n", "macro_auc", "macro_auc_ci95", "balanced_accuracy", "accuracy", "ece",
            "mel_sensitivity_at_spec80", "mel_sensitivity_at_spec90")
    out = {k: m[k] for k in keys if k in m}
    out["per_class_auc"] = {c: v["auc"] for c, v in m.get("per_class", {}).items()}
    return out


def package_and_report(engine: Engine, layout: RunLayout, *, evaluate_test: bool, progress: bool) -> dict:
    """Best weights -> temperature on val -> the package -> test report (rank 0)."""

    cfg, source, model = engine.cfg, engine.source, engine.net
    model.load_state_dict(load_checkpoint(layout.checkpoints / "best.pt")["model"])
    val = source.val
    logits = predict_logits(model, val.pixels, val.rows, engine.spec, engine.device)
    y = torch.from_numpy(val.labels)
    temperature = fit_temperature(logits, y) if len(val) else 1.0
    probs = torch.softmax(logits / temperature, 1).numpy()
    val_metrics = compute_metrics(val.labels, probs, engine.classes, bootstrap=0) if len(val) else {}
    # the decision rules (medpipe.decision) are chosen on the validation split too
    rules = fit_rules(probs, val.labels, engine.classes, default=cfg.decision_rule) if len(val) else None
    tta_calibration = None
    if cfg.tta and len(val):  # flip TTA changes the logits: it gets a temperature and decision offsets of its own
        tta_logits = predict_logits(model, val.pixels, val.rows, engine.spec, engine.device, tta=True)
        t_tta = fit_temperature(tta_logits, y)
        tta_calibration = {"temperature": t_tta, "decision": fit_rules(
            torch.softmax(tta_logits / t_tta, 1).numpy(), val.labels, engine.classes, default=cfg.decision_rule)}
    metrics = {"best_epoch": engine.state.best_epoch, "val": _compact(val_metrics) if val_metrics else {}}
    meta = save_package(layout.model, model.cpu(), name=f"{cfg.model}-ham", arch=cfg.model, classes=engine.classes,
                        spec=engine.spec, temperature=temperature, metrics=metrics, config=cfg.to_dict(),
                        records_sha256=source.records_sha256, decision=rules, tta_calibration=tta_calibration)
    out = {"model_dir": str(layout.model), "temperature": temperature, "val": metrics["val"]}
    if evaluate_test:
        t = source.test
        result = evaluate_arrays(Predictor(layout.model), t.pixels, t.rows, t.labels, t.ids, t.names, layout.report,
                                 split="test", tta=cfg.tta, bootstrap=cfg.bootstrap)
        metrics["test"] = _compact(result["metrics"])
        update_meta(meta, metrics=metrics)
        out.update(test=metrics["test"], report=result["report_md"], plots=result["plots"])
    return out
