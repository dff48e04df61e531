"""Experiment tracking with MLflow, as a handler of the training engine's events (the ``track`` extra).

    medpipe train --data DATA --out runs/r1 --track             # embedded: sqlite:///runs/mlflow.db
    medpipe train --data DATA --out runs/r2 --track http://127.0.0.1:5000 --experiment ham --register ham-densenet
    MLFLOW_TRACKING_URI=http://... medpipe train ... --track      # the environment's server
    mlflow ui --backend-store-uri sqlite:///runs/mlflow.db         # every run, in a browser
    medpipe runs --track sqlite:///runs/mlflow.db [--plot val_auc.png]   # runs with key metrics, best first

What is logged (rank 0 only, so a torchrun job is one MLflow run): the resolved config as params;
dataset identity (record-table hash, class counts, split seed and sizes) as params; every epoch's
metrics with the epoch as step (train/val loss, val macro and per-class AUC, balanced accuracy, lr,
images/s, epoch time, and the resource figures of train.handlers.ResourceMetrics: ``gpu_memory_gb`` on
CUDA...); the best epoch; the test report (JSON, markdown, plots) and the run's config/metrics files as
artifacts; the git commit of the code when it is a checkout; the
outcome as run status (FINISHED, FAILED with the reason, KILLED on SIGTERM/SIGINT). The model package is
logged as an MLflow pyfunc model (:mod:`medpipe.mlflow_model`, models-from-code: no pickle) that carries
``weights.safetensors`` + ``model.json`` unchanged and checks their hash on load; ``--register NAME``
registers it.

A team shares one ``mlflow server`` (a PostgreSQL backend store, an S3-compatible artifact store behind the
server's artifact proxy: the training machines need its URL only; guide: "Beyond one machine"). Any number of
training processes log to it at once; processes starting together create a new experiment once (the one that
loses the race uses the winner's), and registering the same ``--register`` name from several runs at once
gives each its own version.

Tracking never breaks training: the first failed call (server unreachable) logs one warning; from then
on calls are kept in order and retried when training has finished (a few attempts over about
``RETRY_SECONDS``). If the server is still away the MLflow run stays as the server last saw it
(RUNNING) and a second warning says how many records were not delivered.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import medpipe
from medpipe.errors import ConfigError
from medpipe.package import META, WEIGHTS, read_meta
from medpipe.train.engine import Engine, Events, TrainingInterrupted
from medpipe.utils import atomic_write_text, sha256_file, versions

log = logging.getLogger(__name__)
DB_NAME = "mlflow.db"
RETRY_SECONDS = 60.0
RUN_FILE = "mlflow_run.json"


def require_mlflow():
    try:
        import mlflow
    except ImportError:
        raise ConfigError("--track needs MLflow, which is not installed: pip install 'medpipe-imaging[track]'") from None
    return mlflow


def resolve_uri(track: str | None, run_dir: str | Path) -> str:
    """``auto`` (``--track`` without a value): $MLFLOW_TRACKING_URI, else a SQLite store in the run's parent
    folder. Anything else is an MLflow tracking URI (http(s)://, sqlite:///, file:, a SageMaker ARN with
    the sagemaker-mlflow plugin)."""
    if track in (None, "", "auto"):
        env = os.environ.get("MLFLOW_TRACKING_URI")
        return env or f"sqlite:///{Path(run_dir).resolve().parent / DB_NAME}"
    return str(track)


def git_commit() -> str | None:
    """The commit of the medpipe source when it runs from a git checkout."""
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                           timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


class Tracker:
    """One MLflow run through ``MlflowClient``; every call goes through :meth:`call`, which keeps calls in order
    while the server is unreachable and retries them in :meth:`flush`."""

    def __init__(self, uri: str, experiment: str):
        mlflow = require_mlflow()
        from mlflow.tracking import MlflowClient

        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast; we retry at the end
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.mlflow, self.uri, self.experiment = mlflow, uri, experiment
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id: str | None = None
        self.pending: list = []
        self.warned = False

    def call(self, fn, *args, **kwargs) -> None:
        if self.pending:  # keep order: once something waits, everything after it waits too
            self.pending.append((fn, args, kwargs))
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking must never end training
            self.pending.append((fn, args, kwargs))
            if not self.warned:
                from mlflow.exceptions import RestException

                self.warned = True
                what = "answered with an error" if isinstance(exc, RestException) else "is not answering"
                log.warning("tracking: %s %s (%s: %s); training continues, tracking records are kept and sent again "
                            "at the end", self.uri, what, exc.__class__.__name__, str(exc).splitlines()[0][:200])

    def flush(self, seconds: float = RETRY_SECONDS) -> bool:
        """Send what waits; retry with backoff for up to ``seconds``. True when nothing is left."""
        deadline, delay = time.monotonic() + seconds, 1.0
        while self.pending:
            fn, args, kwargs = self.pending[0]
            try:
                fn(*args, **kwargs)
                self.pending.pop(0)
            except Exception as exc:  # noqa: BLE001
                if time.monotonic() + delay > deadline:
                    log.warning("tracking: %d records could not be sent to %s (%s); the MLflow run stays incomplete",
                                len(self.pending), self.uri, exc.__class__.__name__)
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        return True

    # the run ------------------------------------------------------------------------------------------------

    def start(self, name: str, run_id: str | None = None) -> None:
        def create():
            if self.run_id is not None:
                return
            if run_id is not None:  # a resumed run: the same MLflow run goes on
                self.client.update_run(run_id, status="RUNNING")
                if "failure_reason" in self.client.get_run(run_id).data.tags:
                    self.client.delete_tag(run_id, "failure_reason")
                self.run_id = run_id
                return
            self.run_id = self.client.create_run(self._experiment_id(), run_name=name).info.run_id

        self.call(create)

    def _experiment_id(self) -> str:
        """The experiment's id, creating it when it does not exist. Processes starting together on a shared
        server race to create it: the loser (RESOURCE_ALREADY_EXISTS) reads the winner's."""
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(self.experiment, self._artifact_location())
        except MlflowException as exc:
            exp = self.client.get_experiment_by_name(self.experiment)
            if exc.error_code != "RESOURCE_ALREADY_EXISTS" or exp is None:
                raise
            return exp.experiment_id

    def _artifact_location(self) -> str | None:
        """A SQLite store keeps its artifacts beside it (``mlartifacts/``), not under the current folder."""
        if self.uri.startswith("sqlite:///"):
            return (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
        return None  # a server decides (--artifacts-destination)

    def params(self, values: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in values.items()]
        for i in range(0, len(items), 100):
            self.call(lambda chunk=items[i:i + 100]: self.client.log_batch(self.run_id, params=chunk))

    def tags(self, values: dict) -> None:
        from mlflow.entities import RunTag

        self.call(lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in values.items()]))

    def metrics(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in values.items() if isinstance(v, (int, float))]
        self.call(lambda: self.client.log_batch(self.run_id, metrics=items))

    def artifacts(self, folder: Path, path: str) -> None:
        if Path(folder).is_dir():
            self.call(lambda: self.client.log_artifacts(self.run_id, str(folder), path))

    def end(self, status: str, reason: str | None = None) -> None:
        if reason:
            self.tags({"failure_reason": reason[:4000]})
        self.call(lambda: self.client.set_terminated(self.run_id, status=status))


class MLflowHandler:
    """Engine handler: the run's params, dataset identity and per-epoch metrics; :meth:`finish` adds the
    report, the model and the outcome once the pipeline has packaged it."""

    def __init__(self, uri: str, experiment: str = "medpipe", register: str | None = None,
                 run_dir: Path | None = None):
        self.uri, self.experiment, self.register, self.run_dir = uri, experiment, register, run_dir
        self.tracker: Tracker | None = None
        require_mlflow()

    def attach(self, engine: Engine) -> None:
        if not engine.dd.main:
            return  # one MLflow run per job: rank 0 logs
        engine.on(Events.STARTED, self.started)
        engine.on(Events.VALIDATION_COMPLETED, self.epoch)
        engine.on(Events.BEST_IMPROVED, self.best)
        engine.on(Events.EXCEPTION_RAISED, self.failed)

    def started(self, engine: Engine) -> None:
        t = self.tracker = Tracker(self.uri, self.experiment)
        previous = self._previous_run()
        t.start(self.run_dir.name if self.run_dir else "medpipe", run_id=previous)
        if previous is None:
            cfg, src = engine.cfg, engine.source
            t.params(cfg.to_dict())
            identity = {"data.records_sha256": src.records_sha256, "data.classes": ",".join(src.classes),
                        "data.class_counts_train": json.dumps(dict(zip(src.classes, map(int, src.class_counts)))),
                        "data.split_seed": cfg.split_seed, "data.n_val": len(src.val), "data.n_test": len(src.test),
                        "data.n_train": int(sum(src.class_counts)), "data.streamed": src.streamed,
                        "world_size": engine.dd.world}
            t.params(identity)
            commit = git_commit()
            t.tags({"mlflow.source.git.commit": commit} if commit else {"git_commit": "unknown"})
        t.call(self._remember)

    def _previous_run(self) -> str | None:
        """A resumed run continues its MLflow run (same store)."""
        f = self.run_dir / RUN_FILE if self.run_dir else None
        if f and f.is_file():
            saved = json.loads(f.read_text())
            if saved.get("uri") == self.uri:
                return saved.get("run_id")
        return None

    def _remember(self) -> None:
        if self.run_dir and self.tracker.run_id:
            atomic_write_text(self.run_dir / RUN_FILE, json.dumps({"uri": self.uri, "run_id": self.tracker.run_id}))

    def epoch(self, engine: Engine) -> None:
        m = dict(engine.state.metrics)
        per_class = m.pop("val_auc_per_class", {}) or {}
        m.update({f"val_auc_{c}": v for c, v in per_class.items()})
        # the epoch's resource figures (gpu_memory_gb on CUDA...) are in m already: train.handlers.ResourceMetrics
        self.tracker.metrics({k: v for k, v in m.items() if k != "epoch"}, step=int(m["epoch"]))

    def best(self, engine: Engine) -> None:
        self.tracker.metrics({"best_epoch": engine.state.best_epoch,
                              f"best_{engine.cfg.monitor}": engine.sign * engine.state.best_metric},
                             step=engine.state.best_epoch)

    def failed(self, engine: Engine) -> None:
        if self.tracker is None:
            return
        exc = engine.state.exception
        killed = isinstance(exc, (TrainingInterrupted, KeyboardInterrupt))
        if not killed:  # the failure as a metric event at its step (the reason: the failure_reason tag)
            self.tracker.metrics({"training_failed": 1}, step=int(engine.state.iteration))
        self.tracker.end("KILLED" if killed else "FAILED", f"{exc.__class__.__name__}: {exc}")
        self.tracker.flush(seconds=10)

    def finish(self, result: dict, run_dir: Path, report_dir: Path) -> None:
        """After packaging (rank 0): test metrics, report and run files, the pyfunc model, FINISHED."""
        t = self.tracker
        if t is None:
            return
        if result.get("test"):
            t.metrics({f"test_{k}": v for k, v in result["test"].items() if isinstance(v, (int, float))}, step=0)
        t.artifacts(report_dir, "report")
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("config.yaml", "metrics.jsonl", "splits.json", "shards_index.json", "distributed.json"):
                if (run_dir / name).is_file():
                    shutil.copy(run_dir / name, tmp)
            t.artifacts(Path(tmp), "run")
            t.flush(seconds=RETRY_SECONDS)  # the temp folder must still exist while the upload waits
        if result.get("model_dir"):
            t.call(self._log_model, Path(result["model_dir"]))
        t.end("FINISHED")
        t.flush(seconds=RETRY_SECONDS)

    def _log_model(self, model_dir: Path) -> None:
        mlflow = self.tracker.mlflow
        with tracking_uri(self.uri), mlflow.start_run(run_id=self.tracker.run_id):
            log_package(model_dir, registered_model_name=self.register or None)
            # start_run(run_id=...) ends the run FINISHED on exit; the tracker's own end() follows


@contextlib.contextmanager
def tracking_uri(uri: str):
    """MLflow's fluent API (``log_model``) with ``uri`` as its tracking URI, for the block only.
    ``mlflow.set_tracking_uri`` changes the process: it also writes $MLFLOW_TRACKING_URI (which later
    ``--track`` runs and child processes follow); both are put back as they were, set or not."""
    from mlflow.tracking._tracking_service import utils  # the process-wide URI set_tracking_uri keeps

    mlflow = require_mlflow()
    before, env = getattr(utils, "_tracking_uri", None), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None also unsets $MLFLOW_TRACKING_URI
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def log_package(model_dir: str | Path, *, name: str = "model", registered_model_name: str | None = None):
    """Log a medpipe package to the active MLflow run as a pyfunc model (:mod:`medpipe.mlflow_model`): the
    package files unchanged, their sha256 in the model config, a signature, an input example, and the medpipe
    source (code_paths) so the model loads where medpipe is not installed."""
    import io

    import mlflow
    import numpy as np
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from PIL import Image

    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(buf, format="PNG")
    extra = [ColSpec("double" if f == "age" else "string", f, required=False) for f in meta.metadata.fields] \
        if meta.metadata is not None else []  # patient metadata beside the image (medpipe.data.metadata)
    signature = ModelSignature(inputs=Schema([ColSpec("binary", "image"), *extra]),
                               outputs=Schema([ColSpec("string", "label"),
                                               *[ColSpec("double", c) for c in meta.classes]]))
    v = versions()
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "package"
        pkg.mkdir()
        for f in (WEIGHTS, META):
            shutil.copy2(model_dir / f, pkg / f)
        return mlflow.pyfunc.log_model(
            name=name, python_model=str(Path(medpipe.__file__).parent / "mlflow_model.py"),
            artifacts={"package": str(pkg)},
            model_config={"sha256": {f: sha256_file(pkg / f) for f in (WEIGHTS, META)}},
            code_paths=[str(Path(medpipe.__file__).parent)], signature=signature,
            input_example=pd.DataFrame({"image": [buf.getvalue()]}), registered_model_name=registered_model_name,
            pip_requirements=[f"torch=={v['torch']}", f"monai=={v['monai']}", "numpy", "pillow", "pandas",
                              "safetensors", "pyyaml", "scikit-learn", "matplotlib", "tqdm"])


def list_runs(uri: str, experiment: str = "medpipe", metric: str = "best_val_auc", plot: str | None = None) -> list[dict]:
    """Runs of ``experiment`` with their key metrics, best first (by ``metric``); optionally a plot of val AUC
    per epoch for them."""
    require_mlflow()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"no experiment {experiment!r} in {uri}")
    runs = client.search_runs([exp.experiment_id], order_by=[f"metrics.{metric} DESC"], max_results=1000)
    rows = [{"run_id": r.info.run_id, "name": r.info.run_name, "status": r.info.status,
             **{k: r.data.metrics.get(k) for k in (metric, "best_epoch", "test_macro_auc", "test_balanced_accuracy")}}
            for r in runs]
    if plot and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for r in rows[:20]:
            hist = sorted(client.get_metric_history(r["run_id"], "val_auc"), key=lambda m: m.step)
            ax.plot([m.step for m in hist], [m.value for m in hist], marker="o", label=r["name"])
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation macro AUC")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        plt.close(fig)
    return rows
