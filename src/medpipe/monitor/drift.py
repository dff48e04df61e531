"""Baseline statistics of a model on labelled data, and the per-window drift and performance checks against it.

Files, named as SageMaker Model Monitor names them (the fields are medpipe's own):

- ``statistics.json``: the model (name, version, ``package_sha256``, classes), the predicted-class
  counts, a reference sample of the calibrated confidence (the top probability) and of each input
  statistic (:data:`medpipe.monitor.capture.STAT_NAMES`), the label-free estimates on the baseline
  data and the measured accuracy, balanced accuracy and macro AUC (the baseline data has labels).
- ``constraints.json``: the thresholds a check applies (edit to tune): ``alpha`` of each test,
  ``performance_tolerance`` and ``min_window``.
- ``constraint_violations.json`` (written by a check): one entry per violated constraint and window.

Per window of captured images (:func:`check`):

- prediction drift: chi-square goodness of fit of the predicted-class counts against the baseline's
  class shares (``scipy.stats.chisquare``; baseline counts + 0.5 so no class has an expected zero);
- confidence drift: two-sample Kolmogorov-Smirnov test of the top probability (``scipy.stats.ks_2samp``);
- input drift: a KS test per input statistic, Holm's step-down correction over the family
  (``scipy.stats.false_discovery_control`` is Benjamini-Hochberg, which controls the false discovery
  rate, not the family-wise error a page-the-on-call alert wants; Holm is a few lines);
- embedding drift: maximum mean discrepancy (MMD, Gretton et al. 2012) between the window's projected
  penultimate-layer embeddings (:mod:`medpipe.monitor.embedding`) and the baseline's reference
  sample, Gaussian kernel (``sklearn.metrics.pairwise.rbf_kernel``) with the bandwidth set by the
  median heuristic on the reference, p-value from a permutation test (``scipy.stats.permutation_test``,
  ``embedding_permutations`` resamples, one-sided). Chosen over a classifier two-sample test: the
  permutation test holds its level exactly at any window size, needs no split of a small window into
  train and test halves (which costs the classifier test half its power at 30-100 images) and no model
  fit per window; on 32 dimensions and a reference of :data:`EMBEDDING_REFERENCE` images one window
  costs well under a second;
- label-free performance (confidence-based performance estimation, as NannyML's CBPE): with
  calibrated probabilities, P(correct) of an image is the probability of its predicted class, so
  the expected accuracy is their mean (standard error from the Poisson-binomial variance); the
  expected sensitivity of class k is the sum of p_k over images predicted k divided by the sum of
  p_k; the expected one-vs-rest AUC sweeps the threshold with expected true/false positives p_k
  and 1 - p_k. As NannyML's CBPE calibrates on its reference data, the probabilities are first
  recalibrated by a temperature fitted on the baseline's labels (``estimate_temperature``; about 1
  when the package was calibrated on the same split). A violation when the expected balanced
  accuracy's upper one-sided 95% bound lies below the baseline's estimate minus ``performance_tolerance``;
- with ground truth: measured accuracy, balanced accuracy (binomial standard error per class) and
  macro AUC; a violation when the measured balanced accuracy's upper one-sided 95% bound lies below
  the baseline's measured one minus ``performance_tolerance``.

Windows with fewer than ``min_window`` images are reported but not tested.
"""

from __future__ import annotations

import numpy as np

from medpipe.calibration import fit_temperature
from medpipe.monitor.capture import STAT_NAMES
from medpipe.monitor.embedding import stack

REFERENCE_SAMPLE = 5000  # values kept per reference sample
EMBEDDING_REFERENCE = 500  # embeddings kept in the baseline (the permutation test's cost grows with its square)
CONSTRAINTS = {"prediction_drift_alpha": 0.01, "confidence_drift_alpha": 0.01, "input_drift_alpha": 0.01,
               "embedding_drift_alpha": 0.01, "embedding_permutations": 500,
               "performance_tolerance": 0.05, "min_window": 30}


def mmd_test(window: np.ndarray, reference: np.ndarray, permutations: int = 500, seed: int = 0) -> dict:
    """MMD two-sample test of ``window`` (n, d) against ``reference`` (m, d): the biased MMD^2 estimate with a
    Gaussian kernel (median-heuristic bandwidth on the reference) and its permutation p-value."""
    from scipy import stats as st
    from sklearn.metrics.pairwise import euclidean_distances, rbf_kernel

    d = euclidean_distances(reference, squared=True)[np.triu_indices(len(reference), 1)]
    sigma2 = float(np.median(d)) / 2 or 1.0  # median heuristic: k(x, y) = exp(-|x-y|^2 / median |x-y|^2)
    z = np.concatenate([window, reference]).astype(np.float64)
    kernel = rbf_kernel(z, gamma=1.0 / (2 * sigma2))
    n, m = len(window), len(reference)

    def mmd2(a, b, axis=-1):  # a, b: index sets (..., n) and (..., m) of z; w^T K w with w = 1/n on a, -1/m on b
        a, b = np.moveaxis(np.atleast_2d(a), axis, -1), np.moveaxis(np.atleast_2d(b), axis, -1)
        w = np.zeros((a.shape[0], n + m))
        np.put_along_axis(w, a, 1.0 / n, axis=-1)
        np.put_along_axis(w, b, -1.0 / m, axis=-1)
        return ((w @ kernel) * w).sum(-1)

    res = st.permutation_test((np.arange(n), np.arange(n, n + m)), mmd2, permutation_type="independent",
                              vectorized=True, n_resamples=permutations, alternative="greater", random_state=seed)
    return {"n": int(n), "mmd2": float(np.squeeze(res.statistic)), "p_value": float(np.squeeze(res.pvalue)),
            "bandwidth": float(np.sqrt(sigma2))}


def expected_performance(probs: np.ndarray) -> dict:
    """Label-free estimates from calibrated probabilities (n, k): accuracy with its standard error, per-class
    sensitivity, balanced accuracy and macro AUC (one-vs-rest; classes with no expected positives skipped)."""
    n, k = probs.shape
    pred = probs.argmax(1)
    p_correct = probs[np.arange(n), pred]
    sens, aucs = [], []
    for c in range(k):
        pos = probs[:, c].sum()
        sens.append(float(probs[pred == c, c].sum() / pos) if pos > 0 else float("nan"))
        order = np.argsort(-probs[:, c], kind="stable")
        tp, fp = np.cumsum(probs[order, c]), np.cumsum(1 - probs[order, c])
        if tp[-1] > 0 and fp[-1] > 0:
            aucs.append(float(np.trapezoid(np.r_[0, tp / tp[-1]], np.r_[0, fp / fp[-1]])))
    valid = [s for s in sens if s == s]
    return {"accuracy": float(p_correct.mean()) if n else float("nan"),
            "accuracy_se": float(np.sqrt((p_correct * (1 - p_correct)).sum()) / n) if n else float("nan"),
            "balanced_accuracy": float(np.mean(valid)) if valid else float("nan"),
            "per_class_sensitivity": sens, "macro_auc": float(np.mean(aucs)) if aucs else float("nan")}


def rescale(probs: np.ndarray, t: float) -> np.ndarray:
    """Probabilities recalibrated by temperature ``t``: softmax(log(p) / t), which is softmax(logits / t)."""
    z = np.log(np.clip(probs, 1e-12, 1.0)) / t
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def estimate(probs: np.ndarray, stats: dict) -> dict:
    """The label-free estimates of a window, on probabilities recalibrated by the baseline's temperature."""
    q = rescale(probs, float(stats.get("estimate_temperature") or 1.0))
    return {**expected_performance(q), "balanced_accuracy_se": balanced_accuracy_se(q)}


def balanced_accuracy_se(probs: np.ndarray) -> float:
    """Standard error of the expected balanced accuracy under the calibrated model (delta method per class)."""
    pred = probs.argmax(1)
    var = []
    for c in range(probs.shape[1]):
        pos = probs[:, c].sum()
        if pos <= 0:
            continue
        hit = (pred == c).astype(float)
        s = probs[pred == c, c].sum() / pos
        # sensitivity = sum(y_i hit_i) / sum(y_i), y_i ~ Bernoulli(p_i): linearised variance
        var.append(float((probs[:, c] * (1 - probs[:, c]) * (hit - s) ** 2).sum() / pos**2))
    return float(np.sqrt(np.sum(var)) / max(len(var), 1))


def measured_performance(y: np.ndarray, probs: np.ndarray) -> dict:
    """Accuracy, balanced accuracy (with its binomial standard error) and macro AUC (one-vs-rest over the
    classes present) with labels."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    import warnings

    pred = probs.argmax(1)
    present = np.unique(y)
    aucs = [roc_auc_score(y == c, probs[:, c]) for c in present if 0 < (y == c).sum() < len(y)]
    with warnings.catch_warnings():  # a small window predicts classes none of its labels has: expected
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        bacc = float(balanced_accuracy_score(y, pred))  # mean recall over the classes present in y
    # per-class binomial variance with Laplace's (hits + 1) / (n + 2), so a class of 3 images all right or all
    # wrong does not claim zero uncertainty
    smoothed = [((pred[y == c] == c).sum() + 1) / ((y == c).sum() + 2) for c in present]
    se = float(np.sqrt(sum(r * (1 - r) / (y == c).sum() for r, c in zip(smoothed, present))) / max(len(present), 1))
    return {"n": int(len(y)), "accuracy": float((pred == y).mean()), "balanced_accuracy": bacc,
            "balanced_accuracy_se": se,
            "macro_auc": float(np.mean(aucs)) if aucs else float("nan")}


def holm(pvalues: list[float]) -> list[float]:
    """Holm-adjusted p-values (family-wise error control), in the input order."""
    p = np.asarray(pvalues, float)
    order = np.argsort(p)
    m = len(p)
    adj = np.maximum.accumulate([(m - r) * p[i] for r, i in enumerate(order)]) if m else np.array([])
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
    return out.tolist()


def _sample(values: np.ndarray, seed: int = 0) -> list[float]:
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if len(values) > REFERENCE_SAMPLE:
        values = np.random.default_rng(seed).choice(values, REFERENCE_SAMPLE, replace=False)
    return [round(float(v), 6) for v in values]


def statistics(meta: dict, classes: list[str], probs: np.ndarray, y: np.ndarray | None, inputs: list[dict]) -> dict:
    """statistics.json for the baseline data (``y``: its labels, None if unknown)."""
    pred = probs.argmax(1)
    stats = {"format": "medpipe-monitor-statistics/1", **meta, "classes": classes, "n": int(len(probs)),
             "predicted_class_counts": {c: int((pred == i).sum()) for i, c in enumerate(classes)},
             "confidence": _sample(probs.max(1)),
             "inputs": {s: _sample(np.array([d.get(s, np.nan) for d in inputs], float)) for s in STAT_NAMES},
             "expected": expected_performance(probs), "estimate_temperature": 1.0}
    proj = next((d["embedding_projection"] for d in inputs if d.get("embedding_projection")), None)
    if proj:
        keep = [d["embedding"] for d in inputs if d.get("embedding_projection") == proj and d.get("embedding")]
        if len(keep) > EMBEDDING_REFERENCE:
            keep = [keep[i] for i in sorted(np.random.default_rng(0).choice(len(keep), EMBEDDING_REFERENCE, False))]
        stats["embedding"] = {"projection": proj, "sample": keep}
    if y is not None:
        import torch  # deferred: torch, only for the temperature fit

        y = np.asarray(y)
        # as NannyML's CBPE calibrates on its reference data: the estimates use probabilities recalibrated on
        # the baseline's labels (about 1.0 when the package was calibrated on this same split)
        logp = torch.tensor(np.log(np.clip(probs, 1e-12, 1.0)), dtype=torch.float32)
        t = fit_temperature(logp, torch.tensor(y, dtype=torch.long))
        stats["estimate_temperature"] = t
        stats["expected"] = expected_performance(rescale(probs, t))
        stats["measured"] = measured_performance(y, probs)
    return stats


def check_window(stats: dict, cons: dict, probs: np.ndarray, inputs: list[dict],
                 truth: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """All checks on one window: results per check and the list of violated ones; ``truth``: the labels of
    the window's labelled images and their probabilities."""
    from scipy import stats as st

    n, classes = len(probs), stats["classes"]
    out: dict = {"n": int(n), "tested": n >= cons["min_window"], "violations": []}
    base = np.array([stats["predicted_class_counts"][c] for c in classes], float) + 0.5
    counts = np.bincount(probs.argmax(1), minlength=len(classes)).astype(float)
    chi = st.chisquare(counts, base / base.sum() * n) if n else None
    out["prediction_drift"] = {"counts": dict(zip(classes, counts.astype(int).tolist())),
                               "statistic": float(chi.statistic) if chi else None,
                               "p_value": float(chi.pvalue) if chi else None}
    ks = st.ks_2samp(probs.max(1), stats["confidence"]) if n else None
    out["confidence_drift"] = {"median": float(np.median(probs.max(1))) if n else None,
                               "statistic": float(ks.statistic) if ks else None,
                               "p_value": float(ks.pvalue) if ks else None}
    names, pv, ds = [], [], []
    for s in STAT_NAMES:
        vals = np.array([d.get(s, np.nan) for d in inputs], float)
        vals = vals[np.isfinite(vals)]
        if len(vals) >= cons["min_window"] and stats["inputs"].get(s):
            r = st.ks_2samp(vals, stats["inputs"][s])
            names.append(s), pv.append(float(r.pvalue)), ds.append(float(r.statistic))
    adj = holm(pv)
    out["input_drift"] = {s: {"statistic": d, "p_value": p, "p_holm": a} for s, d, p, a in zip(names, ds, pv, adj)}
    out["embedding_drift"] = embedding_drift(stats, cons, inputs)
    out["estimated"] = estimate(probs, stats) if n else {}
    if truth is not None and len(truth[0]):
        out["measured"] = measured_performance(*truth)
    if out["tested"]:
        out["violations"] = _violations(out, stats, cons)
    return out


def _violations(w: dict, stats: dict, cons: dict) -> list[dict]:
    v = []
    p = w["prediction_drift"]["p_value"]
    if p is not None and p < cons["prediction_drift_alpha"]:
        v.append({"constraint_check_type": "prediction_drift", "description": f"predicted-class mix differs from "
                  f"the baseline (chi-square p = {p:.2g} < {cons['prediction_drift_alpha']})"})
    p = w["confidence_drift"]["p_value"]
    if p is not None and p < cons["confidence_drift_alpha"]:
        v.append({"constraint_check_type": "confidence_drift", "description": f"confidence distribution differs "
                  f"(KS p = {p:.2g} < {cons['confidence_drift_alpha']})"})
    for s, r in w["input_drift"].items():
        if r["p_holm"] < cons["input_drift_alpha"]:
            v.append({"constraint_check_type": "input_drift", "feature_name": s, "description": f"input statistic "
                      f"{s} drifted (KS D = {r['statistic']:.3f}, Holm-adjusted p = {r['p_holm']:.2g})"})
    e = w.get("embedding_drift") or {}
    if e.get("p_value") is not None and e["p_value"] < cons["embedding_drift_alpha"]:
        v.append({"constraint_check_type": "embedding_drift", "description": f"penultimate-layer embeddings "
                  f"differ (MMD^2 {e['mmd2']:.4f}, permutation p = {e['p_value']:.2g} < {cons['embedding_drift_alpha']})"})
    tol = cons["performance_tolerance"]
    est, floor = w["estimated"], stats["expected"]["balanced_accuracy"] - tol
    if est and est["balanced_accuracy"] + 1.645 * est["balanced_accuracy_se"] < floor:
        v.append({"constraint_check_type": "estimated_performance", "description": f"expected balanced accuracy "
                  f"{est['balanced_accuracy']:.3f} (SE {est['balanced_accuracy_se']:.3f}) is below the baseline's "
                  f"{stats['expected']['balanced_accuracy']:.3f} - {tol}"})
    m, ref = w.get("measured"), (stats.get("measured") or {}).get("balanced_accuracy")
    if m and ref is not None and m["balanced_accuracy"] + 1.645 * m["balanced_accuracy_se"] < ref - tol:
        v.append({"constraint_check_type": "measured_performance", "description": f"measured balanced accuracy "
                  f"{m['balanced_accuracy']:.3f} (SE {m['balanced_accuracy_se']:.3f}) on {m['n']} labelled images is "
                  f"below the baseline's {ref:.3f} - {tol}"})
    return v


def embedding_drift(stats: dict, cons: dict, inputs: list[dict]) -> dict | None:
    """The MMD test of a window's embeddings against the baseline's (None: too few embeddings on either side,
    or made with another projection; ``n`` says how many the window had)."""
    ref = stats.get("embedding") or {}
    if not ref.get("sample"):
        return None
    win = stack(inputs, ref["projection"])
    reference = stack([{"embedding": e, "embedding_projection": ref["projection"]} for e in ref["sample"]],
                      ref["projection"])
    if len(win) < cons["min_window"] or len(reference) < cons["min_window"]:
        return {"n": int(len(win)), "mmd2": None, "p_value": None}
    return mmd_test(win, reference, int(cons["embedding_permutations"]))
