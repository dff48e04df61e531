"""The evaluation of a model package: predictions on a split, its figures (medpipe.metrics) per
decision rule, and the human report.

``write_report`` writes ``report.json``, ``report.md`` and PNG plots (ROC per class, confusion
matrix, reliability diagram). The report is written for a clinician: every per-class figure stands
next to its n, and a figure from fewer than ``MIN_POSITIVES`` positive images is flagged (with under 30
positives a 95% interval for a sensitivity near 0.8 is wider than +/-0.15, so the point value alone
misleads); it says whether test-time augmentation was used; ROC curves differ in line style and
marker as well as colour (overlapping curves stay distinguishable); the confusion matrix cells show the
row share their colour encodes (with the count), under a labelled colour bar; the reliability diagram
prints each bin's image count.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from medpipe.data.cache import build_cache
from medpipe.data.sources import load_records
from medpipe.decision import apply_offsets, balanced_accuracy, resolve
from medpipe.errors import MedpipeError
from medpipe.infer.predictor import Predictor
from medpipe.metrics import (auc_per_class, bootstrap_auc_ci, compute_metrics,  # noqa: F401 - evaluate's names
                             expected_calibration_error, sensitivity_at_specificity)
from medpipe.utils import atomic_write_json, atomic_write_text, csv_text

MIN_POSITIVES = 30  # per-class figures from fewer positive images are flagged in the report
LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def decision_rule_rows(y: np.ndarray, probs: np.ndarray, classes: list[str], decision: dict | None) -> dict:
    """The label figures under every decision rule a package holds (medpipe.decision), on these images:
    balanced accuracy, accuracy, per-class sensitivity and the validation balanced accuracy it was fitted to."""

    y = np.asarray(y, dtype=np.int64)
    rules = (decision or {}).get("rules", {})
    out = {}
    for name in ["argmax", *[r for r in rules if r != "argmax"]]:
        pred = apply_offsets(probs, resolve(decision, name, len(classes))[1])
        out[name] = {"balanced_accuracy": balanced_accuracy(y, pred, len(classes)),
                     "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
                     "sensitivity": {c: float((pred[y == k] == k).mean()) if (y == k).any() else float("nan")
                                     for k, c in enumerate(classes)},
                     "val_balanced_accuracy": rules.get(name, {}).get("val_balanced_accuracy", float("nan"))}
    return out


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def write_report(metrics: dict, y: np.ndarray, probs: np.ndarray, classes: list[str], out_dir: str | Path,
                 title: str = "medpipe evaluation") -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    y = np.asarray(y)
    _plot_roc(plt, metrics, y, probs, classes, out / "roc.png")
    _plot_confusion(plt, metrics, classes, out / "confusion_matrix.png")
    _plot_reliability(plt, metrics, out / "reliability.png")
    atomic_write_json(out / "report.json", metrics)  # NaN (a class absent from the split) is written as null
    atomic_write_text(out / "report.md", "\n".join(_report_lines(metrics, title)))
    return {"report_json": str(out / "report.json"), "report_md": str(out / "report.md"),
            "plots": [str(out / p) for p in ("roc.png", "confusion_matrix.png", "reliability.png")]}


def _plot_roc(plt, metrics: dict, y: np.ndarray, probs: np.ndarray, classes: list[str], path: Path) -> None:
    """ROC per class, each curve with its own line style and marker, its AUC and n."""
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(6.5, 6))
    for k, c in enumerate(classes):
        yb = (y == k).astype(int)
        if yb.any() and not yb.all():
            fpr, tpr, _ = roc_curve(yb, probs[:, k])
            n_pos = int(yb.sum())
            flag = " *" if n_pos < MIN_POSITIVES else ""
            ax.plot(fpr, tpr, linestyle=LINE_STYLES[k % len(LINE_STYLES)], marker=MARKERS[k % len(MARKERS)],
                    markevery=max(1, len(fpr) // 6), markersize=4, lw=1.4, alpha=0.85,
                    label=f"{c} (AUC {metrics['per_class'][c]['auc']:.3f}, n={n_pos}){flag}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC per class (macro AUC {_fmt(metrics['macro_auc'])})")
    ax.legend(loc="lower right", fontsize=7, title=f"* fewer than {MIN_POSITIVES} positives", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_confusion(plt, metrics: dict, classes: list[str], path: Path) -> None:
    """Confusion matrix: row-normalised colours, each cell's share and count printed."""
    cm = np.asarray(metrics["confusion_matrix"], dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45)
    ax.set_yticks(range(len(classes)), classes)
    for i in range(len(classes)):
        for j in range(len(classes)):  # the cell shows what its colour encodes (row share), then the count
            ax.text(j, i, f"{norm[i, j]:.0%}\n({int(cm[i, j])})", ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=7)
    ax.set(xlabel="predicted", ylabel="true (n per row)",
           title=f"Confusion matrix (balanced acc {_fmt(metrics['balanced_accuracy'])})")
    ax.set_yticks(range(len(classes)), [f"{c} (n={int(cm[i].sum())})" for i, c in enumerate(classes)])
    bar = fig.colorbar(im, ax=ax, fraction=0.046)
    bar.set_label("share of the true class's images (row-normalised)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_reliability(plt, metrics: dict, path: Path) -> None:
    """Reliability diagram with each bin's image count."""
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    bins = metrics["reliability_bins"]
    if bins:
        mids = [(b["lo"] + b["hi"]) / 2 for b in bins]
        ax.bar(mids, [b["accuracy"] for b in bins], width=1 / 15, edgecolor="k", alpha=0.7, label="accuracy")
        for m, b in zip(mids, bins):  # how many images each bar stands on
            ax.text(m, min(b["accuracy"] + 0.02, 0.95), f"n={b['count']}", ha="center", fontsize=6, rotation=90)
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="C1", label="bin mean")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top class)", ylabel="accuracy",
           title=f"Reliability (ECE {_fmt(metrics['ece'])})")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _report_lines(metrics: dict, title: str) -> list[str]:
    """report.md: headline figures, the decision-rule table, the per-class table and the caution."""
    tta = "no"
    if metrics.get("tta"):
        tta = "yes (logits averaged over the image and its flips; " + (
            "temperature and decision rules fitted on TTA validation logits)" if metrics.get("calibrated_for_tta")
            else "the INT8 accuracy gate's temperature, fitted without TTA)" if metrics.get("int8_gate")
            else "the package's calibration was fitted without TTA)")
    few = [c for c, m in metrics["per_class"].items() if m["support"] < MIN_POSITIVES]
    lines = [f"# {title}", "", f"Images evaluated: {metrics['n']}. Test-time augmentation: {tta}.", "",
             f"- Macro ROC AUC: **{_fmt(metrics['macro_auc'])}** (95% CI {_fmt(metrics['macro_auc_ci95'][0])}"
             f" to {_fmt(metrics['macro_auc_ci95'][1])}, {metrics['bootstrap']} bootstrap resamples)",
             f"- Balanced accuracy: **{_fmt(metrics['balanced_accuracy'])}**; accuracy {_fmt(metrics['accuracy'])}",
             f"- Expected calibration error: {_fmt(metrics['ece'])}"]
    if "mel_sensitivity_at_spec80" in metrics:
        n_mel = metrics["per_class"].get("mel", {}).get("support", 0)
        lines.append(f"- Melanoma sensitivity at 80% specificity: {_fmt(metrics['mel_sensitivity_at_spec80'])}; "
                     f"at 90%: {_fmt(metrics['mel_sensitivity_at_spec90'])} (n={n_mel} melanomas"
                     + (f"; **fewer than {MIN_POSITIVES}: unreliable**)" if n_mel < MIN_POSITIVES else ")"))
    if metrics.get("decision_rules"):
        rules = metrics["decision_rules"]
        lines += ["", f"Labels by the decision rule **{metrics.get('decision_rule', 'argmax')}** (probabilities "
                  "are the same under every rule; rules fitted on the validation split, see medpipe.decision):",
                  "", "| decision rule | balanced accuracy | accuracy | val balanced accuracy | "
                  + " | ".join(f"sens {c}" for c in metrics["per_class"]) + " |",
                  "|---|---:|---:|---:|" + "---:|" * len(metrics["per_class"])]
        for name, r in rules.items():
            lines.append(f"| {name} | {_fmt(r['balanced_accuracy'])} | {_fmt(r['accuracy'])} | "
                         f"{_fmt(r['val_balanced_accuracy'])} | "
                         + " | ".join(_fmt(r["sensitivity"][c]) for c in metrics["per_class"]) + " |")
    lines += ["", "| class | n (positives) | AUC | AUC 95% CI | sensitivity | specificity | |",
              "|---|---:|---:|---|---:|---:|---|"]
    for c, m in metrics["per_class"].items():
        flag = f"fewer than {MIN_POSITIVES} positives" if m["support"] < MIN_POSITIVES else ""
        lines.append(f"| {c} | {m['support']} | {_fmt(m['auc'])} | {_fmt(m['auc_ci95'][0])}-{_fmt(m['auc_ci95'][1])} "
                     f"| {_fmt(m['sensitivity'])} | {_fmt(m['specificity'])} | {flag} |")
    if few:
        lines += ["", f"**Caution:** {', '.join(few)} had fewer than {MIN_POSITIVES} positive images here; their "
                  "figures (and intervals, which a bootstrap over so few cases understates) are not reliable."]
    lines += ["", "![ROC per class](roc.png)", "", "![Confusion matrix](confusion_matrix.png)", "",
              "![Reliability diagram](reliability.png)", ""]
    return lines


def evaluate_package(model_dir: str | Path, data_dir: str | Path, out_dir: str | Path, *, split: str = "test",
                     splits_csv: str | Path | None = None, tta: bool = False, bootstrap: int = 1000,
                     batch_size: int = 64, backend: str = "auto", device: str = "auto", progress: bool = False,
                     decision_rule: str | None = None) -> dict:
    """Evaluate a package on a split of an ingested data dir. Pixels come from the same decoder as serving
    and the probabilities from the same runtime (``backend`` defaults to ``auto``, as ``medpipe serve``)."""
    import pandas as pd

    predictor = Predictor(model_dir, device=device, backend=backend, decision_rule=decision_rule)
    table, classes = load_records(data_dir)
    if classes != predictor.classes:
        raise MedpipeError(f"data classes {classes} differ from the model's {predictor.classes}")
    if split != "all":
        sp_path = Path(splits_csv) if splits_csv else Path(data_dir) / "splits.csv"
        if not sp_path.is_file():
            raise MedpipeError(f"no split file {sp_path}; run 'medpipe split --data {data_dir}' or pass --split all")
        sp = pd.read_csv(sp_path, dtype=str, keep_default_na=False)
        ids = set(sp.loc[sp["split"] == split, "image_id"])
        table = table[table["image_id"].isin(ids)]
    if table.empty:
        raise MedpipeError(f"split {split!r} has no images")
    cache = build_cache(table, Path(data_dir) / "cache", predictor.size, predictor.spec.interpolation, progress=progress)
    return evaluate_arrays(predictor, cache.pixels, cache.rows(table["image_id"]), table["class_index"].to_numpy(),
                           list(table["image_id"]), list(table["label"]), out_dir, split=split, tta=tta,
                           bootstrap=bootstrap, batch_size=batch_size, metadata=table_metadata(predictor, table))


def table_metadata(predictor, table) -> np.ndarray | None:
    """The record table's patient metadata encoded for a package that takes it (the columns it lacks count as
    not given, and so does a missing cell: NaN, None or pandas' NA); None for an image-only package. A value
    outside the package's vocabulary or range is a MetadataError naming the image and the field."""
    import pandas as pd

    spec = getattr(predictor, "metadata_spec", None)
    if spec is None:
        return None
    cols = [f for f in spec.fields if f in table.columns]
    rows = [{c: None if v is None or (not isinstance(v, str) and pd.isna(v)) else str(v) for c, v in r.items()}
            for r in table[cols].to_dict("records")] if cols else [{} for _ in range(len(table))]
    return spec.encode_many(rows, list(table["image_id"]))


def evaluate_arrays(predictor, pixels, rows, y, image_ids, labels, out_dir, *, split: str, tta: bool = False,
                    bootstrap: int = 1000, batch_size: int = 64, metadata: np.ndarray | None = None) -> dict:
    """Metrics, report, plots and predictions.csv for pixels[rows] (uint8 at the model's size). ``metadata``:
    encoded patient metadata per row, for a package that takes it (None: none given)."""
    import pandas as pd

    classes = predictor.classes
    probs = np.concatenate([predictor.probabilities(
        pixels[rows[i:i + batch_size]], tta=tta, metadata=None if metadata is None else metadata[i:i + batch_size])
        for i in range(0, len(rows), batch_size)])
    pred = predictor.labels(probs, tta=tta)
    metrics = compute_metrics(y, probs, classes, bootstrap=bootstrap, pred=pred)
    metrics["split"], metrics["tta"] = split, tta
    if getattr(predictor, "metadata_spec", None) is not None:
        metrics["metadata_given"] = metadata is not None
    metrics["decision_rule"] = predictor.decision_rule
    cal_tta = predictor.meta.calibration.tta if tta and not getattr(predictor, "int8", None) else None
    metrics["calibrated_for_tta"] = bool(cal_tta) if tta else None
    metrics["decision_rules"] = decision_rule_rows(y, probs, classes, (cal_tta.decision if cal_tta else None)
                                                   or predictor.meta.decision)
    metrics["backend"] = getattr(predictor, "backend", "eager")
    if getattr(predictor, "int8", None):  # the INT8 model's accuracy gate travels with its evaluation
        metrics["int8_gate"] = predictor.int8["gate"]
    paths = write_report(metrics, y, probs, classes, out_dir, title=f"medpipe evaluation: {predictor.name}, {split} split")
    pred_table = pd.DataFrame(probs, columns=classes)
    pred_table.insert(0, "image_id", list(image_ids))
    pred_table.insert(1, "label", list(labels))
    pred_table.insert(2, "predicted", [classes[k] for k in pred])
    atomic_write_text(Path(out_dir) / "predictions.csv",
                      csv_text(list(pred_table.columns), pred_table.itertuples(index=False, name=None)))
    return {"metrics": metrics, **paths}
