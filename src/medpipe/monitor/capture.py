"""Data capture: one JSON Lines record per answered request, in the format SageMaker endpoints write.

The record is the one SageMaker Model Monitor documents for endpoints deployed with a
``DataCaptureConfig`` ("Capture data from real-time endpoint" and "Data capture" pages of the
SageMaker developer guide, https://docs.aws.amazon.com/sagemaker/latest/dg/model-monitor-data-capture-endpoint.html):

    {"captureData": {"endpointInput":  {"observedContentType": ..., "mode": "INPUT",  "data": ..., "encoding": "BASE64"|"JSON"|"CSV"},
                     "endpointOutput": {"observedContentType": ..., "mode": "OUTPUT", "data": ..., "encoding": ...}},
     "eventMetadata": {"eventId": ..., "inferenceTime": "2026-12-06T14:00:00Z"},
     "eventVersion": "0"}

in files ``DIR/yyyy/mm/dd/hh/*.jsonl`` (SageMaker puts them under ``DESTINATION/ENDPOINT/VARIANT/``).
medpipe adds one top-level key SageMaker's own readers ignore: ``"medpipe": {"package_sha256",
"model", "version", "inputs": [fingerprint per image]}``. The package hash (the weights' sha256)
keeps records of another model out of a check.

Medical images are personal data: by default the input is captured as a **fingerprint** per image
(``observedContentType`` :data:`FINGERPRINT_TYPE`, encoding JSON): sha256 and byte size of the
bytes, format, width x height, and pixel statistics of the image resized to :data:`STATS_SIZE`
(per-channel mean/std, luminance, blur as the variance of the Laplacian, the under/over-exposed
pixel shares) and, where the backend gives one, the model's penultimate-layer embedding compressed to 32
float16 values (:mod:`medpipe.monitor.embedding`: ``embedding``, ``embedding_projection``); never
pixels. ``inputs=True`` captures the request body itself, base64, as SageMaker does.

A JPEG's fingerprint also carries ``jpeg_quality``, the IJG quality factor estimated from its
quantization tables (:func:`jpeg_quality`; header only), so a drop of the encoder's quality (another
camera, a re-encoding gateway) is an input statistic like the others.

Capture is off the request path: :meth:`CaptureWriter.attach` (the service's one hook) samples the
finished request, reads a spooled body only when sampled, and :meth:`CaptureWriter.submit` puts it on a
bounded queue and returns (over the queue's count or byte cap the record is dropped and counted; it
never waits). One background thread takes what is queued, computes the fingerprints (decoding again
through :mod:`medpipe.data.imageio` at 64 x 64, under the same pixel limit: the statistics do not
depend on the model, so a SageMaker record's bytes give the same values) and appends the batch with one
write per file. Files rotate every hour and at ``max_file_mb``; past ``max_total_mb`` the oldest
files are removed, each with a log line. A write error is counted per lost record and logged once;
the answer has already gone out.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import queue
import random
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from medpipe.data import imageio
from medpipe.errors import ConfigError, ImageError
from medpipe.monitor.embedding import Embedder

log = logging.getLogger("medpipe.monitor")

FINGERPRINT_TYPE = "application/vnd.medpipe.fingerprint+json"
STATS_SIZE = (64, 64)
STAT_NAMES = ("mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b", "luminance", "blur", "dark_share",
              "bright_share", "jpeg_quality")
EVENT_HEADER = "X-Medpipe-Event-Id"
WRITE_BATCH = 64  # records the writer thread appends with one write


def pixel_stats(rgb: np.ndarray) -> dict:
    """Statistics of an RGB uint8 image resized to :data:`STATS_SIZE` (each a float, names in :data:`STAT_NAMES`)."""
    from scipy import ndimage

    if rgb.shape[:2] != STATS_SIZE:
        rgb = imageio.resize_rgb(rgb, STATS_SIZE, "bilinear")
    x = rgb.astype(np.float32) / 255.0
    lum = x @ np.array([0.299, 0.587, 0.114], np.float32)
    planes = np.ascontiguousarray(x.reshape(-1, 3).T)  # per-channel rows: 5x faster than reducing along axis 0
    mean, std = planes.mean(1), planes.std(1)
    return {"mean_r": float(mean[0]), "mean_g": float(mean[1]), "mean_b": float(mean[2]),
            "std_r": float(std[0]), "std_g": float(std[1]), "std_b": float(std[2]),
            "luminance": float(lum.mean()), "blur": float(ndimage.laplace(lum).var()),
            "dark_share": float((lum < 16 / 255).mean()), "bright_share": float((lum > 239 / 255).mean())}


# The example quantization tables of the JPEG standard (ITU-T T.81 Annex K, tables K.1 and K.2), in natural
# (row-major) order, as Pillow's ``Image.quantization`` gives a file's tables; libjpeg's quality q scales them.
STD_LUMINANCE = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], np.float64)
STD_CHROMINANCE = np.array([
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99] + [99] * 32, np.float64)


def _ijg_tables() -> np.ndarray:
    """(100, 2, 64): the luminance and chrominance tables libjpeg writes at quality 1..100
    (``jpeg_quality_scaling``: percent 5000/q, integer, below 50, 200 - 2q above; entries clamped to 1..255)."""
    q = np.arange(1, 101, dtype=np.float64)
    scale = np.where(q < 50, np.floor(5000.0 / q), 200.0 - 2.0 * q)[:, None, None]
    std = np.stack([STD_LUMINANCE, STD_CHROMINANCE])[None]
    return np.clip(np.floor((std * scale + 50.0) / 100.0), 1, 255)


_IJG = _ijg_tables()


def jpeg_quality(tables: dict) -> float | None:
    """The IJG quality factor (1..100) whose scaled standard tables are nearest (mean absolute difference) to a
    JPEG's quantization ``tables`` (Pillow's ``Image.quantization``: table id -> 64 values), as ImageMagick's
    ``identify -format %Q`` estimates it; the mean of the tied qualities (tables of q 98..100 are nearly all 1).
    Tables of another encoder (a camera's own) get the IJG quality of the same coarseness. None without a
    64-entry luminance table."""
    lum = np.asarray(tables.get(0, ()), np.float64)
    if lum.shape != (64,):
        return None
    chroma = np.asarray(tables.get(1, ()), np.float64)
    err = np.abs(_IJG[:, 0] - lum).mean(1)
    if chroma.shape == (64,):
        err = err + np.abs(_IJG[:, 1] - chroma).mean(1)
    best = np.flatnonzero(err <= err.min() + 1e-9) + 1
    return float(best.mean())


def fingerprint(kind: str, payload, max_pixels: int = imageio.DEFAULT_MAX_PIXELS) -> dict:
    """The fingerprint of one parsed request item (``kind`` bytes | array | dicom, as
    :func:`medpipe.infer.protocol.parse_body` returns); an undecodable item gets its ``error``."""
    if kind == "array":
        arr = np.ascontiguousarray(payload)
        out = {"sha256": hashlib.sha256(arr.tobytes()).hexdigest(), "bytes": int(arr.nbytes), "format": "npy",
               "shape": list(arr.shape)}
        try:
            out.update(pixel_stats(imageio.prepare_array(arr, STATS_SIZE, "bilinear", max_pixels=max_pixels)))
        except (ImageError, ValueError) as exc:
            out["error"] = str(exc)[:200]
        return out
    data = bytes(payload)
    out = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    if kind == "dicom":
        out["format"] = "DICOM"
        return out
    try:
        info = imageio.probe(data, max_pixels=max_pixels)
        out.update(format=info.format, width=info.width, height=info.height)
        if info.format == "JPEG":
            out["jpeg_quality"] = _quality_of(data)
        out.update(pixel_stats(imageio.decode_image(data, max_pixels=max_pixels, size=STATS_SIZE,
                                                    interpolation="bilinear")))
    except ImageError as exc:
        out["error"] = exc.reason[:200]
    return out


def _quality_of(data: bytes) -> float | None:
    """:func:`jpeg_quality` of JPEG bytes :func:`medpipe.data.imageio.probe` accepted (reads the header only)."""
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as img:
            return jpeg_quality(getattr(img, "quantization", None) or {})
    except (OSError, ValueError, SyntaxError):
        return None


def build_record(event_id: str, when: float, ctype: str, body: bytes, items: list, answer: bytes, answer_type: str,
                 meta: dict, inputs: bool, max_pixels: int, embeddings: list | None = None,
                 projection: str | None = None) -> dict:
    """One capture record (see the module docstring); ``items``: the parsed request, ``answer``: the response body,
    ``embeddings``: per item its encoded embedding or None (:mod:`medpipe.monitor.embedding`, ``projection``)."""
    prints = [fingerprint(k, p, max_pixels) for k, p in items]
    for fp, emb in zip(prints, embeddings or []):
        if emb is not None:
            fp.update(embedding=emb, embedding_projection=projection)
    if inputs:
        endpoint_input = {"observedContentType": ctype, "mode": "INPUT",
                          "data": base64.b64encode(body).decode("ascii"), "encoding": "BASE64"}
    else:
        endpoint_input = {"observedContentType": FINGERPRINT_TYPE, "mode": "INPUT",
                          "data": json.dumps({"images": prints}, separators=(",", ":")), "encoding": "JSON"}
    encoding = "CSV" if answer_type == "text/csv" else "JSON"
    return {"captureData": {"endpointInput": endpoint_input,
                            "endpointOutput": {"observedContentType": answer_type, "mode": "OUTPUT",
                                               "data": answer.decode("utf-8"), "encoding": encoding}},
            "eventMetadata": {"eventId": event_id, "inferenceTime": iso_time(when)},
            "eventVersion": "0",
            "medpipe": {**meta, "inputs": prints}}


def iso_time(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class CaptureWriter:
    """Sampled, bounded, off-the-request-path writer of capture records (see the module docstring).

    ``meta``: the model's identity for every record (``package_sha256``, ``model``, ``version``).
    Counters (plain ints, and Prometheus counters once :meth:`register` is called): ``captured``,
    ``dropped`` (queue full), ``write_errors``, ``files_removed``.
    """

    def __init__(self, root: str | Path, meta: dict, *, sample: float = 1.0, inputs: bool = False,
                 max_file_mb: float = 16.0, max_total_mb: float = 1024.0, max_queue: int = 256,
                 max_queue_mb: float = 64.0, max_pixels: int = imageio.DEFAULT_MAX_PIXELS):
        if not 0.0 < sample <= 1.0:
            raise ConfigError(f"--capture-sample must be in (0, 1], got {sample}")
        if max_total_mb < max_file_mb:
            raise ConfigError(f"--capture-max-mb ({max_total_mb:g}) must hold at least one file ({max_file_mb:g} MB)")
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--capture {root}: cannot create the folder ({exc.strerror})") from None
        self.meta, self.sample, self.inputs, self.max_pixels = dict(meta), float(sample), bool(inputs), max_pixels
        self.max_file, self.max_total = int(max_file_mb * 2**20), int(max_total_mb * 2**20)
        self.max_queue_bytes = int(max_queue_mb * 2**20)
        self.counts = {"captured": 0, "dropped": 0, "write_errors": 0, "files_removed": 0}
        self._prom: dict = {}
        self.projection: str | None = None  # the embedding projection's name (set by open_capture)
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._queued_bytes = 0
        self._lock = threading.Lock()
        self._file: Path | None = None
        self._files = sorted(([p, p.stat().st_size] for p in self.root.rglob("*.jsonl")), key=lambda f: str(f[0]))
        self._total = sum(size for _, size in self._files)
        self._error_logged = False
        self._thread = threading.Thread(target=self._run, name="medpipe-capture", daemon=True)
        self._thread.start()

    def register(self, registry) -> None:
        """Prometheus counters of this writer in ``registry`` (``medpipe_capture_*_total``)."""
        from prometheus_client import Counter  # deferred: the serve extra

        helps = {"captured": "Requests written to the data capture", "dropped": "Capture records dropped because "
                 "the capture queue was full (the answers went out)", "write_errors": "Capture records lost to a "
                 "write error (the answers went out)", "files_removed": "Capture files removed to stay under the "
                 "capture size cap"}
        for name, text in helps.items():
            self._prom[name] = Counter(f"medpipe_capture_{name}_total", text, registry=registry)

    def _count(self, name: str, n: int = 1) -> None:
        self.counts[name] += n
        if name in self._prom:
            self._prom[name].inc(n)

    def attach(self, response, ctype: str, body, items: list, answer_type: str,
               embeddings: list | None = None) -> str | None:
        """The service's hook for a finished /invocations answer: sample it, hand it to the writer and put its
        eventId in the response's :data:`EVENT_HEADER`. ``body``: the request's spooled body (``size``,
        ``read()``), read only for a sampled request that fits the queue; a spooled image item
        (``("file", path)``) is captured from those bytes. ``embeddings``: per item, its encoded embedding."""
        if self.sample < 1.0 and random.random() >= self.sample:
            return None
        if body.size + len(response.body) > self.max_queue_bytes - self._queued_bytes:
            with self._lock:
                self._count("dropped")
            return None
        raw = body.read()
        items = [("bytes", raw) if kind == "file" else (kind, p) for kind, p in items]
        event_id = self.submit(ctype, raw, items, response.body, answer_type, sampled=True, embeddings=embeddings)
        if event_id:
            response.headers[EVENT_HEADER] = event_id
        return event_id

    def submit(self, ctype: str, body: bytes, items: list, answer: bytes, answer_type: str,
               sampled: bool = False, embeddings: list | None = None) -> str | None:
        """Hand a finished request to the writer; returns its eventId, or None when not sampled or dropped.
        Never raises and never blocks."""
        if not sampled and self.sample < 1.0 and random.random() >= self.sample:
            return None
        size = len(body) + len(answer)
        with self._lock:
            if self._queued_bytes + size > self.max_queue_bytes:
                self._count("dropped")
                return None
            self._queued_bytes += size
        event_id = str(uuid.uuid4())
        try:
            self._queue.put_nowait((event_id, time.time(), ctype, body, items, answer, answer_type, embeddings))
        except queue.Full:
            with self._lock:
                self._queued_bytes -= size
                self._count("dropped")
            return None
        return event_id

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (for at most ``timeout`` seconds) and stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        """The writer thread: take what is queued (up to :data:`WRITE_BATCH` records), fingerprint and encode
        each, append them in one write per file; until :meth:`close` queues its None."""
        stop = False
        while not stop:
            jobs = [self._queue.get()]
            while len(jobs) < WRITE_BATCH:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if None in jobs:
                stop, jobs = True, jobs[:jobs.index(None)]
            lines = []
            for event_id, when, ctype, body, items, answer, answer_type, embeddings in jobs:
                with self._lock:
                    self._queued_bytes -= len(body) + len(answer)
                try:
                    rec = build_record(event_id, when, ctype, body, items, answer, answer_type, self.meta,
                                       self.inputs, self.max_pixels, embeddings, self.projection)
                    lines.append((json.dumps(rec, separators=(",", ":")).encode() + b"\n", when))
                except Exception as exc:  # noqa: BLE001 - capture must never stop; counted and logged once
                    self._failed(1, exc)
            if lines:
                self._write(lines)

    def _failed(self, records: int, exc: Exception) -> None:
        self._count("write_errors", records)
        if not self._error_logged:
            self._error_logged = True
            log.error("data capture: a record could not be written (%s: %s); later errors are only "
                      "counted (medpipe_capture_write_errors_total)", exc.__class__.__name__, exc)

    def _write(self, lines: list[tuple[bytes, float]]) -> None:
        """Append encoded records, each run of records of the same hour with one write; a failed write loses
        (and counts) its run only."""
        start = 0
        while start < len(lines):
            hour = _hour(lines[start][1])
            end = start + 1
            while end < len(lines) and _hour(lines[end][1]) == hour:
                end += 1
            before = self.counts["captured"]
            try:
                self.write_lines([line for line, _ in lines[start:end]], lines[start][1])
            except Exception as exc:  # noqa: BLE001 - a full disk, the folder gone: the answers went out
                self._file = None  # start a new file once writing works again (the folder may come back)
                self._failed(end - start - (self.counts["captured"] - before), exc)
            start = end

    def _path_for(self, when: float) -> Path:
        t = datetime.fromtimestamp(when, timezone.utc)
        hour = self.root / t.strftime("%Y/%m/%d/%H")
        if self._file is None or self._file.parent != hour or self._files[-1][1] >= self.max_file:
            hour.mkdir(parents=True, exist_ok=True)
            self._file = hour / f"{t.strftime('%M-%S-%f')[:-3]}-{uuid.uuid4().hex[:8]}.jsonl"
            self._files.append([self._file, 0])
        return self._file

    def write_lines(self, lines: list[bytes], when: float) -> None:
        """Append lines of one hour, as many per write as the current file has room for (rotating when it is
        full), counting each written line as captured; then keep under the size cap (oldest files first)."""
        i = 0
        while i < len(lines):
            path = self._path_for(when)
            room, j, size = self.max_file - self._files[-1][1], i, 0
            while j < len(lines) and (j == i or size + len(lines[j]) <= room):
                size, j = size + len(lines[j]), j + 1
            with open(path, "ab") as f:
                f.write(b"".join(lines[i:j]))
            self._files[-1][1] += size
            self._total += size
            self._count("captured", j - i)
            i = j
            self._trim()

    def _trim(self) -> None:
        while self._total > self.max_total and len(self._files) > 1:
            old, size = self._files.pop(0)
            try:
                old.unlink()
            except OSError:  # gone already, or the folder replaced: it no longer counts either way
                pass
            self._total -= size
            self._count("files_removed")
            log.info("data capture: removed %s (%d bytes) to stay under %d MB", old, size, self.max_total // 2**20)


def _hour(when: float) -> int:
    return int(when // 3600)


def open_capture(cfg, predictor, registry=None, embedder: Embedder | None = None) -> CaptureWriter | None:
    """The service's writer for a ``ServeConfig`` with ``capture`` set (None without), its counters in ``registry``;
    ``embedder``: the one whose rows the service splits (its projection names the records' embeddings)."""
    if not getattr(cfg, "capture", None):
        return None
    meta = {"package_sha256": predictor.meta.weights_sha256, "model": predictor.name, "version": predictor.version}
    writer = CaptureWriter(cfg.capture, meta, sample=cfg.capture_sample, inputs=cfg.capture_inputs,
                           max_file_mb=min(16.0, cfg.capture_max_mb), max_total_mb=cfg.capture_max_mb,
                           max_pixels=cfg.max_pixels)
    if registry is not None:
        writer.register(registry)
    writer.projection = embedder.id if embedder is not None else None
    log.info("data capture: %g%% of /invocations requests to %s (%s), at most %g MB", 100 * cfg.capture_sample,
             cfg.capture, "request bodies" if cfg.capture_inputs else "input fingerprints, no pixels",
             cfg.capture_max_mb)
    return writer
