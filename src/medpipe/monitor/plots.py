"""The plots of a ``medpipe monitor check`` report, one PNG each under ``OUT/plots/``, over the windows:

- ``class_mix.png``: the predicted-class shares per window (stacked), the baseline's shares as the last bar;
- ``confidence.png``: the median top calibrated probability per window, the baseline's median as a line,
  and the KS p-value with the threshold;
- ``embedding_drift.png``: the MMD permutation p-value per window against ``embedding_drift_alpha``;
- ``input_drift.png``: the KS D of each input statistic per window (marked where its Holm-adjusted
  p-value is below ``input_drift_alpha``);
- ``performance.png``: the label-free balanced accuracy with its 95% interval, the measured one where
  labels came, and the baseline's minus the tolerance.

Drawn with matplotlib's Agg backend (no display). A p-value axis is logarithmic, so a window at the
threshold and one far past it are told apart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _axes(plt, title: str, ylabel: str):
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=100)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("window")
    return fig, ax


def _p(values) -> np.ndarray:
    return np.array([np.nan if v is None else max(float(v), 1e-6) for v in values])


def draw(stats: dict, cons: dict, results: list[dict], out: Path) -> list[str]:
    """Write the PNGs for these windows; returns their paths relative to ``out``'s parent (for the report)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    x = np.array([r["window"] for r in results])
    classes = stats["classes"]
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        written.append(f"{out.name}/{name}")

    fig, ax = _axes(plt, "Predicted-class mix per window (B: baseline)", "share")
    base = np.array([stats["predicted_class_counts"][c] for c in classes], float)
    shares = [np.array([r["prediction_drift"]["counts"][c] for c in classes], float) for r in results]
    mix = np.array([s / max(s.sum(), 1) for s in shares] + [base / max(base.sum(), 1)])
    pos = np.r_[x, (x.max() + 1.5) if len(x) else 0]
    bottom = np.zeros(len(pos))
    for k, c in enumerate(classes):
        ax.bar(pos, mix[:, k], bottom=bottom, label=c, width=0.8)
        bottom += mix[:, k]
    ax.set_xticks(pos, [*map(str, x), "B"])
    ax.legend(fontsize=7, ncol=len(classes), loc="upper center", bbox_to_anchor=(0.5, -0.3))
    save(fig, "class_mix.png")

    fig, ax = _axes(plt, "Confidence: median per window; KS p-value (right)", "median top probability")
    ax.plot(x, [r["confidence_drift"]["median"] for r in results], "o-", label="median")
    ax.axhline(float(np.median(stats["confidence"])), color="grey", ls="--", label="baseline median")
    ax2 = ax.twinx()
    ax2.semilogy(x, _p(r["confidence_drift"]["p_value"] for r in results), "s:", color="tab:red", label="KS p")
    ax2.axhline(cons["confidence_drift_alpha"], color="tab:red", lw=0.8)
    ax2.set_ylabel("p-value")
    ax.legend(fontsize=7, loc="lower left")
    save(fig, "confidence.png")

    emb = [r.get("embedding_drift") or {} for r in results]
    if any(e.get("p_value") is not None for e in emb):
        fig, ax = _axes(plt, "Embedding drift: MMD permutation p-value per window", "p-value")
        ax.semilogy(x, _p(e.get("p_value") for e in emb), "o-")
        ax.axhline(cons["embedding_drift_alpha"], color="tab:red", ls="--", label="embedding_drift_alpha")
        ax.legend(fontsize=7)
        save(fig, "embedding_drift.png")

    names = sorted({s for r in results for s in r["input_drift"]})
    if names:
        fig, ax = _axes(plt, "Input statistics: KS D per window (x: Holm p below input_drift_alpha)", "KS D")
        for s in names:
            d = np.array([r["input_drift"].get(s, {}).get("statistic", np.nan) for r in results], float)
            hit = np.array([r["input_drift"].get(s, {}).get("p_holm", 1.0) < cons["input_drift_alpha"]
                            for r in results])
            line, = ax.plot(x, d, "-", label=s, lw=1)
            ax.plot(x[hit], d[hit], "x", color=line.get_color(), ms=8)
        ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.3))
        save(fig, "input_drift.png")

    fig, ax = _axes(plt, "Balanced accuracy: label-free estimate (95% interval) and measured", "balanced accuracy")
    est = np.array([r["estimated"].get("balanced_accuracy", np.nan) if r["estimated"] else np.nan for r in results])
    se = np.array([r["estimated"].get("balanced_accuracy_se", np.nan) if r["estimated"] else np.nan for r in results])
    ax.errorbar(x, est, yerr=1.96 * se, fmt="o-", capsize=3, label="estimated")
    meas = np.array([r["measured"]["balanced_accuracy"] if "measured" in r else np.nan for r in results])
    if np.isfinite(meas).any():
        ax.plot(x, meas, "s", color="tab:green", label="measured")
    ax.axhline(stats["expected"]["balanced_accuracy"] - cons["performance_tolerance"], color="tab:red", ls="--",
               label="baseline - tolerance")
    ax.legend(fontsize=7)
    save(fig, "performance.png")
    return written
