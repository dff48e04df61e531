"""``medpipe monitor select``: the captured cases most worth an expert's label, as a SageMaker Ground Truth
input manifest and a CSV.

    medpipe monitor select --capture DIR --budget N --out OUT [--baseline BASE] [--model PKG]
                           [--window 500] [--references refs.csv] [--source-prefix s3://bucket/prefix/]

The rule (one score per captured image, highest first, ``--budget`` of them; an image sent several
times, by its sha256, counts once):

    score = (1 - top calibrated probability) + 0.5 * [the decision rules disagree] + 0.25 * [its window drifted]

- uncertainty: the calibrated probability of the top class is the chance the model is right, so
  ``1 - p`` is the expected error of the answer the clinician saw;
- disagreement (with ``--model``: the rules in its ``model.json``, :mod:`medpipe.decision`): the
  image's label depends on which rule is used, so it sits on a decision boundary and its label tells
  which rule is right there;
- drift (with ``--baseline``): the image belongs to a window ``monitor check`` flags, a sample of the
  population the baseline does not describe, which the next training run needs.

Sources: Ground Truth shows an image at its ``source-ref``. Images captured with ``--capture-inputs``
are written to ``OUT/images/<sha256>.<ext>`` and referenced as ``--source-prefix`` + that name
(default the local folder; upload it and pass its ``s3://`` prefix); an image the client keeps in its
own archive is referenced through ``--references`` (CSV ``eventId,source-ref[,index]``, the eventId the
client got in ``X-Medpipe-Event-Id``). Selected images without either are listed in the CSV only (with
their sha256, by which a site finds them). Every manifest line carries ``medpipe-event-id`` and
``medpipe-index``: Ground Truth copies them into its output manifest, which ``monitor check
--ground-truth`` joins by eventId and ``medpipe ingest`` reads as training data.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import numpy as np

from medpipe import decision
from medpipe.errors import MedpipeError
from medpipe.monitor import drift
from medpipe.monitor.capture import iso_time
from medpipe.monitor.jobs import _load, windows
from medpipe.monitor.reader import ReadLog, read_capture
from medpipe.monitor.reader import _files as capture_files, _open as open_capture_file
from medpipe.package import read_meta
from medpipe.utils import atomic_write_text

WEIGHTS = {"disagree": 0.5, "drifted": 0.25}
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tif", "DICOM": ".dcm"}
COLUMNS = ("eventId", "index", "inferenceTime", "sha256", "source-ref", "predicted", "confidence", "disagree",
           "drifted_window", "score")


def disagreement(probs: np.ndarray, decision_entry: dict | None, classes: int) -> np.ndarray:
    """True where the package's decision rules (argmax and every fitted one) do not all give the same label."""
    rules = sorted({"argmax", *((decision_entry or {}).get("rules") or {})})
    labels = [decision.apply_offsets(probs, decision.resolve(decision_entry, r, classes)[1]) for r in rules]
    return (np.stack(labels) != labels[0]).any(0) if labels else np.zeros(len(probs), bool)


def drifted(cap, stats: dict, cons: dict, window: str) -> np.ndarray:
    """True for the images of windows where ``monitor check`` would report a violation."""
    out = np.zeros(len(cap.probs), bool)
    for idx in windows(cap.times, window):
        if drift.check_window(stats, cons, cap.probs[idx], [cap.inputs[i] for i in idx])["violations"]:
            out[idx] = True
    return out


def _references(path: str | Path | None, log: ReadLog) -> dict[tuple[str, int], str]:
    if not path:
        return {}
    path = Path(path)
    if not path.is_file():
        raise MedpipeError(f"--references {path}: no such file")
    reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8", errors="replace")))
    if not reader.fieldnames or not {"eventId", "source-ref"} <= set(reader.fieldnames):
        raise MedpipeError(f"--references {path}: a CSV needs the columns eventId,source-ref (got "
                           f"{','.join(reader.fieldnames or [])})")
    out = {}
    for no, r in enumerate(reader, 2):
        index = (r.get("index") or "0").strip()
        if not r["eventId"] or not r["source-ref"] or not index.isdigit():
            log.add("bad_reference", f"{path}:{no}")
            continue
        out[(r["eventId"], int(index))] = r["source-ref"].strip()
    return out


def captured_bytes(root: str | Path, wanted: set[tuple[str, int]]) -> dict[tuple[str, int], bytes]:
    """The image bytes of the wanted (eventId, index) where the record kept the request body (--capture-inputs
    or SageMaker's capture): an image body, or medpipe's JSON ``{"images": [base64, ...]}``. ``root``: a
    folder, a file or an s3:// prefix, as :func:`medpipe.monitor.reader.read_capture` reads it."""
    out: dict = {}
    events = {e for e, _ in wanted}
    for path in capture_files(root):
        with open_capture_file(path) as f:
            for raw in f:
                try:
                    rec = json.loads(raw)
                    event = str(rec["eventMetadata"]["eventId"])
                    if event not in events:
                        continue
                    inp = rec["captureData"]["endpointInput"]
                    if inp.get("encoding") != "BASE64":
                        continue
                    body, ctype = base64.b64decode(inp["data"]), str(inp.get("observedContentType", ""))
                    if "json" in ctype:
                        items = json.loads(body).get("images") or []
                        images = [base64.b64decode(x.get("b64") if isinstance(x, dict) else x) for x in items]
                    else:
                        images = [body] if "image" in ctype or "dicom" in ctype else []
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue  # monitor check names bad lines; here they only have no bytes
                for i, data in enumerate(images):
                    if (event, i) in wanted:
                        out[(event, i)] = data
    return out


def select(capture: str | Path, budget: int, out: str | Path, *, baseline: str | Path | None = None,
           model: str | Path | None = None, window: str = "500", references: str | Path | None = None,
           source_prefix: str | None = None) -> dict:
    """Score, pick and write ``OUT/manifest.jsonl``, ``OUT/selected.csv`` and ``OUT/images/``; returns a summary."""
    if budget <= 0:
        raise MedpipeError(f"--budget must be a positive number of images, got {budget}")
    if baseline is None and model is None:
        raise MedpipeError("monitor select needs --baseline (drifted windows) or --model (decision rules), or both")
    stats, cons = _load(Path(baseline)) if baseline else (None, None)
    meta = read_meta(model) if model else None
    classes = list(stats["classes"] if stats else meta.classes)
    if meta is not None and list(meta.classes) != classes:
        raise MedpipeError(f"--model classes {list(meta.classes)} differ from the baseline's {classes}")
    sha = stats.get("package_sha256") if stats else meta.weights_sha256
    log = ReadLog()
    cap = read_capture(capture, classes, sha, log)
    if not len(cap.probs):
        raise MedpipeError(f"--capture {capture}: no usable records of this model")
    dis = disagreement(cap.probs, meta.decision if meta else None, len(classes))
    drf = drifted(cap, stats, cons, window) if stats else np.zeros(len(cap.probs), bool)
    conf = cap.probs.max(1)
    score = (1 - conf) + WEIGHTS["disagree"] * dis + WEIGHTS["drifted"] * drf
    chosen, seen = [], set()
    for i in np.argsort(-score, kind="stable"):
        key = cap.inputs[i].get("sha256") or (cap.event_ids[i], cap.index[i])
        if key not in seen:
            seen.add(key)
            chosen.append(int(i))
        if len(chosen) == budget:
            break
    return _write(Path(out), capture, cap, chosen, score, conf, dis, drf, classes,
                  _references(references, log), source_prefix, log)


def _write(out: Path, capture, cap, chosen: list[int], score, conf, dis, drf, classes: list[str], refs: dict,
           source_prefix: str | None, log: ReadLog) -> dict:
    keys = [(cap.event_ids[i], cap.index[i]) for i in chosen]
    kept = captured_bytes(capture, set(keys) - set(refs))
    (out / "images").mkdir(parents=True, exist_ok=True)
    prefix = source_prefix if source_prefix is not None else str((out / "images").resolve()) + "/"
    lines, rows = [], []
    for i, key in zip(chosen, keys):
        fp = cap.inputs[i]
        ref = refs.get(key)
        if ref is None and key in kept:
            name = f"{fp.get('sha256') or key[0]}{EXTENSIONS.get(str(fp.get('format', '')).upper(), '.img')}"
            (out / "images" / name).write_bytes(kept[key])
            ref = prefix + name
        if ref is not None:
            lines.append(json.dumps({"source-ref": ref, "medpipe-event-id": key[0], "medpipe-index": key[1]}))
        rows.append([key[0], key[1], iso_time(float(cap.times[i])), fp.get("sha256", ""), ref or "",
                     classes[int(cap.probs[i].argmax())], f"{conf[i]:.4f}", int(dis[i]), int(drf[i]), f"{score[i]:.4f}"])
    atomic_write_text(out / "manifest.jsonl", "".join(x + "\n" for x in lines))
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([COLUMNS, *rows])
    atomic_write_text(out / "selected.csv", buf.getvalue())
    return {"images": int(len(cap.probs)), "selected": len(rows), "in_manifest": len(lines),
            "no_source": len(rows) - len(lines), "disagree": int(dis[chosen].sum()) if chosen else 0,
            "drifted": int(drf[chosen].sum()) if chosen else 0, "skipped": log.counts, "named": log.named}
