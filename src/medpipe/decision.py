"""Decision rules: which label to give once the calibrated probabilities are known.

The probabilities a package returns are calibrated (temperature scaling on the validation split) and
stay exactly as they are; a decision rule only chooses the label. Every rule here is one vector of
per-class offsets ``b`` added to the log-probabilities::

    label = argmax_k ( log p_k + b_k )

- ``argmax``: ``b = 0``, the most probable class. On HAM10000 (nv about 67%) it favours nevi.
- ``prior``: logit adjustment (Menon et al. 2021, "Long-tail learning via logit adjustment"):
  ``b = -tau * log(prior)``, the prior being the validation split's class frequencies. For a model
  trained on the natural class frequencies (``imbalance: none``) whose calibrated probabilities
  estimate the posterior, ``tau = 1`` is the Bayes rule for balanced accuracy; a model trained with
  the balanced sampler or class weights has already moved towards the rare classes (temperature
  scaling does not undo that), so there the best ``tau`` is nearer 0. Hence ``tau`` is not fixed but
  chosen on the validation split (a grid from -1 to 2) to maximise its balanced accuracy.
- ``class_bias``: starts from ``prior`` and moves each class's offset in turn (coordinate ascent on
  a grid) while the validation balanced accuracy strictly improves. More freedom, so it fits the
  validation split more closely; with few positives per class it can over-fit (compare both in the
  report on the test split).
- ``class_bias_bagged``: ``class_bias`` fitted on ``BAGS`` bootstrap resamples of the validation split
  (seeded: the same split gives the same offsets) and the offsets averaged (bagging). With 3-4 validation
  images of df and vasc one image moves ``class_bias`` a lot; measured by benchmarks/decision_rules.py over
  bootstrap draws of the validation split, bagging lowered the spread of test balanced accuracy a little (SD
  0.031 against 0.034, not in every package) at the same mean (0.338 against 0.336), where shrinking
  ``class_bias`` toward ``prior`` (:func:`shrink_offsets`) lowered the mean without lowering the spread.

Rules are fitted on the validation split at the end of training and stored in ``model.json``
under ``"decision"``: every fitted rule with its offsets, the validation balanced accuracy each
reached, and ``"default"``, the rule predict, serve, batch and the exports use unless told
otherwise (config key ``decision_rule``; ``prior`` unless set, the default recipe's). Each prediction
says which rule produced its label. A federated run, whose validation images stay at the sites, gets
``prior`` from the pooled class counts alone (:func:`prior_from_counts`).
"""

from __future__ import annotations

import math

import numpy as np

from medpipe.errors import DecisionRuleError

RULES = ("argmax", "prior", "class_bias", "class_bias_bagged")
# bootstrap fits averaged by class_bias_bagged (what benchmarks/decision_rules.py measured). Fitted with the other
# rules on every run so that any package takes --decision-rule class_bias_bagged: on 1,500 validation images (a
# HAM10000 split) fit_rules costs 0.75 s of CPU time, 0.65 s of it the bags; a training epoch takes minutes.
BAGS = 8
TAU_GRID = np.round(np.arange(-1.0, 2.0001, 0.05), 4)
BIAS_GRID = np.round(np.arange(-3.0, 3.0001, 0.1), 4)
_EPS = 1e-12


def apply_offsets(probs: np.ndarray, offsets: np.ndarray | list[float] | None) -> np.ndarray:
    """Labels (N,) from probabilities (N, C) under a rule's offsets (None or zeros: argmax)."""
    probs = np.asarray(probs, dtype=np.float64)
    if offsets is None:
        return probs.argmax(axis=1)
    return (np.log(np.clip(probs, _EPS, 1.0)) + np.asarray(offsets, dtype=np.float64)[None, :]).argmax(axis=1)


def balanced_accuracy(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Mean recall over the classes present in ``y`` (NaN when ``y`` is empty)."""
    y, pred = np.asarray(y), np.asarray(pred)
    recalls = [float((pred[y == k] == k).mean()) for k in range(n_classes) if (y == k).any()]
    return float(np.mean(recalls)) if recalls else float("nan")


def _fit_prior(log_p: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[float, np.ndarray, float]:
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    log_prior = np.log((counts + 1.0) / (counts.sum() + n_classes))  # add-one: a class absent from val stays finite
    best = (-math.inf, 0.0)
    for tau in TAU_GRID:  # ties go to the smallest |tau| (closest to argmax)
        score = balanced_accuracy(y, (log_p - tau * log_prior).argmax(axis=1), n_classes)
        if score > best[0] + 1e-12 or (abs(score - best[0]) <= 1e-12 and abs(tau) < abs(best[1])):
            best = (score, float(tau))
    return best[1], -best[1] * log_prior, best[0]


def _grid_scores(log_p: np.ndarray, y: np.ndarray, n_classes: int, offsets: np.ndarray) -> np.ndarray:
    """Balanced accuracy of each row of ``offsets`` (G x C) at once, as :func:`balanced_accuracy`."""
    pred = (log_p[None, :, :] + offsets[:, None, :]).argmax(axis=2)  # G x N
    onehot = np.eye(n_classes)[y]  # N x C
    counts = onehot.sum(axis=0)
    present = counts > 0
    recall = ((pred == y[None, :]).astype(np.float64) @ onehot)[:, present] / counts[present]
    return recall.mean(axis=1)


def _fit_class_bias(log_p: np.ndarray, y: np.ndarray, n_classes: int, start: np.ndarray,
                    sweeps: int = 3) -> tuple[np.ndarray, float]:
    b = start.copy()
    score = balanced_accuracy(y, (log_p + b).argmax(axis=1), n_classes)
    for _ in range(sweeps):
        moved = False
        for k in range(n_classes):
            trials = np.repeat(b[None, :], len(BIAS_GRID), axis=0)
            trials[:, k] = b[k] + BIAS_GRID
            scores = _grid_scores(log_p, y, n_classes, trials)
            best = int(np.argmax(scores))  # the first grid value reaching the best score
            if scores[best] > score + 1e-9:  # strictly better only: no drift on plateaus
                b[k], score, moved = trials[best, k], float(scores[best]), True
        if not moved:
            break
    return b - b.mean(), score  # offsets are defined up to a constant


def shrink_offsets(bias, prior, counts, k: float) -> np.ndarray:
    """``class_bias`` offsets pulled toward ``prior``'s: class ``c`` keeps the weight ``n_c / (n_c + k)`` of its
    own offset (``counts``: its validation images), so a class seen a few times moves little from the prior
    rule. ``k`` 0 gives ``class_bias``, infinity ``prior`` (both centred: offsets are defined up to a constant)."""
    bias, prior = np.asarray(bias, dtype=np.float64), np.asarray(prior, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    if k < 0 or math.isnan(k):
        raise DecisionRuleError(f"shrinkage k must be >= 0, got {k}")
    w = np.ones_like(counts) if k == 0 else counts / (counts + k)
    return w * (bias - bias.mean()) + (1.0 - w) * (prior - prior.mean())


def _fit_bagged(log_p: np.ndarray, y: np.ndarray, n_classes: int, bags: int = BAGS,
                seed: int = 0) -> tuple[np.ndarray, float]:
    """``class_bias`` offsets averaged over ``bags`` fits on seeded bootstrap resamples, and their score on
    the whole split."""
    rng = np.random.default_rng(seed)
    fits = []
    for _ in range(bags):
        idx = rng.integers(0, len(y), len(y))
        _, start, _ = _fit_prior(log_p[idx], y[idx], n_classes)
        fits.append(_fit_class_bias(log_p[idx], y[idx], n_classes, start)[0])
    b = np.mean(fits, axis=0)
    return b, balanced_accuracy(y, (log_p + b).argmax(axis=1), n_classes)


def fit_rules(probs: np.ndarray, y: np.ndarray, classes: list[str], default: str = "argmax") -> dict:
    """Fit every rule on validation probabilities (calibrated) and labels; the dict stored in model.json."""
    if default not in RULES:
        raise DecisionRuleError(f"decision rule must be one of {RULES}, got {default!r}")
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    n = len(classes)
    if probs.ndim != 2 or probs.shape[1] != n or len(y) != len(probs):
        raise DecisionRuleError(f"probabilities of shape {probs.shape} do not match {len(y)} labels of {n} classes")
    rules: dict[str, dict] = {"argmax": {"offsets": [0.0] * n}}
    val_bacc = {"argmax": balanced_accuracy(y, probs.argmax(axis=1), n)}
    if len(y):
        log_p = np.log(np.clip(probs, _EPS, 1.0))
        tau, prior_b, prior_s = _fit_prior(log_p, y, n)
        rules["prior"] = {"offsets": [float(v) for v in prior_b], "tau": tau}
        val_bacc["prior"] = prior_s
        bias_b, bias_s = _fit_class_bias(log_p, y, n, prior_b)
        rules["class_bias"] = {"offsets": [float(v) for v in bias_b]}
        val_bacc["class_bias"] = bias_s
        bag_b, bag_s = _fit_bagged(log_p, y, n)
        rules["class_bias_bagged"] = {"offsets": [float(v) for v in bag_b], "bags": BAGS}
        val_bacc["class_bias_bagged"] = bag_s
    if default not in rules:  # no validation images: only argmax exists
        default = "argmax"
    for name, rule in rules.items():
        rule["val_balanced_accuracy"] = val_bacc[name]
    return {"default": default, "fitted_on": "val", "n_val": int(len(y)), "rules": rules}


def prior_from_counts(counts, classes: list[str], default: str, tau: float) -> dict:
    """The ``decision`` entry for a model whose validation split cannot be read (federated: the images stay at
    the sites): ``argmax`` and ``prior`` with a fixed ``tau`` and the class frequencies ``counts`` (summed over
    the sites), nothing fitted to individual images. ``tau`` 1 is the Bayes rule for balanced accuracy for a
    model trained on the natural frequencies; 0 (argmax) for one trained with balancing."""
    counts = np.asarray(counts, dtype=np.float64)
    n = len(classes)
    if counts.shape != (n,):
        raise DecisionRuleError(f"class counts of shape {counts.shape} do not match {n} classes")
    log_prior = np.log((counts + 1.0) / (counts.sum() + n))
    rules = {"argmax": {"offsets": [0.0] * n},
             "prior": {"offsets": [float(-tau * v) + 0.0 for v in log_prior], "tau": float(tau)}}
    return {"default": default if default in rules else "prior", "fitted_on": "pooled class counts",
            "n_val": int(counts.sum()), "rules": rules}


def resolve(decision: dict | None, rule: str | None, n_classes: int) -> tuple[str, np.ndarray | None]:
    """(rule name, offsets or None) from a package's ``decision`` entry; ``rule`` None means its default.
    A package without the entry (older packages) only has ``argmax``."""
    decision = decision or {"default": "argmax", "rules": {"argmax": {"offsets": [0.0] * n_classes}}}
    name = rule or decision.get("default", "argmax")
    rules = decision.get("rules", {})
    if name == "argmax":
        return "argmax", None
    if name not in rules:
        have = ", ".join(sorted({"argmax", *rules}))
        raise DecisionRuleError(f"decision rule {name!r} is not in this package (it has: {have})")
    offsets = np.asarray(rules[name]["offsets"], dtype=np.float64)
    if offsets.shape != (n_classes,) or not np.isfinite(offsets).all():
        raise DecisionRuleError(f"decision rule {name!r}: offsets must be {n_classes} finite numbers")
    return name, offsets
