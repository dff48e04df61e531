"""Grouped, stratified, seeded splits.

No group (lesion or patient) is ever in two splits. Groups are stratified by their label (the most
common label among a group's images, ties to the lower class index), shuffled with the seed, and
dealt per class so that every class with at least 3 groups has a group in val and in test. A class
with 2 groups puts one in train and one in test; a class with 1 group stays in train.

``splits.csv`` (image_id, group_id, label, split) sits next to ``splits.json`` (seed, fractions,
records hash, the CSV's sha256); :func:`ensure_splits` reuses an existing split only when all of those match.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from medpipe.data.sources import load_records, records_hash
from medpipe.utils import atomic_write_json, atomic_write_text, frame_csv, read_csv_table

SPLITS_FILE = "splits.csv"
SPLITS_META = "splits.json"
SPLIT_NAMES = ("train", "val", "test")


def group_labels(table: pd.DataFrame) -> pd.Series:
    counts = table.groupby(["group_id", "class_index"]).size().reset_index(name="n")
    counts = counts.sort_values(["group_id", "n", "class_index"], ascending=[True, False, True])
    return counts.drop_duplicates("group_id").set_index("group_id")["class_index"]


def make_splits(table: pd.DataFrame, seed: int = 0, val: float = 0.15, test: float = 0.15) -> pd.DataFrame:
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"val and test fractions must be in [0, 1) with val + test < 1, got {val}, {test}")
    rng = np.random.default_rng(seed)
    glabel = group_labels(table)
    assignment: dict[str, str] = {}
    for cls in sorted(glabel.unique()):
        groups = np.array(sorted(glabel.index[glabel == cls]), dtype=object)  # numpy's str dtype drops trailing NULs
        groups = groups[rng.permutation(len(groups))]
        g = len(groups)
        if g >= 3:
            n_test = max(1, int(round(g * test))) if test > 0 else 0
            n_val = max(1, int(round(g * val))) if val > 0 else 0
            while n_test + n_val > g - 1:  # keep at least one group for training
                if n_val >= n_test and n_val > 1:
                    n_val -= 1
                elif n_test > 1:
                    n_test -= 1
                else:
                    break
        elif g == 2:
            n_test, n_val = (1 if test > 0 else 0), 0
        else:
            n_test = n_val = 0
        for i, grp in enumerate(groups):
            assignment[grp] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    out = table[["image_id", "group_id", "label"]].copy()
    out["split"] = out["group_id"].map(assignment)
    return out.sort_values("image_id").reset_index(drop=True)


def ensure_splits(data_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, seed: int = 0,
                  val: float = 0.15, test: float = 0.15, force: bool = False,
                  table: pd.DataFrame | None = None,
                  records_sha256: str | None = None) -> tuple[pd.DataFrame, bool]:
    """Return (splits, reused). Writes ``splits.csv`` + ``splits.json`` into ``out_dir`` (default data_dir).

    ``table`` is the already-loaded record table of ``data_dir``, when the caller has it, and
    ``records_sha256`` its :func:`records_hash`, when the caller computed it already. An existing split is
    reused only when ``splits.json`` names the same seed, fractions and records and the sha256 of the
    ``splits.csv`` it describes: runs of other split seeds on the same data folder at once (each rewrites both
    files) can never pair one seed's metadata with another's split.
    """
    if table is None:
        table, _ = load_records(data_dir)
    out_dir = Path(out_dir or data_dir)
    meta = {"seed": int(seed), "val": float(val), "test": float(test),
            "records_sha256": records_sha256 or records_hash(table)}
    csv_path, meta_path = out_dir / SPLITS_FILE, out_dir / SPLITS_META
    if not force and csv_path.is_file() and meta_path.is_file():
        try:
            saved = json.loads(meta_path.read_text())
            data = csv_path.read_bytes()
            if {k: saved.get(k) for k in meta} == meta and saved.get("csv_sha256") == hashlib.sha256(data).hexdigest():
                return read_csv_table(io.BytesIO(data)), True
        except (ValueError, OSError):
            pass
    splits = make_splits(table, seed=seed, val=val, test=test)
    write_splits(out_dir, splits, meta)
    return splits, False


def write_splits(out_dir: str | os.PathLike, splits: pd.DataFrame, meta: dict) -> None:
    """``splits.csv`` and ``splits.json`` (``meta`` + the CSV's sha256), each written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = frame_csv(splits)
    atomic_write_text(out_dir / SPLITS_FILE, text)
    atomic_write_json(out_dir / SPLITS_META, {**meta, "csv_sha256": hashlib.sha256(text.encode()).hexdigest()})


def summarize(splits: pd.DataFrame) -> pd.DataFrame:
    return splits.pivot_table(index="label", columns="split", values="image_id", aggfunc="count", fill_value=0) \
        .reindex(columns=[s for s in SPLIT_NAMES])
