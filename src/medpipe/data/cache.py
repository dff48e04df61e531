"""Decoded-pixel cache: every image decoded once, resized, stored as one uint8 memmap.

Training never decodes a JPEG: the cache holds ``N x H x W x 3`` uint8 pixels in ``pixels.npy``
(opened with ``mmap_mode='r'``, never pickled), with ``index.json`` listing image ids in row order. Its folder name is a hash of every file's
sha256, the size, the interpolation and the cache format version, so any change in data or
preprocessing gives a new cache instead of stale pixels. Pixels are produced by
:func:`medpipe.data.imageio.decode_image` — the very function the predictor uses on raw bytes —
so cached and raw paths give identical arrays.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from medpipe.data import imageio

CACHE_VERSION = 1


def cache_key(sha256s: list[str], size: tuple[int, int], interpolation: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": CACHE_VERSION, "size": list(size), "interpolation": interpolation}).encode())
    for s in sha256s:
        h.update(s.encode())
    return h.hexdigest()[:24]


def _decode_job(args):
    path, size, interpolation, max_pixels = args
    return imageio.read_image(path, size=size, interpolation=interpolation, max_pixels=max_pixels)


class PixelCache:
    """A read-only view of a built cache: ``cache[i]`` is an HxWx3 uint8 array."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.index: list[str] = json.loads((folder / "index.json").read_text())["image_ids"]
        self.pixels = np.load(folder / "pixels.npy", mmap_mode="r", allow_pickle=False)
        self.row = {image_id: i for i, image_id in enumerate(self.index)}

    def __len__(self) -> int:
        return len(self.index)

    def get(self, image_id: str) -> np.ndarray:
        return self.pixels[self.row[image_id]]

    def rows(self, image_ids) -> np.ndarray:
        return np.asarray([self.row[i] for i in image_ids], dtype=np.int64)


def build_cache(table: pd.DataFrame, cache_root: str | os.PathLike, size: tuple[int, int],
                interpolation: str = "bicubic", *, workers: int | None = None, progress: bool = False,
                max_pixels: int = imageio.DEFAULT_MAX_PIXELS) -> PixelCache:
    """Build (or reuse) the cache for ``table`` at ``size`` = (height, width)."""
    table = table.sort_values("image_id")
    key = cache_key(list(table["sha256"]), size, interpolation)
    folder = Path(cache_root) / key
    if (folder / "index.json").is_file() and (folder / "pixels.npy").is_file():
        return PixelCache(folder)
    tmp = Path(cache_root) / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n, (h, w) = len(table), size
    arr = np.lib.format.open_memmap(tmp / "pixels.npy", mode="w+", dtype=np.uint8, shape=(n, h, w, 3))
    jobs = [(p, tuple(size), interpolation, max_pixels) for p in table["path"]]
    from tqdm.auto import tqdm

    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=n, desc=f"cache {h}x{w}", unit="img", disable=not progress)
    if workers > 1 and n >= 16:
        with ProcessPoolExecutor(workers) as pool:
            for i, img in enumerate(pool.map(_decode_job, jobs, chunksize=max(1, min(64, n // (workers * 8))))):
                arr[i] = img
                bar.update()
    else:
        for i, job in enumerate(jobs):
            arr[i] = _decode_job(job)
            bar.update()
    bar.close()
    arr.flush()
    del arr
    meta = {"image_ids": list(table["image_id"]), "size": list(size), "interpolation": interpolation,
            "version": CACHE_VERSION}
    (tmp / "index.json").write_text(json.dumps(meta))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return PixelCache(folder)
