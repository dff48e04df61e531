"""Fault injection for tests: engine handlers a test installs (``medpipe train --handler tests.faults:NAME:ARGS``
in a subprocess, or ``engine.attach(...)`` in-process). Production code reads no fault switches."""

import os
import signal

import torch

from medpipe.train.engine import Events


class SigtermAtStep:
    """Send this process SIGTERM (or the signal named) right after global step ``step``."""

    def __init__(self, step: int, sig: str = "SIGTERM"):
        self.step, self.sig = step, getattr(signal, sig)

    def attach(self, engine):
        engine.on(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine):
        if engine.state.iteration == self.step:
            os.kill(os.getpid(), self.sig)


class NanWeightsAtEpoch:
    """When the run ends at epoch ``epoch`` (a federated site: round x local epochs), fill the first weight
    matrix with NaN, so the weights this local fit hands back (a site's update) are not finite."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def attach(self, engine):
        engine.on(Events.COMPLETED, self)

    def __call__(self, engine):
        if engine.state.epoch == self.epoch:
            p = next(p for p in engine.net.parameters() if p.ndim > 1)
            with torch.no_grad():
                p.fill_(float("nan"))


class NanAtStep:
    """Replace the input batch of global step ``step`` (1-based) by NaNs."""

    def __init__(self, step: int):
        self.step = step

    def attach(self, engine):
        engine.on(Events.ITERATION_STARTED, self)

    def __call__(self, engine):
        if engine.state.iteration + 1 == self.step:
            x, y = engine.state.batch
            engine.state.batch = (torch.full_like(x, float("nan")), y)


class KillRankAtStep:
    """SIGKILL rank ``rank`` after global step ``step``, on torchrun's first attempt only."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def attach(self, engine):
        engine.on(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine):
        first = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0
        if first and engine.dd.rank == self.rank and engine.state.iteration == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class FailCheckpointWrite:
    """Make the ``n``-th checkpoint write (1-based) fail like a full disk, after metrics.jsonl got its line."""

    def __init__(self, n: int):
        self.n, self.count = n, 0

    def attach(self, engine):
        import medpipe.train.checkpoint as ckpt
        import medpipe.train.handlers as handlers

        original = ckpt.save_checkpoint

        def save(path, state):
            self.count += 1
            if self.count == self.n:
                raise OSError(28, "No space left on device (injected)")
            return original(path, state)

        ckpt.save_checkpoint = save
        handlers.save_checkpoint = save  # the name the Checkpointer calls (imported at the top of handlers)


class BadWeightsAtEpoch:
    """When the run ends at epoch ``epoch`` (a federated site: round x local epochs), make the weights this
    local fit hands back a malicious update: ``half`` sends the first weight matrix as float16, ``huge``
    fills it with 3e38 (finite in float32)."""

    def __init__(self, epoch: int, kind: str = "half"):
        if kind not in ("half", "huge"):
            raise ValueError(f"kind must be half or huge, got {kind!r}")
        self.epoch, self.kind = epoch, kind

    def attach(self, engine):
        engine.on(Events.COMPLETED, self)

    def __call__(self, engine):
        if engine.state.epoch != self.epoch:
            return
        p = next(p for p in engine.net.parameters() if p.ndim > 1)
        with torch.no_grad():
            if self.kind == "huge":
                p.fill_(3e38)
            else:
                p.data = p.data.to(torch.float16)

