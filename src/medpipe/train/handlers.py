"""The engine's standard handlers: checkpoints, early stopping, the epoch line, metrics.jsonl, the progress
bar, SIGTERM/SIGINT and the time budget. Each is a small object with ``attach(engine)``; add your own the
same way (``engine.on(Events.X, fn)``). Only rank 0 writes files; every rank runs the handlers (some take
part in collective calls).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from medpipe.utils import to_json
from medpipe.train.engine import Engine, Events, TrainingInterrupted


class Checkpointer:
    """``last.pt`` after every validated epoch (atomic), ``best.pt`` when the monitored metric improved;
    :meth:`save_last` also mid-epoch (a signal)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def attach(self, engine: Engine) -> None:
        engine.on(Events.VALIDATION_COMPLETED, self.epoch_end)

    def save_last(self, engine: Engine) -> Path:
        from medpipe.train.checkpoint import save_checkpoint

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
    """One parseable line per epoch on stdout (rank 0)."""

    def attach(self, engine: Engine) -> None:
        engine.on(Events.VALIDATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.dd.main:
            m = engine.state.metrics
            print(f"epoch={m['epoch']} train_loss={m['train_loss']:.4f} val_loss={m['val_loss']:.4f} "
                  f"val_auc={m['val_auc']:.4f} val_bacc={m['val_bacc']:.4f} lr={m['lr']:.6g} "
                  f"images_per_s={m['images_per_s']:.1f}", flush=True)


class MetricsFile:
    """``metrics.jsonl``: one JSON line per validated epoch. At the start, lines for epochs the run has not
    (or no longer) completed are dropped, so an epoch is never there twice, also when a resume repeats an
    epoch whose checkpoint write failed."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def attach(self, engine: Engine) -> None:
        engine.on(Events.STARTED, self.start)
        engine.on(Events.VALIDATION_COMPLETED, self.append)

    def start(self, engine: Engine) -> None:
        if not engine.dd.main or not self.path.is_file():
            return
        from medpipe.utils import atomic_write_text

        lines = self.path.read_text().splitlines()
        keep = [x for x in lines if x.strip() and json.loads(x).get("epoch", 0) <= engine.state.epoch]
        if len(keep) != len(lines):
            atomic_write_text(self.path, "".join(x + "\n" for x in keep))

    def append(self, engine: Engine) -> None:
        if engine.dd.main:
            with open(self.path, "a") as fh:
                fh.write(to_json(engine.state.metrics) + "\n")


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
        engine.on(Events.STARTED, self.install)
        engine.on(Events.ITERATION_COMPLETED, self.check)
        engine.on(Events.COMPLETED, self.restore)
        engine.on(Events.EXCEPTION_RAISED, self.restore)

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
    The decision is stored in the checkpoint (``budget_epochs``): a resumed run keeps it. A run resumed from
    inside the first epoch, before the decision, times the rest of that epoch and scales its training part to a
    whole epoch."""

    def __init__(self, seconds: float):
        self.seconds, self._t0, self._skip = float(seconds), None, 0

    def attach(self, engine: Engine) -> None:
        engine.on(Events.EPOCH_STARTED, self.start)
        engine.on(Events.VALIDATION_COMPLETED, self.decide)

    def start(self, engine: Engine) -> None:
        s = engine.state
        if self._t0 is None and s.budget_epochs is None and s.epoch == 0:
            self._t0, self._skip = time.perf_counter(), s.batch_in_epoch

    def decide(self, engine: Engine) -> None:
        if self._t0 is None or self._t0 is False:
            return
        epoch_s = time.perf_counter() - self._t0
        self._t0 = False  # decided once
        steps = engine.source.steps_per_epoch
        if 0 < self._skip < steps:  # resumed mid-epoch: the batches before the checkpoint were not timed here
            epoch_s += engine.state.metrics.get("epoch_seconds", 0.0) * self._skip / (steps - self._skip)
        epochs = max(1, math.floor(self.seconds / max(epoch_s, 1e-9)))
        epochs = engine.dd.gather(epochs)[0]
        from medpipe.train.engine import rebuild_schedule

        s = engine.state
        s.max_epochs = s.budget_epochs = max(epochs, s.epoch)
        engine.scheduler = rebuild_schedule(engine.optimizer, engine.cfg, steps, s.max_epochs, s.iteration)
        if engine.dd.main:
            print(f"budget {self.seconds:.0f}s: first epoch took {epoch_s:.1f}s"
                  + (f" (scaled from the {steps - self._skip} batches after the resume)" if self._skip else "")
                  + f", training {s.max_epochs} epochs", flush=True)
