"""Stand-in for ``medpipe.train.engine.local_fit`` / ``medpipe.train.data.open_source`` until the
training engine lands: the same signatures, built from the current loop's pieces. Delete this file
when ``medpipe.train.engine`` exists (``medpipe.fl.site`` imports the engine first)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medpipe.config import TrainConfig
from medpipe.errors import MedpipeError
from medpipe.train.loop import (BatchLoader, BatchSource, epoch_batches, epoch_order, make_loss, make_optimizer,
                                make_schedule, predict_logits, train_step)

__all__ = ["open_source", "local_fit", "proximal_term", "predict_logits"]


@dataclass
class Split:
    pixels: np.ndarray
    rows: np.ndarray
    labels: np.ndarray
    ids: list[str]
    names: list[str]

    def __len__(self) -> int:
        return len(self.rows)


class CachedSource:
    def __init__(self, data_dir, cfg: TrainConfig):
        from medpipe.data.cache import build_cache
        from medpipe.data.sources import load_records, records_hash
        from medpipe.data.splits import ensure_splits
        from medpipe.preprocess import train_batch_preset

        self.cfg, self.data_dir = cfg, Path(data_dir)
        table, self.classes = load_records(data_dir)
        splits, _ = ensure_splits(data_dir, data_dir, seed=cfg.split_seed, val=cfg.val_fraction,
                                  test=cfg.test_fraction, table=table)
        table = table.assign(split=table["image_id"].map(dict(zip(splits["image_id"], splits["split"]))))
        spec = cfg.preprocess()
        cache = build_cache(table, self.data_dir / "cache", (spec.image_size, spec.image_size), spec.interpolation)
        self.records_sha256 = records_hash(table)
        parts = {}
        for name in ("train", "val", "test"):
            t = table[table["split"] == name]
            parts[name] = Split(cache.pixels, cache.rows(t["image_id"]), t["class_index"].to_numpy().astype(np.int64),
                                list(t["image_id"]), list(t["label"]))
        self.train, self.val, self.test = parts["train"], parts["val"], parts["test"]
        if not len(self.train):
            raise MedpipeError(f"{data_dir}: the training split is empty")
        self.class_counts = np.bincount(self.train.labels, minlength=len(self.classes))
        self._loader = BatchLoader(BatchSource(cache.pixels, self.train.rows, self.train.labels,
                                               train_batch_preset(spec), cfg.seed), cfg.workers, pin=False)

    def batches(self, epoch: int):
        return epoch_batches(epoch_order(self.train.labels, len(self.classes), self.cfg, epoch), self.cfg)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.batches(0))

    def epoch(self, epoch: int):
        return self._loader.epoch(epoch, self.batches(epoch))

    def close(self) -> None:
        self._loader.close()


def open_source(data, cfg: TrainConfig, **_):
    return CachedSource(data, cfg)


def proximal_term(reference: dict, mu: float):
    ref: dict[str, torch.Tensor] = {}

    def term(model):
        total = 0.0
        for name, p in model.named_parameters():
            if name not in ref:
                ref[name] = reference[name].detach().to(p.device, p.dtype)
            total = total + (p - ref[name]).pow(2).sum()
        return 0.5 * mu * total

    return term


def local_fit(cfg: TrainConfig, source, *, epochs: int, weights: dict | None = None, device="cpu", loss_terms=(),
              handlers=(), epoch_offset: int = 0):
    from medpipe.models import create_model

    device = torch.device(device)
    model = create_model(cfg.model, len(source.classes), dropout=cfg.dropout)
    if weights is not None:
        model.load_state_dict(weights)
    model = model.to(device).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_schedule(optimizer, dataclasses.replace(cfg, epochs=epochs), source.steps_per_epoch)
    base = make_loss(cfg, source.class_counts, device)
    terms = list(loss_terms)

    def loss_fn(logits, y):
        loss = base(logits, y)
        for t in terms:
            loss = loss + t(model)
        return loss

    records = []
    for e in range(epoch_offset, epoch_offset + epochs):
        model.train()
        total, n = 0.0, 0
        for x, y in source.epoch(e):
            loss = train_step(model, x, y, loss_fn, optimizer, scheduler, cfg.grad_clip, device)
            if loss is None:
                raise MedpipeError(f"loss became non-finite in local epoch {e + 1}")
            total, n = total + loss.item() * len(y), n + len(y)
        records.append({"epoch": e + 1, "train_loss": total / max(1, n), "n_train": int(np.sum(source.class_counts))})
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, records
