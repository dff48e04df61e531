"""Reading data capture and ground truth: records written by ``medpipe serve --capture`` and by a SageMaker
endpoint's ``DataCaptureConfig`` alike, one row per image.

A capture line that is not a record (truncated, not JSON, missing ``captureData``/``eventMetadata``,
an output that is not medpipe's prediction JSON or CSV), a record whose output holds no prediction in
medpipe's form (``no_predictions``: e.g. another endpoint's single-score CSV) and a record of another model
(its ``medpipe.package_sha256`` differs from the baseline's) are counted and named in :class:`ReadLog`,
never mixed in. A record with no package hash (SageMaker writes none) is used and counted.

Ground truth (:func:`read_ground_truth`): a CSV with columns ``eventId,label`` (an ``index`` column
picks an image of a multi-image request; default 0), or SageMaker Model Monitor's JSON Lines
``{"groundTruthData": {"data": LABEL, "encoding": "CSV"}, "eventMetadata": {"eventId": ...},
"eventVersion": "0"}``, or a SageMaker Ground Truth output manifest of a job run on ``medpipe monitor select``'s
input manifest (each line keeps ``medpipe-event-id``/``medpipe-index``; the label is the ``class-name``
of its ``<attribute>-metadata``).

The capture and the ground truth may be ``s3://`` URLs (a prefix: every ``*.jsonl`` under it), read through
:mod:`medpipe.data.s3` with the standard AWS settings; a missing bucket, a denied key or an unreachable endpoint
is an error naming the URL, a truncated object ends in a counted ``bad_line``.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath

import numpy as np

from medpipe.data import s3
from medpipe.errors import MedpipeError, StorageError
from medpipe.monitor.capture import FINGERPRINT_TYPE, fingerprint

NAMED = 20  # problems named in the report per kind (all are counted)


@dataclass
class ReadLog:
    """What reading skipped or noticed: counts per kind and the first :data:`NAMED` places of each."""

    counts: dict = field(default_factory=dict)
    named: dict = field(default_factory=dict)

    def add(self, kind: str, where: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        names = self.named.setdefault(kind, [])
        if len(names) < NAMED:
            names.append(where)


@dataclass
class Capture:
    """One row per answered image: event, time, probabilities (class order of the baseline) and input stats."""

    event_ids: list[str]
    index: list[int]
    times: np.ndarray            # POSIX seconds
    probs: np.ndarray            # (n, classes)
    inputs: list[dict]           # fingerprint per image ({} when the record carries none)


def parse_time(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def _predictions(out: dict, classes: list[str]) -> list[list[float] | None]:
    """endpointOutput -> per image, the probabilities in ``classes`` order (None: an error entry)."""
    data = out["data"]
    if out.get("encoding") == "BASE64":
        data = base64.b64decode(data).decode("utf-8")
    if out.get("encoding") == "CSV" or "csv" in str(out.get("observedContentType", "")):
        rows = list(csv.DictReader(io.StringIO(data)))
        return [None if r.get("error") else [float(r[c]) for c in classes] for r in rows]
    preds = json.loads(data)["predictions"]
    return [None if "error" in p else [float(p["probabilities"][c]) for c in classes] for p in preds]


def _inputs(rec: dict, n: int) -> list[dict]:
    """The fingerprint per image: medpipe's own, else computed from a base64 input (SageMaker's records)."""
    own = (rec.get("medpipe") or {}).get("inputs")
    if isinstance(own, list):
        return own
    inp = rec["captureData"].get("endpointInput") or {}
    if inp.get("observedContentType") == FINGERPRINT_TYPE:
        return json.loads(inp["data"]).get("images", [])
    ctype = str(inp.get("observedContentType", ""))
    if inp.get("encoding") in ("BASE64", "JSON") and "json" in ctype:  # medpipe's {"images": [base64, ...]}
        raw = base64.b64decode(inp["data"]) if inp["encoding"] == "BASE64" else inp["data"]
        images = json.loads(raw).get("images") or []
        return [fingerprint("bytes", base64.b64decode(x.get("b64") if isinstance(x, dict) else x)) for x in images]
    if inp.get("encoding") == "BASE64" and n == 1 and ("image" in ctype or "dicom" in ctype):
        return [fingerprint("dicom" if "dicom" in ctype else "bytes", base64.b64decode(inp["data"]))]
    return [{} for _ in range(n)]


def _files(root: str | Path) -> list[Path] | list[str]:
    if s3.is_s3(root):
        try:
            return s3.list_files(root, {".jsonl"})
        except StorageError as exc:
            raise MedpipeError(f"--capture {exc}") from None
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise MedpipeError(f"--capture {root}: no such file or folder")
    return sorted(root.rglob("*.jsonl"))


def _open(path: str | Path):
    """A capture file (an s3:// object is read whole: capture files are rotated, so small)."""
    if s3.is_s3(path):
        try:
            return io.BytesIO(s3.read_bytes(path))
        except StorageError as exc:
            raise MedpipeError(f"--capture {exc}") from None
    return open(path, "rb")


def read_capture(root: str | Path, classes: list[str], package_sha256: str | None, log: ReadLog) -> Capture:
    """Every usable image row under ``root`` (``*.jsonl``, recursively; a folder, a file or an s3:// prefix),
    in time order."""
    ids, idx, times, probs, inputs = [], [], [], [], []
    for path in _files(root):
        with _open(path) as f:
            for no, raw in enumerate(f, 1):
                where = f"{path}:{no}"
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                    event_meta = rec["eventMetadata"]
                    event, when = str(event_meta["eventId"]), parse_time(event_meta["inferenceTime"])
                    preds = _predictions(rec["captureData"]["endpointOutput"], classes)
                except (ValueError, KeyError, TypeError, AttributeError):
                    log.add("bad_line", where)
                    continue
                if not preds:  # a record, but no prediction in medpipe's form (another kind of model's answer)
                    log.add("no_predictions", where)
                    continue
                sha = (rec.get("medpipe") or {}).get("package_sha256")
                if sha is None:
                    log.add("no_package_hash", where)
                elif package_sha256 and sha != package_sha256:
                    log.add("other_model", f"{where} (package {str(sha)[:12]})")
                    continue
                try:
                    prints = _inputs(rec, len(preds))
                except (ValueError, KeyError, TypeError):
                    log.add("bad_input_data", where)
                    prints = [{} for _ in preds]
                for i, p in enumerate(preds):
                    if p is None:
                        continue
                    ids.append(event), idx.append(i), times.append(when), probs.append(p)
                    inputs.append(prints[i] if i < len(prints) and isinstance(prints[i], dict) else {})
    order = np.argsort(np.asarray(times, float), kind="stable")
    k = len(classes)
    return Capture([ids[i] for i in order], [idx[i] for i in order], np.asarray(times, float)[order],
                   np.asarray(probs, float).reshape(-1, k)[order], [inputs[i] for i in order])


def read_ground_truth(path: str | Path, classes: list[str], log: ReadLog) -> dict[tuple[str, int], int]:
    """(eventId, image index) -> class index, from a CSV or SageMaker ``groundTruthData`` JSON Lines."""
    if s3.is_s3(path):
        try:
            text = s3.read_bytes(path).decode("utf-8", errors="replace")
        except StorageError as exc:
            raise MedpipeError(f"--ground-truth {exc}") from None
        suffix = PurePosixPath(path).suffix.lower()
    else:
        path = Path(path)
        if not path.is_file():
            raise MedpipeError(f"--ground-truth {path}: no such file")
        text, suffix = path.read_text(encoding="utf-8", errors="replace"), path.suffix.lower()
    out: dict[tuple[str, int], int] = {}
    rows: list[tuple[str, str, str, str]] = []  # where, eventId, label, index
    if suffix in (".jsonl", ".json", ".manifest"):
        for no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if isinstance(rec, dict) and "source-ref" in rec:  # a Ground Truth output manifest line
                    rows.append(_labelling_row(rec, f"{path}:{no}"))
                    continue
                gt = rec["groundTruthData"]
                data = base64.b64decode(gt["data"]).decode() if gt.get("encoding") == "BASE64" else str(gt["data"])
                rows.append((f"{path}:{no}", str(rec["eventMetadata"]["eventId"]), data.strip(), "0"))
            except (ValueError, KeyError, TypeError, AttributeError):
                log.add("bad_ground_truth_line", f"{path}:{no}")
    else:
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or not {"eventId", "label"} <= set(reader.fieldnames):
            raise MedpipeError(f"--ground-truth {path}: a CSV needs the columns eventId,label (got "
                               f"{','.join(reader.fieldnames or [])})")
        for no, r in enumerate(reader, 2):
            rows.append((f"{path}:{no}", r["eventId"] or "", (r["label"] or "").strip(), r.get("index") or "0"))
    for where, event, label, index in rows:
        cls = classes.index(label) if label in classes else (int(label) if label.isdigit() and
                                                              int(label) < len(classes) else None)
        if cls is None or not index.isdigit():
            log.add("bad_ground_truth_label", f"{where} ({label!r})")
            continue
        out[(event, int(index))] = cls
    return out


def _labelling_row(rec: dict, where: str) -> tuple[str, str, str, str]:
    """(where, eventId, label, index) of a Ground Truth output manifest line (KeyError/TypeError when it is none)."""
    names = [v.get("class-name") for k, v in rec.items() if k.endswith("-metadata") and isinstance(v, dict)]
    names = [n for n in names if isinstance(n, str)]
    if len(names) != 1:
        raise KeyError("one label attribute with a class-name")
    return where, str(rec["medpipe-event-id"]), names[0].strip(), str(rec.get("medpipe-index", 0))
