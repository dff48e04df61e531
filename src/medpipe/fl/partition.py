"""One ingested dataset cut into N site folders, for one-machine simulations and experiments.

    medpipe fl partition --data DATA --out SITES --by localization            # one site per value
    medpipe fl partition --data DATA --out SITES --sites 3 --dirichlet 0.5    # non-IID class mixes

Whole groups (lesions) go to one site, so no lesion is seen by two sites. ``--by COLUMN`` gives each
distinct value of a metadata column its own site (a group takes its most common value); ``--sites N``
with ``--max-sites`` merges the smallest values. ``--dirichlet ALPHA`` draws, per class, the share of
that class's groups each site gets from Dirichlet(ALPHA) (small alpha: very different class mixes;
large alpha: near IID), seeded. Each site folder holds its own ``records.csv`` (the images stay where
they are) and the run's fixed ``classes.json``; the site then makes its own lesion-grouped split and
pixel cache like any ingested folder. ``partition.json`` records the method, seed and counts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from medpipe.data.sources import CLASSES_FILE, RECORDS_FILE, load_records, records_hash
from medpipe.errors import MedpipeError
from medpipe.utils import atomic_write_text, frame_csv, to_json


def _group_frame(table: pd.DataFrame) -> pd.DataFrame:
    """One row per group: its majority class index (ties to the lower index)."""
    first = table.groupby("group_id")["class_index"].agg(lambda s: int(s.value_counts().sort_index()
                                                                     .sort_values(ascending=False, kind="stable").index[0]))
    return first.rename("class_index").reset_index()


def assign_by_column(table: pd.DataFrame, column: str, max_sites: int = 0) -> dict[str, str]:
    """group -> site name (the column's value, or a merge of the smallest values beyond ``max_sites``)."""
    if column not in table.columns:
        extra = [c for c in table.columns if c not in ("image_id", "path", "label", "class_index", "group_id",
                                                        "sha256", "width", "height")]
        raise MedpipeError(f"records.csv has no column {column!r}; metadata columns: {extra or 'none'}")
    values = table[column].astype(str).replace("", "unknown")
    per_group = values.groupby(table["group_id"]).agg(lambda s: s.value_counts().sort_index()
                                                      .sort_values(ascending=False, kind="stable").index[0])
    sizes = per_group.value_counts()
    names = list(sizes.index)
    if max_sites and len(names) > max_sites:
        keep = names[: max_sites - 1]
        per_group = per_group.where(per_group.isin(keep), "other")
    return {g: _safe(v) for g, v in per_group.items()}


def _safe(name: str) -> str:
    out = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name)).strip("._") or "site"
    return out[:64]


def assign_dirichlet(table: pd.DataFrame, n_sites: int, alpha: float, seed: int = 0) -> dict[str, str]:
    """group -> ``site{k}``: per class, Dirichlet(alpha) shares of its groups over the sites."""
    if n_sites < 2:
        raise MedpipeError(f"--sites must be at least 2, got {n_sites}")
    if not alpha > 0:
        raise MedpipeError(f"--dirichlet alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    groups = _group_frame(table)
    out: dict[str, str] = {}
    for c in sorted(groups["class_index"].unique()):
        ids = groups.loc[groups["class_index"] == c, "group_id"].to_numpy()
        ids = ids[rng.permutation(len(ids))]
        share = rng.dirichlet(np.full(n_sites, alpha))
        cuts = np.round(np.cumsum(share) * len(ids)).astype(int)[:-1]
        for k, part in enumerate(np.split(ids, cuts)):
            out.update({g: f"site{k}" for g in part})
    return out


def partition(data_dir: str | os.PathLike, out: str | os.PathLike, *, by: str | None = None, sites: int = 0,
              dirichlet: float | None = None, seed: int = 0, min_images: int = 10) -> dict:
    """Write one site folder per site under ``out``; return the summary (also ``out/partition.json``)."""
    table, classes = load_records(data_dir)
    if (by is None) == (dirichlet is None):
        raise MedpipeError("give exactly one of --by COLUMN or --dirichlet ALPHA")
    assign = assign_by_column(table, by, sites) if by else assign_dirichlet(table, sites, dirichlet, seed)
    site_of = table["group_id"].map(assign)
    out = Path(out)
    summary = {"data": str(data_dir), "records_sha256": records_hash(table), "classes": classes,
               "method": {"by": by} if by else {"dirichlet": dirichlet, "sites": sites}, "seed": seed,
               "sites": {}, "skipped": {}}
    for name in sorted(site_of.unique()):
        part = table[site_of == name]
        counts = {c: int((part["class_index"] == i).sum()) for i, c in enumerate(classes)}
        if len(part) < min_images:  # too small to split into train/val/test
            summary["skipped"][name] = f"{len(part)} images (< {min_images})"
            continue
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / RECORDS_FILE, frame_csv(part))
        atomic_write_text(folder / CLASSES_FILE, json.dumps(classes))
        summary["sites"][name] = {"dir": str(folder), "images": int(len(part)), "groups": int(part["group_id"].nunique()),
                                  "class_counts": counts}
    if len(summary["sites"]) < 2:
        raise MedpipeError(f"the partition gave {len(summary['sites'])} usable site(s); need at least 2 "
                           f"(skipped: {summary['skipped']})")
    atomic_write_text(out / "partition.json", to_json(summary, indent=2))
    return summary
