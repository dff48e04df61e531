"""Run the documented SageMaker examples with the real SageMaker Python SDK 2.x and no AWS.

    .venv-sm/bin/python tests/sagemaker_readme.py docs/examples OUT.json [--endpoint http://127.0.0.1:PORT]

Executed in the current folder (the test makes it a clean copy of the repository, as the SageMaker guide
asks). Every ``sagemaker_*.py`` file of the examples folder (docs/guides/sagemaker.md includes them), or
every block marked ``<!-- sagemaker-sdk-example -->`` when given a markdown file, runs in order, in one
namespace holding ``role`` and ``bucket``. The SDK is real (its estimator/model/transformer classes, version and
distribution checks, image lookup, hyperparameter encoding, source tarball); only AWS is emulated, at
the session boundary: ``sagemaker.Session`` is a stub that records each request (train, create model,
endpoint, transform, asynchronous invocation), an S3 upload copies the file into OUT's folder, and with ``--endpoint``
``invoke_endpoint`` is forwarded over HTTP to that server's ``/invocations`` (the real inference
toolkit on loopback). Any other network connection fails the run. OUT.json receives the requests.
"""

import io
import json
import re
import shutil
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from unittest import mock

MARK = "<!-- sagemaker-sdk-example -->"
ROLE = "arn:aws:iam::111122223333:role/medpipe-sagemaker"
BUCKET = "medpipe-example-bucket"
MODEL_DATA = f"s3://{BUCKET}/medpipe-job/output/model.tar.gz"


def readme_blocks(readme: Path) -> list[str]:
    if readme.is_dir():
        return [p.read_text() for p in sorted(readme.glob("sagemaker_*.py"))]
    text = readme.read_text()
    return re.findall(re.escape(MARK) + r"\s*```python\n(.*?)```", text, flags=re.S)


def loopback_only():
    real = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ConnectionRefusedError(f"no AWS call allowed in this test: connect to {address!r}")
        return real(self, address)

    return mock.patch.object(socket.socket, "connect", connect)


def stub_session(out_dir: Path, calls: list, endpoint: str | None):
    from sagemaker.session_settings import SessionSettings

    def record(name):
        def f(*args, **kwargs):
            calls.append({"call": name, "kwargs": json.loads(json.dumps(kwargs, default=str))})
            return {"TrainingJobArn": "arn:stub", "ModelArn": "arn:stub"} if name != "transform" else None
        return f

    def upload_file(path, ExtraArgs=None, **kw):  # noqa: N803 - boto3's name
        name = f"upload{len(calls)}-{Path(path).name}"
        shutil.copy(path, out_dir / name)
        calls.append({"call": "s3_upload", "kwargs": {"file": str(out_dir / name)}})

    def invoke_endpoint(EndpointName, Body, ContentType=None, Accept=None, **kw):  # noqa: N803
        req = urllib.request.Request(endpoint + "/invocations", data=Body, method="POST",
                                     headers={"Content-Type": ContentType or "", "Accept": Accept or "*/*"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return {"Body": io.BytesIO(r.read()), "ContentType": r.headers.get("Content-Type")}
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"ModelError {e.code}: {e.read()[:300]!r}") from None

    boto = mock.MagicMock(name="boto_session", region_name="us-east-1")
    boto.resource.return_value.Object.return_value.upload_file.side_effect = upload_file
    sess = mock.MagicMock(name="sagemaker_session", boto_session=boto, boto_region_name="us-east-1",
                          local_mode=False, default_bucket_prefix=None, settings=SessionSettings(),
                          sagemaker_config={"SchemaVersion": "1.0",
                                            "SageMaker": {"PythonSDK": {"Modules": {"TelemetryOptOut": True}}}})
    sess.s3_resource = boto.resource.return_value
    sess.default_bucket.return_value = BUCKET
    sess.expand_role.side_effect = lambda r: r
    job = {"TrainingJobStatus": "Completed", "ModelArtifacts": {"S3ModelArtifacts": MODEL_DATA},
           "OutputDataConfig": {"S3OutputPath": f"s3://{BUCKET}/", "CompressionType": "GZIP"},
           "AlgorithmSpecification": {"TrainingImage": "stub", "TrainingInputMode": "File"},
           "HyperParameters": {}, "RoleArn": ROLE}
    sess.describe_training_job.return_value = job
    sess.sagemaker_client.describe_training_job.return_value = job
    for name in ("train", "create_model", "endpoint_from_production_variants", "create_endpoint_config",
                 "create_endpoint", "transform"):
        getattr(sess, name).side_effect = record(name)
    def invoke_endpoint_async(**kw):  # SageMaker queues it; the answer will be at OutputLocation
        calls.append({"call": "invoke_endpoint_async", "kwargs": json.loads(json.dumps(kw, default=str))})
        return {"InferenceId": "stub-inference-1",
                "OutputLocation": f"s3://{BUCKET}/medpipe/async-out/stub-inference-1.out"}

    sess.sagemaker_runtime_client.invoke_endpoint_async.side_effect = invoke_endpoint_async
    if endpoint:
        sess.sagemaker_runtime_client.invoke_endpoint.side_effect = invoke_endpoint
    else:
        sess.sagemaker_runtime_client.invoke_endpoint.side_effect = lambda **kw: (_ for _ in ()).throw(
            RuntimeError("no endpoint given to this run"))
    return sess


def main(argv: list[str]) -> int:
    readme, out = Path(argv[0]), Path(argv[1])
    endpoint = argv[argv.index("--endpoint") + 1] if "--endpoint" in argv else None
    blocks = readme_blocks(readme)
    if not blocks:
        raise SystemExit(f"{readme}: no sagemaker_*.py example (or block marked {MARK})")
    calls: list = []
    results = []
    sess = stub_session(out.parent, calls, endpoint)
    import sagemaker
    import sagemaker.estimator
    import sagemaker.model
    import sagemaker.session

    patches = [mock.patch.object(m, "Session", return_value=sess) for m in
               (sagemaker, sagemaker.session, sagemaker.estimator, sagemaker.model)]
    ns = {"role": ROLE, "bucket": BUCKET, "__name__": "__readme__"}
    with loopback_only():
        for p in patches:
            p.start()
        try:
            for i, code in enumerate(blocks):
                if not endpoint and "predictor.predict" in code:
                    code = code.split("with open(")[0]  # the invoke part needs the served model
                n = len(calls)
                exec(compile(code, f"SageMaker example {i + 1}", "exec"), ns)  # noqa: S102 - the project's own examples
                results.append({"block": i + 1, "calls": calls[n:]})
        finally:
            for p in patches:
                p.stop()
    outcome = {"blocks": results, "sdk_version": sagemaker.__version__,
               "result": json.loads(json.dumps(ns.get("result"), default=str)) if "result" in ns else None}
    out.write_text(json.dumps(outcome, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
