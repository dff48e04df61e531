"""Streaming shards: the record table and cached pixels packed into sequential tar files.

    medpipe shard --data DATA --out SHARDS [--image-size 64] [--shard-size 1000]    # SHARDS: a folder or s3://
    medpipe train --data SHARDS --out RUN ...            # SHARDS: a folder or any fsspec URL (s3://, gs://, ...)

Format (WebDataset conventions): each sample is ``<key>.png`` (the cached RGB pixels at the training
size, lossless) and ``<key>.json`` (image_id, group_id (the lesion or patient), label, class_index, split), consecutive in
the tar. Training shards are written per class (``train-<class>-NNNNN.tar``) so a class-balanced
stream can draw classes evenly without reading everything; val and test are ``val-NNNNN.tar`` and
``test-NNNNN.tar``. ``index.json`` lists shards with their per-class counts, the classes, the
preprocessing (size, interpolation), the record-table hash and the seeded split (seed and fractions;
training with other split settings is refused, see ``medpipe.train.data``).

Reading never touches the local disk beyond the stream: fsspec opens each shard (``s3://`` through
:mod:`medpipe.data.s3`, with the standard AWS settings) and ``tarfile`` reads it sequentially (``r|``); a shard
that cannot be read (no such bucket or key, access denied, the endpoint unreachable, a truncated tar) is a
:class:`~medpipe.errors.ShardError` naming its URL and the reason. Writing to ``s3://`` puts each shard as one
object (atomic), ``index.json`` last, so a shard set whose index is there is whole. Shards are divided across
ranks and DataLoader workers; a seeded shuffle buffer mixes samples. Without balancing an epoch reads every
training record exactly once; with ``imbalance=sampler`` classes are drawn uniformly (each class stream cycles,
reshuffled).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medpipe.data import s3
from medpipe.data.cache import build_cache
from medpipe.data.sources import load_records, records_hash
from medpipe.data.splits import ensure_splits
from medpipe.errors import ShardError, StorageError
from medpipe.utils import atomic_write_bytes, to_json

INDEX = "index.json"
FORMAT = "medpipe-shards-1"


def _fs_join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def _open(url: str):
    """A binary file object for ``url`` (a path, an s3:// URL or any fsspec URL)."""
    if s3.is_s3(url):
        return s3.open_read(url)
    import fsspec

    return fsspec.open(url, "rb").open()


def _unreadable(url: str, exc: BaseException) -> ShardError:
    why = s3.reason(exc)[0] if s3.is_s3(url) else f"{exc.__class__.__name__}: {exc}"
    return ShardError(f"{url}: cannot read: {why}")


def is_shards(root: str | Path) -> bool:
    if s3.is_s3(root):  # an s3:// URL is never an ingested data folder: read_index says what is wrong with it
        return True
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(str(root))
        return fs.isfile(_fs_join(path, INDEX))
    except (OSError, ValueError, ImportError):
        return False


def write_shards(data_dir: str | Path, out: str | Path, *, size: int = 64, interpolation: str = "bicubic",
                 per_shard: int = 1000, split_seed: int = 0, val: float = 0.15, test: float = 0.15,
                 progress: bool = False) -> dict:
    """Pack an ingested data folder (records, split, pixel cache at ``size``) into shards under ``out``."""

    data_dir = Path(data_dir)
    out = out if s3.is_s3(out) else Path(out)
    table, classes = load_records(data_dir)
    records_sha256 = records_hash(table)
    splits, _ = ensure_splits(data_dir, data_dir, seed=split_seed, val=val, test=test, table=table,
                              records_sha256=records_sha256)
    table = table.assign(split=table["image_id"].map(dict(zip(splits["image_id"], splits["split"]))))
    cache = build_cache(table, data_dir / "cache", (size, size), interpolation, progress=progress)
    if not s3.is_s3(out):
        out.mkdir(parents=True, exist_ok=True)
    shards = []
    groups = [("train", c, table[(table["split"] == "train") & (table["label"] == c)]) for c in classes]
    groups += [(s, None, table[table["split"] == s]) for s in ("val", "test")]
    for split, cls, part in groups:
        part = part.sort_values("image_id")
        for k in range(0, max(len(part), 1), per_shard):
            chunk = part.iloc[k:k + per_shard]
            if chunk.empty:
                continue
            name = f"{split}-{cls}-{k // per_shard:05d}.tar" if cls else f"{split}-{k // per_shard:05d}.tar"
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for _, r in chunk.iterrows():
                    png = io.BytesIO()
                    Image.fromarray(cache.get(r["image_id"])).save(png, format="PNG", compress_level=1)
                    meta = {"image_id": r["image_id"], "group_id": r["group_id"],
                            "label": r["label"], "class_index": int(r["class_index"]), "split": split}
                    key = r["image_id"].replace(".", "_")
                    for ext, data in (("png", png.getvalue()), ("json", json.dumps(meta).encode())):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size, info.mode, info.mtime = len(data), 0o644, 0
                        tar.addfile(info, io.BytesIO(data))
            _put(out, name, buf.getvalue())
            counts = chunk["class_index"].value_counts().to_dict()
            shards.append({"name": name, "split": split, "n": len(chunk),
                           "class_counts": [int(counts.get(i, 0)) for i in range(len(classes))]})
    index = {"format": FORMAT, "classes": classes, "image_size": size, "interpolation": interpolation,
             "records_sha256": records_sha256, "split_seed": split_seed, "val_fraction": val,
             "test_fraction": test, "shards": shards,
             "counts": {s: int((table["split"] == s).sum()) for s in ("train", "val", "test")}}
    _put(out, INDEX, to_json(index, indent=2).encode())  # last: a shard set with its index is whole
    return index


def _put(out: str | Path, name: str, data: bytes) -> None:
    """Write one file of a shard set atomically (s3://: one PUT)."""
    if isinstance(out, str):
        s3.write_bytes(s3.join(out, name), data)
    else:
        atomic_write_bytes(out / name, data)


def read_index(root: str | Path) -> dict:
    try:
        with _open(_fs_join(str(root), INDEX)) as f:
            index = json.loads(f.read())
    except StorageError as exc:
        raise ShardError(str(exc)) from None
    except (OSError, ValueError) as exc:
        if s3.is_s3(str(root)):
            raise ShardError(f"{root}: cannot read {INDEX} ({s3.reason(exc)[0]})") from None
        raise ShardError(f"{root}: cannot read {INDEX} ({exc.__class__.__name__})") from None
    if index.get("format") != FORMAT:
        raise ShardError(f"{root}: not a medpipe shard set (format {index.get('format')!r})")
    index["root"] = str(root)
    return index


def iter_shard(root: str, name: str):
    """(meta, pixels uint8 HWC) for each sample of one shard, read as a stream; a shard that cannot be read to
    its end is a ShardError naming its URL."""
    url = _fs_join(root, name)
    try:
        yield from _read_shard(url, name)
    except StorageError as exc:
        raise ShardError(str(exc)) from None
    except (tarfile.TarError, EOFError) as exc:
        raise ShardError(f"{url}: truncated or not a tar file ({exc}); write the shard set again") from None
    except ShardError:
        raise
    except Exception as exc:
        if not s3.is_storage_error(exc):
            raise
        raise _unreadable(url, exc) from None


def _read_shard(url: str, name: str):
    with _open(url) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        current, parts = None, {}
        for m in tar:
            if not m.isfile():
                continue
            key, _, ext = m.name.rpartition(".")
            if current is not None and key != current:
                yield _sample(name, current, parts)
                parts = {}
            current = key
            parts[ext] = tar.extractfile(m).read()
        if current is not None:
            yield _sample(name, current, parts)


def _sample(shard: str, key: str, parts: dict):
    if "json" not in parts or "png" not in parts:
        raise ShardError(f"{shard}: sample {key!r} lacks its .png or .json member")
    meta = json.loads(parts["json"])
    with Image.open(io.BytesIO(parts["png"])) as im:
        if im.format != "PNG":
            raise ShardError(f"{shard}: sample {key!r} is not PNG")
        pixels = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return meta, pixels


def load_split(index: dict, split: str) -> tuple[list[dict], np.ndarray]:
    """All samples of a (small) split in memory, in image_id order."""
    metas, pixels = [], []
    for s in index["shards"]:
        if s["split"] == split:
            for meta, px in iter_shard(index["root"], s["name"]):
                metas.append(meta)
                pixels.append(px)
    order = sorted(range(len(metas)), key=lambda i: metas[i]["image_id"])
    size = index["image_size"]
    arr = np.stack([pixels[i] for i in order]) if order else np.zeros((0, size, size, 3), np.uint8)
    return [metas[i] for i in order], arr


def deal_shards(shards: list[dict], world: int, seed: int, epoch: int) -> list[list[dict]]:
    """This epoch's training shards for each rank: a seeded per-epoch order, then the largest first, each to the
    rank with the fewest samples so far (longest-processing-time first). Shards are written per class, so their
    sizes differ widely (nevi fill many full shards, rare classes a few small ones); balancing the totals lets
    every rank stream nearly its full share. Only shards of equal size change places between epochs, so the
    smallest rank total (:func:`min_rank_total`) is the same every epoch."""
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    ranked = sorted((shards[i] for i in order), key=lambda s: -s["n"])  # stable: equal sizes keep the order
    out: list[list[dict]] = [[] for _ in range(world)]
    totals = [0] * world
    for s in ranked:
        r = min(range(world), key=lambda k: (totals[k], k))
        out[r].append(s)
        totals[r] += s["n"]
    return out


def min_rank_total(shards: list[dict], world: int) -> int:
    """The smallest number of samples :func:`deal_shards` gives a rank (the same for every epoch and seed)."""
    return min(sum(s["n"] for s in part) for part in deal_shards(shards, world, 0, 0))


class ShardStream(torch.utils.data.IterableDataset):
    """One epoch of training samples (meta, pixels) for this rank and DataLoader worker.

    balanced=False: this rank's shards (:func:`deal_shards`, then every num_workers-th for a worker), read
    once, interleaved (each next sample from a shard drawn in proportion to what it has left, so the
    per-class shards mix uniformly instead of one class after another) through a seeded shuffle buffer.
    balanced=True:
    ``n_samples`` draws, each picking a class uniformly and taking the next sample of that class's
    stream (its shards cycle, reshuffled each pass).
    """

    def __init__(self, index: dict, *, epoch: int, seed: int, rank: int = 0, world: int = 1, balanced: bool = False,
                 n_samples: int | None = None, buffer: int = 512):
        self.index, self.epoch, self.seed, self.rank, self.world = index, epoch, seed, rank, world
        self.balanced, self.buffer = balanced, buffer
        self.train = [s for s in index["shards"] if s["split"] == "train"]
        total = sum(s["n"] for s in self.train)
        self.n_samples = n_samples if n_samples is not None else total // world

    def _worker(self):
        info = torch.utils.data.get_worker_info()
        return (info.id, info.num_workers) if info else (0, 1)

    def _rng(self, *extra) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, self.rank, *extra])

    def __iter__(self):
        wid, nw = self._worker()
        if self.balanced:
            yield from self._balanced(wid, nw)
            return
        mine = deal_shards(self.train, self.world, self.seed, self.epoch)[self.rank][wid::nw]
        rng = self._rng(wid)
        buf = []
        for sample in self._interleaved(mine, rng):
            if len(buf) < self.buffer:
                buf.append(sample)
                continue
            j = int(rng.integers(len(buf)))
            buf[j], sample = sample, buf[j]
            yield sample
        rng.shuffle(buf)
        yield from buf

    def _interleaved(self, shards: list[dict], rng: np.random.Generator):
        """Every sample of ``shards`` once, the next one always from a shard drawn with probability proportional
        to its samples left (a uniformly random merge of the streams; one open reader per shard)."""
        readers = [iter_shard(self.index["root"], s["name"]) for s in shards]
        left = np.array([s["n"] for s in shards], dtype=np.float64)
        while left.sum() > 0:
            k = int(rng.choice(len(readers), p=left / left.sum()))
            sample = next(readers[k], None)
            if sample is None:  # fewer than the index said: that shard is done
                left[k] = 0
                continue
            left[k] -= 1
            yield sample
            if left[k] == 0:
                for extra in readers[k]:  # more than the index said: keep them, as a plain read would
                    yield extra

    def _balanced(self, wid: int, nw: int):
        classes = self.index["classes"]
        by_class = {c: [s["name"] for s in self.train if s["class_counts"][c] > 0] for c in range(len(classes))}
        present = [c for c, names in by_class.items() if names]
        rng = self._rng(wid, 1)
        streams = {}

        def stream(c):
            cycle, share = 0, True
            while True:
                names = list(by_class[c])
                np.random.default_rng([self.seed, self.epoch, self.rank, wid, c, cycle]).shuffle(names)
                # ranks and workers read different samples of a class (every k-th), unless the class is
                # too small to give each of them one, in which case all read all of it
                k, j, got = 0, self.rank * nw + wid, 0
                for name in names:
                    for sample in iter_shard(self.index["root"], name):
                        if not share or k % (self.world * nw) == j:
                            got += 1
                            yield sample
                        k += 1
                if got == 0:
                    share = False
                cycle += 1

        n = self.n_samples // nw + (1 if wid < self.n_samples % nw else 0)
        for _ in range(n):
            c = present[int(rng.integers(len(present)))]
            if c not in streams:
                streams[c] = stream(c)
            yield next(streams[c])
