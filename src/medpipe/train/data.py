"""Training data: one interface over an ingested folder (pixel cache) and a shard set (streamed).

    source = open_source(DATA, cfg, dd)      # CachedSource for a data folder, ShardSource for shards
    source.steps_per_epoch                    # batches per epoch on this rank (the one rule: batch_sizes)
    for x, y in source.epoch(epoch, skip=0):  # this rank's augmented batches of that epoch
        ...
    source.val, source.test                   # Split: pixels, rows, labels, ids, label names (in memory/memmap)
    source.metadata                           # MetadataSpec when the run takes patient metadata, else None

With metadata (``cfg.metadata``, cached source only) a batch is ``(x, m, y)``: ``m`` the encoded metadata
vectors with fields hidden at random (seeded per batch like the images); each Split carries its vectors.

Both sources cut an epoch with :func:`batch_sizes` and seed the train preset per (seed, epoch, batch)
(:func:`augment_batch`), so an epoch is the same straight, resumed mid-way, inline, in a thread or in
worker processes. Both honour the split settings: the cached source splits the record table with
``split_seed`` and the fractions; a shard set carries the split it was written with, and training
with other settings is refused naming both (re-shard with the same ``--split-seed``/fractions).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medpipe.config import TrainConfig
from medpipe.data import shards
from medpipe.data.cache import build_cache
from medpipe.data.metadata import FIELDS as METADATA_FIELDS, MetadataSpec, parse_fields as parse_metadata_fields
from medpipe.data.shards import ShardStream, is_shards, load_split, min_rank_total
from medpipe.data.sources import load_records, records_hash
from medpipe.data.splits import ensure_splits, write_splits
from medpipe.errors import ConfigError, MedpipeError
from medpipe.preprocess import train_batch_preset
from medpipe.utils import atomic_write_text, to_json

log = logging.getLogger(__name__)


@dataclass
class Split:
    """One split held in memory (or memory-mapped): ``pixels[rows]`` are its images in ``ids`` order."""

    pixels: np.ndarray
    rows: np.ndarray
    labels: np.ndarray  # class indices, int64
    ids: list[str]
    names: list[str]  # class names per image
    metadata: np.ndarray | None = None  # encoded patient metadata per image (N x dim), when the run takes it

    def __len__(self) -> int:
        return len(self.rows)


# --------------------------------------------------------------------------- the epoch rules


def batch_sizes(n: int, cfg: TrainConfig) -> list[int]:
    """How ``n`` samples are cut into batches: whole batches, plus the rest when it is at least a quarter
    batch (a tiny last batch only adds BatchNorm noise) or the only batch; at most ``max_steps_per_epoch``."""
    sizes = [cfg.batch_size] * (n // cfg.batch_size)
    rest = n % cfg.batch_size
    if rest and (rest >= max(2, cfg.batch_size // 4) or not sizes):
        sizes.append(rest)
    return sizes


def epoch_order(labels: np.ndarray, n_classes: int, cfg: TrainConfig, epoch: int) -> np.ndarray:
    """This epoch's sample order: class-balanced draws (imbalance=sampler) or a permutation."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    n = len(labels)
    if cfg.imbalance == "sampler":
        counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
        w = 1.0 / counts[labels]
        return torch.multinomial(torch.from_numpy(w), n, replacement=True, generator=g).numpy()
    return torch.randperm(n, generator=g).numpy()


def epoch_batches(order: np.ndarray, cfg: TrainConfig, rank: int = 0, world: int = 1) -> list[np.ndarray]:
    """``order`` cut by :func:`batch_sizes`; with several ranks each takes every world-th batch (all the
    same count), then the per-rank step cap applies."""
    cuts = np.cumsum([0, *batch_sizes(len(order), cfg)])
    batches = [order[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    batches = batches[rank:len(batches) // world * world:world]
    return batches[: cfg.max_steps_per_epoch] if cfg.max_steps_per_epoch else batches


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


# --------------------------------------------------------------------------- cached batches and their loader


class BatchSource(torch.utils.data.Dataset):
    """Key ``(epoch, b, rows)`` -> the augmented images of those cache rows stacked, and their labels."""

    def __init__(self, pixels, rows: np.ndarray, labels: np.ndarray, transform, seed: int,
                 metadata: np.ndarray | None = None, spec: MetadataSpec | None = None):
        self.pixels, self.rows, self.labels, self.transform, self.seed = pixels, rows, labels, transform, seed
        self.metadata, self.spec = metadata, spec

    def __getitem__(self, key: tuple[int, int, np.ndarray]):
        epoch, b, idx = key
        x = augment_batch(self.transform, np.asarray(self.pixels[self.rows[idx]]), self.seed, epoch, b)
        if self.metadata is None:
            return x, torch.from_numpy(self.labels[idx])
        rng = np.random.default_rng([self.seed, epoch, b, 0x6D657461])
        return x, torch.from_numpy(self.spec.mask(self.metadata[idx], rng)), torch.from_numpy(self.labels[idx])


class _KeySampler(torch.utils.data.Sampler):
    """This epoch's batch keys; replaced between epochs while the worker processes stay up."""

    def __init__(self):
        self.keys: list = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


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
        self._iter = None

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
        self._iter = iter(self._procs)  # a persistent loader hands back the same worker-backed iterator
        return self._iter

    def close(self) -> None:
        """Stop the worker processes (a run in a long-lived process must not leave them behind). A
        DataLoader's worker-backed iterator stops and joins its workers when it is released, so this drops
        the loader and its iterator and collects them (no private DataLoader API). Should a caller still
        hold the iterator (e.g. a traceback in flight), the workers stop when that reference goes."""
        if self._procs is None:
            return
        self._iter = self._procs = None
        gc.collect()


# --------------------------------------------------------------------------- the two sources


class CachedSource:
    """An ingested data folder: records, the seeded lesion-grouped split, and the uint8 pixel cache."""

    streamed = False

    def __init__(self, data_dir: str | Path, cfg: TrainConfig, *, rank: int = 0, world: int = 1,
                 progress: bool = False, pin: bool = False):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.data_dir = data_dir = Path(data_dir)
        table, self.classes = load_records(data_dir)
        self.records_sha256 = records_hash(table)
        splits, reused = ensure_splits(data_dir, data_dir, seed=cfg.split_seed, val=cfg.val_fraction,
                                       test=cfg.test_fraction, table=table, records_sha256=self.records_sha256)
        # the run folder gets this split from memory: another run may rewrite DATA/splits.csv meanwhile
        self._splits = splits
        self._split_meta = {"seed": int(cfg.split_seed), "val": float(cfg.val_fraction),
                            "test": float(cfg.test_fraction), "records_sha256": self.records_sha256}
        table = table.assign(split=table["image_id"].map(dict(zip(splits["image_id"], splits["split"]))))
        spec = cfg.preprocess()
        # validation and test: pixels at the model's input size, decoded as serving decodes them (the eval path)
        cache = build_cache(table, data_dir / "cache", spec.size, spec.interpolation, progress=progress)
        # training: the same, or a larger cache that the train preset cuts random resized crops from
        side = cfg.train_cache_size
        big = cache if side == spec.image_size else build_cache(table, data_dir / "cache", (side, side),
                                                                spec.interpolation, progress=progress)
        self.metadata = metadata_spec(table, cfg, data_dir)
        parts = {}
        for name in ("train", "val", "test"):
            t = table[table["split"] == name]
            px = big if name == "train" else cache
            parts[name] = Split(px.pixels, px.rows(t["image_id"]), t["class_index"].to_numpy().astype(np.int64),
                                list(t["image_id"]), list(t["label"]), encode_table(self.metadata, t))
        self.train, self.val, self.test = parts["train"], parts["val"], parts["test"]
        if not len(self.train):
            raise MedpipeError(f"{data_dir}: the training split is empty")
        self.class_counts = np.bincount(self.train.labels, minlength=len(self.classes))
        self._loader = BatchLoader(BatchSource(big.pixels, self.train.rows, self.train.labels,
                                               train_batch_preset(spec, cfg.augmentation()), cfg.seed,
                                               self.train.metadata, self.metadata), cfg.workers, pin=pin)
        log.info("train %d / val %d / test %d images; split %s; cache %s%s", len(self.train), len(self.val),
                 len(self.test), "reused" if reused else "new", cache.folder.name,
                 f"; training crops from the {side}x{side} cache {big.folder.name}" if big is not cache else "")

    def write_provenance(self, run_dir: Path) -> None:
        """The split this run used (``splits.csv`` + ``splits.json``), written into the run folder."""

        write_splits(run_dir, self._splits, self._split_meta)

    def batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of ``epoch`` as positions in the train split (one global seeded order)."""
        order = epoch_order(self.train.labels, len(self.classes), self.cfg, epoch)
        return epoch_batches(order, self.cfg, self.rank, self.world)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.batches(0))

    def epoch(self, epoch: int, skip: int = 0):
        return self._loader.epoch(epoch, self.batches(epoch), skip)

    def describe_batch(self, epoch: int, b: int) -> str:
        return ", ".join(self.train.ids[i] for i in self.batches(epoch)[b][:4])

    def close(self) -> None:
        self._loader.close()


def metadata_spec(table, cfg: TrainConfig, where: Path) -> MetadataSpec | None:
    """The run's metadata inputs fitted on ``table`` (vocabularies over the table's words, the age normalisation
    over the training split), or None for an image-only run: ``metadata: none``, or ``auto`` on data without
    metadata. Asking for a field the data lacks is a ConfigError naming it."""
    fields = parse_metadata_fields(cfg.metadata)
    if not fields:
        return None
    present = [f for f in METADATA_FIELDS if f in table.columns and (table[f].astype(str).str.strip() != "").any()]
    missing = [f for f in fields if f not in present]
    if cfg.metadata.strip() not in ("auto", "all") and missing:
        raise ConfigError(f"config key 'metadata': {where} has no {', '.join(missing)} values (ingest keeps age, sex "
                          "and site; see --metadata-columns)")
    fields = tuple(f for f in fields if f in present)
    if not fields:
        log.info("metadata: auto, but %s carries none: image-only model", where)
        return None
    records = table[list(fields)].astype(str).to_dict("records")
    spec = MetadataSpec.fit(records, fields, cfg.metadata_mask)
    train = table[table["split"] == "train"][list(fields)].astype(str).to_dict("records")
    age = MetadataSpec.fit(train, fields) if "age" in fields else spec
    spec = dataclasses.replace(spec, age_mean=age.age_mean, age_std=age.age_std, fusion=cfg.metadata_fusion)
    log.info("metadata inputs %s (%d values per image)", ", ".join(spec.fields), spec.dim)
    return spec


def encode_table(spec: MetadataSpec | None, table) -> np.ndarray | None:
    """The encoded metadata of a record table's rows (N x dim), or None without a spec."""
    if spec is None:
        return None
    return spec.encode_many(table[list(spec.fields)].astype(str).to_dict("records"), list(table["image_id"]))


class ShardSource:
    """A shard set (folder or fsspec URL): training shards streamed, val and test read into memory."""

    streamed = True

    metadata = None  # a shard set carries pixels and labels only

    def __init__(self, root: str, cfg: TrainConfig, *, rank: int = 0, world: int = 1,
                 progress: bool = False, pin: bool = False):
        self.cfg, self.rank, self.world = cfg, rank, world
        if parse_metadata_fields(cfg.metadata) and cfg.metadata.strip() not in ("auto", "all"):
            raise ConfigError(f"{root}: a shard set carries no patient metadata; train on the ingested data folder "
                              "for metadata: " + cfg.metadata)
        self.index = index = shards.read_index(root)
        _check_shards_match(root, index, cfg)
        self.classes, self.records_sha256 = index["classes"], index["records_sha256"]
        train_shards = [s for s in index["shards"] if s["split"] == "train"]
        self.class_counts = np.sum([s["class_counts"] for s in train_shards], axis=0).astype(np.int64)
        if not self.class_counts.sum():
            raise MedpipeError(f"{root}: the training split is empty")
        self.val, self.test = (self._load(s) for s in ("val", "test"))
        self._transform = train_batch_preset(cfg.preprocess(), cfg.augmentation())
        log.info("streaming %d train shards from %s; val %d / test %d in memory", len(train_shards), root,
                 len(self.val), len(self.test))

    def write_provenance(self, run_dir: Path) -> None:
        """The shard index (split, preprocessing, record hash) copied into the run folder."""

        atomic_write_text(Path(run_dir) / "shards_index.json", to_json(self.index, indent=2))

    def _load(self, split: str) -> Split:
        metas, px = load_split(self.index, split)
        return Split(px, np.arange(len(metas)), np.array([m["class_index"] for m in metas], np.int64),
                     [m["image_id"] for m in metas], [m["label"] for m in metas])

    def _plan(self, epoch: int) -> tuple[list[int], bool]:
        """(batch sizes on this rank, balanced). Every rank runs the same number of steps (DDP needs it), and
        every epoch too (the schedule, the time budget and resumes count steps per epoch): balanced, an equal
        share of the samples; otherwise each rank streams the shards dealt to it this epoch (sizes balanced
        across ranks, :func:`medpipe.data.shards.deal_shards`) and stops after the smallest rank total."""
        train = [s for s in self.index["shards"] if s["split"] == "train"]
        balanced = self.cfg.imbalance == "sampler"
        total = sum(s["n"] for s in train)
        if balanced or self.world == 1:
            n = total // self.world
        else:
            if len(train) < self.world:
                raise ConfigError(f"{len(train)} training shards for {self.world} ranks: each rank streams whole "
                                  "shards, so re-shard into at least as many shards as ranks (or use imbalance: "
                                  "sampler)")

            n = min_rank_total(train, self.world)
        sizes = batch_sizes(n, self.cfg)
        return (sizes[: self.cfg.max_steps_per_epoch] if self.cfg.max_steps_per_epoch else sizes), balanced

    @property
    def steps_per_epoch(self) -> int:
        return len(self._plan(0)[0])

    def epoch(self, epoch: int, skip: int = 0):
        sizes, balanced = self._plan(epoch)
        stream = ShardStream(self.index, epoch=epoch, seed=self.cfg.seed, rank=self.rank, world=self.world,
                             balanced=balanced, n_samples=sum(sizes) if balanced else None)
        it = iter(stream)
        for b, size in enumerate(sizes):
            chunk = [next(it) for _ in range(size)]
            if b >= skip:
                x = augment_batch(self._transform, np.stack([px for _, px in chunk]), self.cfg.seed, epoch, b)
                yield x, torch.tensor([m["class_index"] for m, _ in chunk], dtype=torch.int64)

    def describe_batch(self, epoch: int, b: int) -> str:
        return "(streamed)"

    def close(self) -> None:
        pass


def _check_shards_match(root: str, index: dict, cfg: TrainConfig) -> None:
    """A shard set holds pixels at one size and one split: training with other settings is refused."""
    if cfg.train_cache_size != cfg.image_size:
        raise ConfigError(f"{root}: a shard set holds pixels at one size ({index['image_size']}x{index['image_size']}); "
                          f"--cache-size {cfg.cache_size} (training crops from larger pixels) needs the ingested "
                          "data folder")
    if index["image_size"] != cfg.image_size or index["interpolation"] != cfg.interpolation:
        raise ConfigError(f"{root} holds {index['image_size']}x{index['image_size']} {index['interpolation']} "
                          f"pixels; train with --image-size {index['image_size']} --interpolation "
                          f"{index['interpolation']} or re-shard")
    written = {"split_seed": index.get("split_seed", 0), "val_fraction": index.get("val_fraction", 0.15),
               "test_fraction": index.get("test_fraction", 0.15)}
    diffs = [f"{k} {getattr(cfg, k)!r} (shards: {v!r})" for k, v in written.items() if getattr(cfg, k) != v]
    if diffs:
        raise ConfigError(f"{root} was split with split_seed {written['split_seed']}, val {written['val_fraction']}, "
                          f"test {written['test_fraction']}; this run asks for " + ", ".join(diffs) +
                          ": pass the shards' values or re-shard with --split-seed/--val/--test")


def open_source(data: str | Path, cfg: TrainConfig, *, rank: int = 0, world: int = 1,
                progress: bool = False, pin: bool = False) -> CachedSource | ShardSource:
    """The training source for ``data``: a shard set (folder or fsspec URL with index.json) or an
    ingested data folder."""

    if is_shards(data):
        return ShardSource(str(data), cfg, rank=rank, world=world, progress=progress, pin=pin)
    return CachedSource(data, cfg, rank=rank, world=world, progress=progress, pin=pin)
