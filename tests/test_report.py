"""The evaluation report a clinician reads: n beside every per-class figure, small classes flagged,
TTA stated, and plots whose encodings say what they show."""

import json

import numpy as np

from medpipe.evaluate import MIN_POSITIVES, compute_metrics, write_report


def _data(seed=0):
    rng = np.random.default_rng(seed)
    classes = ["mel", "nv", "df"]
    y = np.array([0] * 11 + [1] * 60 + [2] * 2)  # 11 melanomas, 2 dermatofibromas: too few to trust
    logits = rng.normal(size=(len(y), 3)) + 2.0 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return classes, y, probs.astype(np.float32)


def test_report_gives_n_flags_small_classes_and_says_tta(tmp_path):
    classes, y, probs = _data()
    metrics = compute_metrics(y, probs, classes, bootstrap=50)
    metrics["tta"] = True
    paths = write_report(metrics, y, probs, classes, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "Test-time augmentation: yes" in md
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ") and "|" in line[2:]}
    assert "| 11 |" in rows["mel"] and f"fewer than {MIN_POSITIVES} positives" in rows["mel"]
    assert "| 2 |" in rows["df"] and f"fewer than {MIN_POSITIVES} positives" in rows["df"]
    assert "| 60 |" in rows["nv"] and "fewer than" not in rows["nv"]
    assert "(n=11 melanomas; **fewer than 30: unreliable**)" in md
    assert "**Caution:** mel, df had fewer than 30 positive images" in md
    for p in paths["plots"]:
        assert (tmp_path / p.split("/")[-1]).stat().st_size > 1000
    metrics["tta"] = False
    write_report(metrics, y, probs, classes, tmp_path / "b")
    assert "Test-time augmentation: no" in (tmp_path / "b" / "report.md").read_text()


def test_plots_encode_what_they_show(tmp_path, monkeypatch):
    """ROC curves differ in style and marker, confusion cells print the row share their colour encodes,
    the colour bar is labelled, and reliability bars carry their counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    real_savefig = matplotlib.figure.Figure.savefig

    def keep(fig, *a, **k):
        figures.append(fig)
        return real_savefig(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    monkeypatch.setattr(plt, "close", lambda *a, **k: None)
    classes, y, probs = _data(1)
    metrics = compute_metrics(y, probs, classes, bootstrap=0)
    write_report(metrics, y, probs, classes, tmp_path)
    roc, cm, rel = figures
    lines = [ln for ln in roc.axes[0].get_lines() if ln.get_label().startswith(tuple(classes))]
    assert len({(ln.get_linestyle(), ln.get_marker()) for ln in lines}) == len(lines) == 3
    assert all("n=" in ln.get_label() for ln in lines)
    ax, bar_ax = cm.axes[0], cm.axes[1]
    assert "row-normalised" in bar_ax.get_ylabel()
    image = ax.get_images()[0].get_array()
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    for (i, j), text in cells.items():
        assert text.startswith(f"{image[i, j]:.0%}")  # the printed share is the coloured value
    counts = [t.get_text() for t in rel.axes[0].texts]
    assert counts and all(c.startswith("n=") for c in counts)
    assert sum(int(c[2:]) for c in counts) == len(y)
    json.loads((tmp_path / "report.json").read_text())


def test_metrics_match_scikit_learn_with_an_absent_class():
    """Per-class AUC is scikit-learn's one-vs-rest AUC, an absent class is NaN (with a warning naming it) and
    left out of the macro AUC and balanced accuracy; sensitivity/specificity match the confusion matrix; the
    bootstrap interval is reproducible from its seed and holds the point estimate."""
    import pytest
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, roc_auc_score

    rng = np.random.default_rng(3)
    classes = ["a", "b", "c", "absent"]
    y = rng.integers(0, 3, 120)
    probs = rng.dirichlet([1, 1, 1, 1], size=len(y)) + 0.3 * np.eye(4)[y]
    probs /= probs.sum(axis=1, keepdims=True)
    pred = rng.integers(0, 4, len(y))  # a decision rule may predict the absent class
    with pytest.warns(RuntimeWarning, match="absent"):
        m = compute_metrics(y, probs, classes, bootstrap=100, seed=7, pred=pred)
    want = [roc_auc_score(y == k, probs[:, k]) for k in range(3)]
    got = [m["per_class"][c]["auc"] for c in classes]
    assert np.allclose(got[:3], want) and np.isnan(got[3])
    assert np.isclose(m["macro_auc"], np.mean(want))
    with pytest.warns(UserWarning):  # sklearn says the absent class was predicted
        assert np.isclose(m["balanced_accuracy"], balanced_accuracy_score(y, pred))
    cm = confusion_matrix(y, pred, labels=range(4))
    assert m["confusion_matrix"] == cm.tolist()
    for k, c in enumerate(classes[:3]):
        neg = cm.sum() - cm[k].sum()
        assert np.isclose(m["per_class"][c]["sensitivity"], cm[k, k] / cm[k].sum())
        assert np.isclose(m["per_class"][c]["specificity"], (neg - (cm[:, k].sum() - cm[k, k])) / neg)
    assert np.isnan(m["per_class"]["absent"]["sensitivity"]) and m["per_class"]["absent"]["specificity"] < 1
    lo, hi = m["macro_auc_ci95"]
    assert lo < m["macro_auc"] < hi and np.isnan(m["per_class"]["absent"]["auc_ci95"]).all()
    with pytest.warns(RuntimeWarning):
        again = compute_metrics(y, probs, classes, bootstrap=100, seed=7, pred=pred)
    assert again["macro_auc_ci95"] == m["macro_auc_ci95"]
