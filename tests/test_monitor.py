"""Data capture (SageMaker's record format) and `medpipe monitor baseline/check`: drift, estimates, ground truth."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medpipe.cli import main
from medpipe.monitor.capture import EVENT_HEADER, FINGERPRINT_TYPE, CaptureWriter
from medpipe.monitor.embedding import DIM, Embedder, decode, encode
from medpipe.monitor.jobs import EXIT_VIOLATION
from medpipe.monitor.reader import ReadLog, read_capture
from tests._server import Server

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "tests" / "data" / "densenet-test"
SHA = json.loads((PKG / "model.json").read_text())["weights_sha256"]
META = {"package_sha256": SHA, "model": "densenet-test-ham", "version": "1"}


def _dataset(root: Path, seed: int, count: int) -> Path:
    from medpipe.data.sources import ingest
    from medpipe.data.synthetic import SynthSpec, write_synthetic

    write_synthetic(root / "raw", SynthSpec(count=count, width=64, height=48, seed=seed), fmt="folders", workers=1)
    ingest(root / "raw", root / "data", workers=1)
    return root / "data"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A baseline on one synthetic dataset, and a second dataset (same generator) to serve as traffic."""
    from medpipe.infer.predictor import Predictor

    root = tmp_path_factory.mktemp("monitor")
    base_data, traffic = _dataset(root / "a", 11, 160), _dataset(root / "b", 12, 120)
    assert main(["monitor", "baseline", "--model", str(PKG), "--data", str(base_data), "--split", "all",
                 "--out", str(root / "base"), "--backend", "eager", "--device", "cpu"]) == 0
    table = pd.read_csv(traffic / "records.csv")
    return {"root": root, "base": root / "base", "predictor": Predictor(PKG, device="cpu"),
            "images": [Path(p).read_bytes() for p in table["path"]], "labels": table["class_index"].to_numpy()}


def _answer(predictor, probs: np.ndarray) -> bytes:
    """The JSON body `medpipe serve` answers for images with these probabilities."""
    preds = [p.as_dict() for p in predictor.to_predictions(probs)]
    return json.dumps({"model": predictor.name, "version": predictor.version, "predictions": preds}).encode()


def _capture(folder: Path, predictor, images: list[bytes], meta: dict = META) -> tuple[list[str], np.ndarray]:
    """Capture one request per image through the writer the service uses; returns eventIds and probabilities."""
    embedder = _embedder(predictor)
    probs, emb = embedder.probabilities([predictor.decode(b) for b in images])  # one forward pass: quick under load
    w = CaptureWriter(folder, meta)
    w.projection = embedder.id
    ids = [w.submit("image/jpeg", b, [("bytes", b)], _answer(predictor, probs[i:i + 1]), "application/json",
                    embeddings=[encode(emb[i])]) for i, b in enumerate(images)]
    w.close()
    assert w.counts["captured"] == len(images) and w.counts["dropped"] == 0
    return ids, probs


def _embedder(predictor) -> Embedder:
    if not hasattr(predictor, "_test_embedder"):  # one hook per predictor
        predictor._test_embedder = Embedder(predictor)
    return predictor._test_embedder


def _cast(data: bytes) -> bytes:
    """A strong colour cast (another dermatoscope's white balance): red up, blue down."""
    arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(float)
    arr = np.clip(arr * np.array([1.35, 1.0, 0.65]), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _check(world, capture: Path, out: Path, *extra: str, plots: bool = False) -> tuple[int, dict]:
    code = main(["monitor", "check", "--baseline", str(world["base"]), "--capture", str(capture), "--window", "60",
                 "--out", str(out), *extra, *([] if plots else ["--no-plots"])])
    return code, json.loads((out / "windows.json").read_text())


def test_unshifted_windows_pass_and_a_colour_cast_is_flagged(world, tmp_path):
    stats = json.loads((world["base"] / "statistics.json").read_text())
    assert stats["package_sha256"] == SHA and stats["n"] == 160 and len(stats["inputs"]["mean_r"]) == 160
    _capture(tmp_path / "plain", world["predictor"], world["images"])
    code, res = _check(world, tmp_path / "plain", tmp_path / "plain_out")
    assert code == 0, [w["violations"] for w in res["windows"]]
    assert [w["n"] for w in res["windows"]] == [60, 60] and all(w["tested"] for w in res["windows"])
    assert len(stats["embedding"]["sample"]) == 160 and stats["embedding"]["projection"].endswith(f"x{DIM}")
    assert all(w["embedding_drift"]["n"] == 60 and w["embedding_drift"]["p_value"] > 0.01 for w in res["windows"])
    assert json.loads((tmp_path / "plain_out" / "constraint_violations.json").read_text()) == {"violations": []}

    _capture(tmp_path / "cast", world["predictor"], [_cast(b) for b in world["images"]])
    code, res = _check(world, tmp_path / "cast", tmp_path / "cast_out", plots=True)
    assert code == EXIT_VIOLATION
    found = json.loads((tmp_path / "cast_out" / "constraint_violations.json").read_text())["violations"]
    drifted = {v.get("feature_name") for v in found if v["constraint_check_type"] == "input_drift"}
    assert {"mean_r", "mean_b"} <= drifted and {v["window"] for v in found} == {0, 1}
    assert {"embedding_drift", "input_drift"} <= {v["constraint_check_type"] for v in found}
    report = (tmp_path / "cast_out" / "report.md").read_text()
    assert "violation" in report
    for name in ("class_mix", "confidence", "embedding_drift", "input_drift", "performance"):
        png = tmp_path / "cast_out" / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"(plots/{name}.png)" in report


def _requality(data: bytes, quality: int) -> bytes:
    """The same image re-encoded at another JPEG quality (a gateway that recompresses, another camera)."""
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_a_jpeg_quality_drop_is_flagged_as_input_drift(world, tmp_path):
    base_q = json.loads((world["base"] / "statistics.json").read_text())["inputs"]["jpeg_quality"]
    assert len(base_q) == 160 and min(base_q) > 70  # the synthetic set's JPEGs
    _capture(tmp_path / "low", world["predictor"], [_requality(b, 40) for b in world["images"]])
    code, res = _check(world, tmp_path / "low", tmp_path / "out")
    assert code == EXIT_VIOLATION
    for w in res["windows"]:
        assert w["input_drift"]["jpeg_quality"]["p_holm"] < 0.01
    found = json.loads((tmp_path / "out" / "constraint_violations.json").read_text())["violations"]
    assert {v["window"] for v in found if v.get("feature_name") == "jpeg_quality"} == {0, 1}


def test_ground_truth_joined_by_event_id_gives_the_direct_accuracy(world, tmp_path):
    from medpipe.monitor.drift import measured_performance

    ids, probs = _capture(tmp_path / "cap", world["predictor"], world["images"][:60])
    y = world["labels"][:60]
    # half as CSV, half as SageMaker groundTruthData JSON Lines; plus one eventId nobody captured
    classes = world["predictor"].classes
    pd.DataFrame({"eventId": [*ids, "no-such-event"], "label": [*(classes[c] for c in y), classes[0]]}).to_csv(
        tmp_path / "gt.csv", index=False)
    code, res = _check(world, tmp_path / "cap", tmp_path / "out", "--ground-truth", str(tmp_path / "gt.csv"))
    direct = measured_performance(y, probs)
    measured = res["windows"][0]["measured"]
    assert measured["n"] == 60 and measured["accuracy"] == pytest.approx(direct["accuracy"])
    assert measured["balanced_accuracy"] == pytest.approx(direct["balanced_accuracy"])
    assert measured["macro_auc"] == pytest.approx(direct["macro_auc"])
    assert res["summary"]["skipped"]["unknown_event_id"] == 1
    assert "no-such-event" in (tmp_path / "out" / "report.md").read_text()

    lines = [json.dumps({"groundTruthData": {"data": classes[c], "encoding": "CSV"}, "eventMetadata": {"eventId": i},
                         "eventVersion": "0"}) for i, c in zip(ids, y)]
    (tmp_path / "gt.jsonl").write_text("\n".join(lines) + "\n")
    _, res2 = _check(world, tmp_path / "cap", tmp_path / "out2", "--ground-truth", str(tmp_path / "gt.jsonl"))
    assert res2["windows"][0]["measured"]["accuracy"] == pytest.approx(direct["accuracy"])


def test_bad_lines_other_models_and_a_sagemaker_record_are_counted_never_mixed(world, tmp_path):
    cap = tmp_path / "cap"
    _capture(cap, world["predictor"], world["images"][:40])
    _capture(cap, world["predictor"], world["images"][40:50], meta={**META, "package_sha256": "f" * 64})
    # A record exactly as SageMaker's DataCaptureConfig writes it (no medpipe key; the input base64).
    img = world["images"][50]
    pr = world["predictor"]
    answer = _answer(pr, pr.probabilities([pr.decode(img)]))
    sm = {"captureData": {"endpointInput": {"observedContentType": "image/jpeg", "mode": "INPUT",
                                            "data": base64.b64encode(img).decode(), "encoding": "BASE64"},
                          "endpointOutput": {"observedContentType": "application/json", "mode": "OUTPUT",
                                             "data": answer.decode(), "encoding": "JSON"}},
          "eventMetadata": {"eventId": "b8a5e7b2-0c1f-4a3e-9d55-5c3c0e0b1a11", "inferenceTime": "2030-01-01T00:00:00Z"},
          "eventVersion": "0"}
    odd = cap / "2030" / "01" / "01" / "00" / "sm.jsonl"
    odd.parent.mkdir(parents=True)
    odd.write_text(json.dumps(sm) + "\n" + "{not json\n" + json.dumps(sm)[:80] + "\n")
    code, res = _check(world, cap, tmp_path / "out")
    assert code == 0
    s = res["summary"]
    assert s["images"] == 41  # 40 of this model + the SageMaker record; none of the other model's 10
    assert s["skipped"] == {"other_model": 10, "no_package_hash": 1, "bad_line": 2}
    assert any(n.endswith("sm.jsonl:2") for n in s["named"]["bad_line"])
    last = res["windows"][0]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "other_model: 10" in report and "ffffffffffff" in report
    # the SageMaker record's input statistics were computed from its base64 bytes
    rows = read_capture(odd, world["predictor"].classes, SHA, ReadLog())
    assert len(rows.probs) == 1 and rows.inputs[0]["sha256"] and 0 < rows.inputs[0]["mean_r"] < 1
    assert last["n"] == 41


# The sample record of the SageMaker developer guide, "Capture data from real-time endpoint", section "View
# Captured Data" (https://docs.aws.amazon.com/sagemaker/latest/dg/model-monitor-data-capture-endpoint.html),
# verbatim: an endpoint invoked with text/csv, answering one score. Not a medpipe model's answer.
SAGEMAKER_DOC_RECORD = (
    '{"captureData":{"endpointInput":{"observedContentType":"text/csv","mode":"INPUT",'
    '"data":"69,0,153.7,109,194.0,105,256.1,114,14.1,6,1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,'
    '0,0,1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,0,1,0,1,0\\n",'
    '"encoding":"CSV"},"endpointOutput":{"observedContentType":"text/csv; charset=utf-8","mode":"OUTPUT",'
    '"data":"0.0254181120544672","encoding":"CSV"}},'
    '"eventMetadata":{"eventId":"aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee","inferenceTime":"2022-02-14T17:25:49Z"},'
    '"eventVersion":"0"}')


def test_the_documented_sagemaker_record_and_sagemakers_default_base64_output(world, tmp_path):
    """monitor check reads SageMaker's documented record without mixing it in (counted and named), and reads
    a medpipe endpoint's record as SageMaker writes it with no CaptureContentTypeHeader: both payloads base64
    (the API reference of DataCaptureConfig: "If no headers are specified SageMaker AI will by default base64
    encode when capturing the data")."""
    cap = tmp_path / "cap"
    _capture(cap, world["predictor"], world["images"][:40])
    img, pr = world["images"][40], world["predictor"]
    answer = _answer(pr, pr.probabilities([pr.decode(img)]))
    b64 = {"captureData": {"endpointInput": {"observedContentType": "image/jpeg", "mode": "INPUT",
                                             "data": base64.b64encode(img).decode(), "encoding": "BASE64"},
                           "endpointOutput": {"observedContentType": "application/json", "mode": "OUTPUT",
                                              "data": base64.b64encode(answer).decode(), "encoding": "BASE64"}},
           "eventMetadata": {"eventId": "4c9e3f0e-2d7b-4f55-9a51-0d1c2b3a4f5e", "inferenceTime": "2030-01-01T00:00:00Z"},
           "eventVersion": "0"}
    sm = cap / "2030" / "01" / "01" / "00" / "sm.jsonl"
    sm.parent.mkdir(parents=True)
    sm.write_text(SAGEMAKER_DOC_RECORD + "\n" + json.dumps(b64) + "\n")
    assert json.loads(SAGEMAKER_DOC_RECORD)["eventVersion"] == "0"  # the documented line is valid JSON as written
    code, res = _check(world, cap, tmp_path / "out")
    s = res["summary"]
    assert code == 0 and s["images"] == 41  # 40 of medpipe's records + the base64 one; not the documented one
    assert s["skipped"] == {"no_predictions": 1, "no_package_hash": 1}
    assert s["named"]["no_predictions"] == [f"{sm}:1"]
    assert f"no_predictions: 1 ({sm}:1)" in (tmp_path / "out" / "report.md").read_text()
    rows = read_capture(sm, pr.classes, SHA, ReadLog())
    assert rows.event_ids == [b64["eventMetadata"]["eventId"]] and rows.inputs[0]["bytes"] == len(img)
    np.testing.assert_allclose(rows.probs[0], pr.probabilities([pr.decode(img)])[0], rtol=1e-6)


def test_ground_truth_by_event_id_gives_medpipe_evaluates_auc(world, tmp_path):
    """The traffic images captured and labelled by eventId: monitor check's measured macro AUC, balanced accuracy
    and accuracy are `medpipe evaluate`'s on the same images (same package, same decoder, no TTA)."""
    data = world["root"] / "b" / "data"
    assert main(["evaluate", "--model", str(PKG), "--data", str(data), "--split", "all", "--out",
                 str(tmp_path / "eval"), "--bootstrap", "0", "--backend", "eager", "--device", "cpu"]) == 0
    ev = json.loads((tmp_path / "eval" / "report.json").read_text())
    ids, _ = _capture(tmp_path / "cap", world["predictor"], world["images"])
    classes = world["predictor"].classes
    pd.DataFrame({"eventId": ids, "label": [classes[c] for c in world["labels"]]}).to_csv(tmp_path / "gt.csv",
                                                                                         index=False)
    main(["monitor", "check", "--baseline", str(world["base"]), "--capture", str(tmp_path / "cap"), "--window",
          "1000", "--ground-truth", str(tmp_path / "gt.csv"), "--out", str(tmp_path / "out"), "--no-plots"])
    measured = json.loads((tmp_path / "out" / "windows.json").read_text())["windows"][0]["measured"]
    assert measured["n"] == ev["n"] == len(world["images"])
    assert np.isfinite(ev["macro_auc"]) and measured["macro_auc"] == pytest.approx(ev["macro_auc"], abs=1e-9)
    assert measured["balanced_accuracy"] == pytest.approx(ev["balanced_accuracy"], abs=1e-9)
    assert measured["accuracy"] == pytest.approx(ev["accuracy"], abs=1e-9)


def test_writer_rotates_caps_drops_and_captures_inputs_on_request(world, tmp_path, monkeypatch):
    import threading

    from medpipe.monitor import capture

    threads, real = set(), capture.fingerprint
    monkeypatch.setattr(capture, "fingerprint", lambda *a: threads.add(threading.current_thread().name) or real(*a))
    w = CaptureWriter(tmp_path / "c", META, max_file_mb=0.002, max_total_mb=0.012)
    blob = b"x" * 700
    for _ in range(40):
        w.submit("application/x-npy", b"", [("array", np.zeros((4, 4, 3), np.uint8))], blob, "application/json")
    w.close()
    assert threads == {"medpipe-capture"}  # the fingerprint is computed off the request path
    files = sorted((tmp_path / "c").rglob("*.jsonl"))
    assert w.counts["captured"] == 40 and w.counts["files_removed"] > 0 and len(files) >= 2
    assert sum(f.stat().st_size for f in files) <= 0.012 * 2**20
    assert all(re.search(r"/\d{4}/\d{2}/\d{2}/\d{2}/[^/]+\.jsonl$", str(f)) for f in files)

    # --capture-inputs: the body itself, base64, as SageMaker captures it; the fingerprint still rides along
    body = json.dumps({"images": [base64.b64encode(world["images"][0]).decode()]}).encode()
    answer = _answer(world["predictor"], np.full((1, 7), 1 / 7))
    keep = CaptureWriter(tmp_path / "e", META, inputs=True)
    keep.submit("application/json", body, [("bytes", world["images"][0])], answer, "application/json")
    keep.close()
    rec = json.loads(next((tmp_path / "e").rglob("*.jsonl")).read_text())
    inp = rec["captureData"]["endpointInput"]
    assert inp["encoding"] == "BASE64" and base64.b64decode(inp["data"]) == body
    del rec["medpipe"]  # read as SageMaker's record: the fingerprint is computed from the captured body
    (tmp_path / "e.jsonl").write_text(json.dumps(rec) + "\n")
    rows = read_capture(tmp_path / "e.jsonl", world["predictor"].classes, SHA, ReadLog())
    assert rows.inputs[0]["sha256"] == hashlib.sha256(world["images"][0]).hexdigest()

    full = CaptureWriter(tmp_path / "d", META, max_queue_mb=0.001)
    assert full.submit("image/jpeg", b"y" * 5000, [("bytes", b"y")], b"{}", "application/json") is None
    full.close()
    assert full.counts["dropped"] == 1


def test_serve_capture_writes_records_and_a_write_error_does_not_fail_requests(world, tmp_path):
    cap = tmp_path / "capture"
    # --spool-mb 0.001: every body goes to a temporary file, so capture reads the spooled bodies
    server = Server(PKG, "--backend", "eager", "--capture", str(cap), "--capture-sample", "1", "--spool-mb",
                    "0.001", log=tmp_path / "server.log").wait_ready()
    try:
        img = world["images"][0]
        status, headers, body = server.invoke(img)
        assert status == 200 and EVENT_HEADER.lower() in headers
        event = headers[EVENT_HEADER.lower()]
        two = json.dumps({"images": [base64.b64encode(b).decode() for b in world["images"][1:3]]}).encode()
        status, headers2, _ = server.invoke(two, ctype="application/json")
        assert status == 200
        files = _wait(lambda: [f for f in cap.rglob("*.jsonl") if len(f.read_text().splitlines()) >= 2])
        recs = [json.loads(x) for x in files[0].read_text().splitlines()]
        assert re.search(r"/\d{4}/\d{2}/\d{2}/\d{2}/[^/]+\.jsonl$", str(files[0]))
        rec = next(r for r in recs if r["eventMetadata"]["eventId"] == event)
        assert set(rec) == {"captureData", "eventMetadata", "eventVersion", "medpipe"} and rec["eventVersion"] == "0"
        inp, out = rec["captureData"]["endpointInput"], rec["captureData"]["endpointOutput"]
        assert inp["mode"] == "INPUT" and inp["observedContentType"] == FINGERPRINT_TYPE and inp["encoding"] == "JSON"
        assert out == {"observedContentType": "application/json", "mode": "OUTPUT", "data": body.decode(),
                       "encoding": "JSON"}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["eventMetadata"]["inferenceTime"])
        assert rec["medpipe"]["package_sha256"] == SHA
        fp = rec["medpipe"]["inputs"][0]
        assert fp["format"] == "JPEG" and fp["bytes"] == len(img) and (fp["width"], fp["height"]) == (64, 48)
        assert base64.b64encode(img).decode()[:40] not in files[0].read_text()  # no pixels by default
        # the embedding of the answering forward pass, the same as the baseline's path computes it
        offline = _embedder(world["predictor"]).embed([world["predictor"].decode(img)])[0]
        assert fp["embedding_projection"].endswith(f"x{DIM}")
        np.testing.assert_allclose(decode(fp["embedding"]), offline, rtol=1e-2, atol=1e-2)
        assert len(next(r for r in recs if r is not rec)["medpipe"]["inputs"]) == 2

        code, res = _check(world, cap, tmp_path / "out")  # the server's records, read by monitor check
        assert code == 0 and res["summary"]["images"] == 3 and not res["summary"]["skipped"]

        import shutil

        shutil.rmtree(cap)
        cap.write_text("a file where the capture folder was")  # every write now fails
        for _ in range(3):
            assert server.invoke(img)[0] == 200
        def errors_counted():
            text = server.request("GET", "/metrics")[2].decode()
            return text if "medpipe_capture_write_errors_total 3.0" in text else None

        text = _wait(errors_counted)
        assert "medpipe_capture_captured_total 2.0" in text
        cap.unlink()  # the folder is back: capture resumes
        assert server.invoke(img)[0] == 200
        assert _wait(lambda: list(cap.rglob("*.jsonl")))
    finally:
        server.stop()
    log = server.log_text()
    assert log.count("could not be written") == 1 and "Traceback" not in log


def _small_tmpfs(mount: Path, size_kb: int) -> list[str]:
    """A command prefix running its arguments with a ``size_kb`` tmpfs mounted at ``mount`` (a private mount
    namespace of an unprivileged user namespace: no root needed); skips the test where that is not allowed."""
    import shutil
    import subprocess

    script = f'mount -t tmpfs -o size={size_kb}k tmpfs "$0" && exec "$@"'
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux's unshare to mount a small tmpfs")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", script, str(mount), "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here ({probe.stderr.strip()[:120]})")
    return ["unshare", "-rm", "sh", "-c", script, str(mount)]


def test_a_full_disk_during_capture_never_fails_a_request(world, tmp_path):
    """A real ENOSPC: the capture folder on a 24 KB tmpfs, every record carrying its image (--capture-inputs),
    so the disk fills after a few records. Every request is answered, the errors are counted and logged once,
    and monitor check reads what was written, counting the line the full disk cut short."""
    import shutil

    mount = tmp_path / "small"
    mount.mkdir()
    server = Server(PKG, "--backend", "eager", "--capture", str(mount / "cap"), "--capture-sample", "1",
                    "--capture-inputs", log=tmp_path / "server.log", prefix=_small_tmpfs(mount, 24)).wait_ready()
    try:
        for i in range(16):
            assert server.invoke(world["images"][i])[0] == 200

        def counted():
            text = server.request("GET", "/metrics")[2].decode()
            done = re.search(r"medpipe_capture_captured_total (\d+)", text), re.search(
                r"medpipe_capture_write_errors_total (\d+)", text)
            return done if all(done) and sum(int(m.group(1)) for m in done) == 16 else None

        captured, errors = (int(m.group(1)) for m in _wait(counted))
        assert captured >= 1 and errors >= 1
        # the server's view of its mount namespace, copied out before it exits and the tmpfs goes
        shutil.copytree(f"/proc/{server.proc.pid}/root{mount}/cap", tmp_path / "cap")
    finally:
        server.stop()
    log = server.log_text()
    assert log.count("could not be written") == 1 and "No space left on device" in log and "Traceback" not in log
    _, res = _check(world, tmp_path / "cap", tmp_path / "out")
    assert res["summary"]["images"] == captured
    assert res["summary"]["skipped"].get("bad_line", 0) >= 1  # a line the full disk cut short: counted, not read


def _wait(fn, timeout: float = 20.0):
    t = time.time()
    while time.time() - t < timeout:
        if got := fn():
            return got
        time.sleep(0.1)
    raise AssertionError("condition not reached")


def test_live_monitor_gauges_flag_a_shifted_window(world):
    from prometheus_client import CollectorRegistry, generate_latest

    from medpipe.monitor.live import CHECKS, LiveMonitor, load_baseline

    pred, emb = world["predictor"], _embedder(world["predictor"])
    live = LiveMonitor(*load_baseline(world["base"]), 60, pred.classes, emb.id)
    registry = CollectorRegistry()
    live.register(registry)
    assert 'medpipe_monitor_drift_p_value{check="embedding"} NaN' in generate_latest(registry).decode()

    def feed(images):
        probs, e = emb.probabilities([pred.decode(b) for b in images])
        live.observe(probs, [encode(x) for x in e])
        return live.refresh()

    v = feed(world["images"][:60])
    assert v["window_images"] == 60 and all(v["p_value"][c] > 0.01 for c in CHECKS), v
    assert sum(v["class_share"]) == pytest.approx(1.0)
    v = feed([_cast(b) for b in world["images"][60:120]])  # the window now holds only shifted images
    assert v["window_images"] == 60 and v["p_value"]["embedding"] < 0.01
    text = generate_latest(registry).decode()
    assert re.search(r'medpipe_monitor_drift_p_value\{check="embedding"\} 0\.00', text)
    assert re.search(r'medpipe_monitor_drift_alpha\{check="prediction"\} 0\.01', text)
    assert re.search(rf'medpipe_monitor_class_share\{{class="{pred.classes[0]}"\}} [0-9.e-]+', text)

    from types import SimpleNamespace

    from medpipe.errors import ConfigError
    from medpipe.monitor.live import open_live

    other = SimpleNamespace(classes=pred.classes, meta=SimpleNamespace(weights_sha256="0" * 64))
    with pytest.raises(ConfigError, match="describes another model"):  # serve refuses it at start, exit 2
        open_live(SimpleNamespace(monitor_baseline=str(world["base"]), monitor_window=60), other, emb.id)


def test_alerting_rules_pass_promtool():
    import shutil
    import subprocess

    if not shutil.which("promtool"):
        pytest.skip("promtool not installed (Debian package prometheus, .ci/apt.d/prometheus.txt)")
    res = subprocess.run(["promtool", "check", "rules", str(ROOT / "deploy" / "prometheus" / "medpipe-alerts.yml")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "SUCCESS: 5 rules found" in res.stdout, res.stdout + res.stderr


def _prometheus(port: int, path: str) -> dict:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def test_real_prometheus_scrapes_serve_and_fires_the_drift_alert(world, tmp_path):
    import shutil
    import subprocess
    from urllib.parse import quote

    from tests._server import free_port

    if not shutil.which("prometheus"):
        pytest.skip("prometheus not installed (Debian package prometheus, .ci/apt.d/prometheus.txt)")
    # the shipped rules, without their waiting times ("for: 15m" would hold a firing alert back 15 minutes)
    rules = re.sub(r"for: \d+m", "for: 0s", (ROOT / "deploy" / "prometheus" / "medpipe-alerts.yml").read_text())
    (tmp_path / "rules.yml").write_text(rules)
    server = Server(PKG, "--backend", "eager", "--monitor-baseline", str(world["base"]), "--monitor-window", "60",
                    log=tmp_path / "server.log").wait_ready()
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(tmp_path / "rules.yml")],
        "scrape_configs": [{"job_name": "medpipe", "static_configs": [{"targets": [f"127.0.0.1:{server.port}"]}]}]}))
    with open(tmp_path / "prometheus.log", "wb") as plog:
        prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=plog, stderr=subprocess.STDOUT)

    def value(expr: str):
        try:
            got = _prometheus(port, "/api/v1/query?query=" + quote(expr))["data"]["result"]
        except (OSError, ValueError, KeyError):
            return None
        return float(got[0]["value"][1]) if got else None

    def alerts() -> set:
        return {a["labels"]["alertname"] for a in _prometheus(port, "/api/v1/alerts")["data"]["alerts"]}

    try:
        for img in world["images"][:60]:
            assert server.invoke(img)[0] == 200
        # Prometheus scraped the full unshifted window with its embedding test done, and evaluated the rules on it
        _wait(lambda: value("medpipe_monitor_window_images") == 60 and
              (value('medpipe_monitor_drift_p_value{check="embedding"}') or -1) >= 0, timeout=60)
        time.sleep(3)
        assert alerts() == set()
        for img in world["images"][60:120]:
            assert server.invoke(_cast(img))[0] == 200
        _wait(lambda: "MedpipeEmbeddingDrift" in alerts(), timeout=60)
    finally:
        prom.terminate()
        prom.wait(timeout=30)
        server.stop()
    assert "Traceback" not in server.log_text()


def test_select_for_labelling_and_the_labels_come_back(world, tmp_path):
    import shutil

    pred, n = world["predictor"], 40
    images = world["images"][:n] + [_cast(b) for b in world["images"][n:2 * n]]  # the second window drifted
    labels = dict(enumerate(world["labels"][:2 * n]))
    probs, e = _embedder(pred).probabilities([pred.decode(b) for b in images])
    w = CaptureWriter(tmp_path / "cap", META, inputs=True)  # --capture-inputs: the bodies are kept
    w.projection = _embedder(pred).id
    ids = [w.submit("image/jpeg", b, [("bytes", b)], _answer(pred, probs[i:i + 1]), "application/json",
                    embeddings=[encode(e[i])]) for i, b in enumerate(images)]
    ids.append(w.submit("image/jpeg", images[0], [("bytes", images[0])], _answer(pred, probs[:1]), "application/json"))
    w.close()
    out = tmp_path / "sel"
    assert main(["monitor", "select", "--capture", str(tmp_path / "cap"), "--budget", "12", "--out", str(out),
                 "--baseline", str(world["base"]), "--model", str(PKG), "--window", str(n),
                 "--source-prefix", "s3://labels/job1/"]) == 0
    table = pd.read_csv(out / "selected.csv")
    assert len(table) == 12 and table["score"].is_monotonic_decreasing and table["sha256"].is_unique
    conf = probs.max(1)
    top = table["eventId"].map(ids.index)  # the rule: 1 - confidence + 0.5 disagree + 0.25 drifted window
    assert np.allclose(table["score"], 1 - conf[top] + 0.5 * table["disagree"] + 0.25 * table["drifted_window"],
                       atol=1e-3)
    assert set(table.loc[table["drifted_window"] == 1, "eventId"].map(ids.index)) <= set(range(n, 2 * n))
    assert table["drifted_window"].sum() > 0
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and all(x["source-ref"].startswith("s3://labels/job1/") for x in lines)

    # the labelling job: its images uploaded to s3://labels/job1/, its output manifest = input lines + the label
    s3 = tmp_path / "s3"
    shutil.copytree(out / "images", s3 / "labels" / "job1")
    classes = pred.classes
    for x in lines:
        name = Path(x["source-ref"]).name
        assert hashlib.sha256((s3 / "labels" / "job1" / name).read_bytes()).hexdigest() == name.split(".")[0]
        c = int(labels[ids.index(x["medpipe-event-id"])])
        x.update({"lesion": c, "lesion-metadata": {"class-name": classes[c], "confidence": 0.95, "human-annotated":
                  "yes", "type": "groundtruth/image-classification", "job-name": "labeling-job/job1"}})
    (tmp_path / "output.manifest").write_text("".join(json.dumps(x) + "\n" for x in lines))

    _, res = _check(world, tmp_path / "cap", tmp_path / "chk", "--ground-truth", str(tmp_path / "output.manifest"))
    assert sum(w["labelled"] for w in res["windows"]) == 12 and "bad_ground_truth_line" not in res["summary"]["skipped"]
    assert main(["ingest", str(tmp_path / "output.manifest"), "--out", str(tmp_path / "data"), "--s3-root", str(s3),
                 "--classes", ",".join(classes), "--workers", "1"]) == 0
    rec = pd.read_csv(tmp_path / "data" / "records.csv")
    assert len(rec) == 12 and set(rec["medpipe-event-id"]) == {x["medpipe-event-id"] for x in lines}
    assert all(rec["label"] == [classes[labels[ids.index(i)]] for i in rec["medpipe-event-id"]])
