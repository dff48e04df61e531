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
                                 loss_terms=[proximal_term(global_weights, mu=0.01)])   # FedProx
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

One epoch, top to bottom: this rank's seeded batches from the source -> forward (bf16 autocast where
``precision`` resolves to bf16, see :func:`resolve_precision`) -> loss (+ any added loss terms) -> a
non-finite loss stops the run naming the batch -> backward,
clipping, AdamW, warm-up+cosine step -> validation (exact across ranks) -> best/stale bookkeeping.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from medpipe.config import TrainConfig
from medpipe.errors import MedpipeError, NonFiniteLoss, TrainingInterrupted
from medpipe.preprocess import eval_batch, flip_averaged, use_plain_tensors
from medpipe.train.distributed import Dist
from medpipe.metrics import compute_metrics
from medpipe.models import create_model
from medpipe.train.checkpoint import rng_state, set_rng_state

log = logging.getLogger(__name__)


class Events(str, enum.Enum):
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


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, no weight decay on biases and norm parameters. The fused kernel (CPU and CUDA) is half
    the optimiser time of the default on DenseNet121 (8 vs 16 ms a step on 2 CPU cores)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in model.parameters())
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, fused=fused or None)


def make_loss(cfg: TrainConfig, class_counts: np.ndarray, device):
    n_classes = len(class_counts)
    weight = None
    if cfg.imbalance in ("weighted_loss", "focal"):
        w = class_counts.sum() / (n_classes * np.maximum(class_counts, 1))
        weight = torch.tensor(w, dtype=torch.float32, device=device)
    if cfg.imbalance == "focal":
        from monai.losses import FocalLoss

        # class indices (B,) are one-hot encoded; mixed soft targets (B, C) from mixup/CutMix go in as they are:
        # softmax focal loss is -sum_c t_c (1 - p_c)^gamma log p_c, which for a one-hot t is the usual one
        hard = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=cfg.focal_gamma, weight=weight)
        soft = FocalLoss(to_onehot_y=False, use_softmax=True, gamma=cfg.focal_gamma, weight=weight)
        return lambda logits, y: soft(logits, y) if y.ndim == 2 else hard(logits, y[:, None])
    return lambda logits, y: F.cross_entropy(logits, y, weight=weight, label_smoothing=cfg.label_smoothing)


def make_schedule(optimizer, cfg: TrainConfig, steps_per_epoch: int, epochs: int | None = None):
    """Linear warm-up for ``warmup_epochs``, then cosine down to 1% of the learning rate at the last step."""
    total = max(1, (epochs or cfg.epochs) * steps_per_epoch)
    warm = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warm), eta_min=cfg.lr * 0.01)
    if warm <= 0:
        return cosine
    linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warm, end_factor=1.0, total_iters=warm)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warm])


def provisional_epochs(cfg: TrainConfig) -> int:
    """The schedule's length before a time budget has decided it: ``cfg.epochs``, at least 2 so the first epoch
    never ends the cosine (and the warm-up has the same form as in the decided schedule)."""
    return max(cfg.epochs, 2) if cfg.budget else cfg.epochs


def rebuild_schedule(optimizer, cfg: TrainConfig, steps_per_epoch: int, epochs: int, step: int):
    """The warm-up+cosine schedule of ``epochs`` epochs, advanced to ``step`` (the time budget sets the epoch
    count after the first epoch): the learning rate from here on is exactly that of a run started with
    ``epochs``. Editing a running cosine's length instead would continue its recursive form from the current
    learning rate, which stays at the floor if the old schedule had already ended."""
    import warnings

    for group in optimizer.param_groups:  # the schedulers start from the base learning rate, as at step 0
        group["lr"] = group.get("initial_lr", cfg.lr)
    scheduler = make_schedule(optimizer, cfg, steps_per_epoch, epochs)
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": no optimiser step is meant
        warnings.simplefilter("ignore")
        for _ in range(step):
            scheduler.step()
    return scheduler


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The bf16 matrix instructions this CPU reports (oneDNN uses them under autocast); empty where unknown."""
    try:
        with open(cpuinfo, errors="replace") as fh:
            flags = set(next((ln for ln in fh if ln.startswith("flags")), ":").split(":", 1)[1].split())
    except OSError:
        return []
    return [f for f in ("avx512_bf16", "amx_bf16") if f in flags]


def _step_seconds(model: torch.nn.Module, cfg: TrainConfig, device, bf16: bool, repeats: int = 2) -> float:
    """Best time of a forward+backward at the training batch shape (no optimiser step)."""
    g = torch.Generator(device=device).manual_seed(0)  # the run's own random streams stay untouched
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device, generator=g).contiguous(
        memory_format=torch.channels_last)
    best = math.inf
    for i in range(repeats + 1):  # the first is a warm-up (oneDNN primitive creation)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        out.float().sum().backward()
        if i:
            best = min(best, time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    return best


def resolve_precision(cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> tuple[str, str]:
    """``bf16`` or ``fp32`` for this run, and why. ``auto``: bf16 on CUDA; on a CPU with avx512_bf16/amx_bf16,
    bf16 if a start-up check (a few forward+backward passes of a copy of the model, each precision) times it
    at least 10% faster; fp32 for --deterministic runs (a timing check would tie the numerics to the load)."""
    if cfg.precision != "auto":
        return cfg.precision, "asked for"
    if device.type == "cuda":
        return "bf16", "auto on CUDA"
    if device.type != "cpu":
        return "fp32", f"auto on {device.type}"
    flags = cpu_bf16_flags()
    if not flags:
        return "fp32", "auto: this CPU reports no bf16 instructions (avx512_bf16, amx_bf16)"
    if cfg.deterministic:
        return "fp32", "auto: --deterministic keeps fp32 (a timing check would tie the numerics to the machine's load)"
    import copy

    key = (cfg.model, cfg.batch_size, cfg.image_size, torch.get_num_threads())
    if key not in _PRECISION_CHECKS:  # once per process and shape: engines made again (FL rounds) agree
        probe = copy.deepcopy(model).train()  # BatchNorm statistics of the real model stay untouched
        fp32, bf16 = _step_seconds(probe, cfg, device, False), _step_seconds(probe, cfg, device, True)
        _PRECISION_CHECKS[key] = (("bf16" if bf16 < fp32 / 1.1 else "fp32"),
                                  f"auto: start-up check on this CPU ({'+'.join(flags)}): a step takes "
                                  f"{1000 * bf16:.0f} ms in bf16, {1000 * fp32:.0f} ms in fp32")
    return _PRECISION_CHECKS[key]


_PRECISION_CHECKS: dict[tuple, tuple[str, str]] = {}


def train_step(model, x, y, loss_fn, optimizer, scheduler, grad_clip: float, device, bf16: bool | None = None):
    """One optimisation step; returns the loss, or None (step skipped) when it is not finite. ``bf16``:
    autocast the forward pass (default: on CUDA only)."""
    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    y = y.to(device, non_blocking=True)
    bf16 = device.type == "cuda" if bf16 is None else bf16
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(x)
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


@torch.inference_mode()
def predict_logits(model, pixels, rows: np.ndarray, spec, device, batch: int = 128,
                   bf16: bool | None = None, tta: bool = False) -> torch.Tensor:
    """Logits of pixels[rows] in eval mode; ``tta``: averaged over the image and its three flips."""
    model.eval()
    outs = []
    bf16 = device.type == "cuda" if bf16 is None else bf16
    for i in range(0, len(rows), batch):
        x = eval_batch(pixels[rows[i:i + batch]], spec).to(device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = flip_averaged(lambda t: model(t).float(), x) if tta else model(x).float()
            outs.append(out.cpu())
    return torch.cat(outs) if outs else torch.zeros((0, 0))


def predict_logits_dist(model, pixels, rows: np.ndarray, spec, device, dd: Dist, bf16: bool | None = None) -> torch.Tensor:
    """Validation logits in row order; with several ranks each predicts rows[rank::world] and the
    pieces are gathered and put back in order, so metrics equal the single-process ones exactly."""
    if not dd.enabled:
        return predict_logits(model, pixels, rows, spec, device, bf16=bf16)
    mine = np.arange(dd.rank, len(rows), dd.world)
    logits = predict_logits(model, pixels, rows[mine], spec, device, bf16=bf16)
    parts = dd.gather((mine, logits.numpy() if len(mine) else None))
    n_classes = next(p[1].shape[1] for p in parts if p[1] is not None) if len(rows) else 0
    out = np.zeros((len(rows), n_classes), np.float32)
    for idx, part in parts:
        if part is not None:
            out[idx] = part
    return torch.from_numpy(out)


def proximal_term(reference: dict[str, torch.Tensor], mu: float) -> Callable[[torch.nn.Module], torch.Tensor]:
    """FedProx's proximal term ``mu/2 * ||w - w_ref||^2`` over the trainable parameters, as a loss term
    for :meth:`Engine.add_loss_term` / :func:`local_fit`."""
    ref: dict[str, torch.Tensor] = {}

    def term(model: torch.nn.Module) -> torch.Tensor:
        total = 0.0
        for name, p in model.named_parameters():
            if name not in ref:
                ref[name] = reference[name].detach().to(p.device, p.dtype)
            total = total + (p - ref[name]).pow(2).sum()
        return 0.5 * mu * total

    return term


# --------------------------------------------------------------------------- the engine


class Engine:
    """Runs epochs of a model over a training source and raises :class:`Events` to handlers."""

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, loss_fn, source, cfg: TrainConfig,
                 device: torch.device, dd: Dist | None = None):
        use_plain_tensors()
        self.net, self.optimizer, self.scheduler, self.source, self.cfg = model, optimizer, scheduler, source, cfg
        self.device, self.dd = device, dd or Dist()
        self.model = model  # the DDP wrapper when distributed
        if self.dd.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(model, device_ids=[self.dd.local_rank] if device.type == "cuda" else None)
        self._base_loss, self.loss_terms = loss_fn, []
        self.classes = list(source.classes)
        self.spec = cfg.preprocess()
        self.sign = -1.0 if cfg.monitor == "val_loss" else 1.0
        self.state = State(max_epochs=cfg.epochs)
        self._handlers: dict[Events, list] = defaultdict(list)
        self._snapshot_parts: dict[str, Callable[[], Any]] = {}
        # resolved by create() (resolve_precision); a resume takes the checkpoint's, so it replays exactly
        self.precision, self.precision_reason = ("bf16" if device.type == "cuda" else "fp32"), "default"

    @classmethod
    def create(cls, cfg: TrainConfig, source, device: torch.device, dd: Dist | None = None,
               weights: dict | None = None, epochs: int | None = None) -> "Engine":
        """Model (from the registry), AdamW, warm-up+cosine over ``epochs`` (default cfg.epochs), loss."""

        model = create_model(cfg.model, len(source.classes), pretrained=cfg.pretrained and weights is None,
                             init_weights=None if weights is not None else cfg.init_weights, dropout=cfg.dropout)
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

    def on(self, event: Events, handler: Callable[["Engine"], None]) -> None:
        self._handlers[Events(event)].append(handler)

    def attach(self, *handler_objects) -> "Engine":
        """Attach handler objects (each has ``attach(engine)``, as MONAI's handlers do)."""
        for h in handler_objects:
            h.attach(self)
        return self

    def add_snapshot_part(self, name: str, get: Callable[[], Any]) -> None:
        """Put ``get()`` (tensors and plain values) into every checkpoint under ``parts[name]``; after a resume
        it is in ``state.restored_parts[name]`` (a handler's own state, written with the checkpoint it belongs
        to, never beside it)."""
        self._snapshot_parts[name] = get

    def fire(self, event: Events) -> None:
        for handler in self._handlers[event]:
            handler(self)

    def add_loss_term(self, term: Callable[[torch.nn.Module], torch.Tensor]) -> None:
        """Add ``term(model)`` to every step's loss (e.g. FedProx's :func:`proximal_term`)."""
        self.loss_terms.append(term)

    def terminate(self, reason: str) -> None:
        """Stop after the current epoch (early stopping)."""
        self.state.should_terminate, self.state.stop_reason = True, reason

    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self._base_loss(logits, y)
        for term in self.loss_terms:
            loss = loss + term(self.net)
        return loss

    # checkpoint state -----------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        """Everything a resume needs, as tensors and plain values (loaded with weights_only=True)."""

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
        """Train from ``state.epoch`` to ``state.max_epochs`` (a handler may change either, or terminate)."""
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
        s, dd = self.state, self.dd
        epoch, skip = s.epoch, s.batch_in_epoch
        expected = self.source.steps_per_epoch - skip
        self.model.train()
        t0, seen, loss_sum, n_loss = time.perf_counter(), 0, 0.0, 0
        for b, batch in enumerate(self.source.epoch(epoch, skip), start=skip):
            s.batch = batch
            self.fire(Events.ITERATION_STARTED)
            x, y = s.batch
            loss = train_step(self.model, x, y, self.loss_fn, self.optimizer, self.scheduler, self.cfg.grad_clip,
                              self.device, bf16=self.precision == "bf16")
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
        gathered exactly, no padding)."""

        val = self.source.val
        self.dd.sync_buffers(self.net)
        logits = predict_logits_dist(self.net, val.pixels, val.rows, self.spec, self.device, self.dd,
                                     bf16=self.precision == "bf16")
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


def local_fit(cfg: TrainConfig, source, *, epochs: int, weights: dict | None = None, device: str | torch.device = "cpu",
              loss_terms=(), handlers=(), epoch_offset: int = 0) -> tuple[dict, list[dict]]:
    """Train ``epochs`` epochs from ``weights`` on ``source`` (this site's data); return (weights, metrics).

    A fresh optimiser and warm-up+cosine schedule over these epochs each call (FedAvg's local training);
    ``epoch_offset`` numbers the epochs (e.g. round * epochs) so each round draws new orders and
    augmentations. Every record in ``metrics`` also holds ``n_train``, the weight FedAvg gives this site.
    Writes nothing to disk."""
    device = torch.device(device)
    engine = Engine.create(cfg, source, device, weights=weights, epochs=epochs)
    engine.state.epoch, engine.state.max_epochs = epoch_offset, epoch_offset + epochs
    for term in loss_terms:
        engine.add_loss_term(term)
    engine.attach(*handlers)
    records: list[dict] = []
    n_train = int(np.sum(source.class_counts))
    engine.on(Events.VALIDATION_COMPLETED, lambda e: records.append({**e.state.metrics, "n_train": n_train}))
    engine.fit()
    return {k: v.detach().cpu().clone() for k, v in engine.net.state_dict().items()}, records
