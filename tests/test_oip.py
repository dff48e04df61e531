"""The Open Inference Protocol (KServe v2) on `medpipe serve`, spoken to by the real `tritonclient[http]`
against the real server process: health, metadata, inference with encoded images (BYTES) and with
preprocessed tensors (FP32), JSON and binary tensors, the same probabilities as /invocations, and errors."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests._server import Server

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the dev extra")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(trained_run, tmp_path_factory):
    srv = Server(trained_run / "model", "--backend", "eager", log=tmp_path_factory.mktemp("oip") / "serve.log")
    try:
        srv.wait_ready()
        client = httpclient.InferenceServerClient(url=f"127.0.0.1:{srv.port}", network_timeout=60)
        meta = json.loads((trained_run / "model" / "model.json").read_text())
        yield srv, client, meta
        client.close()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def jpegs(data_dir) -> list[bytes]:
    return [open(p, "rb").read() for p in pd.read_csv(data_dir / "records.csv")["path"][:3]]


def _invocations(srv, jpeg: bytes) -> dict:
    status, _, body = srv.invoke(jpeg)
    assert status == 200
    return json.loads(body)["predictions"][0]


def test_health_and_metadata(served):
    srv, client, meta = served
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(meta["name"])
    assert not client.is_model_ready("no-such-model")
    server = client.get_server_metadata()
    assert server["name"] == "medpipe" and "binary_tensor_data" in server["extensions"]
    md = client.get_model_metadata(meta["name"])
    size = meta["preprocessing"]["image_size"]
    assert {i["name"]: (i["datatype"], i["shape"]) for i in md["inputs"]} == {
        "image_bytes": ("BYTES", [-1]), "image": ("FP32", [-1, 3, size, size])}
    assert {o["name"]: (o["datatype"], o["shape"]) for o in md["outputs"]} == {
        "probabilities": ("FP32", [-1, len(meta["classes"])]), "label": ("BYTES", [-1])}
    assert json.loads(md["parameters"]["classes"]) == meta["classes"]


@pytest.mark.parametrize("binary", [True, False])
def test_infer_bytes_equals_invocations(served, jpegs, binary):
    """Encoded images: raw bytes with the binary extension (tritonclient's default) or base64 in JSON."""
    import base64

    srv, client, meta = served
    data = jpegs if binary else [base64.b64encode(j) for j in jpegs]
    inp = httpclient.InferInput("image_bytes", [len(jpegs)], "BYTES")
    inp.set_data_from_numpy(np.array(data, dtype=object), binary_data=binary)
    outputs = None if binary else [httpclient.InferRequestedOutput("probabilities", binary_data=False),
                                   httpclient.InferRequestedOutput("label", binary_data=False)]
    res = client.infer(meta["name"], [inp], outputs=outputs)
    probs, labels = res.as_numpy("probabilities"), res.as_numpy("label")
    assert probs.dtype == np.float32 and probs.shape == (len(jpegs), len(meta["classes"]))
    for i, j in enumerate(jpegs):
        ref = _invocations(srv, j)
        assert np.abs(probs[i] - np.array([ref["probabilities"][c] for c in meta["classes"]])).max() < 1e-5
        lab = labels[i]
        assert (lab.decode() if isinstance(lab, bytes) else str(lab)) == ref["label"]


def test_infer_preprocessed_fp32_equals_invocations(served, jpegs):
    from medpipe.preprocess import PreprocessSpec, eval_batch

    srv, client, meta = served
    spec = PreprocessSpec.from_dict(meta["preprocessing"])
    x = eval_batch([spec.decode(j) for j in jpegs], spec).numpy()
    inp = httpclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = client.infer(meta["name"], [inp], outputs=[httpclient.InferRequestedOutput("probabilities")])
    probs = res.as_numpy("probabilities")
    for i, j in enumerate(jpegs):
        ref = _invocations(srv, j)
        assert np.abs(probs[i] - np.array([ref["probabilities"][c] for c in meta["classes"]])).max() < 1e-4
    inp_json = httpclient.InferInput("image", list(x[:1].shape), "FP32")
    inp_json.set_data_from_numpy(x[:1], binary_data=False)  # the plain JSON form of the same tensor
    res2 = client.infer(meta["name"], [inp_json], outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=False)])
    assert np.abs(res2.as_numpy("probabilities")[0] - probs[0]).max() < 1e-5


def test_errors_for_wrong_name_shape_datatype_and_bad_image(served, jpegs):
    srv, client, meta = served
    size = meta["preprocessing"]["image_size"]

    def fails(model, inp, status, words):
        with pytest.raises(InferenceServerException) as e:
            client.infer(model, [inp])
        assert str(status) in str(e.value.status()) and words in e.value.message(), (e.value.status(), e.value.message())

    good = httpclient.InferInput("image_bytes", [1], "BYTES")
    good.set_data_from_numpy(np.array([jpegs[0]], dtype=object))
    fails("nope", good, 404, "not served")
    wrong_shape = httpclient.InferInput("image", [1, 3, size + 1, size], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((1, 3, size + 1, size), np.float32))
    fails(meta["name"], wrong_shape, 400, "shape")
    wrong_type = httpclient.InferInput("image", [1, 3, size, size], "INT32")
    wrong_type.set_data_from_numpy(np.zeros((1, 3, size, size), np.int32))
    fails(meta["name"], wrong_type, 400, "must be FP32")
    broken = httpclient.InferInput("image_bytes", [1], "BYTES")
    broken.set_data_from_numpy(np.array([jpegs[0][:200]], dtype=object))
    fails(meta["name"], broken, 400, "element 0")
    # the answer is protocol JSON, never a traceback, and the server still serves
    status, _, body = srv.request("POST", f"/v2/models/{meta['name']}/infer", b"{not json",
                                  {"Content-Type": "application/json"})
    assert status == 400 and set(json.loads(body)) >= {"error"} and b"Traceback" not in body
    assert client.is_server_ready()
    status, _, body = srv.request("GET", "/metrics")
    assert b'route="/v2/models/{name}/infer"' in body


def test_readme_client_snippet(served, data_dir, tmp_path):
    """The documented tritonclient snippet (docs/examples/oip_client.py), run as written in its own process, gets /invocations' answer."""
    srv, _, meta = served
    snippet = (Path(__file__).resolve().parents[1] / "docs" / "examples" / "oip_client.py").read_text()
    (tmp_path / "client.py").write_text(snippet)
    image = pd.read_csv(data_dir / "records.csv")["path"][0]
    r = subprocess.run([sys.executable, str(tmp_path / "client.py"), f"127.0.0.1:{srv.port}", meta["name"], image],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    label, probs = r.stdout.strip().split(" ", 1)
    ref = _invocations(srv, open(image, "rb").read())
    assert label == ref["label"]
    assert np.abs(np.array(json.loads(probs)) - [ref["probabilities"][c] for c in meta["classes"]]).max() < 1e-5


def _infer_raw(srv, name: str, req: dict, binary: bytes = b"") -> tuple[int, dict]:
    head = json.dumps(req).encode()
    headers = {"Content-Type": "application/octet-stream" if binary else "application/json"}
    if binary:
        headers["Inference-Header-Content-Length"] = str(len(head))
    status, _, body = srv.request("POST", f"/v2/models/{name}/infer", head + binary, headers)
    return status, json.loads(body)


def test_non_finite_overflowing_and_boolean_shapes_are_400_naming_the_input(served):
    """NaN, Inf and 3e38 (finite, but it overflows in the network) on the binary and the JSON path alike, and
    a shape holding `true`: 400 naming the input; values at the accepted range's edge are answered."""
    from medpipe.serve.oip import fp32_limit

    srv, _, meta = served
    size, name = meta["preprocessing"]["image_size"], meta["name"]
    shape = [1, 3, size, size]
    for value in (np.nan, np.inf, -np.inf, 3e38):
        x = np.full(shape, value, np.float32)
        binary = {"inputs": [{"name": "image", "datatype": "FP32", "shape": shape,
                              "parameters": {"binary_data_size": x.nbytes}}]}
        status, body = _infer_raw(srv, name, binary, x.tobytes())
        assert status == 400 and "input 'image'" in body["error"], (value, status, body)
    for literal in ("NaN", "Infinity", "3e38", "1e39"):
        head = ('{"inputs": [{"name": "image", "datatype": "FP32", "shape": %s, "data": [%s]}]}'
                % (json.dumps(shape), ", ".join([literal] * int(np.prod(shape))))).encode()
        status, _, body = srv.request("POST", f"/v2/models/{name}/infer", head, {"Content-Type": "application/json"})
        assert status == 400 and "input 'image'" in json.loads(body)["error"], (literal, status, body)
    status, body = _infer_raw(srv, name, {"inputs": [{"name": "image", "datatype": "FP32", "shape": [True, 3, size, size],
                                                      "data": [0.0] * (3 * size * size)}]})
    assert status == 400 and "shape" in body["error"] and "input 'image'" in body["error"]
    spec = meta["preprocessing"]
    edge = fp32_limit(spec.get("mean", (0.485, 0.456, 0.406)), spec.get("std", (0.229, 0.224, 0.225)))
    x = np.where(np.arange(np.prod(shape)).reshape(shape) % 2, edge, -edge).astype(np.float32) * np.float32(0.999)
    status, body = _infer_raw(srv, name, {"inputs": [{"name": "image", "datatype": "FP32", "shape": shape,
                                                      "parameters": {"binary_data_size": x.nbytes}}]}, x.tobytes())
    assert status == 200, body
    assert srv.request("GET", "/ping")[0] == 200


def test_million_empty_bytes_elements_are_refused_before_decoding(served):
    """1.5 million empty BYTES elements (6 MB of JSON, or of the binary extension) against a declared shape
    of 1 or 1,500,000: 400/413 naming the input, counted before anything is decoded."""
    srv, _, meta = served
    n = 1_500_000
    url = f"/v2/models/{meta['name']}/infer"
    for declared in (1, n):
        head = b'{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [%d], "data": [%s""]}]}' % (
            declared, b'"", ' * (n - 1))
        status, _, body = srv.request("POST", url, head, {"Content-Type": "application/json"})
        assert status in (400, 413) and "input 'image_bytes'" in json.loads(body)["error"], (declared, status, body)
        raw = b"\0\0\0\0" * n  # n elements of length 0
        status, body = _infer_raw(srv, meta["name"], {"inputs": [{"name": "image_bytes", "datatype": "BYTES",
                                  "shape": [declared], "parameters": {"binary_data_size": len(raw)}}]}, raw)
        assert status in (400, 413) and "input 'image_bytes'" in body["error"], (declared, status, body)
    assert srv.request("GET", "/ping")[0] == 200


def test_undecodable_element_is_400_as_documented(served):
    """An element that is not an allowed image (text, GIF) is the protocol's invalid input: 400 naming it."""
    import base64

    srv, _, meta = served
    gif = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00" \
          b"\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
    for blob in (b"plain text, not an image", gif):
        status, body = _infer_raw(srv, meta["name"], {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                                                  "data": [base64.b64encode(blob).decode()]}]})
        assert status == 400 and "element 0" in body["error"], (status, body)
    guide = (Path(__file__).resolve().parents[1] / "docs" / "guides" / "serving.md").read_text()
    assert re.search(r"Errors are `\{\"error\": message\}` with 400 \([^)]*undecodable image", " ".join(guide.split()))


def test_large_json_tensor_is_parsed_off_the_event_loop_with_the_same_answers(served, jpegs):
    """A JSON header over OFFLOAD_BYTES (16 preprocessed images as JSON numbers, ~1 MB) is parsed in a
    decode process: the same probabilities as the binary form, and its mistakes still 400 naming the input."""
    from medpipe.preprocess import PreprocessSpec, eval_batch
    from medpipe.serve.oip import OFFLOAD_BYTES

    srv, _, meta = served
    spec = PreprocessSpec.from_dict(meta["preprocessing"])
    x = eval_batch([spec.decode(j) for j in jpegs], spec).numpy()
    x = np.concatenate([x] * 6)[:16]
    req = {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}],
           "outputs": [{"name": "probabilities", "parameters": {"binary_data": False}}]}
    assert len(json.dumps(req)) > OFFLOAD_BYTES
    status, body = _infer_raw(srv, meta["name"], req)
    assert status == 200, body
    probs = np.array(body["outputs"][0]["data"], np.float32).reshape(len(x), -1)
    binary = {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape),
                          "parameters": {"binary_data_size": x.nbytes}}],
              "outputs": [{"name": "probabilities", "parameters": {"binary_data": False}}]}
    status, ref = _infer_raw(srv, meta["name"], binary, x.astype("<f4").tobytes())
    assert status == 200 and np.abs(probs - np.array(ref["outputs"][0]["data"]).reshape(probs.shape)).max() < 1e-5
    req["inputs"][0]["data"][7] = 3e38
    status, body = _infer_raw(srv, meta["name"], req)
    assert status == 400 and "input 'image'" in body["error"], body


def test_invocations_json_is_counted_before_it_is_parsed():
    """/invocations' JSON body: more strings or values than max_images images can hold is 413 before parsing;
    a body at the bound is parsed as before."""
    from medpipe.infer.protocol import HttpError, parse_body

    with pytest.raises(HttpError) as e:
        parse_body("application/json", b'{"images": [%s""]}' % (b'"", ' * 1_499_999), max_images=16)
    assert e.value.status == 413 and "16 images" in e.value.message
    ok = parse_body("application/json", json.dumps({"instances": [{"b64": "AAAA"}] * 16}).encode(), max_images=16)
    assert [k for k, _ in ok] == ["bytes"] * 16
