"""``medpipe monitor baseline`` and ``medpipe monitor check``: the files they read and write, the report.

    medpipe monitor baseline --model PKG --data DATA [--split val] --out BASE
    medpipe monitor check --baseline BASE --capture DIR [--window 500|1h] [--ground-truth FILE] --out OUT

``check`` writes ``OUT/constraint_violations.json``, ``OUT/windows.json`` (every statistic of every
window), ``OUT/report.md`` and its plots ``OUT/plots/*.png`` (unless ``--no-plots``), and returns :data:`EXIT_VIOLATION` when any window violates a
constraint (0 otherwise), so cron or a CI job can alert. The predicted class is the top calibrated
probability in the baseline and in the capture alike (the decision rule may label otherwise).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from medpipe.data.sources import load_records
from medpipe.errors import MedpipeError
from medpipe.monitor import drift
from medpipe.monitor.capture import fingerprint, iso_time
from medpipe.monitor.embedding import Embedder, encode
from medpipe.monitor.plots import draw
from medpipe.monitor.reader import ReadLog, read_capture, read_ground_truth
from medpipe.utils import atomic_write_json, atomic_write_text

EXIT_VIOLATION = 3  # a window violated a constraint (distinct from 2, a usage or input error)


def baseline(model: str | Path, data: str | Path, out: str | Path, *, split: str = "val", backend: str = "auto",
             device: str = "auto", batch_size: int = 32) -> dict:
    """Run the package on a split of an ingested data folder; write statistics.json and constraints.json."""
    import pandas as pd

    from medpipe.infer.predictor import Predictor  # deferred: torch

    predictor = Predictor(model, device=device, backend=backend)
    table, classes = load_records(data)
    if classes != predictor.classes:
        raise MedpipeError(f"data classes {classes} differ from the model's {predictor.classes}")
    if split != "all":
        sp_path = Path(data) / "splits.csv"
        if not sp_path.is_file():
            raise MedpipeError(f"no split file {sp_path}; run 'medpipe split --data {data}' or pass --split all")
        sp = pd.read_csv(sp_path, dtype=str, keep_default_na=False)
        table = table[table["image_id"].isin(set(sp.loc[sp["split"] == split, "image_id"]))]
    if table.empty:
        raise MedpipeError(f"split {split!r} of {data} has no images")
    probs, inputs = [], []
    embedder = Embedder(predictor)
    for start in range(0, len(table), batch_size):
        chunk = [Path(p).read_bytes() for p in table["path"].iloc[start:start + batch_size]]
        prints = [fingerprint("bytes", b, predictor.max_pixels) for b in chunk]
        pixels = [predictor.decode(b) for b in chunk]
        p, emb = embedder.probabilities(pixels)
        for fp, e in zip(prints, embedder.embed(pixels) if emb is None else emb):
            fp.update(embedding=encode(e), embedding_projection=embedder.id)
        probs.append(p)
        inputs += prints
    meta = {"model": predictor.name, "version": predictor.version, "package_sha256": predictor.meta.weights_sha256,
            "split": split}
    stats = drift.statistics(meta, classes, np.concatenate(probs), table["class_index"].to_numpy(), inputs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "statistics.json", stats)
    atomic_write_json(out / "constraints.json", {"format": "medpipe-monitor-constraints/1", **drift.CONSTRAINTS})
    return stats


def _load(base: Path) -> tuple[dict, dict]:
    try:
        stats = json.loads((base / "statistics.json").read_text())
        cons = {**drift.CONSTRAINTS, **json.loads((base / "constraints.json").read_text())}
        stats["classes"], stats["predicted_class_counts"], stats["expected"]  # noqa: B018 - required keys
    except FileNotFoundError as exc:
        raise MedpipeError(f"--baseline {base}: {Path(exc.filename).name} is missing; run 'medpipe monitor "
                           "baseline' first") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise MedpipeError(f"--baseline {base}: statistics.json/constraints.json are not a medpipe baseline "
                           f"({exc.__class__.__name__}: {exc})") from None
    return stats, cons


def windows(times: np.ndarray, spec: str) -> list[np.ndarray]:
    """Index arrays of consecutive windows: ``spec`` a count of images (``500``) or a duration (``30m``, ``1h``, ``1d``)."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", str(spec))
    if not m or int(m.group(1)) <= 0:
        raise MedpipeError(f"--window must be a positive count of images (500) or a duration (30m, 1h, 1d), got {spec!r}")
    n, unit = int(m.group(1)), m.group(2)
    if not unit:
        return [np.arange(i, min(i + n, len(times))) for i in range(0, len(times), n)]
    width = n * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    slot = np.floor(times / width).astype(np.int64)
    return [np.flatnonzero(slot == s) for s in np.unique(slot)]


def check(base: str | Path, capture: str | Path, out: str | Path, *, window: str = "500",
          ground_truth: str | Path | None = None, plots: bool = True) -> tuple[int, dict]:
    """Check every window of the capture against the baseline; write the files (``plots``: also
    ``OUT/plots/*.png``, :mod:`medpipe.monitor.plots`). Returns (exit code, summary)."""
    stats, cons = _load(Path(base))
    classes = stats["classes"]
    log = ReadLog()
    cap = read_capture(capture, classes, stats.get("package_sha256"), log)
    truth = read_ground_truth(ground_truth, classes, log) if ground_truth else {}
    keys = list(zip(cap.event_ids, cap.index))
    known = set(keys)
    for key in truth:
        if key not in known:
            log.add("unknown_event_id", f"{key[0]} (image {key[1]})")
    results, violations = [], []
    for w, idx in enumerate(windows(cap.times, window)):
        lab = [i for i in idx if keys[i] in truth]
        t = (np.array([truth[keys[i]] for i in lab], int), cap.probs[lab]) if lab else None
        r = drift.check_window(stats, cons, cap.probs[idx], [cap.inputs[i] for i in idx], t)
        r.update(window=w, start=_iso(cap.times[idx[0]]), end=_iso(cap.times[idx[-1]]), labelled=len(lab))
        results.append(r)
        violations += [{**v, "window": w, "start": r["start"], "end": r["end"]} for v in r["violations"]]
    summary = {"baseline": str(base), "capture": str(capture), "images": int(len(cap.probs)),
               "windows": len(results), "violations": len(violations), "skipped": log.counts, "named": log.named}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "constraint_violations.json", {"violations": violations})
    atomic_write_json(out / "windows.json", {"summary": summary, "windows": results})
    figures = draw(stats, cons, results, out / "plots") if plots and results else []
    atomic_write_text(out / "report.md", report(stats, cons, summary, results, figures))
    return (EXIT_VIOLATION if violations else 0), summary


def _iso(t: float) -> str:
    return iso_time(float(t))


def _f(v, fmt: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and v != v) else format(v, fmt)


def report(stats: dict, cons: dict, summary: dict, results: list[dict], figures: list[str] = ()) -> str:
    """The markdown report: what was read and skipped, the plots (``figures``: paths relative to the report),
    then one section per window."""
    exp, meas = stats["expected"], stats.get("measured") or {}
    lines = [f"# Monitoring report: {stats.get('model', '?')} v{stats.get('version', '?')}", "",
             f"Baseline: {summary['baseline']} ({stats['n']} images of split {stats.get('split', '?')}; expected "
             f"balanced accuracy {_f(exp['balanced_accuracy'])}, measured {_f(meas.get('balanced_accuracy'))}). "
             f"Capture: {summary['capture']}: {summary['images']} images in {summary['windows']} windows; "
             f"**{summary['violations']} violations**.", "",
             f"Thresholds (constraints.json): {', '.join(f'{k} {v}' for k, v in cons.items() if k != 'format')}.", ""]
    if summary["skipped"]:
        lines += ["## Records not used or noticed", ""]
        for kind, n in summary["skipped"].items():
            lines.append(f"- {kind}: {n} (" + "; ".join(summary["named"][kind][:5]) + (", ..." if n > 5 else "") + ")")
        lines.append("")
    if figures:
        lines += ["## Plots", "", *(f"![{Path(f).stem.replace('_', ' ')}]({f})" for f in figures), ""]
    for r in results:
        lines += [f"## Window {r['window']}: {r['start']} - {r['end']} ({r['n']} images, {r['labelled']} labelled)", ""]
        if not r["tested"]:
            lines += [f"Fewer than {cons['min_window']} images: reported, not tested.", ""]
        pd_, cd = r["prediction_drift"], r["confidence_drift"]
        lines.append(f"- predicted classes: {pd_['counts']} (chi-square p {_f(pd_['p_value'], '.2g')})")
        lines.append(f"- confidence: median {_f(cd['median'])}, KS D {_f(cd['statistic'])} (p {_f(cd['p_value'], '.2g')})")
        for s, x in r["input_drift"].items():
            lines.append(f"- input {s}: KS D {_f(x['statistic'])} (Holm p {_f(x['p_holm'], '.2g')})")
        emb = r.get("embedding_drift")
        if emb and emb["p_value"] is not None:
            lines.append(f"- embedding: MMD^2 {_f(emb['mmd2'], '.4f')} over {emb['n']} images (permutation p "
                         f"{_f(emb['p_value'], '.2g')}, threshold {cons['embedding_drift_alpha']})")
        elif emb:
            lines.append(f"- embedding: {emb['n']} images with an embedding, too few to test")
        e = r["estimated"]
        if e:
            lines.append(f"- estimated (label-free): accuracy {_f(e['accuracy'])} +- {_f(1.96 * e['accuracy_se'])}, "
                         f"balanced accuracy {_f(e['balanced_accuracy'])} +- {_f(1.96 * e['balanced_accuracy_se'])}, "
                         f"macro AUC {_f(e['macro_auc'])}")
        if "measured" in r:
            m = r["measured"]
            lines.append(f"- measured on {m['n']} labelled: accuracy {_f(m['accuracy'])}, balanced accuracy "
                         f"{_f(m['balanced_accuracy'])}, macro AUC {_f(m['macro_auc'])}")
        lines += [f"- **violation**: {v['description']}" for v in r["violations"]] or ["- no violation"]
        lines.append("")
    return "\n".join(lines)
