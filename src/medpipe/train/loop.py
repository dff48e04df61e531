"""The training loop, readable top to bottom.

    medpipe train --data DATA_DIR --out RUN_DIR [--epochs 10 --image-size 64 --imbalance sampler ...]
    medpipe train --data DATA_DIR --out RUN_DIR --resume          # continue from checkpoints/last.pt

What happens:
 1. seeds, threads and device; the resolved config goes to RUN_DIR/config.yaml;
 2. the lesion-grouped split is made (or reused) and copied to RUN_DIR/splits.csv;
 3. every image is decoded once into the uint8 pixel cache at the training size;
 4. each epoch, a seeded order (class-balanced or shuffled) is cut into batches; each batch seeds the
    MONAI train preset from (seed, epoch, batch), so an epoch is the same whether run straight,
    resumed mid-way, or prepared in a background thread (MONAI ThreadDataLoader);
 5. AdamW + warm-up/cosine, optional label smoothing, gradient clipping; bf16 autocast on CUDA;
 6. validation each epoch: macro ROC AUC (monai.metrics), per-class AUC, balanced accuracy; one
    parseable line per epoch; metrics.jsonl; `last` and `best` checkpoints written atomically;
    early stopping on the monitored metric;
 7. SIGTERM: finish the step, save `last` (with the position inside the epoch), exit 143;
 8. at the end: best weights, temperature calibration on val, the model package and model.tar.gz,
    and the evaluation report on the test split.
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

import numpy as np
import torch
import torch.nn.functional as F

from medpipe.config import TrainConfig, write_config
from medpipe.data.cache import build_cache
from medpipe.decision import fit_rules
from medpipe.data.sources import load_records, records_hash
from medpipe.data.splits import SPLITS_FILE, SPLITS_META, ensure_splits
from medpipe.errors import MedpipeError
from medpipe.evaluate import compute_metrics
from medpipe.models import create_model
from medpipe.train import distributed
from medpipe.train.checkpoint import check_compatible, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from medpipe.preprocess import eval_batch, train_batch_preset
from medpipe.utils import resolve_device, seed_everything

log = logging.getLogger(__name__)
FAULT_SIGTERM_AT_STEP = "MEDPIPE_FAULT_SIGTERM_AT_STEP"  # fault injection for tests: signal self at step k
FAULT_NAN_AT_STEP = "MEDPIPE_FAULT_NAN_AT_STEP"  # fault injection for tests: a NaN input batch at step k
FAULT_KILL_RANK = "MEDPIPE_FAULT_KILL_RANK_AT_STEP"  # "rank:step": SIGKILL that rank at that step (first attempt)


class TrainingInterrupted(MedpipeError):
    exit_code = 143


class NonFiniteLoss(MedpipeError):
    pass


# --------------------------------------------------------------------------- data


class BatchSource(torch.utils.data.Dataset):
    """Key ``(epoch, b, rows)`` -> the augmented images of those cache rows stacked, and their labels.

    The train preset is re-seeded from (seed, epoch, b) for every batch, which makes an epoch
    reproducible regardless of threads, workers or where it was resumed.
    """

    def __init__(self, pixels, rows: np.ndarray, labels: np.ndarray, transform, seed: int):
        self.pixels, self.rows, self.labels, self.transform, self.seed = pixels, rows, labels, transform, seed

    def __getitem__(self, key: tuple[int, int, np.ndarray]):
        epoch, b, idx = key
        x = augment_batch(self.transform, np.asarray(self.pixels[self.rows[idx]]), self.seed, epoch, b)
        return x, torch.from_numpy(self.labels[idx])


def augment_batch(transform, images: np.ndarray, seed: int, epoch: int, b: int) -> torch.Tensor:
    """The train preset over batch ``b`` of ``epoch`` (NHWC uint8), seeded from (seed, epoch, b): the
    same images get the same augmentation wherever and whenever the batch is prepared."""
    transform.set_random_state(seed=(seed * 1_000_003 + epoch * 10_007 + b) % 2**32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-image tensors are tiny: a parallel region costs more than it saves
    try:
        return transform(images)
    finally:
        torch.set_num_threads(threads)


class _KeySampler(torch.utils.data.Sampler):
    """This epoch's batch keys; replaced between epochs while the worker processes stay up."""

    def __init__(self):
        self.keys: list = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def epoch_order(labels: np.ndarray, n_classes: int, cfg: TrainConfig, epoch: int) -> np.ndarray:
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    n = len(labels)
    if cfg.imbalance == "sampler":
        counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
        w = 1.0 / counts[labels]
        return torch.multinomial(torch.from_numpy(w), n, replacement=True, generator=g).numpy()
    return torch.randperm(n, generator=g).numpy()


def epoch_batches(order: np.ndarray, cfg: TrainConfig) -> list[np.ndarray]:
    batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    if len(batches) > 1 and len(batches[-1]) < max(2, cfg.batch_size // 4):
        batches = batches[:-1]  # a tiny last batch only adds BatchNorm noise
    if cfg.max_steps_per_epoch:
        batches = batches[: cfg.max_steps_per_epoch]
    return batches


def _identity(batch):
    return batch


def auto_workers(cuda: bool) -> int:
    """What ``workers=-1`` means (benchmarks/train_throughput.py, fraction of pure-compute speed).
    CPU: one background thread (MONAI ThreadDataLoader) that prepares the next batch while the step
    runs; with the per-batch preset it measured 0.92-0.95 on 2 cores against 0.89-0.90 inline.
    CUDA: worker processes, half this rank's share of the cores (at most 8): a single loader thread
    contends for the GIL with the thread launching kernels and fed an H100 at 0.48 of pure compute."""
    if not cuda:
        return 1
    per_rank = (os.cpu_count() or 2) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(8, per_rank // 2))


class BatchLoader:
    """An epoch's (images, labels) batches. ``workers``: 0 inline; 1 one background thread (MONAI
    ThreadDataLoader); >1 worker processes, started once and kept across epochs (a fork per epoch
    cost a quarter of a short epoch on a GPU); -1 :func:`auto_workers`. Batches are seeded per
    (epoch, batch), so every choice yields the same data (test)."""

    def __init__(self, source: BatchSource, workers: int, pin: bool):
        self.source, self.pin = source, pin
        self.workers = auto_workers(pin) if workers < 0 else workers
        self._sampler = _KeySampler()
        self._procs: torch.utils.data.DataLoader | None = None

    def epoch(self, epoch: int, batches: list[np.ndarray], skip: int = 0):
        keys = [(epoch, b, batches[b]) for b in range(skip, len(batches))]
        if self.workers == 0:
            return (self.source[k] for k in keys)
        if self.workers == 1:
            from monai.data import ThreadDataLoader

            return ThreadDataLoader(self.source, batch_size=None, sampler=keys, num_workers=0, buffer_size=2,
                                    pin_memory=self.pin, collate_fn=_identity)
        if self._procs is None:
            self._procs = torch.utils.data.DataLoader(
                self.source, batch_size=None, sampler=self._sampler, num_workers=self.workers,
                pin_memory=self.pin, persistent_workers=True, prefetch_factor=2, collate_fn=_identity)
        self._sampler.keys = keys
        return self._procs

    def close(self) -> None:
        """Stop the worker processes (a run in a long-lived process must not leave them behind)."""
        it = getattr(self._procs, "_iterator", None)
        self._procs = None
        if it is not None:
            it._shutdown_workers()


# --------------------------------------------------------------------------- pieces


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

        focal = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=cfg.focal_gamma, weight=weight)
        return lambda logits, y: focal(logits, y[:, None])
    return lambda logits, y: F.cross_entropy(logits, y, weight=weight, label_smoothing=cfg.label_smoothing)


def make_schedule(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_step(model, x, y, loss_fn, optimizer, scheduler, grad_clip: float, device):
    """One optimisation step; returns the loss, or None (step skipped) when it is not finite."""
    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    y = y.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
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
def predict_logits(model, pixels, rows: np.ndarray, spec, device, batch: int = 128) -> torch.Tensor:
    model.eval()
    outs = []
    for i in range(0, len(rows), batch):
        x = eval_batch(pixels[rows[i:i + batch]], spec).to(device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            outs.append(model(x).float().cpu())
    return torch.cat(outs) if outs else torch.zeros((0, 0))


def predict_logits_dist(model, pixels, rows: np.ndarray, spec, device, dd) -> torch.Tensor:
    """Validation logits in row order; with several ranks each predicts rows[rank::world] and the
    pieces are gathered and put back in order, so metrics equal the single-process ones exactly."""
    if not dd.enabled:
        return predict_logits(model, pixels, rows, spec, device)
    mine = np.arange(dd.rank, len(rows), dd.world)
    logits = predict_logits(model, pixels, rows[mine], spec, device)
    parts = dd.gather((mine, logits.numpy() if len(mine) else None))
    n_classes = next(p[1].shape[1] for p in parts if p[1] is not None) if len(rows) else 0
    out = np.zeros((len(rows), n_classes), np.float32)
    for idx, part in parts:
        if part is not None:
            out[idx] = part
    return torch.from_numpy(out)


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Temperature scaling (Guo et al. 2017): one scalar minimising validation NLL."""
    if len(y) < 2:
        return 1.0
    logits, y = logits.detach().clone(), y.clone()  # may come from inference_mode
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    t = float(log_t.detach().exp())
    return t if math.isfinite(t) and 0.05 < t < 20 else 1.0


class _StopFlag:
    def __init__(self):
        self.set = False
        self._old = None

    def install(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.set = True
        print("SIGTERM received: finishing this step, then saving a checkpoint", file=sys.stderr, flush=True)

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


class _Memory:
    """In-memory pixels with the PixelCache access the loop uses (``pixels[rows]``)."""

    def __init__(self, pixels: np.ndarray):
        self.pixels = pixels


def _prepare_shards(root: str, spec, dd):
    import pandas as pd

    from medpipe.data import shards as shardmod
    from medpipe.errors import ConfigError

    index = shardmod.read_index(root)
    if index["image_size"] != spec.image_size or index["interpolation"] != spec.interpolation:
        raise ConfigError(f"{root} holds {index['image_size']}x{index['image_size']} {index['interpolation']} "
                          f"pixels; train with --image-size {index['image_size']} --interpolation "
                          f"{index['interpolation']} or re-shard")
    val_meta, val_px = shardmod.load_split(index, "val")
    test_meta, test_px = shardmod.load_split(index, "test")
    cols = ["image_id", "lesion_id", "label", "class_index"]
    val_t = pd.DataFrame(val_meta, columns=cols)
    test_t = pd.DataFrame(test_meta, columns=cols)
    counts = np.sum([s["class_counts"] for s in index["shards"] if s["split"] == "train"], axis=0)
    # the train table is only counts here (its rows are streamed): one row per image, by class
    train_t = pd.DataFrame({"image_id": [""] * int(counts.sum()),
                            "class_index": np.repeat(np.arange(len(counts)), counts)})
    if train_t.empty:
        raise MedpipeError(f"{root}: the training split is empty")
    return index, train_t, val_t, _Memory(val_px), (test_t, test_px)


def stream_batches(index: dict, cfg: TrainConfig, epoch: int, dd, transform, skip: int):
    """(batch list for counting, iterator of (x, y)) for one streamed epoch on this rank.

    Every rank runs the same number of steps (needed by DDP): the smallest rank's sample count this
    epoch, in whole batches. With one process and no balancing that is every training record once.
    """
    from medpipe.data.shards import ShardStream

    train = [s for s in index["shards"] if s["split"] == "train"]
    balanced = cfg.imbalance == "sampler"
    if balanced:
        per_rank = [sum(s["n"] for s in train) // dd.world] * dd.world
    else:
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train))
        names = [train[i] for i in order]
        per_rank = [sum(s["n"] for s in names[r::dd.world]) for r in range(dd.world)]
    n = min(per_rank)
    sizes = [cfg.batch_size] * (n // cfg.batch_size)
    rest = n % cfg.batch_size
    if rest and (rest >= max(2, cfg.batch_size // 4) or not sizes):  # same rule as epoch_batches
        sizes.append(rest)
    if cfg.max_steps_per_epoch:
        sizes = sizes[: cfg.max_steps_per_epoch]
    stream = ShardStream(index, epoch=epoch, seed=cfg.seed, rank=dd.rank, world=dd.world, balanced=balanced,
                         n_samples=sum(sizes) if balanced else None)

    def gen():
        it = iter(stream)
        for b, size in enumerate(sizes):
            chunk = [next(it) for _ in range(size)]
            if b < skip:
                continue
            x = augment_batch(transform, np.stack([px for _, px in chunk]), cfg.seed, epoch, b)
            yield x, torch.tensor([m["class_index"] for m, _ in chunk], dtype=torch.int64)

    return sizes, gen()


# --------------------------------------------------------------------------- main entry


def train(data_dir: str | Path, run_dir: str | Path, cfg: TrainConfig, *, resume: bool | str = False,
          checkpoint_dir: str | Path | None = None, model_dir: str | Path | None = None,
          report_dir: str | Path | None = None, progress: bool = False, evaluate_test: bool = True) -> dict:
    from medpipe.data import shards as shardmod

    streaming = shardmod.is_shards(data_dir)  # a shard set (local folder or fsspec URL) instead of a data folder
    data_src = str(data_dir)
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else run_dir / "checkpoints"
    model_dir = Path(model_dir) if model_dir else run_dir / "model"
    report_dir = Path(report_dir) if report_dir else run_dir / "report"
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    # 1. seeds, threads, device, config
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
    if dd.main:
        write_config(cfg, run_dir / "config.yaml")
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if not resume and restarts > 0 and (ckpt_dir / "last.pt").is_file():
        resume = True  # torchrun restarted the workers after a failure: continue from the last checkpoint
    if not dd.main:
        dd.barrier()  # rank 0 prepares split and cache first; the others then reuse them

    # 2-3. records, split and pixels: an ingested folder (split + pixel cache) or a shard set (streamed)
    spec = cfg.preprocess()
    if streaming:
        index, train_t, val_t, cache, test_data = _prepare_shards(data_src, spec, dd)
        classes, rec_hash = index["classes"], index["records_sha256"]
        tr_y = train_t["class_index"].to_numpy().astype(np.int64)
        class_counts = np.sum([s["class_counts"] for s in index["shards"] if s["split"] == "train"], axis=0)
        tr_rows, va_rows = None, np.arange(len(val_t))
        va_y = torch.from_numpy(val_t["class_index"].to_numpy().astype(np.int64))
        n_classes = len(classes)
        if dd.main:
            (run_dir / "shards_index.json").write_text(json.dumps(index, indent=2))
        log.info("streaming %d train shards from %s; val %d / test %d in memory",
                 sum(s["split"] == "train" for s in index["shards"]), data_src, len(val_t), len(test_data[1]))
    else:
        index = test_data = None
        table, classes = load_records(data_dir)
        splits, reused = ensure_splits(data_dir, data_dir, seed=cfg.split_seed, val=cfg.val_fraction,
                                       test=cfg.test_fraction, table=table)
        if dd.main:
            for name in (SPLITS_FILE, SPLITS_META):
                shutil.copyfile(data_dir / name, run_dir / name)
        split_of = dict(zip(splits["image_id"], splits["split"]))
        table = table.assign(split=table["image_id"].map(split_of))
        train_t, val_t = table[table["split"] == "train"], table[table["split"] == "val"]
        if train_t.empty:
            raise MedpipeError("the training split is empty")
        n_classes = len(classes)

        # 3. pixel cache
        cache = build_cache(table, data_dir / "cache", (spec.image_size, spec.image_size), spec.interpolation,
                            progress=progress)
        rec_hash = records_hash(table)
        tr_rows, va_rows = cache.rows(train_t["image_id"]), cache.rows(val_t["image_id"])
        tr_y = train_t["class_index"].to_numpy().astype(np.int64)
        va_y = torch.from_numpy(val_t["class_index"].to_numpy().astype(np.int64))
        class_counts = np.bincount(tr_y, minlength=n_classes)
        log.info("train %d / val %d / test %d images; split %s; cache %s", len(train_t), len(val_t),
                 int((table["split"] == "test").sum()), "reused" if reused else "new", cache.folder.name)
    if dd.main:
        dd.barrier()

    # 4-5. model, optimiser, schedule, loss
    model = create_model(cfg.model, n_classes, pretrained=cfg.pretrained, init_weights=cfg.init_weights,
                         dropout=cfg.dropout).to(device).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = len(epoch_batches(np.arange(len(tr_y) // dd.world * dd.world), cfg)) // dd.world
    scheduler = make_schedule(optimizer, cfg, steps_per_epoch)
    loss_fn = make_loss(cfg, class_counts, device)
    transform = train_batch_preset(spec, cfg.augmentation())
    sign = -1.0 if cfg.monitor == "val_loss" else 1.0

    start_epoch, skip_batches, global_step = 0, 0, 0
    best, best_epoch, stale = -math.inf, -1, 0
    if resume:
        path = ckpt_dir / "last.pt" if resume in (True, "last") else Path(resume)
        state = load_checkpoint(path)
        check_compatible(state, cfg.to_dict(), classes)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, skip_batches, global_step = state["epoch"], state["batch_in_epoch"], state["global_step"]
        best, best_epoch, stale = state["best_metric"], state["best_epoch"], state["stale_epochs"]
        set_rng_state(state["rng"])
        print(f"resumed from {path} at epoch {start_epoch + 1}, batch {skip_batches}", flush=True)

    net = model  # the module itself; `model` is its DDP wrapper when distributed
    if dd.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(net, device_ids=[dd.local_rank] if device.type == "cuda" else None)

    def snapshot(epoch: int, batch_in_epoch: int) -> dict:
        return {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": {}, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "global_step": global_step,
                "best_metric": best, "best_epoch": best_epoch, "stale_epochs": stale, "rng": rng_state(),
                "config": cfg.to_dict(), "classes": classes, "records_sha256": rec_hash}

    stop = _StopFlag().install()
    fault_step = int(os.environ.get(FAULT_SIGTERM_AT_STEP, "0") or 0)
    nan_step = int(os.environ.get(FAULT_NAN_AT_STEP, "0") or 0)
    kill_rank, kill_step = (int(v) for v in (os.environ.get(FAULT_KILL_RANK) or "-1:-1").split(":"))
    metrics_path = run_dir / "metrics.jsonl"
    from tqdm.auto import tqdm

    batch_loader = None if streaming else BatchLoader(
        BatchSource(cache.pixels, tr_rows, tr_y, transform, cfg.seed), cfg.workers, pin=device.type == "cuda")
    try:
        for epoch in range(start_epoch, cfg.epochs):
            # 4. this epoch's batches
            if streaming:
                batches, loader = stream_batches(index, cfg, epoch, dd, transform, skip_batches)
            else:
                batches = epoch_batches(epoch_order(tr_y, n_classes, cfg, epoch), cfg)
                if dd.enabled:  # one global (class-balanced) order; each rank takes every world-th batch
                    batches = batches[dd.rank:len(batches) // dd.world * dd.world:dd.world]
                loader = batch_loader.epoch(epoch, batches, skip_batches)
            model.train()
            t0, seen, loss_sum, n_loss, steps_done = time.perf_counter(), 0, 0.0, 0, 0
            bar = tqdm(total=len(batches), initial=skip_batches, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=not progress, leave=False)
            for b, (x, y) in enumerate(loader, start=skip_batches):
                if nan_step and global_step + 1 == nan_step:
                    x = torch.full_like(x, float("nan"))
                loss = train_step(model, x, y, loss_fn, optimizer, scheduler, cfg.grad_clip, device)
                if loss is None:
                    # The optimiser step was skipped, but the forward pass already moved BatchNorm statistics,
                    # so this state is not saved: checkpoints/last.pt (previous epoch end) stays the good one.
                    shown = train_t["image_id"].iloc[batches[b][:4]] if not streaming else ["(streamed)"]
                    raise NonFiniteLoss(f"loss became non-finite at epoch {epoch + 1}, batch {b} "
                                        f"(images {', '.join(shown)}...); "
                                        f"the step was not applied; the last good checkpoint is {ckpt_dir / 'last.pt'}")
                global_step += 1
                steps_done += 1
                seen += len(y)
                loss_sum += loss.item() * len(y)
                n_loss += len(y)
                bar.update()
                bar.set_postfix(loss=f"{loss_sum / n_loss:.3f}")
                if fault_step and global_step == fault_step:
                    os.kill(os.getpid(), signal.SIGTERM)
                if dd.rank == kill_rank and global_step == kill_step and restarts == 0:
                    os.kill(os.getpid(), signal.SIGKILL)
                if dd.any(stop.set):  # every rank stops at the same step
                    if dd.main:
                        save_checkpoint(ckpt_dir / "last.pt", snapshot(epoch, b + 1))
                    dd.barrier()
                    raise TrainingInterrupted(f"stopped by SIGTERM at epoch {epoch + 1}, batch {b + 1}; "
                                              f"checkpoint saved to {ckpt_dir / 'last.pt'}; continue with --resume")
            bar.close()
            done = steps_done
            if done != len(batches) - skip_batches:
                raise MedpipeError(f"the data loader ended after {done} of {len(batches) - skip_batches} batches "
                                   f"in epoch {epoch + 1} (an error in a loader thread; see the log above)")
            skip_batches = 0
            train_time = time.perf_counter() - t0

            # 6. validation (each rank predicts its share; gathered exactly, no padding)
            dd.sync_buffers(net)
            val_logits = predict_logits_dist(net, cache.pixels, va_rows, spec, device, dd)
            if len(va_y):
                val_loss = float(F.cross_entropy(val_logits, va_y))
                vm = compute_metrics(va_y.numpy(), torch.softmax(val_logits, 1).numpy(), classes, bootstrap=0)
            else:
                val_loss, vm = float("nan"), {"macro_auc": float("nan"), "balanced_accuracy": float("nan"), "per_class": {}}
            record = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, n_loss), "val_loss": val_loss,
                      "val_auc": vm["macro_auc"], "val_bacc": vm["balanced_accuracy"],
                      "val_auc_per_class": {c: m["auc"] for c, m in vm["per_class"].items()},
                      "lr": optimizer.param_groups[0]["lr"], "images_per_s": seen / max(train_time, 1e-9),
                      "epoch_seconds": train_time}
            if dd.enabled:  # the training loss is averaged over ranks; throughput summed
                parts = dd.gather((loss_sum, n_loss, seen))
                record["train_loss"] = sum(p[0] for p in parts) / max(1, sum(p[1] for p in parts))
                record["images_per_s"] = sum(p[2] for p in parts) / max(train_time, 1e-9)
                record["world_size"] = dd.world
            if dd.main:
                print(f"epoch={epoch + 1} train_loss={record['train_loss']:.4f} val_loss={val_loss:.4f} "
                      f"val_auc={record['val_auc']:.4f} val_bacc={record['val_bacc']:.4f} lr={record['lr']:.6g} "
                      f"images_per_s={record['images_per_s']:.1f}", flush=True)
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            score = record[cfg.monitor]
            improved = not math.isnan(score) and sign * score > best
            if improved:
                best, best_epoch, stale = sign * score, epoch + 1, 0
            else:
                stale += 1
            if dd.main:
                save_checkpoint(ckpt_dir / "last.pt", snapshot(epoch + 1, 0))
                if improved or not (ckpt_dir / "best.pt").is_file():
                    shutil.copyfile(ckpt_dir / "last.pt", ckpt_dir / ".best.pt.tmp")
                    os.replace(ckpt_dir / ".best.pt.tmp", ckpt_dir / "best.pt")
            dd.barrier()
            if stale >= cfg.patience:
                print(f"early stopping: {cfg.monitor} has not improved for {stale} epochs", flush=True)
                break
    finally:
        stop.restore()
        if batch_loader is not None:
            batch_loader.close()

    if dd.enabled:
        digests = dd.gather(distributed.params_digest(net))
        if dd.main:
            from medpipe.utils import atomic_write_text

            atomic_write_text(run_dir / "distributed.json", json.dumps(
                {"world_size": dd.world, "ranks_in_sync": len(set(digests)) == 1, "weights_sha256": digests},
                indent=2))
        dd.barrier()
        model = net  # drop the DDP wrapper first: its reducer holds the process group
        import gc

        gc.collect()
        dd.close()
        if not dd.main:
            return {"rank": dd.rank, "world_size": dd.world}

    # 8. best weights -> calibration -> package -> test evaluation (rank 0 only)
    best_state = load_checkpoint(ckpt_dir / "best.pt")
    model.load_state_dict(best_state["model"])
    val_logits = predict_logits(model, cache.pixels, va_rows, spec, device)
    temperature = fit_temperature(val_logits, va_y) if len(va_y) else 1.0
    val_probs = torch.softmax(val_logits / temperature, 1).numpy()
    val_metrics = compute_metrics(va_y.numpy(), val_probs, classes, bootstrap=0) if len(va_y) else {}
    rules = fit_rules(val_probs, va_y.numpy(), classes, default=cfg.decision_rule) if len(va_y) else None  # chosen on val
    return finish_package(model.cpu(), cfg, classes, spec, temperature, val_metrics, best_epoch, rec_hash, data_dir,
                          run_dir, model_dir, report_dir, evaluate_test=evaluate_test, progress=progress,
                          test_data=test_data, decision=rules)


def _compact(m: dict) -> dict:
    keys = ("n", "macro_auc", "macro_auc_ci95", "balanced_accuracy", "accuracy", "ece",
            "mel_sensitivity_at_spec80", "mel_sensitivity_at_spec90")
    out = {k: m[k] for k in keys if k in m}
    out["per_class_auc"] = {c: v["auc"] for c, v in m.get("per_class", {}).items()}
    return out


def finish_package(model, cfg, classes, spec, temperature, val_metrics, best_epoch, rec_hash, data_dir, run_dir,
                   model_dir, report_dir, *, evaluate_test: bool, progress: bool, test_data=None,
                   decision: dict | None = None) -> dict:
    from medpipe.evaluate import evaluate_package
    from medpipe.package import build_sagemaker_tarball, save_package
    from medpipe.utils import atomic_write_text

    metrics = {"best_epoch": best_epoch, "val": _compact(val_metrics) if val_metrics else {}}
    meta = save_package(model_dir, model, name=f"{cfg.model}-ham", arch=cfg.model, classes=classes, spec=spec,
                        temperature=temperature, metrics=metrics, config=cfg.to_dict(), records_sha256=rec_hash,
                        decision=decision)
    summary = {"run_dir": str(run_dir), "model_dir": str(model_dir), "best_epoch": best_epoch,
               "temperature": temperature, "val": metrics["val"]}
    if evaluate_test and test_data is not None:  # streamed shards: the test split is in memory
        from medpipe.evaluate import evaluate_arrays
        from medpipe.infer.predictor import Predictor

        t, px = test_data
        result = evaluate_arrays(Predictor(model_dir), px, np.arange(len(t)), t["class_index"].to_numpy(),
                                 list(t["image_id"]), list(t["label"]), report_dir, split="test", tta=cfg.tta,
                                 bootstrap=cfg.bootstrap)
    elif evaluate_test:
        result = evaluate_package(model_dir, data_dir, report_dir, split="test", splits_csv=run_dir / SPLITS_FILE,
                                  tta=cfg.tta, bootstrap=cfg.bootstrap, progress=progress)
    if evaluate_test:
        metrics["test"] = _compact(result["metrics"])
        meta["metrics"] = metrics
        atomic_write_text(Path(model_dir) / "model.json", json.dumps(meta, indent=2, default=float))
        summary.update(test=metrics["test"], report=result["report_md"], plots=result["plots"])
    build_sagemaker_tarball(model_dir)
    summary["tarball"] = str(Path(model_dir) / "model.tar.gz")
    return summary
