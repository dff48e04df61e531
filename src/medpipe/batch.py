"""Batch transform: predictions for a folder, a manifest or an ingested record table.

    medpipe batch --model RUN/model --input IMAGES/ --output OUT/ [--per-file] [--manifest-out OUT/gt.manifest]
    medpipe batch --url http://127.0.0.1:8080 --input IMAGES/ --output OUT/      # via a running server

Output (``OUT/``): ``predictions.jsonl`` and ``predictions.csv`` (id, path, label, class index, every
class probability; error rows carry ``error`` and ``message``), ``batch.json`` (model, input listing
hash, counts), with ``--per-file`` one ``<relative path>.out`` per input (the server's JSON, as
SageMaker batch transform writes), with ``--manifest-out`` a Ground Truth image-classification
output manifest (label = class index, ``-metadata`` with class-name and confidence).

Resumable: items are listed in a fixed order and processed in shards; each shard is written
atomically to ``OUT/shards/`` when done, and a restart with the same input skips finished shards,
so an interrupted job ends with exactly the rows of an uninterrupted one. Per-item problems
(unreadable, corrupt, not a regular file, outside the input root) become error rows; the job goes on.
With ``--url``, answers that stayed transient after the client's retries (503/429/connection errors)
are rows marked ``transient``: a rerun asks for exactly those again, and the command exits 75 while
any remain. ``--per-file`` outputs whose name (from the input path or ``id``) would land outside
``OUT/`` are refused per row and reported.

Patient metadata: a CSV manifest's or record table's age/sex/site columns (medpipe.data.metadata's names and
aliases, never ``dx_type``) go with each image to a model that takes them, locally or, with ``--url``, as
JSON beside the image; a value outside the model's vocabulary or range is an error row naming the field.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from medpipe.data import s3
from medpipe.data.metadata import canonical_columns
from medpipe.data.sources import (MAX_FILE_MB, MEDIA_TYPES, S3_MIRROR, RefusedReference, file_problem, inside,
                                  regular_file_problem, resolve_ref)
from medpipe.errors import (BatchError, MedpipeError, MetadataError, MetadataNotTakenError, PredictionError, StorageError,
                            UnreadableFileError)
from medpipe.utils import atomic_write_json, atomic_write_text, csv_text, read_csv_table, shown_name, to_json
from medpipe.data import dicom
from medpipe.data.imageio import ImageError
from medpipe.infer.client import Client, media_type

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(MEDIA_TYPES)  # every type the decoders take, DICOM included
SHARD_DIR = "shards"
STATE = "batch.json"


@dataclass
class Item:
    index: int
    id: str
    path: str            # as listed (relative to the input root where possible)
    file: Path | None    # resolved local file, None when refused at listing
    error: tuple[str, str] | None = None
    extra: dict | None = None  # Ground Truth keys passed through
    url: str | None = None     # an s3:// object (read through medpipe.data.s3) instead of a local file
    metadata: dict | None = None  # patient metadata from the manifest's age/sex/site columns (CSV, records.csv)


# -- listing -------------------------------------------------------------------------------------

def _confine(ref: str, root: Path, base: Path, s3_root: Path | None = None) -> tuple[Path | None, tuple[str, str] | None]:
    """Resolve ``ref`` against ``base``; refuse anything (``..``, absolute, symlink) that lands outside ``root``
    (``s3://`` references: outside ``s3_root``)."""

    try:
        p = resolve_ref(ref, base, s3_root)
    except ValueError as exc:
        reason = "outside_input_root" if isinstance(exc, RefusedReference) else "unsupported_reference"
        return None, (reason, str(exc))
    real = Path(os.path.realpath(p))
    if not real.is_relative_to(Path(os.path.realpath(s3_root)) if ref.startswith("s3://") else root):
        return None, ("outside_input_root", f"{ref}: resolves outside the input root; refused")
    return real, None


def _dataset_root(data_dir: Path) -> Path:
    """The folder ``medpipe ingest`` read the images of ``data_dir`` from (its report names the source)."""
    try:
        report = json.loads((data_dir / "ingest_report.json").read_text())
        source = Path(report["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return Path(os.path.realpath(data_dir))
    if report.get("format") == "dataverse":
        source = data_dir / "extracted"
    elif s3.is_s3(report["source"]):  # a manifest on S3: ingest copied its objects under the data folder
        source = data_dir / S3_MIRROR
    elif not source.is_dir():
        source = source.parent  # a manifest: its folder
    return Path(os.path.realpath(source))


def _csv_rows(table, name: str) -> list[tuple]:
    col = next((c for c in ("path", "image", "file", "source-ref", "image_path") if c in table.columns), None)
    if col is None:
        raise BatchError(f"{name}: no path column (expected one of path, image, file, source-ref)")
    idcol = next((c for c in ("id", "image_id") if c in table.columns), col)
    return [(r[idcol], r[col], None) for _, r in table.iterrows()]


def _manifest_rows(text: str, name: str) -> list[tuple]:
    rows = []
    for n, line in enumerate(text.split("\n"), 1):  # JSON lines end at LF only (not U+2028)
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            ref = obj["source-ref"]
            if not isinstance(ref, str):
                raise TypeError("source-ref is not a string")
        except (ValueError, KeyError, TypeError):
            rows.append((f"line{n}", f"{name}:{n}", {"_error": ("bad_manifest_line",
                         f"{name} line {n}: not JSON with a source-ref")}))
            continue
        rows.append((Path(ref).name, ref, obj))
    return rows


def _s3_items(url: str) -> list[Item]:
    """The items of an ``s3://`` input: the images under a prefix (ids and paths relative to it, as for a folder),
    or the rows of a manifest object (Ground Truth or CSV; a relative reference is a key beside the manifest)."""
    given = None
    if PurePosixPath(url).suffix.lower() in (".manifest", ".jsonl", ".csv"):
        text = s3.read_bytes(url, MAX_FILE_MB << 20).decode("utf-8", errors="replace")
        if url.lower().endswith(".csv"):
            table = read_csv_table(io.StringIO(text))
            rows, given = _csv_rows(table, url), manifest_metadata(table)
        else:
            rows = _manifest_rows(text, url)
        base = url.rsplit("/", 1)[0]
    else:
        base = url.rstrip("/")
        found = s3.list_files(url, IMAGE_EXTENSIONS)
        if found == [base]:  # one object
            base = base.rsplit("/", 1)[0]
        rows = [(u[len(base) + 1:], u[len(base) + 1:], None) for u in found]
    items = []
    for i, (iid, ref, extra) in enumerate(rows):
        err, ref = (extra.get("_error") if extra else None), str(ref)
        rel = PurePosixPath(ref)
        if err is None and not s3.is_s3(ref) and ("://" in ref or rel.is_absolute() or ".." in rel.parts):
            err = ("unsupported_reference", f"{ref}: a manifest on S3 names s3:// objects or keys relative to it")
        target = None if err else ref if s3.is_s3(ref) else s3.join(base, ref)
        items.append(Item(i, str(iid), ref, None, err, None if err else extra, url=target,
                          metadata=given[i] if given and not err else None))
    return items


def list_items(input_path: str | os.PathLike, s3_root: str | os.PathLike | None = None) -> tuple[list[Item], Path]:
    """Items in a stable order, and the input root paths are confined to (``s3://bucket/key`` references of a
    Ground Truth manifest map to ``s3_root/bucket/key`` and are confined to ``s3_root``; without ``s3_root``
    they are read from S3). An ``s3://`` input (a prefix or a manifest object) has no local root (None)."""
    if s3.is_s3(input_path):
        return _s3_items(input_path), None
    src = Path(input_path)
    if not src.exists():
        raise BatchError(f"{src}: no such file or folder")
    if src.is_dir() and (src / "records.csv").is_file():
        table = read_csv_table(src / "records.csv")
        rows = [(r["image_id"], r["path"], None) for _, r in table.iterrows()]
        given = manifest_metadata(table)
        # An ingested table lists absolute paths under the dataset root ingest read: confine to that root
        # (never to the rows' common path, which one row pointing at /etc would widen to /).
        root = base = _dataset_root(src)
    elif src.is_dir():
        root = Path(os.path.realpath(src))
        rows, given = [], None
        for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames):
                if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                    rel = (Path(dirpath) / name).relative_to(src).as_posix()
                    shown = shown_name(rel)
                    rows.append((rel, rel, None) if shown == rel else (shown, shown, {"_error": (
                        "bad_file_name", f"{shown}: the file name is not valid UTF-8 (rename it)")}))
        base = src
    elif src.suffix.lower() == ".csv":
        root = Path(os.path.realpath(src.parent))
        table = read_csv_table(src)
        rows, given = _csv_rows(table, str(src)), manifest_metadata(table)
        base = src.parent
    else:  # Ground Truth manifest: JSON lines with source-ref
        root = Path(os.path.realpath(src.parent))
        rows, given = _manifest_rows(src.read_text(), src.name), None
        base = src.parent
    items = []
    for i, (iid, ref, extra) in enumerate(rows):
        if extra and "_error" in extra:
            items.append(Item(i, iid, ref, None, extra["_error"]))
            continue
        if s3.is_s3(ref) and not s3_root:  # read from S3 itself (--s3-root maps buckets onto a local copy)
            items.append(Item(i, str(iid), ref, None, None, extra, url=ref, metadata=given[i] if given else None))
            continue
        f, err = _confine(ref, root, base, Path(s3_root) if s3_root else None)
        items.append(Item(i, str(iid), ref, f, err, extra, metadata=given[i] if given else None))
    return items, root


def manifest_metadata(table) -> list[dict] | None:
    """Each row's age/sex/site (medpipe.data.metadata's column names and aliases), or None when the table
    has none of them. Only those columns are read: a ``dx_type`` column is never an input."""
    found = [canonical_columns(r) for r in table.to_dict("records")]
    if not any(v for f in found for v in f.values()):
        return None
    return [{k: v for k, v in f.items() if v != ""} for f in found]


def listing_hash(items: list[Item]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.id}\t{it.path}\n".encode())
    return h.hexdigest()


# -- predicting ----------------------------------------------------------------------------------

class LocalEngine:
    """Decode in parallel threads, forward in batches; halve the batch on out-of-memory."""

    def __init__(self, model: str, backend: str, device: str, batch_size: int, workers: int,
                 decision_rule: str | None = None, tta: bool = False):
        from medpipe.infer.predictor import Predictor  # deferred: torch (the Ray engine's decoding tasks import this module)

        self.predictor = Predictor(model, device=device, backend=backend, max_batch=max(1, batch_size),
                                   decision_rule=decision_rule, tta=tta)
        self.batch_size = max(1, batch_size)
        self.pool = concurrent.futures.ThreadPoolExecutor(max(1, workers), thread_name_prefix="medpipe-decode")
        self.meta = {"model": self.predictor.name, "version": self.predictor.version,
                     "classes": self.predictor.classes, "backend": self.predictor.backend, "tta": self.predictor.tta}

    def _decode(self, it: Item):
        return decode_item(self.predictor, it)

    def submit(self, items: list[Item]):
        return [self.pool.submit(self._decode, it) if it.error is None else None for it in items]

    def with_metadata(self, it: Item, decoded):
        """Decoded pixels -> (pixels, metadata vector) for a model that takes metadata; the item's MetadataError
        (naming the field) when a value is outside the model's vocabulary or range. An image-only model reads
        no manifest columns (a record table carries age/sex/site for every model)."""
        if isinstance(decoded, (ImageError, StorageError)) or self.predictor.metadata_spec is None:
            return decoded
        try:
            vec = self.predictor.encode_metadata([it.metadata] if it.metadata else None, 1, [it.id])
        except MetadataError as exc:
            return exc
        return decoded if vec is None else (decoded, vec[0].numpy())

    def forward(self, pixels: list, metadata=None):
        import numpy as np
        import torch

        out, i = [], 0
        while i < len(pixels):
            chunk = pixels[i:i + self.batch_size]
            try:
                given = {} if metadata is None else {"metadata": metadata[i:i + len(chunk)]}
                out.append(self.predictor.probabilities(chunk, **given))
                i += len(chunk)
            except (torch.OutOfMemoryError, MemoryError) as exc:
                if self.batch_size == 1:
                    raise BatchError(f"out of memory at batch size 1 ({exc.__class__.__name__})") from None
                self.batch_size = max(1, self.batch_size // 2)
                log.warning("out of memory on a batch of %d; retrying with batch size %d", len(chunk), self.batch_size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        return np.concatenate(out) if out else np.zeros((0, len(self.predictor.classes)), np.float32)

    def run(self, items: list[Item], futures) -> list[dict]:
        return self.rows(items, [self.with_metadata(it, f.result()) if f is not None else None
                                 for it, f in zip(items, futures)])

    def rows(self, items: list[Item], decoded: list) -> list[dict]:
        """The rows of ``items`` from their decoded pixels (None: refused at listing; an ImageError,
        StorageError or MetadataError: why not; a (pixels, metadata vector) pair for a metadata model)."""
        import numpy as np

        good = [d for d in decoded if d is not None and not isinstance(d, (ImageError, StorageError, MetadataError))]
        vectors = None
        if good and isinstance(good[0], tuple):
            vectors, good = np.stack([v for _, v in good]), [p for p, _ in good]
        try:
            probs = self.forward(good, vectors)
        except PredictionError as exc:
            return [_row(it, error=("prediction_failed", str(exc))) for it in items]
        rows, k = [], 0
        preds = self.predictor.to_predictions(probs)  # labels by the package's decision rule
        for it, d in zip(items, decoded):
            if it.error:
                rows.append(_row(it, error=it.error))
            elif isinstance(d, ImageError):
                rows.append(_row(it, error=(d.code, d.reason)))
            elif isinstance(d, MetadataError):
                rows.append(_row(it, error=(d.code, str(d))))
            elif isinstance(d, StorageError):
                rows.append(_row(it, error=(d.code, str(d)), transient=True))
            else:
                rows.append(_row(it, pred=preds[k].as_dict()))
                k += 1
        return rows


def decode_item(decoder, it: Item):
    """``it``'s pixels (resized RGB uint8), or the error saying why not (an ImageError, or a transient StorageError).
    ``decoder``: the Predictor, or anything with its ``decode``, ``prepare_array`` and ``max_pixels`` (the Ray
    engine's spec-only decoder)."""
    if it.url:
        try:
            data = s3.read_bytes(it.url, MAX_FILE_MB << 20)
        except StorageError as exc:  # transient (endpoint unreachable): a row a rerun asks for again
            return exc if exc.transient else UnreadableFileError(str(exc))
    else:
        problem = regular_file_problem(it.file)
        if problem is not None:
            return UnreadableFileError(problem)
        try:
            data = it.file.read_bytes()
        except OSError as exc:
            return UnreadableFileError(f"cannot read file ({exc.strerror})")
    try:
        if Path(it.url or it.file).suffix.lower() == ".dcm":
            return decoder.prepare_array(dicom.decode_dicom(data, decoder.max_pixels))
        return decoder.decode(data)
    except ImageError as exc:
        return exc


class RemoteEngine:
    """Send each file to a server's /invocations, as SageMaker batch transform does (SplitType None),
    through the one HTTP client (medpipe.infer.client: retries transient answers with backoff).

    An item with patient metadata (the manifest's age/sex/site columns) goes as JSON, ``{"images": [base64],
    "metadata": [values]}``, as ``medpipe predict --url`` sends it. A server whose model takes the image only
    refuses that (``metadata_not_taken``): the item is sent again as the image alone, and so is every later
    one, as the local engine reads no manifest columns for such a model."""

    def __init__(self, url: str, concurrency: int | None, retries: int = 6):
        params = {}
        probe = Client(url, retries=1)
        self.url = probe.url
        try:
            params = probe.get_json("/execution-parameters")
        except MedpipeError:
            log.info("%s has no /execution-parameters; using defaults", self.url)
        finally:
            probe.close()
        self.concurrency = concurrency or int(params.get("MaxConcurrentTransforms", 4))
        self.max_payload = int(float(params.get("MaxPayloadInMB", 6)) * 1024 * 1024)
        self.client = Client(url, connections=self.concurrency, retries=retries)
        self.pool = concurrent.futures.ThreadPoolExecutor(self.concurrency, thread_name_prefix="medpipe-client")
        self.meta = {"url": self.url, "concurrency": self.concurrency}
        self.image_only = False  # learnt from the server's first metadata_not_taken answer

    def _post(self, it: Item) -> dict:
        if it.url:
            try:
                data = s3.read_bytes(it.url, self.max_payload)
            except StorageError as exc:
                code = "payload_too_large" if exc.kind == "too_large" else "unreadable_file"
                return _row(it, error=(code, str(exc)), transient=exc.transient)
        else:
            problem = file_problem(it.file, self.max_payload)
            if problem is not None:
                code = "payload_too_large" if problem.code == "file_too_large" else "unreadable_file"
                return _row(it, error=(code, problem.reason))
            try:
                data = it.file.read_bytes()
            except OSError as exc:  # as the local engine: a row, not the end of the job
                return _row(it, error=("unreadable_file", f"cannot read file ({exc.strerror})"))
        answer = self._invoke(it, data)
        if "prediction" in answer:
            self.meta.setdefault("classes", list(answer["prediction"]["probabilities"]))
            return _row(it, pred=answer["prediction"])
        return _row(it, error=(answer["error"], answer["message"]), transient=answer["transient"])

    def _invoke(self, it: Item, data: bytes) -> dict:
        """The server's answer for one item: the image bytes as they are, or JSON with the item's metadata."""
        if it.metadata and not self.image_only:
            body = json.dumps({"images": [base64.b64encode(data).decode()], "metadata": [it.metadata]}).encode()
            if len(body) > self.max_payload:
                return {"error": "payload_too_large", "transient": False,
                        "message": f"{len(body)} bytes as JSON with its metadata, over the server's "
                                   f"{self.max_payload}-byte limit"}
            answer = self.client.invoke(body, "application/json")
            if answer.get("error") != MetadataNotTakenError.code:
                return answer
            self.image_only = True
        return self.client.invoke(data, media_type(it.url or it.file))

    def submit(self, items: list[Item]):
        return [self.pool.submit(self._post, it) if it.error is None else None for it in items]

    def run(self, items: list[Item], futures) -> list[dict]:
        return [_row(it, error=it.error) if f is None else f.result() for it, f in zip(items, futures)]


def _row(it: Item, pred: dict | None = None, error: tuple[str, str] | None = None, transient: bool = False) -> dict:
    """``pred``: one prediction as the Predictor or a server gives it (label chosen by its decision rule).
    ``transient``: the server never answered (busy or unreachable after retries); a rerun asks again."""
    row = {"index": it.index, "id": it.id, "path": it.path}
    if error:
        row.update(error=error[0], message=error[1])
        if transient:
            row["transient"] = True
    else:
        probs = pred["probabilities"]
        label = pred.get("label") or max(probs, key=probs.get)
        row.update(label=label, class_index=list(probs).index(label), probabilities=probs,
                   decision_rule=pred.get("decision_rule", "argmax"), tta=bool(pred.get("tta", False)),
                   most_likely=max(probs, key=probs.get))
    return row


# -- the job -------------------------------------------------------------------------------------

def run_batch(model: str | None, input_path: str, output: str, *, url: str | None = None, per_file: bool = False,
              manifest_out: str | None = None, label_attribute: str = "medpipe-label", batch_size: int = 32,
              shard_size: int = 256, workers: int | None = None, backend: str = "auto", device: str = "auto",
              concurrency: int | None = None, max_error_rate: float | None = None, retries: int = 6,
              progress: bool = False, s3_root: str | None = None, decision_rule: str | None = None,
              tta: bool = False, engine_factory=None) -> dict:
    """``engine_factory``: builds the engine that answers the shards (medpipe.batch_ray's Ray Data engine);
    None: the local engine, or the remote one with ``url``."""
    if url and tta:
        raise BatchError("--tta applies to a local --model; a server averages flips when started with --tta")
    stage = _Output(output)
    out = stage.local
    items, root = list_items(input_path, s3_root)
    if not items:
        raise BatchError(f"{input_path}: no images found")
    digest = listing_hash(items)
    shards = out / SHARD_DIR
    shards.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        if state.get("listing_sha256") != digest or state.get("shard_size") != shard_size:
            raise BatchError(f"{out} holds a batch job over a different input listing or shard size; "
                             "use a new --output folder")
    engine = engine_factory() if engine_factory else RemoteEngine(url, concurrency, retries) if url else \
        LocalEngine(model, backend, device, batch_size, workers or (os.cpu_count() or 1), decision_rule, tta)
    if state_path.is_file():  # finished shards must not be mixed with answers of another model or TTA setting
        old = json.loads(state_path.read_text())
        changed = [f"{k}: {old.get(k)!r} before, {engine.meta.get(k)!r} now" for k in ("model", "version", "tta")
                   if k in old and k in engine.meta and old[k] != engine.meta[k]]
        if changed:
            raise BatchError(f"{out} holds a batch job answered differently ({'; '.join(changed)}); "
                             "resume with the same options or use a new --output folder")
    state = {"input": str(input_path), "listing_sha256": digest, "items": len(items), "shard_size": shard_size,
             **{k: v for k, v in engine.meta.items() if k != "classes"}}
    atomic_write_json(state_path, state)
    stage.put(state_path)

    groups = [items[i:i + shard_size] for i in range(0, len(items), shard_size)]
    todo, kept = _todo(groups, shards)
    done_items = len(items) - sum(len(g) for _, g in todo)
    if done_items:
        log.info("resuming: %d of %d items already done", done_items, len(items))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), initial=done_items, unit="img", desc="batch", dynamic_ncols=True)
    results = engine.results(todo) if hasattr(engine, "results") else _in_order(engine, todo)
    for k, answered in results:  # (shard number, its fresh rows), in any order
        fresh = {r["index"]: r for r in answered}
        rows = [fresh.get(it.index) or kept[it.index] for it in groups[k]]
        atomic_write_text(shards / f"part-{k:05d}.jsonl", "".join(to_json(r) + "\n" for r in rows))
        stage.put(shards / f"part-{k:05d}.jsonl")
        if bar:
            bar.update(len(answered))
    state.update((k, v) for k, v in engine.meta.items() if k != "classes")  # what the engine learnt while running
    if bar:
        bar.close()

    rows = [json.loads(line) for k in range(len(groups))
            for line in (shards / f"part-{k:05d}.jsonl").read_text().splitlines()]
    classes = engine.meta.get("classes") or next((list(r["probabilities"]) for r in rows if "probabilities" in r), [])
    _write_outputs(out, rows, classes)
    refused = _write_per_file(out, rows, engine.meta) if per_file else []
    if manifest_out:
        _write_manifest(manifest_out, rows, items, label_attribute)
    errors = sum("error" in r for r in rows)
    summary = {**state, "predicted": len(rows) - errors, "errors": errors, "error_rate": errors / len(rows),
               "missing": sum(bool(r.get("transient")) for r in rows), "per_file_refused": refused,
               "outputs": {k: stage.where(out / f"predictions.{k}") for k in ("jsonl", "csv")}}
    atomic_write_json(state_path, summary)
    stage.finish()
    summary["threshold_exceeded"] = max_error_rate is not None and summary["error_rate"] > max_error_rate
    return summary


def _in_order(engine, todo: list[tuple[int, list[Item]]]):
    """(shard number, rows) for each shard to do, decoding one shard ahead of the forward pass."""
    pending = engine.submit(todo[0][1]) if todo else None
    for n, (k, group) in enumerate(todo):
        futures = pending
        pending = engine.submit(todo[n + 1][1]) if n + 1 < len(todo) else None  # decode ahead
        yield k, engine.run(group, futures)


def _todo(groups: list[list[Item]], shards: Path) -> tuple[list[tuple[int, list[Item]]], dict[int, dict]]:
    """(shard number, items still to answer) for every unfinished shard, and the finished rows of shards that
    still hold transient rows (those rows are asked again)."""
    kept: dict[int, dict] = {}
    todo = []
    for k, g in enumerate(groups):
        done = _shard_rows(shards / f"part-{k:05d}.jsonl", len(g))
        if done is None:
            todo.append((k, g))
        elif any(r.get("transient") for r in done):
            kept.update({r["index"]: r for r in done if not r.get("transient")})
            todo.append((k, [it for it, r in zip(g, done) if r.get("transient")]))
    return todo, kept


class _Output:
    """Where a job writes: a local folder, or an ``s3://`` prefix staged in a local folder
    (:class:`medpipe.data.s3.Staged`). For S3, what an earlier run put there (the state file and finished parts)
    is pulled back first, to resume; each part and the state are put as soon as they are written, the outputs
    when the job ends. What was put stays in S3 if the job then fails."""

    def __init__(self, output: str):
        self.staged = s3.Staged(output) if s3.is_s3(output) else None
        self.local = self.staged.local if self.staged else Path(output)
        if self.staged:
            self.staged.pull(STATE, SHARD_DIR)

    def where(self, path: Path) -> str:
        return self.staged.url_of(path) if self.staged else str(path)

    def put(self, path: Path) -> None:
        if self.staged:
            try:
                self.staged.put(path)
            except StorageError as exc:
                raise StorageError(f"{exc}; the parts finished before stay under {self.staged.url}/{SHARD_DIR}: "
                                   "run the same command again to resume", transient=exc.transient) from None

    def finish(self) -> None:
        """Put every output (the state file last: a finished job's summary), then drop the local copy."""
        if self.staged:
            rel = {p: p.relative_to(self.local) for p in sorted(self.local.rglob("*")) if p.is_file()}
            files = [p for p, r in rel.items() if r.parts[0] != SHARD_DIR and r.as_posix() != STATE]
            try:
                self.staged.put_many(files)
            except StorageError as exc:
                raise StorageError(f"{exc}; every part is in {self.staged.url}/{SHARD_DIR}: run the same command "
                                   "again to write the outputs", transient=exc.transient) from None
            self.put(self.local / STATE)
            self.staged.close()


def _shard_rows(path: Path, n: int) -> list[dict] | None:
    """A finished shard's rows, or None when it is missing or not whole."""
    if not path.is_file():
        return None
    try:
        rows = [json.loads(x) for x in path.read_text().splitlines()]
    except ValueError:
        return None
    return rows if len(rows) == n else None


def _write_outputs(out: Path, rows: list[dict], classes: list[str]) -> None:
    atomic_write_text(out / "predictions.jsonl", "".join(to_json({k: v for k, v in r.items() if k != "index"}) + "\n"
                                                         for r in rows))
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["id"], r["path"], "", "", *([""] * len(classes)), r["error"], r["message"]])
        else:
            table.append([r["id"], r["path"], r["label"], r["class_index"],
                          *(f"{r['probabilities'][c]:.6f}" for c in classes), "", ""])
    atomic_write_text(out / "predictions.csv", csv_text(["id", "path", "label", "class_index", *classes, "error",
                                                         "message"], table))


def _per_file_name(out: Path, r: dict) -> Path | None:
    """``OUT/<relative input path>.out`` (or ``<id>.out``), only when it stays inside ``OUT``."""
    for name in (r["path"], r["id"]):
        rel = Path(str(name))
        if name and "://" not in str(name) and not rel.is_absolute() and ".." not in rel.parts:
            dest = out / (rel.as_posix() + ".out")
            if inside(dest.parent, out) if dest.parent.exists() else dest.resolve().is_relative_to(out.resolve()):
                return dest
    return None


def _write_per_file(out: Path, rows: list[dict], meta: dict) -> list[dict]:
    """Write the per-file outputs; returns the rows refused (their names would leave ``out``)."""
    refused = []
    for r in rows:
        if "error" in r:
            continue
        dest = _per_file_name(out, r)
        if dest is None:
            refused.append({"id": r["id"], "path": r["path"], "reason": "output name leaves the output folder"})
            log.warning("per-file output for id %r refused: its name would leave %s", r["id"], out)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        pred = {"label": r["label"], "class_index": r["class_index"], "probabilities": r["probabilities"],
                "decision_rule": r.get("decision_rule", "argmax"), "tta": r.get("tta", False),
                "most_likely": r["most_likely"]}
        atomic_write_text(dest, to_json({"model": meta.get("model"), "version": meta.get("version"),
                                          "predictions": [pred]}))
    return refused


def _write_manifest(dest: str, rows: list[dict], items: list[Item], attr: str) -> None:
    from datetime import datetime, timezone

    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")
    lines = []
    for r, it in zip(rows, items):
        if "error" in r:
            continue
        obj = dict(it.extra) if it.extra else {"source-ref": it.url or str(it.file)}
        obj[attr] = r["class_index"]
        obj[f"{attr}-metadata"] = {"class-name": r["label"], "confidence": round(r["probabilities"][r["label"]], 6),
                                   "type": "groundtruth/image-classification", "job-name": f"medpipe-batch/{attr}",
                                   "human-annotated": "no", "creation-date": now}
        lines.append(to_json(obj))
    text = "\n".join(lines) + ("\n" if lines else "")
    if s3.is_s3(dest):
        s3.write_bytes(dest, text.encode("utf-8"))
        return
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(dest), text)
