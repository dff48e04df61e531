"""Hyperparameter search with Optuna (``tune`` extra): the counterpart of SageMaker Automatic Model Tuning.

    medpipe tune --data DATA --out STUDY --space space.yaml [--trials 20]
    medpipe tune --data DATA --out STUDY --space space.yaml --processes 2   # two worker processes, one study
    medpipe train --data DATA --out RUN --config STUDY/best_config.yaml   # train the winner
    # one study on several machines: the same command on each, sharing a PostgreSQL database
    medpipe tune --data DATA --out STUDY --space space.yaml --storage postgresql://optuna@db-host:5432/ham

The search space is YAML (``yaml.safe_load``; read and checked by :mod:`medpipe.tune_space`)::

    objective: val_auc          # val_auc | val_bacc | val_loss: the validation metric to optimise
    trials: 20                  # finished (complete or pruned) trials the study should hold
    base:                       # fixed training options for every trial (any `medpipe train` config key)
      epochs: 12
      image_size: 64
    params:                     # searched options: `choices` (categorical) or `low`/`high` [`log`, `step`]
      lr: {low: 3.0e-4, high: 3.0e-3, log: true}
      label_smoothing: {low: 0.0, high: 0.15}
      imbalance: {choices: [sampler, weighted_loss]}
    pruner: {type: median, startup_trials: 3, warmup_epochs: 2}   # median | percentile | threshold | none
    sampler: {type: tpe, seed: 0}                                 # tpe | random

``params`` may not search the split (``split_seed``, ``val_fraction``, ``test_fraction``: every trial must be
measured on the same validation images), ``monitor`` (it is the objective) or how a run is executed
(``device``, ``workers``, ``threads``, ...); the training ``seed`` may be searched (run-to-run noise).

How it works:

- The study lives in ``STUDY/study.db`` (SQLite, embedded: no server) unless ``--storage URL`` names
  another database (any SQLAlchemy URL Optuna's RDB storage takes: ``postgresql://USER@HOST:PORT/DB`` for a
  study shared by machines; the password from ``PGPASSWORD`` or ``~/.pgpass``, never printed). Running the
  command again continues the same study until it holds ``trials`` finished trials; several processes
  (``--processes``, the same command started in other shells, or on other machines with the same
  ``--storage``) share it, each asking Optuna for the next trial. Processes on several machines share
  nothing but the storage: each writes its trials' run folders under its own ``--out``, and the trial's
  ``host`` and ``run_dir`` attributes (in ``trials.csv``) say where a trial's run is. (Optuna's
  JournalStorage on a shared file system is not offered: it has no heartbeats, so a killed trial would
  never be retried.)
- Each trial is a real ``medpipe train`` run in ``STUDY/trials/trial-N`` (same pipeline, test split not
  evaluated: the search sees validation figures only). Its ``monitor`` is the objective; the trial's value
  is the objective at its best epoch.
- Pruning: a handler on the engine's ``VALIDATION_COMPLETED`` event reports each epoch's objective to
  the trial and stops the run when the pruner says so.
- Each process's sampler seed comes from the space's ``seed``, the process's worker index and the number of
  trials already in the study: a fresh single-process study replays from the seed, while parallel processes
  and a continued study draw new parameters (not trial 0's again); a shell (or machine) that joins a study
  another one created also mixes in a random number, so two that join at the same moment, seeing the same
  number of trials, do not draw the same parameters.
- SIGTERM or SIGINT (Ctrl-C) stops the command like ``medpipe train`` (exit 143): a running trial saves its
  ``checkpoints/last.pt`` and is queued again with the same parameters, so running the same command again
  continues it in the same run folder; no new trial starts after the signal. With ``--processes`` the parent
  passes the signal on to its worker processes and waits for them.
- With ``--processes N`` each worker gets ``cores // N`` threads (OMP and torch); a ``threads`` in ``base`` is
  capped to that share.
- A process killed mid-trial (SIGKILL, a lost machine) stops its heartbeat; once the grace period has
  passed, the next trial start in any process marks that trial failed and queues it again with the same
  parameters (``RetryHeartbeatStaleTrialCallback``); the state change is atomic in the storage, so exactly
  one process retries it. The retry continues the killed run from its ``checkpoints/last.pt`` when it runs
  where that folder is (the run folder is keyed by the original trial number), else it trains from the start.
  A process whose study holds enough trials waits while trials of other processes still run: a trial of a
  process killed in the last round is retried there, not left "running", and every process writes the
  results of the finished study.
- The best trial's configuration (``base`` + its parameters) is written to ``STUDY/best_config.yaml``,
  which ``medpipe train --config`` accepts, and every trial to ``STUDY/trials.csv``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from medpipe.errors import ConfigError, MedpipeError, TrainingInterrupted, TuneError
from medpipe.tune_space import (Param, Space, load_space, make_pruner, make_sampler,  # noqa: F401 (API)
                                 open_storage, sampler_seed, shown_url)
from medpipe.tune_space import require_optuna as _optuna
from medpipe.utils import atomic_write_text, frame_csv

log = logging.getLogger(__name__)

STUDY_DB = "study.db"
STORAGE_ENV = "MEDPIPE_TUNE_STORAGE"  # how a --processes child gets --storage (not on its command line)
BEST_CONFIG = "best_config.yaml"
TRIALS_CSV = "trials.csv"


# --------------------------------------------------------------------------- pruning handler


class PruningHandler:
    """Engine handler: report each epoch's objective to the Optuna trial, stop the run when it is pruned.

    Args:
        trial: the ``optuna.Trial`` of this run.
        objective: the metric reported (``val_auc``, ``val_bacc`` or ``val_loss``).
        first_epoch: unused (the epoch reported is the metrics record's own ``epoch``, which counts the
            epochs before a resume too)."""

    def __init__(self, trial, objective: str, first_epoch: int = 0):
        self.trial, self.objective, self.first_epoch = trial, objective, first_epoch

    def attach(self, engine) -> None:
        from medpipe.train.engine import Events  # deferred: torch (tune's parser is built for medpipe --help)

        engine.on(Events.VALIDATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        optuna = _optuna()
        m = engine.state.metrics
        value, epoch = m.get(self.objective), int(m.get("epoch", engine.state.epoch))
        if value is None or not math.isfinite(value):
            return
        self.trial.report(float(value), epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch}: {self.objective}={value:.4f}")


# --------------------------------------------------------------------------- signals


class StopOnSignal:
    """SIGTERM/SIGINT while a study runs: no new trial starts, the command ends with TrainingInterrupted.

    Inside a training run the run's own handler (``GracefulStop``) saves ``last.pt`` and raises
    TrainingInterrupted; ``run_trial`` notes the trial (``tune`` queues it again). Outside a run (between
    trials, while Optuna asks for one, while a run is being set up) this handler notes the signal. As an engine
    handler it chains itself to the run's handler at the first step (so a signal that the run's handler takes
    after its last step still stops the study) and stops a run whose signal came before training started."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self.trial: int | None = None  # the trial interrupted mid-run
        self.message = ""
        self._old: dict = {}
        self._chained = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            print(f"{signal.Signals(signum).name} received: no new trial starts", file=sys.stderr, flush=True)
        self.received = self.received or signal.Signals(signum).name

    def interrupted(self, number: int, exc: TrainingInterrupted) -> None:
        import re

        self.trial, self.message = number, str(exc)
        if self.received is None:
            name = re.match(r"stopped by (SIG\w+)", str(exc))
            self.received = name.group(1) if name else "a signal"

    # engine handler (one per trial run)
    def attach(self, engine) -> None:
        from medpipe.train.engine import Events  # deferred: torch (tune's parser is built for medpipe --help)

        engine.on(Events.STARTED, self._started)
        engine.on(Events.ITERATION_STARTED, self._chain)

    def _started(self, engine) -> None:
        self._chained = False
        if self.received:
            raise TrainingInterrupted(f"stopped by {self.received} before the trial's training started")

    def _chain(self, engine) -> None:
        if self._chained or threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            run_handler = signal.getsignal(sig)
            if callable(run_handler) and run_handler != self._handle:
                def both(signum, frame, run_handler=run_handler):
                    self.received = self.received or signal.Signals(signum).name
                    run_handler(signum, frame)

                signal.signal(sig, both)  # the run's GracefulStop restores this handler when the run ends
        self._chained = True


def _requeue(study, number: int) -> None:
    """Queue an interrupted trial again with the same parameters, as RetryHeartbeatStaleTrialCallback does for a
    killed one (an interrupt is not added to ``retry_history``, which limits the retries of killed trials); the
    retry resumes ``trials/trial-N`` from its last.pt."""
    optuna = _optuna()
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    system_attrs = {"failed_trial": frozen.number, **frozen.system_attrs}  # a retry's retry keeps the original
    study.add_trial(optuna.create_trial(state=optuna.trial.TrialState.WAITING, params=frozen.params,
                                        distributions=frozen.distributions, system_attrs=system_attrs,
                                        user_attrs={k: v for k, v in frozen.user_attrs.items()
                                                    if k not in ("interrupted", "error")}))


class _NoMedpipeTraceback(logging.Filter):
    """Optuna logs a failed trial's exception with its traceback; a medpipe error's message says it all."""

    def filter(self, record) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], MedpipeError):
            record.exc_info = None
        return True


_NO_MEDPIPE_TRACEBACK = _NoMedpipeTraceback()  # one instance: adding it again is a no-op


# --------------------------------------------------------------------------- trials


def storage_url(storage: str | None, out: Path) -> str:
    """The study's storage URL: ``storage`` as given, else the SQLite file ``study.db`` in the study folder."""
    return storage or f"sqlite:///{(Path(out) / STUDY_DB).resolve()}"


def _study(out: Path, space: Space, heartbeat: int, grace: int, name: str, worker: int = 0,
           standalone: bool = False, storage: str | None = None):
    """Open (or create) the study in ``storage`` (default: ``out/study.db``). ``standalone``: a ``medpipe
    tune`` shell of its own (not one of ``--processes``' children): one that joins a study it did not create
    salts its sampler seed with a random number, or two shells (machines) joining at the same moment would
    draw the same parameters."""
    optuna = _optuna()
    url = storage_url(storage, out)
    storage = open_storage(url, heartbeat, grace)
    try:  # creating is atomic in the storage: of two shells starting together exactly one creates the study
        study = optuna.create_study(study_name=name, storage=storage, direction=space.direction,
                                    sampler=make_sampler(space.sampler), pruner=make_pruner(space.pruner))
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(space.sampler),
                                  pruner=make_pruner(space.pruner))
        created = False
    if study.direction.name.lower() != space.direction:
        raise TuneError(f"{shown_url(url)}: study {name!r} was created to {study.direction.name.lower()}; "
                        f"objective {space.objective} needs {space.direction} (use another --out or --study-name)")
    existing = len(study.get_trials(deepcopy=False))
    salt = int.from_bytes(os.urandom(4), "little") if standalone and not created else None
    study.sampler = make_sampler(space.sampler, worker, existing, salt)
    return study


def _finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _metrics_lines(run_dir: Path) -> list[dict]:
    import json

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "epoch" in rec:  # epoch lines, not events (a failure's reason)
            out.append(rec)
    return out


def _stop_when_done(target: int, stop: StopOnSignal | None = None):
    """Stop once the study holds ``target`` finished (complete or pruned) trials, or as many trials failed
    with an error (a space where every trial fails must not loop forever), or a signal came."""
    from optuna.trial import TrialState

    def callback(study, trial) -> None:
        errors = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if "error" in t.user_attrs]
        if _finished(study) >= target or len(errors) >= target or (stop is not None and stop.received):
            study.stop()

    return callback


def run_trial(trial, space: Space, data: str, out: Path, stop: StopOnSignal | None = None) -> float:
    """One trial: a real training run, pruned from its epoch metrics.

    A signal (``stop``) ends it with TrainingInterrupted after saving last.pt; ``tune`` queues it again. A
    retry of a killed trial resumes that trial's run folder.

    Args:
        trial: the ``optuna.Trial`` (its parameters are suggested from ``space``).
        space: the checked search space.
        data: the ingested data folder or shard set.
        out: the study folder (the run goes to ``trials/trial-N``).
        stop: the study's signal handler, chained to the run's.

    Returns:
        The objective at the trial's best epoch."""
    optuna = _optuna()
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from medpipe.pipeline import run  # deferred: torch

    stop = stop or StopOnSignal()
    values = {p.name: p.suggest(trial) for p in space.params}
    cfg = space.config(values)
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    original = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)  # a retry of a killed trial?
    number = trial.number if original is None else original
    run_dir = out / "trials" / f"trial-{number}"
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("host", socket.gethostname())
    resume = (run_dir / "checkpoints" / "last.pt").is_file()
    done = _metrics_lines(run_dir) if resume else []
    for rec in done:  # the killed attempt's epochs, so the pruner sees the whole curve
        if rec.get(space.objective) is not None and math.isfinite(rec[space.objective]):
            trial.report(float(rec[space.objective]), int(rec["epoch"]))
    print(f"trial {trial.number}: {values}" + (f" (retry of trial {original}, resuming {run_dir})" if resume else ""),
          flush=True)
    try:
        if stop.received:  # the signal came while Optuna was asking for this trial
            raise TrainingInterrupted(f"stopped by {stop.received} before the trial's training started")
        run(data, run_dir, cfg, resume=resume, force=not resume and run_dir.exists(), evaluate_test=False,
            handlers=[PruningHandler(trial, space.objective), stop])
    except optuna.TrialPruned:
        raise
    except TrainingInterrupted as exc:  # not a failure of the trial: it is queued again (tune)
        trial.set_user_attr("interrupted", str(exc))
        stop.interrupted(trial.number, exc)
        raise
    except MedpipeError as exc:  # a bad corner of the space (e.g. NaN loss): this trial fails, the study goes on
        trial.set_user_attr("error", str(exc))
        raise
    history = [r[space.objective] for r in _metrics_lines(run_dir)
               if r.get(space.objective) is not None and math.isfinite(r[space.objective])]
    if not history:
        raise TuneError(f"trial {trial.number}: no finite {space.objective} in {run_dir / 'metrics.jsonl'}")
    return min(history) if space.direction == "minimize" else max(history)


def write_results(study, space: Space, out: Path, storage: str | None = None) -> dict:
    """best_config.yaml (base + the best trial's parameters, a `medpipe train --config` file) and trials.csv.

    Args:
        study: the ``optuna.Study``.
        space: its search space.
        out: the study folder, written to.
        storage: the study's storage URL (None: ``out/study.db``), named in the results.

    Returns:
        The summary: study, trials, finished, complete, objective, best_config (None without a complete
        trial), and best_trial, best_value, best_params when there is one."""
    from optuna.trial import TrialState

    df = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration"))
    atomic_write_text(out / TRIALS_CSV, frame_csv(df, neutralise=True))  # opened in spreadsheets: formula guard
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    where = shown_url(storage) if storage else str(out / STUDY_DB)
    summary = {"study": where, "trials": len(study.trials), "finished": _finished(study),
               "complete": len(complete), "objective": space.objective, "best_config": None}
    if complete:
        best = study.best_trial
        cfg = space.config(best.params).to_dict()
        cfg = {k: v for k, v in cfg.items() if k in space.base or k in best.params or k == "monitor"}
        text = (f"# medpipe tune: best of {len(complete)} complete trials in {where}\n"
                f"# trial {best.number}: {space.objective} = {best.value:.6f} (validation split, best epoch)\n"
                + yaml.safe_dump(cfg, sort_keys=True))
        atomic_write_text(out / BEST_CONFIG, text)
        summary.update(best_config=str(out / BEST_CONFIG), best_trial=best.number, best_value=best.value,
                       best_params=best.params)
    return summary


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def tune(data: str, out: str | Path, space_path: str | Path, *, trials: int | None = None, processes: int = 1,
         study_name: str = "medpipe", heartbeat: int = 30, grace: int = 90, worker: int | None = None,
         threads: int | None = None, storage: str | None = None) -> dict:
    """Run (or continue) the study until it holds ``trials`` finished trials.

    A signal ends it with :class:`TrainingInterrupted` once the running trial is saved and queued again.

    Args:
        data: the ingested data folder or shard set.
        out: the study folder (``study.db``, ``trials/``, results).
        space_path: the search-space YAML.
        trials: finished trials the study should hold (default: the space's ``trials``).
        processes: worker processes sharing the study (this command started again as children).
        study_name: the study's name in ``study.db``.
        heartbeat: seconds between a running trial's heartbeats.
        grace: seconds without a heartbeat after which a trial counts as killed and is retried.
        worker: the index of one of the ``processes`` children (the parent writes the results and judges them).
        threads: a child's share of the cores, which caps the space's ``threads``.
        storage: the study's database URL (default: ``out/study.db``; a ``--processes`` child reads it from
            ``$MEDPIPE_TUNE_STORAGE``, which keeps a password off its command line).

    Returns:
        The summary of :func:`write_results` (``{}`` in a worker process).

    Raises:
        TuneError: a worker process failed, no trial completed, or the storage cannot be reached."""
    optuna = _optuna()
    space = load_space(space_path)
    if trials is not None:
        space.trials = int(trials)
    if grace <= heartbeat:
        raise ConfigError(f"--grace ({grace}s) must be longer than --heartbeat ({heartbeat}s)")
    if threads:
        given = int(space.base.get("threads") or 0)
        space.base["threads"] = threads if given == 0 else min(given, threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if worker is not None and storage is None:
        storage = os.environ.get(STORAGE_ENV) or None
    # created once, before any worker starts
    study = _study(out, space, heartbeat, grace, study_name, worker=worker or 0, standalone=worker is None,
                   storage=storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna.study._optimize").addFilter(_NO_MEDPIPE_TRACEBACK)
    if processes > 1:  # more workers on the same study: this same command as child processes
        _run_workers(data, out, space, space_path, processes, study_name, heartbeat, grace, storage)
    elif _finished(study) < space.trials:
        _optimize(study, space, data, out, storage, heartbeat)
    if worker is not None:
        return {}
    summary = write_results(study, space, out, storage)
    if not summary["complete"]:
        raise TuneError(f"no trial of {summary['study']} completed ({summary['finished']} finished, the rest "
                        f"pruned or failed; see {out / TRIALS_CSV}); nothing to write to {BEST_CONFIG}")
    return summary


def _run_workers(data, out: Path, space: Space, space_path, processes: int, study_name: str, heartbeat: int,
                 grace: int, storage: str | None = None) -> None:
    """``processes`` children running this command on the same study, each with its share of the cores; a
    signal to this process is passed on to them."""
    share = max(1, _cores() // processes)
    given = int(space.base.get("threads") or 0)
    log.info("tune: %d processes with %d thread(s) each%s", processes, share,
             f" (the space's threads: {given} capped to {share})" if given > share else "")
    cmd = [sys.executable, "-m", "medpipe", "tune", "--data", str(data), "--out", str(out), "--space",
           str(space_path), "--trials", str(space.trials), "--study-name", study_name,
           "--heartbeat", str(heartbeat), "--grace", str(grace), "--worker-threads", str(share), "--worker"]
    env = {k: v for k, v in os.environ.items() if k != STORAGE_ENV}
    env.update({"OMP_NUM_THREADS": str(share), **({STORAGE_ENV: storage} if storage else {})})
    children: list[subprocess.Popen] = []
    received: list[str] = []

    def forward(signum, frame):  # a signal to the parent stops the workers (each saves and requeues its trial)
        received.append(signal.Signals(signum).name)
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)

    old = {sig: signal.signal(sig, forward) for sig in StopOnSignal.SIGNALS}
    try:
        for i in range(processes):
            if not received:
                children.append(subprocess.Popen([*cmd, str(i)], env=env))
        codes = [c.wait() for c in children]
    finally:
        for c in children:
            if c.poll() is None:
                c.terminate()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if received:
        raise TrainingInterrupted(f"stopped by {received[0]}: the {len(children)} tune processes stopped "
                                  f"(exit {codes}); the trials they were running are queued again with their "
                                  "parameters and continue from their last.pt: run the same command to continue")
    if any(codes):
        raise TuneError(f"{sum(1 for c in codes if c)} of {processes} tune processes failed (exit {codes})")


def _settle(study, stop: StopOnSignal, interval: float, run_one) -> None:
    """Once the study holds enough trials: wait while trials of other processes run, so that a trial whose
    process was killed in the last round is retried (by ``run_one``, once its heartbeat is stale) instead of
    staying "running" for ever, and the results this process writes are those of the finished study."""
    import warnings

    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    said = False
    while not stop.received:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=ExperimentalWarning)
            fail_stale_trials(study)  # a stale trial: FAIL, and queued again (WAITING) with its parameters
        states = [t.state for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))]
        if TrialState.WAITING in states:
            run_one()
        elif not states:
            return
        else:
            if not said:
                print(f"tune: enough trials; waiting for {len(states)} still running in other processes (one whose "
                      "process was killed is retried once its heartbeat is older than --grace)", flush=True)
                said = True
            time.sleep(interval)


def _optimize(study, space: Space, data, out: Path, storage: str | None = None, heartbeat: float = 30) -> None:
    """Trials in this process until the study holds enough, then :func:`_settle`; a signal queues the running
    trial again."""
    import sqlalchemy.exc

    optuna = _optuna()
    where = shown_url(storage_url(storage, out))
    with StopOnSignal() as stop:
        def trials(n: int | None) -> None:
            study.optimize(lambda t: run_trial(t, space, str(data), out, stop), n_trials=n,
                           callbacks=[_stop_when_done(space.trials, stop)], catch=(MedpipeError,),
                           gc_after_trial=True)

        try:
            trials(None)
            _settle(study, stop, heartbeat, lambda: trials(1))
        except (sqlalchemy.exc.OperationalError, optuna.exceptions.StorageInternalError) as exc:
            # the database went away mid-study (Optuna wraps what fails in a commit, SQLAlchemy's error as cause)
            cause = exc.__cause__ if isinstance(exc.__cause__, sqlalchemy.exc.DBAPIError) else exc
            reason = str(getattr(cause, "orig", None) or cause).strip().splitlines()[0]
            raise TuneError(f"lost the study storage {where} ({reason}); once it is back, run the same command to "
                            f"continue: a trial left running is retried once its last heartbeat is older "
                            "than --grace") from None
    if stop.received and (stop.trial is not None or _finished(study) < space.trials):
        if stop.trial is not None:
            _requeue(study, stop.trial)
            raise TrainingInterrupted(f"{stop.message.split('; continue with')[0]}; trial {stop.trial} is queued "
                                      f"again with the same parameters and run folder: run the same command to "
                                      f"continue it (study {where})")
        raise TrainingInterrupted(f"stopped by {stop.received} between trials; run the same command to "
                                  f"continue the study {where}")


def add_parser(sub) -> None:
    """Add the ``tune`` subcommand to the ``medpipe`` parser.

    Args:
        sub: the parser's subparsers (``add_subparsers()``)."""
    s = sub.add_parser("tune", help="hyperparameter search with Optuna (resumable study, pruning, several machines)",
                       description=__doc__.split("\n\n")[0])
    s.add_argument("--data", required=True, help="ingested data folder or shard set (as for train)")
    s.add_argument("--out", required=True, help="study folder: study.db, trials/, best_config.yaml, trials.csv")
    s.add_argument("--space", required=True, help="search space YAML (see `medpipe.tune`)")
    s.add_argument("--trials", type=int, help="finished trials the study should hold (overrides the YAML)")
    s.add_argument("--processes", type=int, default=1, help="worker processes sharing the study (default 1)")
    s.add_argument("--study-name", default="medpipe", help="Optuna study name in the storage")
    s.add_argument("--storage", metavar="URL",
                   help="database holding the study (default: sqlite:///STUDY/study.db); postgresql://USER@HOST:PORT/DB "
                        "for one study shared by processes on several machines (password: PGPASSWORD or ~/.pgpass)")
    s.add_argument("--heartbeat", type=int, default=30, help="seconds between a running trial's heartbeats")
    s.add_argument("--grace", type=int, default=90,
                   help="seconds without a heartbeat after which a trial counts as killed and is retried")
    s.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # the index of a child of --processes
    s.add_argument("--worker-threads", type=int, help=argparse.SUPPRESS)  # its share of the cores
    s.set_defaults(func=cmd_tune)


def cmd_tune(args) -> int:
    """``medpipe tune``: run the study and print the best trial and how to train it.

    Args:
        args: the parsed ``tune`` arguments.

    Returns:
        The exit status, 0."""
    t0 = time.perf_counter()
    s = tune(args.data, args.out, args.space, trials=args.trials, processes=args.processes,
             study_name=args.study_name, heartbeat=args.heartbeat, grace=args.grace, worker=args.worker,
             threads=args.worker_threads, storage=args.storage)
    if args.worker is not None:
        return 0
    print(f"tune: {s['finished']} finished trials ({s['complete']} complete) in {s['study']}; "
          f"{time.perf_counter() - t0:.0f} s")
    if s.get("best_config"):
        print(f"best: trial {s['best_trial']} {s['objective']}={s['best_value']:.4f} {s['best_params']}")
        print(f"train it: medpipe train --data {args.data} --out RUN --config {s['best_config']}")
    return 0
