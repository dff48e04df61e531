"""The SageMaker Runtime route shape and the AWS Lambda example, with the real boto3 client against a real
``medpipe serve`` process on loopback (only AWS's front end is missing: the client's endpoint_url points here).
"""

import base64
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests._server import Server, free_port

botocore = pytest.importorskip("botocore", reason="boto3 (dev extra) runs the SageMaker Runtime client")
import boto3
from botocore.config import Config

ROOT = Path(__file__).resolve().parents[1]
AWS_ENV = {"AWS_ACCESS_KEY_ID": "AKIDLOCALTEST", "AWS_SECRET_ACCESS_KEY": "local-test-secret",
           "AWS_DEFAULT_REGION": "eu-west-1"}


def image(fmt: str = "JPEG", seed: int = 0, size=(120, 90)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import torch

    from medpipe.models import create_model
    from medpipe.package import save_package
    from medpipe.preprocess import PreprocessSpec

    torch.manual_seed(0)
    work = tmp_path_factory.mktemp("lambda")
    save_package(work / "pkg", create_model("densenet-test", 3), name="lesions", arch="densenet-test",
                 classes=["benign", "melanoma", "other"], spec=PreprocessSpec(image_size=32))
    s = Server(work / "pkg", "--backend", "eager", "--decode-workers", "1", log=work / "serve.log")
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture()
def aws(monkeypatch):
    for k, v in AWS_ENV.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")  # no profile of this machine is read
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")


def runtime_client(url: str):
    return boto3.client("sagemaker-runtime", endpoint_url=url, config=Config(retries={"max_attempts": 1}))


def test_runtime_route_answers_like_invocations(server, aws):
    jpeg = image()
    st, _, direct = server.invoke(jpeg)
    assert st == 200
    client = runtime_client(server.url)
    out = client.invoke_endpoint(EndpointName="medpipe-ham10000-1", Body=jpeg, ContentType="image/jpeg",
                                 Accept="application/json")
    assert out["ContentType"].startswith("application/json") and out["InvokedProductionVariant"] == "AllTraffic"
    assert json.loads(out["Body"].read()) == json.loads(direct)
    csv = client.invoke_endpoint(EndpointName="e", Body=jpeg, ContentType="image/jpeg", Accept="text/csv")
    assert csv["Body"].read() == server.invoke(jpeg, accept="text/csv")[2]
    # the model server's refusal arrives as SageMaker reports a container's: ModelError, its status inside
    cut = jpeg[: len(jpeg) // 3]
    with pytest.raises(client.exceptions.ModelError) as err:
        client.invoke_endpoint(EndpointName="e", Body=cut, ContentType="image/jpeg")
    st, _, refused = server.invoke(cut)
    assert st == err.value.response["OriginalStatusCode"] == 400
    original = json.loads(err.value.response["OriginalMessage"])
    assert (original["error"], original["message"]) == (json.loads(refused)["error"], json.loads(refused)["message"])
    with pytest.raises(client.exceptions.ModelError) as err:
        client.invoke_endpoint(EndpointName="e", Body=jpeg, ContentType="image/gif")
    assert err.value.response["OriginalStatusCode"] == 415
    with pytest.raises(client.exceptions.ValidationError, match="not a SageMaker endpoint name"):
        client.invoke_endpoint(EndpointName="bad_name", Body=jpeg, ContentType="image/jpeg")
    metrics = server.request("GET", "/metrics")[2].decode()
    assert 'route="/endpoints/{name}/invocations",status="424"' in metrics  # endpoint names folded


@pytest.fixture()
def handler(server, aws, monkeypatch):
    spec = importlib.util.spec_from_file_location("lambda_handler", ROOT / "docs" / "examples" / "lambda_handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("ENDPOINT_NAME", "medpipe-ham10000-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", server.url)  # boto3's own variable: the code is unchanged
    return module.handler


def event(body: bytes | str, binary: bool = True, **headers) -> dict:
    """An API Gateway (REST API) proxy event."""
    text = base64.b64encode(body).decode() if binary else body
    return {"resource": "/predict", "path": "/predict", "httpMethod": "POST", "headers": headers,
            "isBase64Encoded": binary, "body": text, "requestContext": {"stage": "prod"}}


def test_lambda_handler_invokes_the_endpoint(handler, server):
    jpeg, png = image(), image("PNG", seed=1)
    answer = handler(event(jpeg, **{"Content-Type": "image/jpeg"}), None)
    assert answer["statusCode"] == 200 and answer["headers"]["Content-Type"].startswith("application/json")
    assert json.loads(answer["body"]) == json.loads(server.invoke(jpeg)[2])
    as_json = handler(event(json.dumps({"image": "data:image/png;base64," + base64.b64encode(png).decode()}),
                            binary=False, **{"content-type": "application/json"}), None)
    assert as_json["statusCode"] == 200
    assert json.loads(as_json["body"]) == json.loads(server.invoke(png, "image/png")[2])
    csv = handler(event(jpeg, Accept="text/csv"), None)  # no Content-Type: sniffed from the bytes
    assert csv["statusCode"] == 200 and csv["body"].encode() == server.invoke(jpeg, accept="text/csv")[2]


def test_lambda_handler_maps_errors_to_statuses(handler, monkeypatch):
    jpeg = image()
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, "GIF")
    cases = [
        (event(b""), 400, "empty_body"),
        (event("%%%", binary=False), 400, "bad_json"),
        (event(json.dumps({"image": "not base64!"}), binary=False), 400, "bad_base64"),
        (event(json.dumps({"picture": "AAAA"}), binary=False), 400, "missing_image"),
        (event(b"\0" * (6 * 1024 * 1024 + 1)), 413, "image_too_large"),
        (event(gif.getvalue()), 415, "unsupported_media_type"),  # sniffed: no call made
        (event(jpeg[: len(jpeg) // 3], **{"Content-Type": "image/jpeg"}), 400, None),  # the server's 400 (ModelError)
        (event(gif.getvalue(), **{"Content-Type": "image/jpeg"}), 415, None),  # the server's 415 (ModelError)
        (event(jpeg, Accept="application/xml"), 406, "not_acceptable"),
    ]
    for ev, status, code in cases:
        answer = handler(ev, None)
        body = json.loads(answer["body"])
        assert answer["statusCode"] == status, (status, answer)
        assert set(body) == {"error", "message"} and (code is None or body["error"] == code), body
        assert "Traceback" not in answer["body"] and "AKID" not in answer["body"]
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", f"http://127.0.0.1:{free_port()}")  # nobody listens
    handler.__globals__["_client"] = None  # the next call builds its client with the new address
    down = handler(event(jpeg), None)
    assert down["statusCode"] == 502 and json.loads(down["body"])["error"] == "endpoint_unreachable"
    monkeypatch.delenv("ENDPOINT_NAME")
    assert handler(event(jpeg), None)["statusCode"] == 500
