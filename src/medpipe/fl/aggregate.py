"""What the server does with site replies: check them, aggregate them, pool the sites' metrics.

A site is trusted with nothing it could use to steer the federation: every reply is checked against
the server's own model and limits before it is used, and a reply that fails is excluded from the
round with the reason (by site name in the round's log and record); it never aborts the round.

* **Update checks** (:func:`check_train_reply`, :func:`check_update`): an update must carry exactly
  the global model's tensors, each with the global tensor's dtype (a float16 or int64 tensor for a
  float32 one is refused, never cast) and shape, only finite values, and move the model by at most
  ``max_update_ratio`` times the global model's norm: ``||update - global|| <= ratio * ||global||``
  over all floating tensors, in float64 (:func:`update_ratio`; the default
  :data:`MAX_UPDATE_RATIO` is far above what honest sites send, see docs/federated-security.md).
  Integer tensors are counters (BatchNorm's ``num_batches_tracked``): each may only grow, by at most
  the optimisation steps the site can have taken, ``num-examples * local_epochs`` (a step uses at
  least one image; :func:`check_counters`), so a site cannot push a counter backwards or to 2**62.
  ``num-examples`` must be a positive integer no larger than the site's registered image count
  (``--site-examples``; ``fl simulate`` registers each site folder's size) or else the
  ``--max-examples`` cap; the reported count is recorded per round, accepted or not. The optional
  ``class-counts`` (the site's training images per class) must hold one non-negative integer per
  class of the run, adding up to ``num-examples`` (:func:`check_class_counts`).
* **Aggregation** (:func:`aggregate`): ``mean`` (FedAvg / FedProx: every floating tensor is the
  average of the sites' tensors weighted by their sample counts; FedProx differs only in the sites'
  local loss), or a robust choice that ignores the sample counts: ``median`` (coordinate-wise
  median, Flower's FedMedian) or ``trimmed-mean`` (coordinate-wise mean after dropping the
  ``int(trim * n)`` largest and smallest values, Flower's FedTrimmedAvg; with 0.2 that needs 5 sites
  to drop anything). The maths is Flower's (``np.median`` and ``scipy.stats.trim_mean``, which
  Flower's ``aggregate_trimmed_avg`` copies), computed here because the in-process path (tests,
  ``benchmarks/federated.py``) runs where Flower cannot be installed (its pins conflict with the dev
  extra); tests/test_fl_robust.py checks the results equal Flower's own functions. BatchNorm running
  means and variances are aggregated like the weights, deliberately: the output is one model that
  must serve every site and sites that never took part, which FedBN's per-site statistics cannot
  give; the cost, slower agreement on very different colour statistics, is measured in
  ``benchmarks/federated.py``. Integer buffers (``num_batches_tracked``) take the max (``mean``) or
  the lower median (robust). When fewer than the needed updates pass, the round keeps the previous
  global model (:func:`combine` says so).
* **Pooled metrics without moving images** (:func:`site_statistics`, :func:`pooled_metrics`): each
  site sends, per class, histograms of the predicted probability for its positive and negative
  validation images (1000 bins) and its confusion matrix. Summed over sites they give the pooled
  one-vs-rest ROC AUC (a bin's ties count half: within 1/1000 of the exact AUC over the pooled
  predictions) and the pooled balanced accuracy exactly. No image, label list or per-image score
  leaves a site. Each evaluation reply is schema-checked first (:func:`check_evaluation`: types,
  lengths, non-negative integer counts, and histograms, confusion matrix and ``num-examples`` that
  agree with each other); a malformed one is excluded from the pooled figures with the reason
  (:func:`pool_evaluations`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

BINS = 1000
METHODS = ("mean", "median", "trimmed-mean")
TRIM_FRACTION = 0.2  # Flower's FedTrimmedAvg default (beta)
MAX_UPDATE_RATIO = 5.0
MAX_EXAMPLES = 1_000_000  # the num-examples cap for a site without a registered count


@dataclass(frozen=True)
class Guard:
    """The server's limits on what a site may send (from the run configuration, :meth:`from_config`)."""

    max_update_ratio: float = MAX_UPDATE_RATIO
    max_examples: int = MAX_EXAMPLES
    site_examples: Mapping[str, int] = field(default_factory=dict)  # site name -> registered image count
    local_epochs: int = 1  # bounds how far a site's integer counters may move in one round (check_counters)
    n_classes: int | None = None  # the run's vocabulary: a reply's class-counts hold one per class (None: unchecked)

    @classmethod
    def from_config(cls, cfg: Mapping) -> Guard:
        return cls(max_update_ratio=float(cfg.get("max_update_ratio", MAX_UPDATE_RATIO)),
                   max_examples=int(cfg.get("max_examples", MAX_EXAMPLES)),
                   site_examples={str(k): int(v) for k, v in (cfg.get("site_examples") or {}).items()},
                   local_epochs=int(cfg.get("local_epochs", 1)),
                   n_classes=len(cfg["classes"]) if cfg.get("classes") else None)

    def bound(self, site: str) -> tuple[int, str]:
        """The most examples ``site`` may report, and where that bound comes from."""
        if site in self.site_examples:
            return int(self.site_examples[site]), "its registered image count"
        return int(self.max_examples), "the --max-examples cap"


@dataclass
class Verdict:
    """One site's checked training reply: usable (``reason`` None) or excluded with the reason."""

    site: str
    reason: str | None = None
    arrays: dict | None = None
    n_train: int = 0
    train_loss: float = math.nan
    update_ratio: float | None = None
    reported: object = None  # num-examples as the site sent it (recorded even when refused)
    bound: int | None = None
    class_counts: list | None = None  # the site's training images per class, when it sent them


@dataclass
class RoundResult:
    """The aggregation of one round: the new global (the previous one when it is ``kept``)."""

    arrays: dict
    used: dict  # site -> {n_train, train_loss, update_ratio, examples_bound}
    excluded: dict  # site -> reason
    num_examples: dict  # site -> num-examples as reported (int, or its repr when not an integer)
    kept: bool
    note: str


def restore_scalars(update: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Flower's ``Array`` carries 0-d tensors (e.g. ``num_batches_tracked``) as shape (1,): give them
    back the reference's 0-d shape. Nothing else is reshaped."""
    out = dict(update)
    for name, ref in reference.items():
        arr = out.get(name)
        if arr is not None and ref.ndim == 0 and arr.shape == (1,):
            out[name] = arr.reshape(())
    return out


def update_ratio(update: dict[str, np.ndarray], global_arrays: dict[str, np.ndarray]) -> float:
    """``||update - global|| / ||global||`` over the floating tensors, accumulated in float64 (a 3e38
    float32 value squares without overflow). Assumes :func:`check_update`'s structure checks passed."""
    diff = ref = 0.0
    for name, g in global_arrays.items():
        if np.issubdtype(g.dtype, np.floating):
            g64 = g.astype(np.float64).ravel()
            d = update[name].astype(np.float64).ravel() - g64
            diff += float(np.dot(d, d))
            ref += float(np.dot(g64, g64))
    if ref > 0:
        return math.sqrt(diff) / math.sqrt(ref)
    return 0.0 if diff == 0 else math.inf


def check_update(update: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                 max_ratio: float | None = None) -> str | None:
    """The reason ``update`` cannot be aggregated into ``reference``'s model (the current global), or
    None when it can: same tensor names, dtypes and shapes, finite values and, with ``max_ratio``,
    ``update_ratio(update, reference) <= max_ratio``."""
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        parts = ([f"missing {len(missing)} tensors (e.g. {missing[0]})"] if missing else []) + \
                ([f"{len(extra)} unknown tensors (e.g. {extra[0]})"] if extra else [])
        return "; ".join(parts)
    for name, ref in reference.items():
        arr = update[name]
        if not isinstance(arr, np.ndarray) or arr.dtype != ref.dtype:
            got = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
            return f"tensor {name} is {got}, expected {ref.dtype} (updates are never cast)"
        if tuple(arr.shape) != tuple(ref.shape):
            return f"tensor {name} has shape {tuple(arr.shape)}, expected {tuple(ref.shape)}"
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            return f"tensor {name} has {bad} non-finite values (NaN or inf)"
    if max_ratio is not None:
        return _ratio_reason(update_ratio(update, reference), max_ratio)
    return None


def check_counters(update: dict[str, np.ndarray], reference: dict[str, np.ndarray], max_steps: int) -> str | None:
    """The reason an integer tensor of ``update`` is not an honest counter, or None: every integer
    tensor (``num_batches_tracked``) may grow by 0 to ``max_steps`` over the global model's value, and
    nothing else. Compared exactly (Python integers: no int64 overflow for values near 2**63).
    Assumes :func:`check_update`'s structure checks passed."""
    for name, ref in reference.items():
        if np.issubdtype(ref.dtype, np.integer):
            moved = [int(u) - int(r) for u, r in zip(update[name].ravel().tolist(), ref.ravel().tolist())]
            worst = min(moved, default=0) if min(moved, default=0) < 0 else max(moved, default=0)
            if not 0 <= worst <= max_steps:
                return (f"integer tensor {name} moved by {worst} in one round (a counter may only grow, by at most "
                        f"{max_steps} steps: num-examples x local epochs)")
    return None


def _ratio_reason(ratio: float, limit: float) -> str | None:
    if ratio <= limit:
        return None
    return f"the update moves the model by {ratio:.3g} times the global model's norm (limit {limit:g}, --max-update-ratio)"


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_count(value, bound: tuple[int, str], what: str = "num-examples") -> tuple[int | None, str | None]:
    """(the count, None) when ``value`` is a positive integer within ``bound`` = (limit, its source);
    else (None, the reason)."""
    if not _is_int(value):
        return None, f"{what} {value!r} is not an integer"
    n, (limit, source) = int(value), bound
    if n <= 0:
        return None, f"{what} {n} is not positive"
    if n > limit:
        return None, f"{what} {n} exceeds {limit} ({source})"
    return n, None


def check_train_reply(site: str, update: dict[str, np.ndarray], metrics: Mapping,
                      global_arrays: dict[str, np.ndarray], guard: Guard) -> Verdict:
    """Everything the server checks in one site's training reply (see the module docstring)."""
    reported = metrics.get("num-examples") if isinstance(metrics, Mapping) else None
    v = Verdict(site, reported=reported, bound=guard.bound(site)[0])
    if not isinstance(metrics, Mapping) or "num-examples" not in metrics or "train_loss" not in metrics:
        v.reason = "malformed reply: metrics need num-examples and train_loss"
        return v
    n, v.reason = check_count(reported, guard.bound(site))
    if v.reason is None and not _is_number(metrics["train_loss"]):
        v.reason = f"train_loss {metrics['train_loss']!r} is not a number"
    v.reason = v.reason or check_update(update, global_arrays)
    if v.reason is None:
        v.reason = check_counters(update, global_arrays, n * max(1, guard.local_epochs))
    if v.reason is None:
        v.update_ratio = update_ratio(update, global_arrays)
        v.reason = _ratio_reason(v.update_ratio, guard.max_update_ratio)
    if v.reason is None and metrics.get("class-counts") is not None:
        v.class_counts, v.reason = check_class_counts(metrics["class-counts"], n, guard.n_classes)
    if v.reason is None:
        v.arrays, v.n_train, v.train_loss = update, n, float(metrics["train_loss"])
    return v


def check_class_counts(value, n: int, n_classes: int | None) -> tuple[list[int] | None, str | None]:
    """A training reply's optional ``class-counts``: ``n_classes`` non-negative integers (one per class of the
    run's vocabulary; None: any length) that add up to its ``num-examples`` ``n``; (counts, None) or (None, the
    reason). The server keeps only accepted counts, so the federation's class prior is always one per class."""
    if not isinstance(value, (list, tuple)) or not value or not all(_is_int(x) and int(x) >= 0 for x in value):
        return None, f"class-counts must be a list of non-negative integers, got {str(value)[:80]}"
    if n_classes is not None and len(value) != n_classes:
        return None, f"class-counts has {len(value)} values, not one per class of the run's {n_classes}"
    counts = [int(x) for x in value]
    if sum(counts) != n:
        return None, f"class-counts add up to {sum(counts)}, not num-examples {n}"
    return counts, None


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


def aggregate(updates: list[tuple[dict[str, np.ndarray], int]], method: str = "mean",
              trim: float = TRIM_FRACTION) -> dict[str, np.ndarray]:
    """The new global weights from checked ``(arrays, num_examples)`` updates by ``method`` (one of
    :data:`METHODS`; the robust ones ignore the sample counts, as Flower's do)."""
    if method == "mean":
        return weighted_average(updates)
    if method not in METHODS:
        raise ValueError(f"unknown aggregation {method!r}; expected one of {', '.join(METHODS)}")
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"the trim fraction must be in [0, 0.5), got {trim}")
    if not updates:
        raise ValueError("no updates to aggregate")
    from scipy.stats import trim_mean

    out = {}
    for name, first in updates[0][0].items():
        stack = np.stack([arrays[name] for arrays, _ in updates])
        if np.issubdtype(first.dtype, np.floating):
            s64 = stack.astype(np.float64)
            value = np.median(s64, axis=0) if method == "median" else trim_mean(s64, trim, axis=0)
        else:
            value = np.quantile(stack, 0.5, axis=0, method="lower")
        out[name] = np.asarray(value).astype(first.dtype)
    return out


def combine(global_arrays: dict[str, np.ndarray], verdicts: Mapping[str, Verdict], method: str = "mean",
            trim: float = TRIM_FRACTION, min_updates: int = 1) -> RoundResult:
    """Aggregate the usable verdicts into the new global model; with fewer than ``min_updates`` of them
    the previous global model is kept (``kept``) and ``note`` says why."""
    used = {s: {"n_train": v.n_train, "train_loss": v.train_loss, "update_ratio": v.update_ratio,
                "examples_bound": v.bound, **({"class_counts": v.class_counts} if v.class_counts else {})}
            for s, v in sorted(verdicts.items()) if v.reason is None}
    excluded = {s: v.reason for s, v in sorted(verdicts.items()) if v.reason is not None}
    reported = {s: int(v.reported) if _is_int(v.reported) else repr(v.reported) for s, v in sorted(verdicts.items())}
    if len(used) < max(1, min_updates):
        why = (f"every update was excluded ({len(excluded)})" if verdicts and not used
               else f"{len(used)} valid update(s), fewer than the {min_updates} needed")
        return RoundResult(global_arrays, used, excluded, reported, True,
                           f"{why}; the global model stays the previous round's")
    updates = [(verdicts[s].arrays, verdicts[s].n_train) for s in used]
    arrays = aggregate(updates, method, trim)
    return RoundResult(arrays, used, excluded, reported, False,
                       f"aggregated {len(used)} update(s) by {method}" + (f" (trim {trim:g})" if method ==
                                                                           "trimmed-mean" else ""))


def aggregate_round(global_arrays: dict[str, np.ndarray], replies: Mapping[str, tuple[dict, Mapping]],
                    guard: Guard | None = None, method: str = "mean", trim: float = TRIM_FRACTION,
                    min_updates: int = 1) -> RoundResult:
    """One round's aggregation from ``{site: (update arrays, metrics)}``: each reply checked
    (:func:`check_train_reply`), the usable ones aggregated (:func:`combine`)."""
    guard = guard or Guard()
    verdicts = {site: check_train_reply(site, upd, metrics, global_arrays, guard)
                for site, (upd, metrics) in replies.items()}
    return combine(global_arrays, verdicts, method, trim, min_updates)


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


EVAL_NUMBERS = ("val_loss", "macro_auc", "balanced_accuracy")


def _int_vector(value, length: int, what: str) -> tuple[np.ndarray | None, str | None]:
    """``value`` as an int64 vector of ``length`` non-negative counts, or (None, the reason)."""
    # np.ndim only for arrays: on a ragged list it raises; a list's nested items fail the integer check below
    if not isinstance(value, (list, tuple, np.ndarray)) or (isinstance(value, np.ndarray) and value.ndim != 1) \
            or len(value) != length:
        got = len(value) if isinstance(value, (list, tuple)) else type(value).__name__
        return None, f"{what} must be a list of {length} integers, got {got}"
    if not all(_is_int(x) for x in value):
        return None, f"{what} must hold integers only"
    if any(not 0 <= int(x) < 2**62 for x in value):
        return None, f"{what} holds a negative count or one too large to count images"
    return np.asarray([int(x) for x in value], np.int64), None


def check_evaluation(metrics: Mapping, n_classes: int, bound: tuple[int, str],
                     bins: int = BINS) -> tuple[tuple[dict, dict] | None, str | None]:
    """((site figures, pooling statistics), None) for a well-formed evaluation reply, else (None, the
    reason): ``num-examples`` a positive integer within ``bound``; ``val_loss``, ``macro_auc``,
    ``balanced_accuracy`` numbers (AUC and balanced accuracy in [0, 1], NaN allowed for a site missing
    a class); ``hist_pos``/``hist_neg`` ``n_classes * bins`` and ``confusion`` ``n_classes**2``
    non-negative integers that agree: per class, positives + negatives = ``num-examples`` and the
    positives are the confusion matrix's row for that class."""
    if not isinstance(metrics, Mapping):
        return None, "malformed evaluation reply: no metrics"
    missing = [k for k in ("num-examples", *EVAL_NUMBERS, "hist_pos", "hist_neg", "confusion") if k not in metrics]
    if missing:
        return None, f"malformed evaluation reply: missing {', '.join(missing)}"
    n, reason = check_count(metrics["num-examples"], bound)
    if reason:
        return None, reason
    for key in EVAL_NUMBERS:
        v = metrics[key]
        if not _is_number(v):
            return None, f"{key} {v!r} is not a number"
        if key != "val_loss" and not (math.isnan(v) or 0.0 <= v <= 1.0):
            return None, f"{key} {v!r} is outside [0, 1]"
        if key == "val_loss" and v < 0:
            return None, f"val_loss {v!r} is negative"
    c, arrays = n_classes, {}
    for key, length in (("hist_pos", c * bins), ("hist_neg", c * bins), ("confusion", c * c)):
        arrays[key], reason = _int_vector(metrics[key], length, key)
        if reason:
            return None, reason
    pos, neg = arrays["hist_pos"].reshape(c, bins).sum(1), arrays["hist_neg"].reshape(c, bins).sum(1)
    conf = arrays["confusion"].reshape(c, c)
    if not (np.all(pos + neg == n) and int(conf.sum()) == n and np.array_equal(conf.sum(1), pos)):
        return None, (f"the histograms and confusion matrix do not agree with each other or with num-examples {n} "
                      f"(per class positives + negatives {(pos + neg).tolist()}, confusion total {int(conf.sum())})")
    figures = {"n_val": n, "macro_auc": float(metrics["macro_auc"]),
               "balanced_accuracy": float(metrics["balanced_accuracy"]), "val_loss": float(metrics["val_loss"])}
    return (figures, {k: a.tolist() for k, a in arrays.items()}), None


def pool_evaluations(replies: Mapping[str, Mapping], classes: list[str], guard: Guard | None = None,
                     bins: int = BINS) -> tuple[dict, dict, dict]:
    """(per-site figures, pooled figures, excluded {site: reason}) from ``{site: evaluation metrics}``:
    every reply checked by :func:`check_evaluation`, the well-formed ones pooled."""
    guard = guard or Guard()
    per_site, stats, excluded = {}, [], {}
    for site, metrics in sorted(replies.items()):
        ok, reason = check_evaluation(metrics, len(classes), guard.bound(site), bins)
        if reason:
            excluded[site] = reason
            continue
        per_site[site], site_stats = ok
        stats.append(site_stats)
    pooled = pooled_metrics(stats, classes, bins) if stats else {"n": 0, "macro_auc": math.nan,
                                                                "balanced_accuracy": math.nan, "per_class_auc": {}}
    return per_site, pooled, excluded
