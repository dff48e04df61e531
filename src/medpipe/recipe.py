"""Training-recipe options that act on batches, as handlers of the training engine's events.

- ``mixup_alpha`` > 0: mixup (Zhang et al. 2018): each batch is blended with a shuffled copy of itself,
  ``x = lam * x + (1 - lam) * x[perm]``, ``lam ~ Beta(alpha, alpha)``, and the targets become the same
  blend of the two one-hot labels.
- ``cutmix_alpha`` > 0: CutMix (Yun et al. 2019): a random box of area ``1 - lam`` is pasted from the
  shuffled copy; the targets are mixed by the box's actual area.
- both > 0: each mixed batch uses one of them, half the time each; ``mix_prob`` is the share of batches
  mixed at all (the rest train on plain labels).

The draw for a batch is seeded from (seed, global step), so a resumed run mixes exactly as a straight
one. Soft targets go to the same cross-entropy (class weights and label smoothing still apply) or
focal loss (``-sum_c t_c (1 - p_c)^gamma log p_c``, the class-index loss for a one-hot target).
Mixup 0.2 and the weight average (0.999) are part of the default recipe (``benchmarks/quality.py``).

- ``ema_decay`` > 0: an exponential moving average of the weights (and BatchNorm statistics), updated
  after every step with decay ``min(ema_decay, (1 + step) / (10 + step))`` (a warm-up so short runs are
  not dominated by the random initialisation). Validation, the best-epoch choice, the checkpoints'
  ``model`` and so the package use the averaged weights; training continues on the raw ones.
  every checkpoint holds the average and, at an epoch end, the raw weights, so ``--resume``
  continues exactly (tested against a straight run, from an epoch end and from mid-epoch).

The colour, crop and colour-constancy options act on images and live in :mod:`medpipe.preprocess`;
the decision rule lives in :mod:`medpipe.decision`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from medpipe.train.checkpoint import load_checkpoint
from medpipe.train.engine import Events, Order


class MixBatches:
    """``Events.ITERATION_STARTED`` handler: replace ``state.batch`` (x, class indices) with a mixed batch
    (x, soft targets of shape (N, C)). ``stream``: a further seed for runs whose step count restarts (a
    federated site's local training restarts at step 0 every round; the round makes its draws new)."""

    def __init__(self, n_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0,
                 seed: int = 0, stream: int = 0):
        self.n_classes, self.mixup_alpha, self.cutmix_alpha = n_classes, float(mixup_alpha), float(cutmix_alpha)
        self.prob, self.seed, self.stream = float(prob), int(seed), int(stream)

    def attach(self, engine) -> None:
        engine.on(Events.ITERATION_STARTED, self, Order.MODEL)  # before any other handler sees the batch

    def __call__(self, engine) -> None:
        batch = engine.state.batch
        if len(batch) == 3:  # (x, metadata, y): the metadata vectors are blended with the same weights
            x, m, y = batch
            engine.state.batch = self.mix(x, y, step=engine.state.iteration, metadata=m)
        else:
            engine.state.batch = self.mix(*batch, step=engine.state.iteration)

    def mix(self, x: torch.Tensor, y: torch.Tensor, step: int, metadata: torch.Tensor | None = None) -> tuple:
        """(x, y) mixed, or (x, metadata, y) when ``metadata`` is given."""
        x, y, lam, perm = self._mix(x, y, step)
        if metadata is None:
            return x, y
        if perm is not None:
            metadata = lam * metadata + (1.0 - lam) * metadata[perm]
        return x, metadata, y

    def _mix(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple:
        key = [self.seed, step, 0x6D6978] + ([self.stream] if self.stream else [])
        rng = np.random.default_rng(key)  # (seed, global step): the same draw after a resume
        if len(y) < 2 or rng.random() >= self.prob:
            return x, y, 1.0, None
        kinds = [k for k, a in (("mixup", self.mixup_alpha), ("cutmix", self.cutmix_alpha)) if a > 0]
        if not kinds:
            return x, y, 1.0, None
        kind = kinds[int(rng.integers(len(kinds)))]
        alpha = self.mixup_alpha if kind == "mixup" else self.cutmix_alpha
        lam = float(rng.beta(alpha, alpha))
        perm = torch.from_numpy(rng.permutation(len(y)))
        if kind == "mixup":
            x = lam * x + (1.0 - lam) * x[perm]
        else:
            h, w = x.shape[-2:]
            cut = math.sqrt(1.0 - lam)
            bh, bw = int(round(h * cut)), int(round(w * cut))
            cy, cx = int(rng.integers(h)), int(rng.integers(w))
            y0, y1 = max(0, cy - bh // 2), min(h, cy + (bh - bh // 2))
            x0, x1 = max(0, cx - bw // 2), min(w, cx + (bw - bw // 2))
            x = x.clone()
            x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)  # the box actually pasted (clipped at the border)
        onehot = torch.nn.functional.one_hot(y.long(), self.n_classes).float()
        return x, lam * onehot + (1.0 - lam) * onehot[perm], lam, perm


class WeightEMA:
    """Exponential moving average of the weights, validated and checkpointed in place of the raw weights.

    Events: STARTED (start the average, or reload it after a resume), ITERATION_COMPLETED (update),
    EPOCH_COMPLETED (put the average into the model before validation and the epoch-end checkpoint),
    EPOCH_STARTED (put the raw weights back for training), each first among the event's handlers
    (``Order.MODEL``), whatever the attach order. The average, and the raw weights while the model
    holds the average, are a part of every checkpoint the engine writes (``Engine.add_snapshot_part``), so
    a checkpoint and its average are always of the same step. (Runs from before kept them in ``ema.pt``
    beside ``last.pt``; a resume of such a run still reads it when it is of the checkpoint's step.)"""

    PART = "ema"
    LEGACY_FILE = "ema.pt"

    def __init__(self, decay: float, folder):
        from pathlib import Path

        self.decay, self.folder = float(decay), Path(folder)
        self.ema: dict[str, torch.Tensor] | None = None
        self.raw: dict[str, torch.Tensor] | None = None  # set while the model holds the average

    def attach(self, engine) -> None:
        # Order.MODEL: before any handler of the same event reads or saves the weights (a signal stop saves a
        # checkpoint at ITERATION_COMPLETED: its average must be of that step)
        engine.on(Events.STARTED, self.start, Order.MODEL)
        engine.on(Events.ITERATION_COMPLETED, self.update, Order.MODEL)
        engine.on(Events.EPOCH_COMPLETED, self.swap_in, Order.MODEL)
        engine.on(Events.EPOCH_STARTED, self.swap_out, Order.MODEL)
        engine.add_snapshot_part(self.PART, lambda: {"ema": self.ema, "raw": self.raw})

    @staticmethod
    def _copy(state: dict) -> dict:
        return {k: v.detach().clone() for k, v in state.items()}

    def start(self, engine) -> None:
        saved = engine.state.restored_parts.get(self.PART) if engine.state.resumed else None
        if engine.state.resumed and saved is None and (self.folder / self.LEGACY_FILE).is_file():
            legacy = load_checkpoint(self.folder / self.LEGACY_FILE)
            if legacy.get("global_step") == engine.state.iteration:
                saved = legacy
        if saved is not None and saved.get("ema") is not None:
            self.ema = {k: v.to(engine.device) for k, v in saved["ema"].items()}
            if saved.get("raw") is not None:  # the checkpoint's model is the average: train on from the raw
                engine.net.load_state_dict(saved["raw"])
            return
        if engine.state.resumed:
            print("the checkpoint holds no weight average of its step: the average starts again from the "
                  "checkpoint's weights", flush=True)
        self.ema = self._copy(engine.net.state_dict())

    @torch.no_grad()
    def update(self, engine) -> None:
        step = engine.state.iteration
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        for k, v in engine.net.state_dict().items():
            if v.dtype.is_floating_point:
                self.ema[k].mul_(d).add_(v.detach(), alpha=1.0 - d)
            else:
                self.ema[k].copy_(v)

    def swap_in(self, engine) -> None:
        self.raw = self._copy(engine.net.state_dict())
        engine.net.load_state_dict(self.ema)

    def swap_out(self, engine) -> None:
        if self.raw is not None:
            engine.net.load_state_dict(self.raw)
            self.raw = None


def batch_handlers(cfg, n_classes: int, stream: int = 0) -> list:
    """The handlers that act on training batches only (mixup / CutMix), for any training loop, e.g. a federated
    site's local epochs (which use them; the weight average is not: a site returns its raw weights to the
    aggregation)."""
    if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0:
        return [MixBatches(n_classes, cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob, cfg.seed, stream)]
    return []


def handlers(cfg, n_classes: int, checkpoints=None) -> list:
    """The recipe handlers a training config asks for (with the defaults: mixup and the weight average,
    ``mixup_alpha: 0`` and ``ema_decay: 0`` turn them off). ``checkpoints``: the run's
    checkpoint folder (the weight average is saved there)."""
    out = batch_handlers(cfg, n_classes)
    if cfg.ema_decay > 0:
        if checkpoints is None:
            raise ValueError("ema_decay needs the run's checkpoint folder")
        out.append(WeightEMA(cfg.ema_decay, checkpoints))
    return out
