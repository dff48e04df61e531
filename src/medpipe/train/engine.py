"""The training engine: fit / train_one_epoch / validate, with events that handlers hang on.

    from medpipe.train.data import open_source
    from medpipe.train.engine import Engine, Events

    source = open_source("DATA", cfg)                    # ingested folder (pixel cache) or shard set
    engine = Engine.create(cfg, source, torch.device("cpu"))
    engine.on(Events.VALIDATION_COMPLETED, lambda e: print(e.state.metrics["val_auc"]))
    state = engine.fit()                                  # cfg.epochs epochs (or until a handler terminates)

``medpipe.pipeline.run`` is the full job (handlers for checkpoints, early stopping, the epoch line,
metrics.jsonl and the progress bar, then calibration, package and test report). Local training for
federated learning, "k epochs from these weights on this site's data":

    weights, metrics = local_fit(cfg, source, epochs=k, weights=global_weights,
                                 loss_terms=[proximal_term(global_weights, mu=0.01)])   # FedProx, medpipe.fl.losses
    # weights: state dict (CPU tensors); metrics: one record per epoch (train_loss, val_auc, ..., n_train)

Events (MONAI/ignite names; each handler gets the engine, ``engine.state`` holds the figures):

    STARTED               fit() begins; state.epoch = epochs already done (after a resume)
    EPOCH_STARTED         state.epoch = the epoch about to run (0-based), state.batch_in_epoch = first batch
    ITERATION_STARTED     state.batch = (x, y); a handler may replace it (fault injection in tests)
    ITERATION_COMPLETED   state.loss, state.iteration (global step), state.batch_in_epoch (batches done)
    EPOCH_COMPLETED       state.metrics: epoch, train_loss, lr, images_per_s, epoch_seconds
    VALIDATION_COMPLETED  state.metrics + val_loss, val_auc, val_bacc, val_auc_per_class; best/stale updated
    BEST_IMPROVED         the monitored metric improved this epoch (state.best_epoch)
    CHECKPOINT_SAVED      state.checkpoint = the path written
    COMPLETED             fit() ends normally (also after early stopping; state.stop_reason)
    EXCEPTION_RAISED      fit() fails; state.exception (NaN loss, SIGTERM/SIGINT, any error); re-raised

The handlers of one event run in :class:`Order` (then in attach order): a handler names its place when it
registers (``engine.on(event, fn, order=Order.MODEL)``), so the order in which handler objects are attached
never changes a run: the batch mixing and the weight average act first, the checkpoint is written after the
epoch is recorded, a signal stop comes last.

One epoch, top to bottom: this rank's seeded batches from the source -> forward (bf16 autocast where
``precision`` resolves to bf16, see :func:`medpipe.train.factories.resolve_precision`) -> loss (+ any added loss terms) -> a
non-finite loss stops the run naming the batch -> backward,
clipping, AdamW, warm-up+cosine step -> validation (exact across ranks) -> best/stale bookkeeping.
"""

from __future__ import annotations

import bisect
import enum
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from medpipe.config import TrainConfig
from medpipe.errors import MedpipeError, NonFiniteLoss, TrainingInterrupted
from medpipe.preprocess import use_plain_tensors
from medpipe.train.distributed import Dist
from medpipe.train.factories import make_loss, make_optimizer, make_schedule, provisional_epochs, resolve_precision
from medpipe.train.predict import predict_logits, predict_logits_dist  # noqa: F401 (predict_logits: importable here too)
from medpipe.metrics import compute_metrics
from medpipe.models import create_model
from medpipe.train.checkpoint import rng_state, set_rng_state

if TYPE_CHECKING:
    from medpipe.train.data import CachedSource, ShardSource

log = logging.getLogger(__name__)


class Events(str, enum.Enum):
    """The engine's events, in the order of a run (what each carries: the module docstring)."""

    STARTED = "started"
    EPOCH_STARTED = "epoch_started"
    ITERATION_STARTED = "iteration_started"
    ITERATION_COMPLETED = "iteration_completed"
    EPOCH_COMPLETED = "epoch_completed"
    VALIDATION_COMPLETED = "validation_completed"
    BEST_IMPROVED = "best_improved"
    CHECKPOINT_SAVED = "checkpoint_saved"
    COMPLETED = "completed"
    EXCEPTION_RAISED = "exception_raised"


class Order(enum.IntEnum):
    """Where a handler acts among the handlers of one event: lower first, equal ones in attach order.

    ``MODEL``: changes what the step trains on or what is validated and saved (batch mixing, the weight
    average). ``DECIDE``: decides state that the checkpoint stores (the time budget's epoch count).
    ``RECORD``: records the epoch before its checkpoint (the epoch line, metrics.jsonl). ``SAVE``: writes the
    checkpoint. ``REACT`` (the default): acts on a saved epoch (early stopping, tracking, pruning, your own
    handlers, fault injection in tests). ``STOP``: last; a signal stop saves a step every other handler has
    finished with."""

    MODEL = 10
    DECIDE = 20
    RECORD = 30
    SAVE = 40
    REACT = 50
    STOP = 60


@dataclass
class State:
    max_epochs: int
    epoch: int = 0  # epochs completed (during an epoch: the 0-based epoch running)
    iteration: int = 0  # optimisation steps done, all epochs
    batch_in_epoch: int = 0
    batch: tuple | None = None
    loss: float | None = None
    metrics: dict = field(default_factory=dict)
    best_metric: float = -math.inf  # signed: higher is better (val_loss is negated)
    best_epoch: int = -1
    stale: int = 0
    improved: bool = False
    resumed: bool = False
    budget_epochs: int | None = None  # the epoch count a time budget decided (handlers.TimeBudget)
    restored_parts: dict = field(default_factory=dict)  # a resumed checkpoint's handler parts (add_snapshot_part)
    should_terminate: bool = False
    stop_reason: str = ""
    checkpoint: str | None = None
    exception: BaseException | None = None


# --------------------------------------------------------------------------- the pieces of a step


def train_step(model, x, y, loss_fn, optimizer, scheduler, grad_clip: float, device, bf16: bool | None = None,
               metadata: torch.Tensor | None = None):
    """One optimisation step: forward, loss, backward, clipping, optimiser and schedule step.

    Args:
        model: the network (or its DDP wrapper), in train mode.
        x: the input batch (N, 3, H, W); moved to ``device`` in channels-last layout.
        y: class indices (N,) or soft targets (N, C).
        loss_fn: ``loss_fn(logits, y)`` (e.g. :meth:`Engine.loss_fn`).
        optimizer: stepped once.
        scheduler: stepped once, after the optimiser.
        grad_clip: maximum gradient norm; 0 turns clipping off.
        device: where the model is.
        bf16: autocast the forward pass to bfloat16 (default: on CUDA only).
        metadata: the encoded patient metadata (N, dim) of a model that takes it.

    Returns:
        The loss (a detached scalar tensor), or None when it was not finite: then nothing was applied."""
    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    y = y.to(device, non_blocking=True)
    bf16 = device.type == "cuda" if bf16 is None else bf16
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(x) if metadata is None else model(x, metadata.to(device, non_blocking=True))
    loss = loss_fn(logits.float(), y)
    if not torch.isfinite(loss):
        return None
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return loss.detach()


# --------------------------------------------------------------------------- the engine


class Engine:
    """Runs epochs of a model over a training source and raises :class:`Events` to handlers.

    Build one with :meth:`create` (model from the registry, optimiser, schedule, loss, precision), hang
    handlers on it (:meth:`on`, :meth:`attach`), then :meth:`fit`. ``net`` is the bare model, ``model`` the
    one trained (the DDP wrapper when distributed); ``state`` (:class:`State`) holds the figures.

    Args:
        model: the network, already on ``device``.
        optimizer: its optimiser.
        scheduler: the learning-rate schedule, stepped once per optimisation step.
        loss_fn: ``loss_fn(logits, y)``; added loss terms (:meth:`add_loss_term`) come on top.
        source: the training source (:func:`medpipe.train.data.open_source`): batches per epoch, the
            validation split, class names and counts.
        cfg: the run's :class:`medpipe.config.TrainConfig`.
        device: where the model trains.
        dd: the process group; single process when left out.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], source: CachedSource | ShardSource,
                 cfg: TrainConfig, device: torch.device, dd: Dist | None = None):
        use_plain_tensors()
        self.net, self.optimizer, self.scheduler, self.source, self.cfg = model, optimizer, scheduler, source, cfg
        self.device, self.dd = device, dd or Dist()
        self.model = model  # the DDP wrapper when distributed
        if self.dd.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(model, device_ids=[self.dd.local_rank] if device.type == "cuda" else None)
        self._base_loss, self.loss_terms = loss_fn, []
        self.logit_offset: torch.Tensor | None = None  # added to the logits inside the training loss (set_logit_offset)
        self.classes = list(source.classes)
        self.spec = cfg.preprocess()
        self.sign = -1.0 if cfg.monitor == "val_loss" else 1.0
        self.state = State(max_epochs=cfg.epochs)
        self._handlers: dict[Events, list[tuple[int, int, Callable]]] = defaultdict(list)  # (order, seq, fn) sorted
        self._snapshot_parts: dict[str, Callable[[], Any]] = {}
        # resolved by create() (resolve_precision); a resume takes the checkpoint's, so it replays exactly
        self.precision, self.precision_reason = ("bf16" if device.type == "cuda" else "fp32"), "default"

    @classmethod
    def create(cls, cfg: TrainConfig, source: CachedSource | ShardSource, device: torch.device, dd: Dist | None = None,
               weights: dict | None = None, epochs: int | None = None) -> "Engine":
        """Model (from the registry), AdamW, warm-up+cosine over ``epochs`` (default cfg.epochs), loss.

        Args:
            cfg: the run's config (model, recipe, precision).
            source: the training source (its class counts weight the loss; its steps size the schedule).
            device: where to train.
            dd: the process group (DDP wrapper and exact validation across ranks).
            weights: a state dict to start from (no pretrained or init weights then).
            epochs: the schedule's and the run's length (default ``cfg.epochs``; with a time budget a
                provisional length until the budget decides).

        Returns:
            The engine, ``state.epoch`` 0, precision resolved
            (:func:`medpipe.train.factories.resolve_precision`)."""

        spec = getattr(source, "metadata", None)
        model = create_model(cfg.model, len(source.classes), pretrained=cfg.pretrained and weights is None,
                             init_weights=None if weights is not None else cfg.init_weights, dropout=cfg.dropout,
                             metadata_dim=spec.dim if spec is not None else 0,
                             fusion=spec.fusion if spec is not None else "concat")
        if weights is not None:
            model.load_state_dict(weights)
        model = model.to(device).to(memory_format=torch.channels_last)
        optimizer = make_optimizer(model, cfg)
        scheduler = make_schedule(optimizer, cfg, source.steps_per_epoch, epochs or provisional_epochs(cfg))
        engine = cls(model, optimizer, scheduler, make_loss(cfg, source.class_counts, device), source, cfg, device, dd)
        engine.state.max_epochs = epochs or cfg.epochs
        if engine.dd.enabled and device.type == "cpu" and cfg.precision == "auto":
            engine.precision, engine.precision_reason = "fp32", "auto: multi-process CPU runs keep fp32"
        else:
            engine.precision, engine.precision_reason = resolve_precision(cfg, model, device)
        log.info("precision %s (%s)", engine.precision, engine.precision_reason)
        return engine

    # handlers -------------------------------------------------------------------------------------------

    def on(self, event: Events, handler: Callable[["Engine"], None], order: Order = Order.REACT) -> None:
        """Call ``handler(engine)`` at every ``event``.

        Args:
            event: one of :class:`Events` (or its string value).
            handler: called with the engine; ``engine.state`` holds the figures.
            order: its place among the event's handlers (:class:`Order`; equal orders run in attach order).
        """
        handlers = self._handlers[Events(event)]
        bisect.insort(handlers, (int(order), len(handlers), handler))  # seq is unique: handlers never compared

    def attach(self, *handler_objects: Any) -> "Engine":
        """Attach handler objects (each has ``attach(engine)``, as MONAI's handlers do).

        Args:
            handler_objects: objects whose ``attach`` registers their functions with :meth:`on`; the order
                does not matter (each declares its :class:`Order`).

        Returns:
            The engine (calls chain)."""
        for h in handler_objects:
            h.attach(self)
        return self

    def add_snapshot_part(self, name: str, get: Callable[[], Any]) -> None:
        """Put ``get()`` (tensors and plain values) into every checkpoint under ``parts[name]``; after a resume
        it is in ``state.restored_parts[name]`` (a handler's own state, written with the checkpoint it belongs
        to, never beside it).

        Args:
            name: the part's key (one per handler).
            get: returns the part's current value when a checkpoint is written."""
        self._snapshot_parts[name] = get

    def fire(self, event: Events) -> None:
        """Call the handlers of ``event`` (by :class:`Order`, then attach order)."""
        for _, _, handler in list(self._handlers[event]):
            handler(self)

    def add_loss_term(self, term: Callable[[torch.nn.Module], torch.Tensor]) -> None:
        """Add ``term(model)`` to every step's loss.

        Args:
            term: returns a scalar tensor from the bare model (e.g. FedProx's
                :func:`medpipe.fl.losses.proximal_term`)."""
        self.loss_terms.append(term)

    def set_logit_offset(self, offset) -> None:
        """Add ``offset`` (one value per class) to the logits inside every step's loss, not to the model's
        outputs: a federated site's logit calibration (:func:`medpipe.fl.strategy.site_logit_offset`)."""
        self.logit_offset = None if offset is None else torch.as_tensor(offset, dtype=torch.float32, device=self.device)

    def terminate(self, reason: str) -> None:
        """Stop after the current epoch (early stopping).

        Args:
            reason: kept in ``state.stop_reason``."""
        self.state.should_terminate, self.state.stop_reason = True, reason

    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The base loss of ``logits`` (plus the logit offset, if one is set) against ``y`` plus every added loss
        term (the step's loss)."""
        loss = self._base_loss(logits if self.logit_offset is None else logits + self.logit_offset, y)
        for term in self.loss_terms:
            loss = loss + term(self.net)
        return loss

    # checkpoint state -----------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        """Everything a resume needs, as tensors and plain values (loaded with weights_only=True).

        Returns:
            Model, optimiser and schedule state, position (epoch, batch, step), best/stale bookkeeping,
            random states, config, classes, precision and the handlers' parts (:meth:`add_snapshot_part`)."""

        s = self.state
        return {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": {}, "epoch": s.epoch,
                "batch_in_epoch": s.batch_in_epoch, "global_step": s.iteration, "max_epochs": s.max_epochs,
                "budget_epochs": s.budget_epochs, "steps_per_epoch": self.source.steps_per_epoch,
                "best_metric": s.best_metric, "best_epoch": s.best_epoch, "stale_epochs": s.stale,
                "rng": rng_state(), "config": self.cfg.to_dict(), "classes": self.classes, "precision": self.precision,
                "records_sha256": self.source.records_sha256,
                "parts": {name: get() for name, get in self._snapshot_parts.items()}}

    def restore(self, snap: dict) -> None:
        """Continue from a :meth:`snapshot` (a loaded checkpoint): weights, optimiser, schedule, position,
        random states, precision; ``state.resumed`` is set and the handlers' parts are in
        ``state.restored_parts``.

        Args:
            snap: the snapshot.

        Raises:
            MedpipeError: the checkpoint's epoch length differs from this source's (other data, batch size
                or rank count)."""
        steps = snap.get("steps_per_epoch")
        if steps is not None and steps != self.source.steps_per_epoch:
            raise MedpipeError(f"the checkpoint was written with {steps} steps per epoch and this data, batch size "
                               f"and rank count give {self.source.steps_per_epoch}: its schedule and position "
                               "do not apply here; train with the settings it was written with, or start over "
                               "with --force")
        if snap["batch_in_epoch"] > self.source.steps_per_epoch:
            raise MedpipeError(f"the checkpoint stopped at batch {snap['batch_in_epoch']} of an epoch, but an epoch "
                               f"here has {self.source.steps_per_epoch} (written by another medpipe version or "
                               "with other settings); start over with --force")
        self.net.load_state_dict(snap["model"])
        if snap.get("precision") in ("bf16", "fp32") and snap["precision"] != self.precision:
            self.precision, self.precision_reason = snap["precision"], "the checkpoint's (resumed)"
            log.info("precision %s (%s)", self.precision, self.precision_reason)
        self.optimizer.load_state_dict(snap["optimizer"])
        self.scheduler.load_state_dict(snap["scheduler"])
        s = self.state
        s.epoch, s.batch_in_epoch, s.iteration = snap["epoch"], snap["batch_in_epoch"], snap["global_step"]
        s.max_epochs = int(snap.get("max_epochs", s.max_epochs))
        # a checkpoint from before this key: a budget decided at an epoch end (never before the first one)
        s.budget_epochs = snap.get("budget_epochs", s.max_epochs if self.cfg.budget and s.epoch > 0 else None)
        s.best_metric, s.best_epoch, s.stale = snap["best_metric"], snap["best_epoch"], snap["stale_epochs"]
        s.resumed = True
        s.restored_parts = dict(snap.get("parts") or {})
        set_rng_state(snap["rng"])

    # the loop -------------------------------------------------------------------------------------------

    def fit(self) -> State:
        """Train from ``state.epoch`` to ``state.max_epochs`` (a handler may change either, or terminate).

        Returns:
            The final :class:`State` (``epoch``, ``metrics`` of the last epoch, ``best_epoch``, ``stop_reason``).

        Raises:
            NonFiniteLoss: the loss became NaN or infinite (re-raised after EXCEPTION_RAISED, as is any error).
            TrainingInterrupted: SIGTERM/SIGINT (the signal stop saved ``last.pt``)."""
        s = self.state
        try:
            self.fire(Events.STARTED)
            while s.epoch < s.max_epochs and not s.should_terminate:
                self.fire(Events.EPOCH_STARTED)
                s.metrics = self.train_one_epoch()
                self.fire(Events.EPOCH_COMPLETED)
                s.metrics.update(self.validate())
                self._update_best()
                s.epoch += 1
                s.batch_in_epoch = 0
                self.fire(Events.VALIDATION_COMPLETED)
                if s.improved:
                    self.fire(Events.BEST_IMPROVED)
            self.fire(Events.COMPLETED)
        except BaseException as exc:
            s.exception = exc
            self.fire(Events.EXCEPTION_RAISED)
            raise
        return s

    def train_one_epoch(self) -> dict:
        """One epoch of this rank's batches (from ``state.batch_in_epoch`` after a mid-epoch resume).

        Returns:
            The epoch's record: epoch (1-based), train_loss, lr, images_per_s, epoch_seconds, precision
            (and world_size when distributed; loss averaged, throughput summed over ranks)."""
        s, dd = self.state, self.dd
        epoch, skip = s.epoch, s.batch_in_epoch
        expected = self.source.steps_per_epoch - skip
        self.model.train()
        t0, seen, loss_sum, n_loss = time.perf_counter(), 0, 0.0, 0
        for b, batch in enumerate(self.source.epoch(epoch, skip), start=skip):
            s.batch = batch
            self.fire(Events.ITERATION_STARTED)
            x, *m, y = s.batch  # (x, y), or (x, metadata, y) for a model that takes metadata
            loss = train_step(self.model, x, y, self.loss_fn, self.optimizer, self.scheduler, self.cfg.grad_clip,
                              self.device, bf16=self.precision == "bf16", metadata=m[0] if m else None)
            if loss is None:
                # The optimiser step was skipped, but the forward pass already moved BatchNorm statistics,
                # so this state is not saved: the last checkpoint (previous epoch end) stays the good one.
                raise NonFiniteLoss(f"loss became non-finite at epoch {epoch + 1}, batch {b} "
                                    f"(images {self.source.describe_batch(epoch, b)}...); the step was not applied")
            s.iteration, s.batch_in_epoch, s.loss = s.iteration + 1, b + 1, float(loss)
            seen, loss_sum, n_loss = seen + len(y), loss_sum + s.loss * len(y), n_loss + len(y)
            self.fire(Events.ITERATION_COMPLETED)
        if s.batch_in_epoch - skip != expected:
            raise MedpipeError(f"the data loader ended after {s.batch_in_epoch - skip} of {expected} batches in "
                               f"epoch {epoch + 1} (an error in a loader thread; see the log above)")
        seconds = time.perf_counter() - t0
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, n_loss), "lr": self.optimizer.param_groups[0]["lr"],
                  "images_per_s": seen / max(seconds, 1e-9), "epoch_seconds": seconds, "precision": self.precision}
        if dd.enabled:  # the training loss is averaged over ranks; throughput summed
            parts = dd.gather((loss_sum, n_loss, seen))
            record["train_loss"] = sum(p[0] for p in parts) / max(1, sum(p[1] for p in parts))
            record["images_per_s"] = sum(p[2] for p in parts) / max(seconds, 1e-9)
            record["world_size"] = dd.world
        return record

    def validate(self) -> dict:
        """Validation loss, macro ROC AUC, per-class AUC and balanced accuracy (each rank predicts its share;
        gathered exactly, no padding).

        Returns:
            ``val_loss``, ``val_auc``, ``val_bacc``, ``val_auc_per_class`` (NaN and {} for an empty split)."""

        val = self.source.val
        self.dd.sync_buffers(self.net)
        logits = predict_logits_dist(self.net, val.pixels, val.rows, self.spec, self.device, self.dd,
                                     bf16=self.precision == "bf16", metadata=val.metadata)
        if not len(val):
            return {"val_loss": float("nan"), "val_auc": float("nan"), "val_bacc": float("nan"),
                    "val_auc_per_class": {}}
        y = torch.from_numpy(val.labels)
        vm = compute_metrics(val.labels, torch.softmax(logits, 1).numpy(), self.classes, bootstrap=0)
        return {"val_loss": float(F.cross_entropy(logits, y)), "val_auc": vm["macro_auc"],
                "val_bacc": vm["balanced_accuracy"], "val_auc_per_class": {c: m["auc"] for c, m in vm["per_class"].items()}}

    def _update_best(self) -> None:
        s = self.state
        score = s.metrics[self.cfg.monitor]
        s.improved = not math.isnan(score) and self.sign * score > s.best_metric
        if s.improved:
            s.best_metric, s.best_epoch, s.stale = self.sign * score, s.epoch + 1, 0
        else:
            s.stale += 1


# --------------------------------------------------------------------------- local training (federated learning)


def local_fit(cfg: TrainConfig, source: CachedSource | ShardSource, *, epochs: int, weights: dict | None = None,
              device: str | torch.device = "cpu", loss_terms: Iterable[Callable[[torch.nn.Module], torch.Tensor]] = (),
              handlers: Iterable[Any] = (), epoch_offset: int = 0, lr_range: tuple[float, float] | None = None,
              optimizer_state: dict | None = None, logit_offset=None) -> tuple[dict, list[dict]]:
    """Train ``epochs`` epochs from ``weights`` on ``source`` (this site's data); return (weights, metrics).

    By default a fresh optimiser and warm-up+cosine schedule over these epochs each call; a federated
    schedule across rounds passes the round's rates instead (``lr_range``). Writes nothing to disk.

    Args:
        cfg: the run's config.
        source: this site's training source.
        epochs: local epochs.
        weights: the state dict to start from (the global model); the config's initial weights if None.
        device: where to train.
        loss_terms: ``term(model)`` callables added to the loss (FedProx: :func:`medpipe.fl.losses.proximal_term`).
        handlers: handler objects to attach (e.g. the recipe's batch mixing).
        epoch_offset: the number of the first epoch (e.g. round * epochs), so each round draws new orders
            and augmentations.
        lr_range: (rate at the first step, rate after the last): a linear ramp over these epochs' steps, no
            warm-up (the server's schedule across rounds, :func:`medpipe.fl.strategy.round_lr`).
        optimizer_state: a dict carried from call to call (an optimiser kept between rounds): the AdamW
            state in it, if any, is loaded before training and replaced by the new state after.
        logit_offset: one value per class added to the logits inside the training loss
            (:meth:`Engine.set_logit_offset`); None: none.

    Returns:
        ``(weights, metrics)``: the trained state dict (CPU tensors) and one record per epoch, each also
        holding ``n_train``, the weight FedAvg gives this site."""
    device = torch.device(device)
    engine = Engine.create(cfg, source, device, weights=weights, epochs=epochs)
    engine.state.epoch, engine.state.max_epochs = epoch_offset, epoch_offset + epochs
    if optimizer_state:
        engine.optimizer.load_state_dict(optimizer_state["optimizer"])  # the moments; the rates are set anew below
        for group in engine.optimizer.param_groups:
            group["lr"] = group["initial_lr"] = cfg.lr
        engine.scheduler = make_schedule(engine.optimizer, cfg, source.steps_per_epoch, epochs)
    if lr_range is not None:
        engine.scheduler = ramp_schedule(engine.optimizer, lr_range, max(1, epochs * source.steps_per_epoch))
    for term in loss_terms:
        engine.add_loss_term(term)
    engine.set_logit_offset(logit_offset)
    engine.attach(*handlers)
    records: list[dict] = []
    n_train = int(np.sum(source.class_counts))
    engine.on(Events.VALIDATION_COMPLETED, lambda e: records.append({**e.state.metrics, "n_train": n_train}))
    engine.fit()
    if optimizer_state is not None:
        optimizer_state["optimizer"] = engine.optimizer.state_dict()
    return {k: v.detach().cpu().clone() for k, v in engine.net.state_dict().items()}, records


def ramp_schedule(optimizer: torch.optim.Optimizer, lr_range: tuple[float, float],
                  steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """A linear ramp of the learning rate from ``lr_range[0]`` at the first step to ``lr_range[1]`` after
    ``steps`` steps (every parameter group)."""
    start, end = (float(v) for v in lr_range)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = 1.0  # the lambda gives the rate itself
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: start + (end - start) * min(step, steps) / steps)
