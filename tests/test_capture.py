"""The capture fingerprint's JPEG quality estimate and the capture writer's failure handling (off the request path)."""

from __future__ import annotations

import io
import json
import logging
import threading

import numpy as np
import pytest
from PIL import Image

from medpipe.monitor import capture
from medpipe.monitor.capture import CaptureWriter, fingerprint, jpeg_quality

META = {"package_sha256": "a" * 64, "model": "m", "version": "1"}


def _photo(fmt: str, **kw) -> bytes:
    """A smooth image with texture (a gradient plus noise), encoded in ``fmt``."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:120, 0:160]
    arr = np.stack([x * 1.5, y * 2.0, (x + y) * 0.8], -1) + rng.normal(0, 12, (120, 160, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("quality", [95, 75, 40])
def test_fingerprint_estimates_the_jpeg_quality(quality):
    fp = fingerprint("bytes", _photo("JPEG", quality=quality))
    assert fp["format"] == "JPEG" and abs(fp["jpeg_quality"] - quality) <= 5


def test_no_jpeg_quality_for_a_png_an_array_or_a_foreign_table():
    assert "jpeg_quality" not in fingerprint("bytes", _photo("PNG"))
    assert "jpeg_quality" not in fingerprint("array", np.zeros((8, 8, 3), np.uint8))
    assert jpeg_quality({}) is None and jpeg_quality({0: [1, 2, 3]}) is None
    assert jpeg_quality({0: [1] * 64}) > 97  # all-ones: the tables of quality 98..100


def _writer(tmp_path, **kw) -> CaptureWriter:
    from prometheus_client import CollectorRegistry

    w = CaptureWriter(tmp_path / "cap", META, **kw)
    w.registry = CollectorRegistry()
    w.register(w.registry)
    return w


def _metric(w: CaptureWriter, name: str) -> float:
    return w.registry.get_sample_value(f"medpipe_capture_{name}_total")


def _submit(w: CaptureWriter, n: int) -> list:
    return [w.submit("image/jpeg", b"x" * 10, [("array", np.zeros((4, 4, 3), np.uint8))], b"{}", "application/json")
            for _ in range(n)]


def test_a_write_error_loses_the_records_counts_them_and_logs_once(tmp_path, monkeypatch, caplog):
    w = _writer(tmp_path)

    def disk_full(self, lines, when):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(CaptureWriter, "write_lines", disk_full)
    with caplog.at_level(logging.ERROR, "medpipe.monitor"):
        ids = _submit(w, 30)
        w.close()
    assert all(ids)  # every request got its eventId: the answer went out
    assert w.counts["write_errors"] == 30 and w.counts["captured"] == 0 and _metric(w, "write_errors") == 30
    assert sum("could not be written" in r.message for r in caplog.records) == 1


def test_a_full_queue_drops_and_counts_never_blocks(tmp_path, monkeypatch):
    stuck, release, real = threading.Event(), threading.Event(), capture.build_record

    def slow(*a):
        stuck.set()
        release.wait(30)  # the writer thread is stuck (a slow disk): the queue fills up
        return real(*a)

    monkeypatch.setattr(capture, "build_record", slow)
    w = _writer(tmp_path, max_queue=4)
    first = _submit(w, 1)
    assert stuck.wait(20)
    done: list = []
    t = threading.Thread(target=lambda: done.append(_submit(w, 40)))
    t.start()
    t.join(20)  # submit never waits for room: all 40 return at once, the stuck writer notwithstanding
    assert not t.is_alive() and len(done[0]) == 40
    kept = first + [i for i in done[0] if i]
    assert len(kept) == 5 and w.counts["dropped"] == 36 == _metric(w, "dropped")
    release.set()
    w.close()
    assert w.counts["captured"] == 5 == _metric(w, "captured")
    lines = [json.loads(x) for f in (tmp_path / "cap").rglob("*.jsonl") for x in f.read_text().splitlines()]
    assert sorted(r["eventMetadata"]["eventId"] for r in lines) == sorted(kept)
