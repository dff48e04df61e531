"""The engine's standard handlers: checkpoints, early stopping, the epoch line, metrics.jsonl, resource
metrics, the progress bar, SIGTERM/SIGINT and the time budget. Each is a small object with ``attach(engine)``; add your own the
same way (``engine.on(Events.X, fn)``). Each names its place among an event's handlers (:class:`Order`:
the time budget decides, the epoch line and metrics.jsonl record, the checkpoint saves, early stopping
reacts, the signal stop comes last), so they may be attached in any order. Only rank 0 writes files; every
rank runs the handlers (some take part in collective calls).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from medpipe.utils import atomic_write_text, to_json
from medpipe.train.engine import Engine, Events, Order, TrainingInterrupted
from medpipe.train.checkpoint import save_checkpoint
from medpipe.train.factories import rebuild_schedule


class Checkpointer:
    """``last.pt`` after every validated epoch (atomic), ``best.pt`` when the monitored metric improved;
    :meth:`save_last` also mid-epoch (a signal)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def attach(self, engine: Engine) -> None:
        engine.on(Events.VALIDATION_COMPLETED, self.epoch_end, Order.SAVE)

    def save_last(self, engine: Engine) -> Path:
        path = self.folder / "last.pt"
        if engine.dd.main:
            save_checkpoint(path, engine.snapshot())
            engine.state.checkpoint = str(path)
            engine.fire(Events.CHECKPOINT_SAVED)
        return path

    def epoch_end(self, engine: Engine) -> None:
        last = self.save_last(engine)
        if engine.dd.main and (engine.state.improved or not (self.folder / "best.pt").is_file()):
            tmp = self.folder / ".best.pt.tmp"
            shutil.copyfile(last, tmp)
            os.replace(tmp, self.folder / "best.pt")
            engine.state.checkpoint = str(self.folder / "best.pt")
            engine.fire(Events.CHECKPOINT_SAVED)
        engine.dd.barrier()


class EarlyStopping:
    """Stop once the monitored metric has not improved for ``patience`` epochs. Also checked when a run starts,
    so a run resumed from the checkpoint of the epoch that stopped it (a kill during packaging) stops again
    instead of training on."""

    def __init__(self, patience: int, monitor: str):
        self.patience, self.monitor = patience, monitor

    def attach(self, engine: Engine) -> None:
        engine.on(Events.STARTED, self)
        engine.on(Events.VALIDATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.stale >= self.patience:
            reason = f"early stopping: {self.monitor} has not improved for {engine.state.stale} epochs"
            engine.terminate(reason)
            if engine.dd.main:
                print(reason, flush=True)


class EpochLine:
    """One parseable line per epoch on stdout (rank 0); verbose (``medpipe -v``, the ``medpipe`` logger at DEBUG)
    it goes on with the epoch's resource figures (:class:`ResourceMetrics`)."""

    def attach(self, engine: Engine) -> None:
        engine.on(Events.VALIDATION_COMPLETED, self, Order.RECORD)

    def __call__(self, engine: Engine) -> None:
        if engine.dd.main:
            m = engine.state.metrics
            extra = ""
            if logging.getLogger("medpipe").isEnabledFor(logging.DEBUG):
                extra = "".join(f" {k}={m[k]:.{d}f}" for k, d in ResourceMetrics.LINE if m.get(k) is not None)
            print(f"epoch={m['epoch']} train_loss={m['train_loss']:.4f} val_loss={m['val_loss']:.4f} "
                  f"val_auc={m['val_auc']:.4f} val_bacc={m['val_bacc']:.4f} lr={m['lr']:.6g} "
                  f"images_per_s={m['images_per_s']:.1f}{extra}", flush=True)


class MetricsFile:
    """``metrics.jsonl``: one JSON line per validated epoch. At the start, lines for epochs the run has not
    (or no longer) completed are dropped, so an epoch is never there twice, also when a resume repeats an
    epoch whose checkpoint write failed. A run that fails (an exception, a non-finite loss; not a signal stop)
    appends an event line without ``epoch``: ``{"event": "failed", "error": CLASS, "reason": MESSAGE,
    "at_epoch": 1-based epoch running, "iteration": step, "time": ISO}``, as SageMaker reports a training error;
    resumes keep it."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def attach(self, engine: Engine) -> None:
        engine.on(Events.STARTED, self.start, Order.RECORD)
        engine.on(Events.VALIDATION_COMPLETED, self.append, Order.RECORD)
        engine.on(Events.EXCEPTION_RAISED, self.failed, Order.RECORD)

    def failed(self, engine: Engine) -> None:
        exc, s = engine.state.exception, engine.state
        if not engine.dd.main or exc is None or isinstance(exc, (TrainingInterrupted, KeyboardInterrupt)):
            return
        event = {"event": "failed", "error": exc.__class__.__name__, "reason": str(exc)[:2000],
                 "at_epoch": s.epoch + 1, "iteration": s.iteration,
                 "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            with open(self.path, "a") as fh:
                fh.write(to_json(event) + "\n")
        except OSError:  # the disk that failed the run may fail this too: the error itself still propagates
            pass

    def start(self, engine: Engine) -> None:
        if not engine.dd.main or not self.path.is_file():
            return

        lines = self.path.read_text().splitlines()
        keep = [x for x in lines if x.strip() and json.loads(x).get("epoch", 0) <= engine.state.epoch]
        if len(keep) != len(lines):
            atomic_write_text(self.path, "".join(x + "\n" for x in keep))

    def append(self, engine: Engine) -> None:
        if engine.dd.main:
            with open(self.path, "a") as fh:
                fh.write(to_json(engine.state.metrics) + "\n")


class ResourceMetrics:
    """Per epoch, over its training part, into the epoch's record before the epoch line, metrics.jsonl and
    MLflow take it (rank 0's figures; each rank measures its own):

    - ``rss_mb``: resident memory of this process and its data-loader worker processes at the epoch's end;
    - ``cpu_percent``: their CPU time over the wall time (100 = one core busy all the time);
    - ``data_wait_share``: share of the wall time spent waiting for the next batch (from the end of one
      step's handlers to the start of the next step): near 1, the loader starves the model;
    - ``disk_free_gb``: free space on the file system of the run folder (checkpoints go there);
    - on CUDA: ``gpu_memory_gb`` (peak allocated this epoch) and ``gpu_utilization`` (percent, NVML's
      sample through ``torch.cuda.utilization``, averaged over one call every :data:`GPU_EVERY` steps;
      absent without NVML).

    CPU and memory come from psutil (absent where it is not installed)."""

    LINE = (("rss_mb", 0), ("cpu_percent", 0), ("data_wait_share", 3), ("disk_free_gb", 1), ("gpu_memory_gb", 2),
            ("gpu_utilization", 0))
    GPU_EVERY = 20

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        try:
            import psutil

            self._proc = psutil.Process()
        except ImportError:
            self._proc = None
        self._t0 = self._last = 0.0
        self._wait, self._cpu0, self._gpu = 0.0, 0.0, []

    def attach(self, engine: Engine) -> None:
        engine.on(Events.EPOCH_STARTED, self.start, Order.RECORD)
        engine.on(Events.ITERATION_STARTED, self.batch_arrived, Order.MODEL)  # the wait ends with the batch
        engine.on(Events.ITERATION_COMPLETED, self.step_done, Order.STOP)  # and starts after the step's handlers
        engine.on(Events.EPOCH_COMPLETED, self.record, Order.RECORD)

    def _cpu_seconds(self) -> float:
        if self._proc is None:
            return 0.0
        total = 0.0
        for p in [self._proc, *self._proc.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except Exception:  # noqa: BLE001 - a worker that just exited (psutil.NoSuchProcess)
                continue
        return total

    def _rss_mb(self) -> float | None:
        if self._proc is None:
            return None
        total = 0
        for p in [self._proc, *self._proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except Exception:  # noqa: BLE001 - a worker that just exited
                continue
        return total / 2**20

    def start(self, engine: Engine) -> None:
        self._t0 = self._last = time.perf_counter()
        self._wait, self._cpu0, self._gpu = 0.0, self._cpu_seconds(), []
        if engine.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(engine.device)

    def batch_arrived(self, engine: Engine) -> None:
        self._wait += time.perf_counter() - self._last

    def step_done(self, engine: Engine) -> None:
        if engine.device.type == "cuda" and engine.state.iteration % self.GPU_EVERY == 1:
            import torch

            try:
                self._gpu.append(float(torch.cuda.utilization(engine.device)))
            except Exception:  # noqa: BLE001 - no NVML (pynvml) here: the figure is left out
                pass
        self._last = time.perf_counter()

    def record(self, engine: Engine) -> None:
        wall = max(time.perf_counter() - self._t0, 1e-9)
        m = engine.state.metrics
        m["data_wait_share"] = min(1.0, self._wait / wall)
        m["disk_free_gb"] = shutil.disk_usage(self.run_dir if self.run_dir.exists() else Path.cwd()).free / 2**30
        if self._proc is not None:
            m["rss_mb"] = self._rss_mb()
            m["cpu_percent"] = 100.0 * (self._cpu_seconds() - self._cpu0) / wall
        if engine.device.type == "cuda":
            import torch

            m["gpu_memory_gb"] = torch.cuda.max_memory_allocated(engine.device) / 2**30
            if self._gpu:
                m["gpu_utilization"] = sum(self._gpu) / len(self._gpu)


class ProgressBar:
    def attach(self, engine: Engine) -> None:
        engine.on(Events.EPOCH_STARTED, self.open)
        engine.on(Events.ITERATION_COMPLETED, self.step)
        engine.on(Events.EPOCH_COMPLETED, self.close)
        engine.on(Events.EXCEPTION_RAISED, self.close)
        self.bar = None

    def open(self, engine: Engine) -> None:
        from tqdm.auto import tqdm

        s = engine.state
        self.bar = tqdm(total=engine.source.steps_per_epoch, initial=s.batch_in_epoch, leave=False,
                        desc=f"epoch {s.epoch + 1}/{s.max_epochs}", disable=not engine.dd.main)

    def step(self, engine: Engine) -> None:
        self.bar.update()
        self.bar.set_postfix(loss=f"{engine.state.loss:.3f}")

    def close(self, engine: Engine) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class GracefulStop:
    """SIGTERM or SIGINT (Ctrl-C): finish the step, save ``last.pt`` with the position inside the epoch,
    and raise :class:`TrainingInterrupted` ("continue with --resume"). Every rank stops at the same step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, checkpointer: Checkpointer):
        self.checkpointer, self.received, self._old = checkpointer, None, {}

    def attach(self, engine: Engine) -> None:
        engine.on(Events.STARTED, self.install, Order.STOP)
        engine.on(Events.ITERATION_COMPLETED, self.check, Order.STOP)  # after the weight average's update
        engine.on(Events.COMPLETED, self.restore, Order.STOP)
        engine.on(Events.EXCEPTION_RAISED, self.restore, Order.STOP)

    def install(self, engine: Engine) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        print(f"{self.received} received: finishing this step, then saving a checkpoint", file=sys.stderr,
              flush=True)

    def check(self, engine: Engine) -> None:
        if engine.dd.any(self.received is not None):
            s = engine.state
            path = self.checkpointer.save_last(engine)
            engine.dd.barrier()
            raise TrainingInterrupted(f"stopped by {self.received or 'a signal on another rank'} at epoch "
                                      f"{s.epoch + 1}, batch {s.batch_in_epoch}; checkpoint saved to {path}; "
                                      "continue with --resume")

    def restore(self, engine: Engine) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


class TimeBudget:
    """Sets the epoch count from the first epoch's time so the warm-up+cosine schedule ends at the budget.

    The first epoch (training and validation) is timed; the epoch count becomes
    ``max(1, floor(budget / epoch time))`` (rank 0's estimate on every rank) and the schedule is rebuilt for
    that count at the current step (the learning rate then follows exactly the curve of ``--epochs N``).
    The decision is stored in the checkpoint (``budget_epochs``): a resumed run keeps it. Until then every
    checkpoint holds the first epoch's time so far (a snapshot part), so a run stopped and resumed inside its
    first epoch adds the time before the stop to the time after the resume."""

    PART = "budget"

    def __init__(self, seconds: float):
        self.seconds, self._t0, self._before = float(seconds), None, 0.0

    def attach(self, engine: Engine) -> None:
        engine.on(Events.EPOCH_STARTED, self.start, Order.DECIDE)
        engine.on(Events.VALIDATION_COMPLETED, self.decide, Order.DECIDE)  # before the checkpoint that stores it
        engine.add_snapshot_part(self.PART, self._part)

    def _part(self) -> dict | None:
        if self._t0 is None or self._t0 is False:
            return None
        return {"first_epoch_seconds": self._before + time.perf_counter() - self._t0}

    def start(self, engine: Engine) -> None:
        s = engine.state
        if self._t0 is None and s.budget_epochs is None and s.epoch == 0:
            self._t0 = time.perf_counter()
            saved = s.restored_parts.get(self.PART) if s.resumed else None
            self._before = float(saved["first_epoch_seconds"]) if saved else 0.0
            self._resumed_at = s.batch_in_epoch if s.resumed else 0
            self._unknown = s.resumed and s.batch_in_epoch > 0 and not saved  # a checkpoint of an older version

    def decide(self, engine: Engine) -> None:
        if self._t0 is None or self._t0 is False:
            return
        epoch_s = self._before + time.perf_counter() - self._t0
        self._t0 = False  # decided once
        steps, s = engine.source.steps_per_epoch, engine.state
        note = f" ({self._before:.1f}s before the resume at batch {self._resumed_at})" if self._before else ""
        if self._unknown:  # an older checkpoint without the time before the stop: scale the part timed here
            done_here = steps - self._resumed_at
            if done_here <= 0:  # nothing of the first epoch's training was timed: keep the provisional count
                s.budget_epochs = s.max_epochs
                if engine.dd.main:
                    print(f"budget {self.seconds:.0f}s: the checkpoint holds no first-epoch time; training "
                          f"{s.max_epochs} epochs (the provisional count)", flush=True)
                return
            epoch_s += s.metrics.get("epoch_seconds", 0.0) * self._resumed_at / done_here
            note = f" (scaled from the {done_here} batches after the resume)"
        epochs = max(1, math.floor(self.seconds / max(epoch_s, 1e-9)))
        epochs = engine.dd.gather(epochs)[0]

        s.max_epochs = s.budget_epochs = max(epochs, s.epoch)
        engine.scheduler = rebuild_schedule(engine.optimizer, engine.cfg, steps, s.max_epochs, s.iteration)
        if engine.dd.main:
            print(f"budget {self.seconds:.0f}s: first epoch took {epoch_s:.1f}s{note}, training {s.max_epochs} "
                  "epochs", flush=True)
