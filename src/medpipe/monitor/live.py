"""Live drift signals of a running service: rolling-window statistics as Prometheus gauges.

``medpipe serve --monitor-baseline BASE [--monitor-window 500]`` keeps the last ``window`` answered
images (predicted class, top calibrated probability, projected embedding where the backend gives one,
:mod:`medpipe.monitor.embedding`) and, every :data:`REFRESH_S` seconds when new images came, a
background thread runs the checks of :mod:`medpipe.monitor.drift` on that window against the baseline
written by ``medpipe monitor baseline``: the chi-square test of the predicted-class mix, the KS test of
the confidence, the MMD permutation test of the embeddings (:data:`LIVE_PERMUTATIONS` resamples) and
the label-free estimates. The request path only appends to the window. Gauges (``medpipe_monitor_*``):

- ``window_images``: images in the window; ``class_share{class}`` and ``baseline_class_share{class}``;
  ``confidence_median``;
- ``drift_p_value{check}`` and ``drift_statistic{check}`` for ``check`` = ``prediction`` (chi-square),
  ``confidence`` (KS D), ``embedding`` (MMD^2); ``drift_alpha{check}``: the threshold of
  ``constraints.json``, so an alerting rule compares the two (``deploy/prometheus/medpipe-alerts.yml``);
- ``estimated_balanced_accuracy`` (and its ``_se``), ``baseline_estimated_balanced_accuracy``,
  ``performance_tolerance``.

A p-value is NaN (no alert can fire) while the window holds fewer than ``min_window`` images.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import threading
from pathlib import Path

import numpy as np

from medpipe.errors import ConfigError
from medpipe.monitor import drift
from medpipe.monitor.embedding import decode

log = logging.getLogger("medpipe.monitor")

REFRESH_S = 2.0
LIVE_PERMUTATIONS = 200  # smallest p-value 1/201, under the default alpha 0.01
CHECKS = ("prediction", "confidence", "embedding")


def load_baseline(base: str | Path) -> tuple[dict, dict]:
    """statistics.json and constraints.json of a baseline folder; a ConfigError naming what is wrong."""
    base = Path(base)
    try:
        stats = json.loads((base / "statistics.json").read_text())
        cons = {**drift.CONSTRAINTS, **json.loads((base / "constraints.json").read_text())}
        stats["classes"], stats["predicted_class_counts"], stats["expected"], stats["confidence"]  # noqa: B018
    except OSError as exc:
        raise ConfigError(f"--monitor-baseline {base}: cannot read {Path(exc.filename or base).name} "
                          f"({exc.strerror}); write it with 'medpipe monitor baseline'") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--monitor-baseline {base}: not a medpipe baseline ({exc.__class__.__name__}: "
                          f"{exc})") from None
    return stats, cons


class LiveMonitor:
    """The rolling window and its gauges (see the module docstring)."""

    def __init__(self, stats: dict, cons: dict, window: int, classes: list[str], projection: str | None):
        if window < cons["min_window"]:
            raise ConfigError(f"--monitor-window must be at least min_window ({cons['min_window']}, "
                              f"constraints.json), got {window}")
        if list(stats["classes"]) != list(classes):
            raise ConfigError(f"--monitor-baseline: its classes {stats['classes']} are not the model's {classes}")
        self.stats, self.cons, self.classes = stats, cons, list(classes)
        self._probs: collections.deque = collections.deque(maxlen=window)
        self._emb: collections.deque = collections.deque(maxlen=window)
        ref = stats.get("embedding") or {}
        usable = ref.get("projection") == projection and projection is not None
        vecs = [v for v in (decode(e) for e in ref.get("sample", [])) if v is not None] if usable else []
        self._reference = np.stack(vecs) if len(vecs) >= cons["min_window"] else None
        self._lock = threading.Lock()
        self._seen = self._done = 0
        self.values: dict = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="medpipe-live-monitor", daemon=True)

    def observe(self, probs: np.ndarray, embeddings: list) -> None:
        """Add answered images (rows of calibrated probabilities; per row its projected embedding or None)."""
        with self._lock:
            for p, e in zip(probs, embeddings):
                self._probs.append(np.asarray(p, np.float64))
                self._emb.append(e)
            self._seen += len(probs)

    def refresh(self) -> dict:
        """Recompute every statistic on the current window; the values the gauges show."""
        with self._lock:
            probs = np.array(self._probs).reshape(-1, len(self.classes))
            emb = [e for e in self._emb if e is not None]
            self._done = self._seen
        n, cons, nan = len(probs), self.cons, math.nan
        counts = np.bincount(probs.argmax(1), minlength=len(self.classes)) if n else np.zeros(len(self.classes))
        v = {"window_images": n, "class_share": (counts / n).tolist() if n else [nan] * len(self.classes),
             "confidence_median": float(np.median(probs.max(1))) if n else nan,
             "p_value": dict.fromkeys(CHECKS, nan), "statistic": dict.fromkeys(CHECKS, nan),
             "estimated_balanced_accuracy": nan, "estimated_balanced_accuracy_se": nan}
        if n >= cons["min_window"]:
            w = drift.check_window(self.stats, cons, probs, [])
            v["p_value"]["prediction"] = w["prediction_drift"]["p_value"]
            v["statistic"]["prediction"] = w["prediction_drift"]["statistic"]
            v["p_value"]["confidence"] = w["confidence_drift"]["p_value"]
            v["statistic"]["confidence"] = w["confidence_drift"]["statistic"]
            v["estimated_balanced_accuracy"] = w["estimated"]["balanced_accuracy"]
            v["estimated_balanced_accuracy_se"] = w["estimated"]["balanced_accuracy_se"]
        if self._reference is not None and len(emb) >= cons["min_window"]:
            r = drift.mmd_test(np.stack([decode(e) for e in emb]), self._reference, LIVE_PERMUTATIONS)
            v["p_value"]["embedding"], v["statistic"]["embedding"] = r["p_value"], r["mmd2"]
        self.values = v
        return v

    def _run(self) -> None:
        while not self._stop.wait(REFRESH_S):
            if self._seen != self._done:
                try:
                    self.refresh()
                except Exception as exc:  # noqa: BLE001 - a statistic must never stop the service
                    log.warning("live monitor: refresh failed (%s: %s)", exc.__class__.__name__, exc)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def register(self, registry) -> None:
        """The gauges, read at scrape time from the last refresh, in ``registry``."""
        from prometheus_client.core import GaugeMetricFamily

        monitor = self

        class _Collector:
            def collect(self):
                yield from monitor.families(GaugeMetricFamily)

        registry.register(_Collector())

    def families(self, family) -> list:
        """The gauge families of the last refresh (``family``: prometheus_client's GaugeMetricFamily)."""
        v, expected = self.values or self.refresh(), self.stats["expected"]
        base = np.array([self.stats["predicted_class_counts"][c] for c in self.classes], float)
        out = []

        def gauge(name, text, value=None, labels=(), rows=()):
            g = family(f"medpipe_monitor_{name}", text, labels=list(labels) or None)
            if labels:
                for lab, val in rows:
                    g.add_metric(list(lab), _num(val))
            else:
                g.add_metric([], _num(value))
            out.append(g)

        gauge("window_images", "Answered images in the rolling window", v["window_images"])
        gauge("class_share", "Share of each predicted class (top calibrated probability) in the window",
              labels=["class"], rows=[((c,), s) for c, s in zip(self.classes, v["class_share"])])
        gauge("baseline_class_share", "Share of each predicted class on the baseline data", labels=["class"],
              rows=[((c,), s) for c, s in zip(self.classes, base / max(base.sum(), 1.0))])
        gauge("confidence_median", "Median top calibrated probability in the window", v["confidence_median"])
        gauge("drift_p_value", "p-value of the window's drift test against the baseline (NaN: too few images)",
              labels=["check"], rows=[((c,), v["p_value"][c]) for c in CHECKS])
        gauge("drift_statistic", "Drift test statistic (prediction: chi-square, confidence: KS D, embedding: MMD^2)",
              labels=["check"], rows=[((c,), v["statistic"][c]) for c in CHECKS])
        gauge("drift_alpha", "Threshold of each drift test (constraints.json)", labels=["check"],
              rows=[((c,), self.cons[f"{c}_drift_alpha"]) for c in CHECKS])
        gauge("estimated_balanced_accuracy", "Label-free (CBPE) balanced accuracy of the window",
              v["estimated_balanced_accuracy"])
        gauge("estimated_balanced_accuracy_se", "Standard error of that estimate", v["estimated_balanced_accuracy_se"])
        gauge("baseline_estimated_balanced_accuracy", "The same estimate on the baseline data",
              expected["balanced_accuracy"])
        gauge("performance_tolerance", "Allowed drop of balanced accuracy (constraints.json)",
              self.cons["performance_tolerance"])
        return out


def _num(x) -> float:
    return math.nan if x is None else float(x)


def open_live(cfg, predictor, projection: str | None, registry=None) -> LiveMonitor | None:
    """The service's live monitor for a ``ServeConfig`` with ``monitor_baseline`` set (None without); a baseline
    of another model (its ``package_sha256``) is refused."""
    if not getattr(cfg, "monitor_baseline", None):
        return None
    stats, cons = load_baseline(cfg.monitor_baseline)
    classes, sha = predictor.classes, predictor.meta.weights_sha256
    if stats.get("package_sha256") and stats["package_sha256"] != sha:
        raise ConfigError(f"--monitor-baseline {cfg.monitor_baseline}: it describes another model (package "
                          f"{str(stats['package_sha256'])[:12]}, this one is {str(sha)[:12]}); run 'medpipe monitor "
                          "baseline' with this model")
    live = LiveMonitor(stats, cons, cfg.monitor_window, classes, projection)
    if registry is not None:
        live.register(registry)
    live.start()
    log.info("live monitor: drift of the last %d images against %s as medpipe_monitor_* gauges%s",
             cfg.monitor_window, cfg.monitor_baseline, "" if live._reference is not None else
             " (no embedding test: the baseline has no embeddings of this projection or the backend gives none)")
    return live
