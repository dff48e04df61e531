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
    """The README's tritonclient snippet, run as written in its own process, gets /invocations' answer."""
    srv, _, meta = served
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = re.search(r"<!-- oip-client -->\s*```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "client.py").write_text(snippet)
    image = pd.read_csv(data_dir / "records.csv")["path"][0]
    r = subprocess.run([sys.executable, str(tmp_path / "client.py"), f"127.0.0.1:{srv.port}", meta["name"], image],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    label, probs = r.stdout.strip().split(" ", 1)
    ref = _invocations(srv, open(image, "rb").read())
    assert label == ref["label"]
    assert np.abs(np.array(json.loads(probs)) - [ref["probabilities"][c] for c in meta["classes"]]).max() < 1e-5
