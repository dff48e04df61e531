"""The inference service, started as a real process on loopback and spoken to over HTTP.

Covers every row of the inference-service table in RELIABILITY.md; a few rows that need a special
model (NaN weights) or many generated requests (the fuzzer) drive the same app in-process.
"""

import asyncio
import base64
import io
import json
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests._server import Server, as_json

pytest.importorskip("fastapi")
pytestmark = pytest.mark.slow

MAX_BODY_MB = 1.0
MAX_IMAGES = 4


@pytest.fixture(scope="module")
def golden(trained_run, data_dir):
    """A test-split image with the probabilities `medpipe evaluate` wrote for it."""
    preds = pd.read_csv(trained_run / "report" / "predictions.csv")
    records = pd.read_csv(data_dir / "records.csv").set_index("image_id")
    row = preds.iloc[0]
    path = Path(records.loc[row["image_id"], "path"])
    return {"path": path, "bytes": path.read_bytes(), "evaluate": row}


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    s = Server(trained_run / "model", "--backend", "eager", "--max-body-mb", str(MAX_BODY_MB),
               "--max-images", str(MAX_IMAGES), "--body-timeout-s", "1.5", log=log).wait_ready()
    yield s
    s.stop()
    text = s.log_text()
    assert "Traceback" not in text, text[-3000:]
    assert str(trained_run) not in text  # no file paths in the log


ERRORS: list[tuple[int, bytes]] = []


def _error(status, headers, body):
    """Every error body: JSON with code, message and request id; no trace, path or bytes."""
    ERRORS.append((status, body))
    assert headers["content-type"].startswith("application/json")
    err = as_json(body)
    assert set(err) == {"error", "message", "request_id"} and err["request_id"] == headers["x-request-id"]
    text = body.decode()
    assert "Traceback" not in text and "File \"" not in text and "/tmp" not in text
    return err


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    (img.convert(mode) if mode else img).save(buf, format="PNG")
    return buf.getvalue()


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


# -- the contract --------------------------------------------------------------------------------

def test_ping_json_csv_and_sagemaker_headers(server, golden):
    st, h, body = server.request("GET", "/ping")
    assert st == 200 and body == b""
    st, h, body = server.invoke(golden["bytes"], headers={"X-Amzn-SageMaker-Custom-Attributes": "x=1",
                                                         "X-Amzn-SageMaker-Target-Model": "ignored"})
    assert st == 200 and h["content-type"] == "application/json"
    res = as_json(body)
    assert res["model"] and res["version"] == "1" and len(res["predictions"]) == 1
    p = res["predictions"][0]
    assert set(p) == {"label", "class_index", "probabilities", "decision_rule", "tta", "most_likely"} and p["tta"] is False
    assert p["most_likely"] == max(p["probabilities"], key=p["probabilities"].get)
    assert abs(sum(p["probabilities"].values()) - 1) < 1e-5
    assert list(p["probabilities"])[p["class_index"]] == p["label"]
    for accept in (None, "*/*", "application/json; q=0.9, text/html"):
        st, _, b = server.invoke(golden["bytes"], accept=accept)
        assert st == 200 and as_json(b) == res
    for ctype in ("application/x-image", "image/jpeg; charset=binary"):
        assert as_json(server.invoke(golden["bytes"], ctype=ctype)[2]) == res
    st, h, body = server.invoke(golden["bytes"], accept="text/csv")
    assert st == 200 and h["content-type"].startswith("text/csv")
    header, line = body.decode().strip().splitlines()
    assert header.split(",")[:3] == ["index", "label", "class_index"]
    assert line.split(",")[1] == p["label"]


def test_golden_served_equals_predict_and_evaluate(server, golden, trained_run):
    from medpipe.infer.predictor import Predictor

    served = as_json(server.invoke(golden["bytes"])[2])["predictions"][0]["probabilities"]
    predicted = Predictor(trained_run / "model").predict_files([golden["path"]])[0].probabilities
    for c, v in served.items():
        assert abs(v - predicted[c]) < 1e-6
        assert abs(v - golden["evaluate"][c]) < 1e-5


def test_png_npy_and_json_inputs(server, golden):
    ref = as_json(server.invoke(golden["bytes"])[2])["predictions"][0]
    from medpipe.data.imageio import decode_image

    rgb = decode_image(golden["bytes"])
    st, _, body = server.invoke(_png(rgb), ctype="image/png")
    assert st == 200 and as_json(body)["predictions"][0]["label"] == ref["label"]
    png_probs = as_json(body)["predictions"][0]["probabilities"]
    # .npy: HWC uint8, CHW float in [0,1] and an NCHW stack all equal the PNG of the same pixels
    for arr in (rgb, np.moveaxis(rgb.astype(np.float32) / 255, 2, 0)):
        st, _, body = server.invoke(_npy(arr), ctype="application/x-npy")
        got = as_json(body)["predictions"][0]["probabilities"]
        assert st == 200 and all(abs(got[c] - png_probs[c]) < 1e-5 for c in got)
    st, _, body = server.invoke(_npy(np.stack([rgb, rgb])), ctype="application/x-npy")
    assert st == 200 and len(as_json(body)["predictions"]) == 2
    b64 = base64.b64encode(golden["bytes"]).decode()
    st, _, body = server.invoke(json.dumps({"images": [b64, {"b64": b64}]}).encode(), ctype="application/json")
    assert st == 200 and [p["label"] for p in as_json(body)["predictions"]] == [ref["label"]] * 2


def test_json_with_one_bad_image_keeps_the_good_one(server, golden):
    b64 = base64.b64encode(golden["bytes"]).decode()
    bad = base64.b64encode(b"not an image at all").decode()
    st, _, body = server.invoke(json.dumps({"images": [b64, bad]}).encode(), ctype="application/json")
    preds = as_json(body)["predictions"]
    assert st == 200 and "label" in preds[0]
    assert preds[1]["error"] == "unsupported_format" and "allowed formats" in preds[1]["message"]
    st, _, body = server.invoke(json.dumps({"images": [b64, bad]}).encode(), ctype="application/json",
                                accept="text/csv")
    assert st == 200 and body.decode().splitlines()[2].endswith(",unsupported_format")


@pytest.mark.parametrize("body,code", [
    (b"{not json", "bad_json"),
    (b'{"images": "abc"}', "bad_json"),
    (b'{"pictures": []}', "bad_json"),
    (b'{"images": [12]}', "bad_json"),
    (b'{"images": ["@@@notbase64"]}', "bad_base64"),
    (b'{"images": []}', "no_images"),
])
def test_malformed_json_is_400(server, body, code):
    st, h, b = server.invoke(body, ctype="application/json")
    assert st == 400 and _error(st, h, b)["error"] == code


def test_bad_npy_and_pickled_npy_are_400(server, tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for body in (buf.getvalue(), b"\x93NUMPY garbage", _npy(np.array(["a", "b"]))):
        st, h, b = server.invoke(body, ctype="application/x-npy")
        assert st == 400 and _error(st, h, b)["error"] == "bad_npy"
    assert not marker.exists()


def test_too_many_images_is_413(server, golden):
    b64 = base64.b64encode(golden["bytes"]).decode()
    st, h, b = server.invoke(json.dumps({"images": [b64] * (MAX_IMAGES + 1)}).encode(), ctype="application/json")
    assert st == 413 and _error(st, h, b)["error"] == "too_many_images"
    st, h, b = server.invoke(_npy(np.zeros((MAX_IMAGES + 1, 8, 8, 3), np.uint8)), ctype="application/x-npy")
    assert st == 413


def test_dicom_input_equals_png_of_same_pixels(server, golden):
    pytest.importorskip("pydicom")
    from medpipe.data.imageio import decode_image
    from tests.test_imageio import _dicom_bytes, _dicom_dataset

    rgb = decode_image(golden["bytes"])
    ds = _dicom_dataset(rgb.shape[0], rgb.shape[1], pi="RGB", spp=3, pixels=rgb.tobytes())
    st, _, body = server.invoke(_dicom_bytes(ds), ctype="application/dicom")
    assert st == 200, body
    got = as_json(body)["predictions"][0]["probabilities"]
    ref = as_json(server.invoke(_png(rgb), ctype="image/png")[2])["predictions"][0]["probabilities"]
    assert all(abs(got[c] - ref[c]) < 1e-6 for c in got)
    st, h, b = server.invoke(b"\x00" * 200, ctype="application/dicom")
    assert st == 400 and "DICOM" in _error(st, h, b)["message"] and "Secret" not in b.decode()


# -- limits --------------------------------------------------------------------------------------

def _raw(server, head: bytes, body_chunks=(), delay=0.0, timeout=10.0) -> bytes:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    try:
        s.sendall(head)
        for c in body_chunks:
            if delay:
                time.sleep(delay)
            try:
                s.sendall(c)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server closed the connection: read its answer
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            data += chunk
        return data
    finally:
        s.close()


def test_body_over_cap_is_413_before_it_is_read(server):
    cap = int(MAX_BODY_MB * 1024 * 1024)
    # Declared length over the cap: the answer comes without a single body byte being sent.
    t = time.perf_counter()
    reply = _raw(server, f"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                         f"Content-Length: {cap + 1}\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 413") and b"body_too_large" in reply and time.perf_counter() - t < 5
    # Chunked (http.client chunks an iterable body), no length: refused once the count passes the cap.
    def chunks():
        for _ in range(cap // 65536 + 2):
            yield b"\xff" * 65536
    st, h, b = server.request("POST", "/invocations", chunks(), {"Content-Type": "image/jpeg"})
    assert st == 413 and _error(st, h, b)["error"] == "body_too_large"
    # A lying Content-Length (small) followed by far more bytes: only the declared bytes are read.
    reply = _raw(server, b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                         b"Content-Length: 10\r\n\r\n", [b"\xff" * (2 * cap)])
    assert reply.startswith(b"HTTP/1.1 400") or reply.startswith(b"HTTP/1.1 415")
    assert server.request("GET", "/ping")[0] == 200


def test_decompression_bomb_is_413_fast(server):
    from tests.test_imageio import _png_header_only

    t = time.perf_counter()
    st, h, b = server.invoke(_png_header_only(30000, 30000), ctype="image/png")
    assert st == 413 and _error(st, h, b)["error"] == "image_too_large"
    assert time.perf_counter() - t < 2


def test_corrupt_images_are_400_and_next_request_is_fine(server, golden):
    good = golden["bytes"]
    flipped = bytearray(good)
    for i in range(2, 60):
        flipped[i] ^= 0xFF
    for body in (good[: len(good) // 2], bytes(flipped), b""):
        st, h, b = server.invoke(body)
        assert st in (400, 415), (st, b)
        _error(st, h, b)
        assert server.invoke(good)[0] == 200


@pytest.mark.parametrize("body,ctype", [
    (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00"
     b"\x01\x00\x01\x00\x00\x02\x02D\x01\x00;", "image/jpeg"),
    (b"II*\x00\x08\x00\x00\x00\x00\x00", "image/jpeg"),
    (b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", "image/png"),
    (b"<svg xmlns='http://www.w3.org/2000/svg'><image href='http://example.com/x.png'/></svg>", "image/png"),
    (b"just some text", "image/jpeg"),
    (b"abc", "image/gif"),
    (b"abc", "text/plain"),
    (b"abc", "application/pdf"),
])
def test_unsupported_or_lying_formats_are_415(server, body, ctype):
    st, h, b = server.invoke(body, ctype=ctype)
    assert st == 415 and _error(st, h, b)["error"] in ("unsupported_format", "unsupported_media_type")


def test_unacceptable_accept_is_406(server, golden):
    st, h, b = server.invoke(golden["bytes"], accept="text/html")
    assert st == 406 and _error(st, h, b)["error"] == "not_acceptable"


def test_odd_modes_and_sizes(server, golden):
    from medpipe.data.imageio import decode_image

    rgb = decode_image(golden["bytes"])
    ref = as_json(server.invoke(_png(rgb), ctype="image/png")[2])["predictions"][0]["probabilities"]
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    got = as_json(server.invoke(_png(rgba), ctype="image/png")[2])["predictions"][0]["probabilities"]
    assert all(abs(got[c] - ref[c]) < 1e-6 for c in got)
    for mode in ("L", "P", "I;16"):
        st, _, b = server.invoke(_png(rgb, "L" if mode == "I;16" else mode) if mode != "I;16" else
                                 _png((decode_image(golden["bytes"])[..., 0].astype(np.uint16) * 257)),
                                 ctype="image/png")
        assert st == 200, b
    for w, h in ((1, 1), (1, 2000), (2000, 1)):
        st, _, b = server.invoke(_png(np.full((h, w, 3), 90, np.uint8)), ctype="image/png")
        assert st == 200, b


def test_slow_client_is_cut_off_and_ping_stays_fast(server):
    result = {}

    def trickle():
        head = (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                b"Content-Length: 1000\r\n\r\n")
        t = time.perf_counter()
        result["reply"] = _raw(server, head, [b"\xff"] * 40, delay=0.1, timeout=15)
        result["seconds"] = time.perf_counter() - t

    th = threading.Thread(target=trickle)
    th.start()
    pings = []
    while th.is_alive():
        t = time.perf_counter()
        assert server.request("GET", "/ping", timeout=5)[0] == 200
        pings.append(time.perf_counter() - t)
        time.sleep(0.1)
    th.join()
    assert result["reply"].startswith(b"HTTP/1.1 408") and b"body_timeout" in result["reply"]
    assert result["seconds"] < 4.5  # cut off after the 1.5 s body timeout, not after the 4 s trickle
    assert max(pings) < 2


def test_concurrent_identical_requests_match_serial(server, golden):
    serial = as_json(server.invoke(golden["bytes"])[2])
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda _: server.invoke(golden["bytes"]), range(16)))
    # Same answers; a batched forward may differ from a lone one in the last float bits only.
    ref = serial["predictions"][0]
    for st, _, b in results:
        got = as_json(b)["predictions"][0]
        assert st == 200 and got["label"] == ref["label"]
        assert max(abs(got["probabilities"][c] - v) for c, v in ref["probabilities"].items()) < 1e-5


def test_routes_metrics_and_execution_parameters(server, golden):
    assert server.invoke(golden["bytes"])[0] == 200  # at least one of each for the counters below
    assert server.invoke(b"abc", ctype="text/plain")[0] == 415
    for method, path in (("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/redoc"), ("GET", "/nothing"),
                         ("POST", "/models/x/invoke"), ("GET", "/../etc/passwd")):
        st, h, b = server.request(method, path)
        assert st == 404 and _error(st, h, b)["error"] == "not_found"
    st, h, b = server.request("GET", "/invocations")
    assert st == 405 and _error(st, h, b)["error"] == "method_not_allowed"
    st, h, b = server.request("GET", "/execution-parameters")
    assert st == 200 and as_json(b) == {"MaxConcurrentTransforms": 4, "BatchStrategy": "SINGLE_RECORD",
                                        "MaxPayloadInMB": 1}
    st, h, b = server.request("GET", "/metrics")
    text = b.decode()
    assert st == 200 and h["content-type"].startswith("text/plain")
    assert re.search(r'medpipe_requests_total\{route="/invocations",status="200"\} [1-9]', text)
    assert re.search(r'medpipe_requests_total\{route="/invocations",status="415"\} [1-9]', text)
    assert "medpipe_request_seconds_bucket" in text and "medpipe_batch_size_bucket" in text
    assert "medpipe_queue_images 0.0" in text
    st, h, b = server.request("GET", "/")
    assert st == 200 and b"<html" in b and b"http://" not in b and b"https://" not in b  # no external assets
    assert "default-src 'self'" in h["content-security-policy"]


def test_route_set_is_exactly_the_documented_one(trained_run):
    from medpipe.infer.predictor import Predictor
    from medpipe.serve.app import ROUTES, create_app
    from medpipe.serve.config import ServeConfig
    from medpipe.serve.oip import OIP_ROUTES

    app = create_app(Predictor(trained_run / "model"), ServeConfig()).app
    found = {(m, r.path) for r in app.routes for m in getattr(r, "methods", ()) if m != "HEAD"}
    assert found == ROUTES | OIP_ROUTES


def test_client_mode_predict_url(server, golden, capsys):
    from medpipe.cli import main

    assert main(["predict", "--url", server.url, "--json", str(golden["path"])]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    ref = as_json(server.invoke(golden["bytes"])[2])["predictions"][0]
    assert line["label"] == ref["label"] and line["probabilities"] == ref["probabilities"]


def test_explain_returns_heatmap(server, golden):
    st, _, b = server.request("POST", "/explain", golden["bytes"], {"Content-Type": "image/jpeg"})
    res = as_json(b)
    assert st == 200 and res["label"] and res["heatmap"].startswith("data:image/png;base64,")
    heat = Image.open(io.BytesIO(base64.b64decode(res["heatmap"].split(",", 1)[1])))
    assert heat.mode == "RGBA" and np.asarray(heat)[..., 3].std() > 0  # not a flat map
    st, h, b = server.request("POST", "/explain", b"plain text", {"Content-Type": "text/plain"})
    assert st == 415 and _error(st, h, b)


def test_error_bodies_were_checked():
    assert len(ERRORS) >= 20  # the scan above covered this many error responses


# -- deadline, queue, SIGTERM (servers with a slow model) ------------------------------------------

def test_deadline_is_504_and_slot_is_freed(trained_run, golden, tmp_path):
    s = Server(trained_run / "model", "--deadline-s", "0.8", "--max-queue", "1",
               slow_infer_s=1.5, log=tmp_path / "log").wait_ready()
    try:
        t = time.perf_counter()
        st, h, b = s.invoke(golden["bytes"])
        assert st == 504 and _error(st, h, b)["error"] == "deadline_exceeded"
        assert time.perf_counter() - t < 1.5
        # the single queue slot was freed: the next request is admitted (and times out again), not refused
        assert s.invoke(golden["bytes"])[0] == 504
    finally:
        s.stop()


def test_overload_is_503_with_retry_after_and_ping_stays_fast(trained_run, golden, tmp_path):
    s = Server(trained_run / "model", "--max-queue", "2", "--max-batch", "1",
               slow_infer_s=0.4, log=tmp_path / "log").wait_ready()
    try:
        pings = []

        def ping_loop(stop):
            while not stop.is_set():
                t = time.perf_counter()
                assert s.request("GET", "/ping", timeout=5)[0] == 200
                pings.append(time.perf_counter() - t)
                time.sleep(0.05)
        stop = threading.Event()
        th = threading.Thread(target=ping_loop, args=(stop,))
        th.start()
        with ThreadPoolExecutor(10) as ex:
            results = list(ex.map(lambda _: s.invoke(golden["bytes"]), range(10)))
        stop.set()
        th.join()
        statuses = [st for st, _, _ in results]
        assert statuses.count(200) >= 2 and statuses.count(503) >= 1, statuses
        assert set(statuses) <= {200, 503}
        for st, h, b in results:
            if st == 503:
                assert h["retry-after"] == "1" and _error(st, h, b)["error"] == "overloaded"
        assert pings and max(pings) < 2
    finally:
        s.stop()


def test_sigterm_finishes_in_flight_request_and_exits_0(trained_run, golden, tmp_path):
    s = Server(trained_run / "model", slow_infer_s=1.5, log=tmp_path / "log").wait_ready()
    try:
        with ThreadPoolExecutor(1) as ex:
            fut = ex.submit(s.invoke, golden["bytes"])
            time.sleep(0.5)  # the request is in the model now
            t = time.perf_counter()
            s.proc.send_signal(signal.SIGTERM)
            st, _, body = fut.result(timeout=30)
        assert st == 200 and as_json(body)["predictions"][0]["label"]
        assert s.proc.wait(30) == 0 and time.perf_counter() - t < 30
        with pytest.raises(OSError):
            s.request("GET", "/ping", timeout=2)
    finally:
        s.stop()


@pytest.mark.parametrize("defect", ["missing", "hash", "pickle"])
def test_bad_package_refuses_to_start(trained_run, tmp_path, defect):
    import os
    import pickle
    import shutil
    import subprocess
    import sys

    pkg = tmp_path / "pkg"
    shutil.copytree(trained_run / "model", pkg)
    marker = tmp_path / "pwned"
    if defect == "missing":
        (pkg / "weights.safetensors").unlink()
    elif defect == "hash":
        with open(pkg / "weights.safetensors", "r+b") as f:
            f.truncate(1000)
    else:
        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))
        (pkg / "weights.safetensors").write_bytes(pickle.dumps(Evil()))
    from tests._server import free_port

    r = subprocess.run([sys.executable, "-m", "medpipe", "serve", "--model", str(pkg), "--port", str(free_port())],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "medpipe serve: error:" in r.stderr and "Traceback" not in r.stderr
    assert {"missing": "missing", "hash": "does not match", "pickle": "does not match"}[defect] in r.stderr
    assert not marker.exists()


# -- in-process: a NaN model, the batcher, a fuzzer -------------------------------------------------

def test_nan_model_is_500_with_code(tmp_path):
    import torch
    from fastapi.testclient import TestClient

    from medpipe.preprocess import PreprocessSpec
    from medpipe.models import create_model
    from medpipe.package import save_package
    from medpipe.infer.predictor import Predictor
    from medpipe.serve.app import create_app
    from medpipe.serve.config import ServeConfig

    model = create_model("densenet121", 7)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    save_package(tmp_path / "pkg", model, name="nan", arch="densenet121",
                 classes=["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"], spec=PreprocessSpec(image_size=32))
    app = create_app(Predictor(tmp_path / "pkg"), ServeConfig())
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/invocations", content=_png(np.zeros((32, 32, 3), np.uint8)),
                   headers={"Content-Type": "image/png"})
        assert r.status_code == 500 and r.json()["error"] == "prediction_failed" and "nan" not in r.text.lower()


@pytest.mark.parametrize("field, value, says", [
    ("streams", -1, "--streams must be >= 0, got -1"),
    ("max_batch", 0, "--max-batch must be > 0, got 0"),
    ("decode_memory_mb", 100, "--decode-memory-mb must be 0 (no limit) or at least 256"),
    ("tls_cert", "c.pem", "--tls-cert and --tls-key go together"),
])
def test_serve_config_refuses_out_of_range_options(field, value, says):
    """A bad serve option is a ConfigError naming the option and the value, before anything starts; the
    valid neighbours pass (streams 0 is automatic)."""
    from medpipe.errors import ConfigError
    from medpipe.serve.config import ServeConfig

    with pytest.raises(ConfigError, match=re.escape(says)):
        ServeConfig(**{field: value})
    assert ServeConfig(streams=0).streams == 0 and ServeConfig(streams=2).streams == 2


def test_batcher_gathers_concurrent_requests():
    from medpipe.serve.batcher import Batcher

    sizes = []

    def infer(pixels):
        sizes.append(len(pixels))
        time.sleep(0.2)
        return np.array([[float(p[0, 0, 0])] for p in pixels])

    async def main():
        b = Batcher(infer, max_batch=4, max_wait_s=0.0)
        b.start()
        img = lambda v: np.full((2, 2, 3), v, np.uint8)  # noqa: E731
        first = asyncio.ensure_future(b.submit([img(1)]))
        await asyncio.sleep(0.05)  # the lone request runs at once, alone
        rest = [asyncio.ensure_future(b.submit([img(10 + i)])) for i in range(5)]
        rest.append(asyncio.ensure_future(b.submit([img(20), img(21)])))
        out = await asyncio.gather(first, *rest)
        await b.close()
        return out

    out = asyncio.run(main())
    assert sizes == [1, 4, 3]  # 1 alone; then whole requests up to max_batch 4; then the rest
    assert [r[:, 0].tolist() for r in out] == [[1], [10], [11], [12], [13], [14], [20, 21]]


def test_batcher_holds_a_batch_open_while_requests_decode():
    """While another request is still decoding, a queued one waits for it (up to max_wait_s), and the batch
    runs as soon as that decode finishes, not at the deadline; a decode that never finishes costs at most
    max_wait_s."""
    from medpipe.serve.batcher import Batcher

    sizes = []

    def infer(pixels):
        sizes.append(len(pixels))
        return np.zeros((len(pixels), 1))

    async def main():
        img = np.zeros((2, 2, 3), np.uint8)
        b = Batcher(infer, max_batch=4, max_wait_s=30.0)
        b.start()
        b.decoding_started()  # request A decoding
        b.decoding_started()  # request B decoding
        b.decoding_finished()
        t = time.perf_counter()
        a = asyncio.ensure_future(b.submit([img]))  # A queued, B still decoding: the batch stays open
        await asyncio.sleep(0.3)
        assert not a.done() and sizes == []

        async def b_decoded():  # as Service.predict does: the decode finishes, then its images are queued
            b.decoding_finished()
            return await b.submit([img])

        await asyncio.gather(a, b_decoded())  # B's images join A's batch
        woken = time.perf_counter() - t
        await b.close()
        short = Batcher(infer, max_batch=4, max_wait_s=0.2)
        short.start()
        short.decoding_started()  # never finishes
        await short.submit([img])
        await short.close()
        return woken

    woken = asyncio.run(main())
    assert sizes == [2, 1] and woken < 20  # woken by the finished decode, far before the 30 s deadline


def test_flip_tta_in_serve_batch_and_predict_gives_the_same_answer(trained_run, golden, tmp_path, capsys,
                                                                    monkeypatch):
    """--tta: the server, a batch job and predict average the same four flips (equal probabilities, and each
    answer says tta); they differ from the plain answer; batch/predict with --url refuse --tta (the server
    decides)."""
    from fastapi.testclient import TestClient

    from medpipe.cli import main
    from medpipe.infer.predictor import Predictor
    from medpipe.serve.app import create_app
    from medpipe.serve.config import ServeConfig

    capsys.readouterr()
    assert main(["predict", "--model", str(trained_run / "model"), "--json", "--tta", str(golden["path"])]) == 0
    predicted = json.loads(capsys.readouterr().out.splitlines()[0])
    assert predicted["tta"] is True
    with TestClient(create_app(Predictor(trained_run / "model", tta=True), ServeConfig(tta=True)).app) as c:
        r = c.post("/invocations", content=golden["bytes"], headers={"Content-Type": "image/jpeg"})
    served = r.json()["predictions"][0]
    assert r.status_code == 200 and served["tta"] is True
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "a.jpg").write_bytes(golden["bytes"])
    assert main(["batch", "--model", str(trained_run / "model"), "--input", str(inp), "--output",
                 str(tmp_path / "out"), "--tta", "--backend", "eager"]) == 0
    row = json.loads(next((tmp_path / "out").rglob("part-*.jsonl")).read_text().splitlines()[0])
    assert row["tta"] is True
    capsys.readouterr()  # resuming that job without --tta would mix answers: refused, nothing rewritten
    assert main(["batch", "--model", str(trained_run / "model"), "--input", str(inp), "--output",
                 str(tmp_path / "out"), "--backend", "eager"]) == 2
    assert "tta: True before, False now" in capsys.readouterr().err
    plain = Predictor(trained_run / "model").predict_files([golden["path"]])[0]
    assert plain.tta is False
    for other in (served["probabilities"], row["probabilities"]):
        assert max(abs(other[k] - predicted["probabilities"][k]) for k in other) < 1e-4
    assert max(abs(plain.probabilities[k] - predicted["probabilities"][k]) for k in plain.probabilities) > 1e-6
    # the wiring: `serve --tta` sets ServeConfig.tta, and the SageMaker handler reads MEDPIPE_TTA
    from medpipe import cli
    from medpipe.sagemaker import inference

    assert cli.build_parser().parse_args(["serve", "--model", "m", "--tta"]).tta is True
    monkeypatch.setenv("MEDPIPE_TTA", "1")
    assert inference.model_fn(str(trained_run / "model")).tta is True
    monkeypatch.setenv("MEDPIPE_TTA", "0")
    assert inference.model_fn(str(trained_run / "model")).tta is False
    for argv in (["predict", "--url", "http://127.0.0.1:9", "--tta", str(golden["path"])],
                 ["batch", "--url", "http://127.0.0.1:9", "--input", str(inp), "--output", str(tmp_path / "o2"), "--tta"]):
        assert main(argv) == 2 and "--tta applies to a local --model" in capsys.readouterr().err


def test_fuzz_api_never_500(trained_run):
    from fastapi.testclient import TestClient
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from medpipe.infer.predictor import Predictor
    from medpipe.serve.app import create_app
    from medpipe.serve.config import ServeConfig

    app = create_app(Predictor(trained_run / "model"), ServeConfig(max_images=4))
    ctypes = st.sampled_from(["image/jpeg", "image/png", "application/x-npy", "application/json",
                              "application/dicom", "text/plain", "", "image/jpeg; x=1", "multipart/form-data"])
    accepts = st.one_of(st.sampled_from(["", "*/*", "text/csv", "application/json;q=0", "text/*", "image/png"]),
                        st.text(max_size=20).filter(lambda s: "\n" not in s and "\r" not in s))
    json_bodies = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                               lambda c: st.lists(c, max_size=5) | st.dictionaries(
                                   st.sampled_from(["images", "instances", "b64", "x"]), c, max_size=3),
                               max_leaves=10).map(lambda o: json.dumps(o).encode())
    bodies = st.one_of(st.binary(max_size=300), json_bodies)

    with TestClient(app, raise_server_exceptions=False) as c:
        @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
        @given(ctypes, accepts, bodies)
        def check(ctype, accept, body):
            try:
                r = c.post("/invocations", content=body, headers={"Content-Type": ctype, "Accept": accept})
            except UnicodeEncodeError:
                return  # not a header a client can send
            assert r.status_code in (200, 400, 406, 413, 415), (r.status_code, r.text)
            if r.status_code != 200:
                assert set(r.json()) == {"error", "message", "request_id"}
        check()
