"""Classification figures as pure functions of labels and probabilities (no model, no files).

``compute_metrics`` gives macro and per-class ROC AUC with percentile bootstrap 95% confidence intervals
(seeded resampling of the images), balanced accuracy, per-class sensitivity and specificity, melanoma
sensitivity at 80% and 90% specificity, the confusion matrix and expected calibration error. The
classification figures are scikit-learn's (``roc_auc_score``, ``roc_curve``, ``confusion_matrix``,
``multilabel_confusion_matrix``, ``balanced_accuracy_score``). A class absent from the evaluated split
gets NaN with a warning, never a crash. Training (validation AUC per epoch), the INT8 gate and the
report (medpipe.evaluate) all measure with these functions.
"""

from __future__ import annotations

import math
import warnings

import numpy as np


def auc_per_class(y: np.ndarray, probs: np.ndarray) -> list[float]:
    """One-vs-rest ROC AUC per class (scikit-learn's ``roc_auc_score``); NaN where a class is absent (or
    alone), where the AUC is undefined. The caller warns, naming the classes.

    Args:
        y: the N true class indices.
        probs: N x C probabilities (or any per-class scores).

    Returns:
        C floats, NaN where undefined.
    """
    from sklearn.metrics import roc_auc_score  # scikit-learn loads at the first figure

    y = np.asarray(y, dtype=np.int64)
    n_classes = probs.shape[1]
    onehot = np.eye(n_classes, dtype=np.int64)[y] if len(y) else np.zeros((0, n_classes), np.int64)
    positives = onehot.sum(axis=0)
    defined = (positives > 0) & (positives < len(y))
    out = np.full(n_classes, np.nan)
    if defined.any():
        out[defined] = roc_auc_score(onehot[:, defined], probs[:, defined], average=None)
    return [float(v) for v in out]


def macro_auc(y: np.ndarray, probs: np.ndarray) -> float:
    """The mean of the defined per-class AUCs (:func:`auc_per_class`), without a warning; NaN when none is.

    Args:
        y: the N true class indices.
        probs: N x C probabilities (or any per-class scores).

    Returns:
        The macro ROC AUC over the classes present (and not alone) in ``y``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        per = auc_per_class(y, probs)
        return float(np.nanmean(per)) if not all(math.isnan(v) for v in per) else float("nan")


def bootstrap_auc_ci(y: np.ndarray, probs: np.ndarray, resamples: int, seed: int = 0) -> tuple[list, list]:
    """Percentile 95% intervals of the macro AUC and of each class's AUC over ``resamples`` bootstrap
    resamples of the images (drawn with replacement, seeded). A class absent from a resample has no AUC
    there: the macro AUC of that resample averages the classes present, and a class's interval needs more
    than 10 resamples with it (else NaN). ``scipy.stats.bootstrap`` is not used because it turns any such
    NaN into a NaN interval.

    Args:
        y: the N true class indices.
        probs: N x C probabilities.
        resamples: bootstrap resamples.
        seed: seed of the resampling.

    Returns:
        ``([lo, hi] of the macro AUC, [[lo, hi] per class])``.
    """
    rng = np.random.default_rng(seed)
    n_classes = probs.shape[1]
    boots = np.empty((resamples, n_classes))
    for b in range(resamples):
        idx = rng.integers(0, len(y), len(y))
        boots[b] = auc_per_class(y[idx], probs[idx])
    ci_per = [[float("nan")] * 2 for _ in range(n_classes)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        macro_b = np.nanmean(boots, axis=1)
        ci_macro = [float(np.nanpercentile(macro_b, 2.5)), float(np.nanpercentile(macro_b, 97.5))]
        for k in range(n_classes):
            col = boots[:, k][~np.isnan(boots[:, k])]
            if len(col) > 10:
                ci_per[k] = [float(np.percentile(col, 2.5)), float(np.percentile(col, 97.5))]
    return ci_macro, ci_per


def expected_calibration_error(y: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> tuple[float, list[dict]]:
    """Expected calibration error of the top-1 confidence over ``n_bins`` equal-width bins.

    Args:
        y: the N true class indices.
        probs: N x C probabilities.
        n_bins: bins over (0, 1].

    Returns:
        ``(ece, bins)``: bins holds each non-empty bin's lo, hi, count, accuracy and mean confidence.
    """
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(float)
    edges = np.linspace(0, 1, n_bins + 1)
    ece, bins = 0.0, []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if m.any():
            acc, cf = float(correct[m].mean()), float(conf[m].mean())
            ece += m.mean() * abs(acc - cf)
            bins.append({"lo": float(lo), "hi": float(hi), "count": int(m.sum()), "accuracy": acc, "confidence": cf})
    return float(ece), bins


def sensitivity_at_specificity(y_bin: np.ndarray, score: np.ndarray, spec: float) -> float:
    """The highest sensitivity on the ROC curve at a specificity of at least ``spec``.

    Args:
        y_bin: N binary labels (1 = positive).
        score: N scores of the positive class.
        spec: the specificity required, e.g. 0.9.

    Returns:
        The sensitivity; NaN when ``y_bin`` holds only one class.
    """
    from sklearn.metrics import roc_curve

    if y_bin.all() or not y_bin.any():
        return float("nan")
    fpr, tpr, _ = roc_curve(y_bin, score)
    ok = fpr <= 1 - spec + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def compute_metrics(y: np.ndarray, probs: np.ndarray, classes: list[str], *, bootstrap: int = 1000,
                    seed: int = 0, positive: str = "mel", pred: np.ndarray | None = None) -> dict:
    """``pred``: the labels a decision rule gave (medpipe.decision); argmax of ``probs`` when None.
    The label figures (balanced accuracy, sensitivity, specificity, confusion matrix) use them; AUC and
    calibration depend on the probabilities only.

    Args:
        y: the N true class indices.
        probs: N x C calibrated probabilities.
        classes: the C class names.
        bootstrap: resamples for the 95% intervals (0: none).
        seed: seed of the resampling.
        positive: the class whose sensitivity at 80%/90% specificity is reported, when present.
        pred: the N labels a decision rule gave; argmax of ``probs`` when None.

    Returns:
        A JSON-ready dict: n, macro_auc (+ _ci95), balanced_accuracy, accuracy, ece, per_class (auc, auc_ci95,
        sensitivity, specificity, support), confusion_matrix, reliability_bins, bootstrap and the
        ``<positive>_sensitivity_at_spec80/90`` figures.
    """
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, multilabel_confusion_matrix

    y = np.asarray(y, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = len(classes)
    pred = probs.argmax(axis=1) if pred is None else np.asarray(pred, dtype=np.int64)
    per_auc = auc_per_class(y, probs)
    missing = [classes[k] for k, v in enumerate(per_auc) if math.isnan(v)]
    if missing:
        warnings.warn(f"ROC AUC undefined (NaN) for classes absent or alone in this split: {', '.join(missing)}",
                      RuntimeWarning, stacklevel=2)
    macro = float(np.nanmean(per_auc)) if not all(math.isnan(v) for v in per_auc) else float("nan")
    labels = list(range(n_classes))
    cm = confusion_matrix(y, pred, labels=labels)
    (tn, fp), (fn, tp) = multilabel_confusion_matrix(y, pred, labels=labels).transpose(1, 2, 0)  # per class
    support = tp + fn
    sens = [float(tp[k] / support[k]) if support[k] else float("nan") for k in labels]
    spec = [float(tn[k] / (tn[k] + fp[k])) if tn[k] + fp[k] else float("nan") for k in labels]
    with warnings.catch_warnings():  # a label predicted but absent from y: sklearn warns, then leaves it out
        warnings.simplefilter("ignore", UserWarning)
        bacc = float(balanced_accuracy_score(y, pred)) if len(y) else float("nan")
    ece, bins = expected_calibration_error(y, probs)

    ci_macro, ci_per = [float("nan")] * 2, [[float("nan")] * 2 for _ in range(n_classes)]
    if bootstrap > 0 and len(y) > 1:
        ci_macro, ci_per = bootstrap_auc_ci(y, probs, bootstrap, seed)

    out = {
        "n": int(len(y)), "macro_auc": macro, "macro_auc_ci95": ci_macro, "balanced_accuracy": bacc,
        "accuracy": float((pred == y).mean()) if len(y) else float("nan"), "ece": ece,
        "per_class": {c: {"auc": per_auc[k], "auc_ci95": ci_per[k], "sensitivity": sens[k], "specificity": spec[k],
                          "support": int(support[k])} for k, c in enumerate(classes)},
        "confusion_matrix": cm.tolist(), "reliability_bins": bins, "bootstrap": int(bootstrap),
    }
    if positive in classes:
        k = classes.index(positive)
        yb = (y == k).astype(int)
        out[f"{positive}_sensitivity_at_spec80"] = sensitivity_at_specificity(yb, probs[:, k], 0.80)
        out[f"{positive}_sensitivity_at_spec90"] = sensitivity_at_specificity(yb, probs[:, k], 0.90)
    return out
