"""What the server does with site updates: check them, average them, pool the sites' metrics.

* **Checks** (:func:`check_update`): an update must carry exactly the global model's tensors, each
  with its shape, and only finite values; anything else is excluded from the round with the reason.
* **FedAvg / FedProx aggregation** (:func:`weighted_average`): every floating tensor is the average of
  the sites' tensors weighted by their training sample counts (FedProx differs only in the sites'
  local loss). BatchNorm running means and variances are averaged the same way, deliberately: the
  output is one model that must serve every site and sites that never took part, which FedBN's
  per-site statistics cannot give; the cost, slower agreement on very different colour statistics,
  is measured in ``benchmarks/federated.py``. Integer buffers (``num_batches_tracked``) take the max.
* **Pooled metrics without moving images** (:func:`site_statistics`, :func:`pooled_metrics`): each
  site sends, per class, histograms of the predicted probability for its positive and negative
  validation images (1000 bins) and its confusion matrix. Summed over sites they give the pooled
  one-vs-rest ROC AUC (a bin's ties count half: within 1/1000 of the exact AUC over the pooled
  predictions) and the pooled balanced accuracy exactly. No image, label list or per-image score
  leaves a site.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

BINS = 1000


def restore_scalars(update: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Flower's ``Array`` carries 0-d tensors (e.g. ``num_batches_tracked``) as shape (1,): give them
    back the reference's 0-d shape. Nothing else is reshaped."""
    out = dict(update)
    for name, ref in reference.items():
        arr = out.get(name)
        if arr is not None and ref.ndim == 0 and arr.shape == (1,):
            out[name] = arr.reshape(())
    return out


def check_update(update: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> str | None:
    """The reason ``update`` cannot be aggregated into ``reference``'s model, or None when it can."""
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        parts = ([f"missing {len(missing)} tensors (e.g. {missing[0]})"] if missing else []) + \
                ([f"{len(extra)} unknown tensors (e.g. {extra[0]})"] if extra else [])
        return "; ".join(parts)
    for name, ref in reference.items():
        arr = update[name]
        if tuple(arr.shape) != tuple(ref.shape):
            return f"tensor {name} has shape {tuple(arr.shape)}, expected {tuple(ref.shape)}"
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            return f"tensor {name} has {bad} non-finite values (NaN or inf)"
    return None


def weighted_average(updates: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    """Sample-count weighted mean of float tensors (float64 accumulation); max of integer tensors."""
    if not updates:
        raise ValueError("no updates to aggregate")
    total = float(sum(n for _, n in updates))
    if total <= 0:
        raise ValueError("the updates carry no training samples")
    out = {}
    for name, first in updates[0][0].items():
        if np.issubdtype(first.dtype, np.floating):
            acc = np.zeros(first.shape, np.float64)
            for arrays, n in updates:
                acc += arrays[name].astype(np.float64) * (n / total)
            out[name] = acc.astype(first.dtype)
        else:
            out[name] = np.asarray(np.max(np.stack([arrays[name] for arrays, _ in updates]), axis=0), first.dtype)
    return out


def site_statistics(y: np.ndarray, probs: np.ndarray, n_classes: int, bins: int = BINS) -> dict[str, list[int]]:
    """Aggregate statistics of one site's validation predictions (see the module docstring)."""
    y = np.asarray(y, np.int64)
    probs = np.asarray(probs, np.float64)
    idx = np.clip((probs * bins).astype(np.int64), 0, bins - 1)
    pos = np.zeros((n_classes, bins), np.int64)
    neg = np.zeros((n_classes, bins), np.int64)
    for c in range(n_classes):
        is_pos = y == c
        pos[c] = np.bincount(idx[is_pos, c], minlength=bins)
        neg[c] = np.bincount(idx[~is_pos, c], minlength=bins)
    conf = np.zeros((n_classes, n_classes), np.int64)
    if len(y):
        np.add.at(conf, (y, probs.argmax(1)), 1)
    return {"hist_pos": pos.ravel().tolist(), "hist_neg": neg.ravel().tolist(), "confusion": conf.ravel().tolist()}


def _hist_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return math.nan
    below = np.cumsum(neg) - neg  # negatives in lower bins
    return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))


def pooled_metrics(stats: list[dict], classes: list[str], bins: int = BINS) -> dict:
    """Macro AUC, per-class AUC and balanced accuracy over all sites' summed statistics."""
    c = len(classes)
    pos = sum(np.asarray(s["hist_pos"], np.int64).reshape(c, bins) for s in stats)
    neg = sum(np.asarray(s["hist_neg"], np.int64).reshape(c, bins) for s in stats)
    conf = sum(np.asarray(s["confusion"], np.int64).reshape(c, c) for s in stats)
    per_class = {name: _hist_auc(pos[i], neg[i]) for i, name in enumerate(classes)}
    missing = [k for k, v in per_class.items() if math.isnan(v)]
    if missing:
        warnings.warn(f"pooled AUC undefined for classes absent from every site's validation split: {missing}",
                      stacklevel=2)
    aucs = [v for v in per_class.values() if not math.isnan(v)]
    support = conf.sum(1)
    recalls = [conf[i, i] / support[i] for i in range(c) if support[i] > 0]
    return {"n": int(conf.sum()), "macro_auc": float(np.mean(aucs)) if aucs else math.nan,
            "balanced_accuracy": float(np.mean(recalls)) if recalls else math.nan, "per_class_auc": per_class,
            "support": [int(v) for v in support]}  # validation images per class over all sites (counts only)
