"""medpipe against the real SageMaker pieces: the SDK 2.x, the training toolkit, the inference toolkit
with TorchServe, and pip's resolver over the container dependency list.

They run from the toolkit venv ``.venv-sm`` that ``make test`` builds (``make sagemaker-venv``); where it
could not be built, or Java (for TorchServe) is missing, the tests skip with that reason. Only AWS
is emulated: S3 and the SageMaker API at the SDK's session boundary (tests/sagemaker_readme.py), the
S3 download of the source tarball (the SDK's own tarball is handed to the toolkit as a local file)
and the tar of SM_MODEL_DIR that SageMaker does after a job. One training job and one TorchServe
start are shared by the tests of this module.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMVENV = ROOT / ".venv-sm"
SMPY = SMVENV / "bin" / "python"
# the job trains with the patient metadata the HAM10000 download carries: the endpoint then answers requests with
# and without it (without: the image-only fallback, what the image-only tests below ask)
TINY_HPS = {"model": "densenet-test", "epochs": "1", "image-size": "32", "batch-size": "8", "bootstrap": "20", "threads": "1",
            "metadata": "auto"}


def _toolkits_missing() -> str | None:
    if (SMVENV / "FAILED").is_file():
        return "the toolkit venv could not be built: " + (SMVENV / "FAILED").read_text()[-300:]
    if not SMPY.is_file():
        return f"{SMVENV} is missing: run `make sagemaker-venv` (make test builds it)"
    probe = "import sagemaker, sagemaker_training, sagemaker_pytorch_container, sagemaker_inference, " \
            "sagemaker_pytorch_serving_container, ts, monai; assert sagemaker.__version__.startswith('2.')"
    r = subprocess.run([str(SMPY), "-c", probe], capture_output=True, text=True, timeout=120)
    return None if r.returncode == 0 else f"the toolkit venv is incomplete: {r.stderr.strip()[-300:]}"


MISSING = _toolkits_missing()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("SM_")}
    env.update(PATH=f"{SMVENV / 'bin'}:{env.get('PATH', '')}", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               SAGEMAKER_SUPPRESS_V2_WARNING="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def clean_src(tmp_path_factory, synth_dir) -> Path:
    """The repository as `git archive` would give it (the README asks for a clean export as source_dir)."""
    dest = tmp_path_factory.mktemp("src") / "medpipe"
    r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                       capture_output=True, timeout=60)
    if r.returncode != 0:
        pytest.skip("not a git checkout: cannot make the clean source folder the README asks for")
    for rel in filter(None, r.stdout.decode().split("\0")):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    shutil.copy(sorted((synth_dir / "HAM10000_images_part_1").glob("*.jpg"))[0], dest / "ISIC_0024306.jpg")
    return dest


def _run_readme(clean_src: Path, out: Path, endpoint: str | None = None) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(SMPY), str(clean_src / "tests" / "sagemaker_readme.py"), str(clean_src / "docs" / "examples"), str(out)]
    r = subprocess.run(cmd + (["--endpoint", endpoint] if endpoint else []), cwd=clean_src, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def sdk(clean_src, tmp_path_factory) -> dict:
    return _run_readme(clean_src, tmp_path_factory.mktemp("sdk") / "sdk.json")


def _calls(sdk: dict, block: int, name: str) -> list[dict]:
    return [c["kwargs"] for c in sdk["blocks"][block - 1]["calls"] if c["call"] == name]


def test_readme_objects_are_valid_for_sdk2(sdk):
    assert sdk["sdk_version"].startswith("2.") and len(sdk["blocks"]) == 5
    train = _calls(sdk, 1, "train")[0]
    assert train["image_uri"].endswith("pytorch-training:2.8.0-gpu-py312")
    assert train["checkpoint_s3_uri"].endswith("/medpipe/checkpoints")
    hps = train["hyperparameters"]
    assert hps["sagemaker_program"] == '"sagemaker_entry.py"' and hps["budget"] == '"2h"'
    # deploy: the job's own model.tar.gz, no repack (no upload), the handler module named
    model = _calls(sdk, 2, "create_model")[0]["container_defs"]
    assert model["ModelDataUrl"].endswith("/output/model.tar.gz") and not _calls(sdk, 2, "s3_upload")
    assert model["Image"].endswith("pytorch-inference:2.6.0-cpu-py312")
    assert model["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py"
    assert _calls(sdk, 2, "endpoint_from_production_variants")
    transform = _calls(sdk, 3, "transform")[0]
    assert transform["strategy"] == "SingleRecord" and transform["input_config"]["ContentType"] == "image/jpeg"
    assert "SplitType" not in transform["input_config"]
    ddp = _calls(sdk, 4, "train")[0]
    assert ddp["hyperparameters"]["sagemaker_torch_distributed_enabled"] == "true"
    assert ddp["resource_config"]["InstanceCount"] == 2


def test_async_deploy_block_is_valid_for_sdk2(sdk):
    """docs/examples/sagemaker_5_async.py: the SDK's AsyncInferenceConfig reaches the endpoint config, the
    model's environment raises TorchServe's limits, and predict_async invokes the asynchronous API."""
    from medpipe.serve.profiles import ASYNC_MAX_CONCURRENT_INVOCATIONS, ASYNC_MAX_PAYLOAD_MB

    model = _calls(sdk, 5, "create_model")[0]["container_defs"]
    env = model["Environment"]
    assert env["MEDPIPE_SERVE_PROFILE"] == "async" and env["SAGEMAKER_PROGRAM"] == "inference.py"
    assert int(env["TS_MAX_REQUEST_SIZE"]) == ASYNC_MAX_PAYLOAD_MB * 1024 * 1024
    assert int(env["TS_DEFAULT_RESPONSE_TIMEOUT"]) == 3600
    assert model["ModelDataUrl"].endswith("/output/model.tar.gz") and not _calls(sdk, 5, "s3_upload")
    config = _calls(sdk, 5, "endpoint_from_production_variants")[0]["async_inference_config_dict"]
    assert config["OutputConfig"]["S3OutputPath"].endswith("/medpipe/async-out")
    assert config["ClientConfig"]["MaxConcurrentInvocationsPerInstance"] == ASYNC_MAX_CONCURRENT_INVOCATIONS
    invoke = _calls(sdk, 5, "invoke_endpoint_async")[0]
    assert invoke["InputLocation"].startswith("s3://") and invoke["Accept"] == "application/json"


@pytest.fixture(scope="module")
def job(sdk, synth_dir, tmp_path_factory) -> dict:
    """The SDK's source tarball and hyperparameters run by the real training toolkit under an emulated /opt/ml."""
    train = _calls(sdk, 1, "train")[0]
    upload = _calls(sdk, 1, "s3_upload")[0]["file"]
    base = tmp_path_factory.mktemp("job") / "opt_ml"
    cfg = base / "input" / "config"
    cfg.mkdir(parents=True)
    shutil.copytree(synth_dir, base / "input" / "data" / "train" / "ham", ignore=shutil.ignore_patterns("*.zip"))
    hps = dict(train["hyperparameters"])
    hps.update({k: json.dumps(v) if not v.isdigit() else v for k, v in TINY_HPS.items()})  # tiny, SDK-encoded
    hps["sagemaker_submit_directory"] = json.dumps(upload)  # the S3 download, emulated
    (cfg / "hyperparameters.json").write_text(json.dumps(hps))
    (cfg / "resourceconfig.json").write_text(json.dumps({"current_host": "algo-1", "hosts": ["algo-1"],
                                                         "network_interface_name": "lo"}))
    (cfg / "inputdataconfig.json").write_text(json.dumps({"train": {"TrainingInputMode": "File",
                                                                    "S3DistributionType": "FullyReplicated"}}))
    env = _env(SAGEMAKER_BASE_DIR=str(base), SAGEMAKER_TRAINING_MODULE="sagemaker_pytorch_container.training:main",
               SM_STUDIO_LOCAL_MODE="true",  # no DNS lookup of algo-1
               MEDPIPE_SM_WORK=str(base.parent / "work"))
    r = subprocess.run([str(SMVENV / "bin" / "train")], cwd=base.parent, env=env, capture_output=True, text=True,
                       timeout=900)
    return {"base": base, "rc": r.returncode, "out": r.stdout + r.stderr, "train": train}


def test_training_toolkit_runs_the_job(job):
    assert job["rc"] == 0, job["out"][-5000:]
    base = job["base"]
    assert not (base / "output" / "failure").exists()
    model = base / "model"
    assert {p.name for p in model.iterdir()} == {"weights.safetensors", "model.json", "code"}
    assert (model / "code" / "inference.py").is_file() and (model / "code" / "requirements.txt").is_file()
    assert not list(model.rglob("*.tar.gz"))
    assert (base / "output" / "data" / "report" / "report.md").is_file()
    assert (base / "code" / "sagemaker_entry.py").is_file()  # the toolkit unpacked the SDK's tarball
    # the README's metric regexes match the job's real epoch lines
    for m in job["train"]["metric_definitions"]:
        values = re.findall(m["Regex"], job["out"])
        assert values and all(float(v) >= 0 for v in values), (m, job["out"][-2000:])


def _http(url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 60):
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


LAUNCH = """import sys
from sagemaker_pytorch_serving_container import serving, torchserve
torchserve.TS_CONFIG_FILE = sys.argv[1]  # /etc/sagemaker-ts.properties in the container
serving.main()
"""


@contextlib.contextmanager
def _toolkit_endpoint(job, model_env: dict, work: Path):
    """SM_MODEL_DIR tarred as SageMaker does, extracted fresh, served by the inference toolkit's start-up with
    the model's environment (``Model(env=...)``) on loopback ports."""
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs a Java runtime (.ci/run installs default-jre-headless)")
    if job["rc"] != 0:
        pytest.skip("the training job failed (see test_training_toolkit_runs_the_job)")
    work.mkdir(parents=True, exist_ok=True)
    with tarfile.open(work / "model.tar.gz", "w:gz") as tf:
        for p in sorted((job["base"] / "model").iterdir()):
            tf.add(p, arcname=p.name)
    base = work / "opt_ml"
    with tarfile.open(work / "model.tar.gz") as tf:
        tf.extractall(base / "model", filter="data")
    port, mport, metrics, grpc, grpc_m = (_free_port() for _ in range(5))
    # one pid file (in $TMPDIR) and one pair of gRPC ports (7070/7071 by default) per endpoint: two can run at once
    (work / "tmp").mkdir()
    env = _env(TMPDIR=str(work / "tmp"), TS_GRPC_INFERENCE_PORT=str(grpc), TS_GRPC_MANAGEMENT_PORT=str(grpc_m),
               SAGEMAKER_BASE_DIR=str(base), SAGEMAKER_BIND_TO_PORT=str(port), SAGEMAKER_MODEL_SERVER_WORKERS="1",
               TS_INFERENCE_ADDRESS=f"http://127.0.0.1:{port}", TS_MANAGEMENT_ADDRESS=f"http://127.0.0.1:{mport}",
               TS_METRICS_ADDRESS=f"http://127.0.0.1:{metrics}", **model_env)
    torch_before = subprocess.run([str(SMPY), "-m", "pip", "show", "torch"], capture_output=True, text=True).stdout
    log = open(work / "serve.log", "w")
    proc = subprocess.Popen([str(SMPY), "-c", LAUNCH, str(work / "ts.properties")], cwd=work, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if _http(url + "/ping", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None:
                break
            time.sleep(2)
        else:
            proc.poll()
        status = None
        try:
            status = _http(url + "/ping", timeout=5)[0]
        except OSError:
            pass
        logs = (work / "serve.log").read_text() + "".join(p.read_text()[-3000:] for p in (work / "logs").glob("*.log"))
        assert status == 200, f"TorchServe did not come up:\n{logs[-6000:]}"
        addresses = re.findall(r"(?:Inference|Management|Metrics) address: (\S+)", logs)
        assert addresses and all("//127.0.0.1:" in a for a in addresses), addresses  # loopback only
        yield {"url": url, "work": work, "base": base, "torch_before": torch_before, "session": proc.pid,
               "management": f"http://127.0.0.1:{mport}"}
    finally:
        subprocess.run(["torchserve", "--stop"], env=env, cwd=work, capture_output=True, timeout=60)
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()


@pytest.fixture(scope="module")
def endpoint(job, sdk, tmp_path_factory):
    """The deploy block's model (real-time endpoint), served by the toolkit."""
    with _toolkit_endpoint(job, _calls(sdk, 2, "create_model")[0]["container_defs"]["Environment"],
                           tmp_path_factory.mktemp("endpoint")) as ep:
        yield ep


def _assert_clean(body: bytes):
    text = body.decode("utf-8", "replace")
    assert "Traceback" not in text and ".py" not in text and "/tmp" not in text and "/work" not in text, text


def test_endpoint_answers_like_medpipe_predict(endpoint, job, clean_src, capsys, tmp_path):
    from medpipe.cli import main

    image = clean_src / "ISIC_0024306.jpg"
    assert _http(endpoint["url"] + "/ping")[0] == 200
    st, ctype, body = _http(endpoint["url"] + "/invocations", image.read_bytes(),
                            {"Content-Type": "image/jpeg", "Accept": "application/json"})
    assert st == 200 and ctype.startswith("application/json"), body[:500]
    served = json.loads(body)["predictions"][0]
    assert main(["predict", "--model", str(job["base"] / "model"), "--json", "--device", "cpu", str(image)]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert served["label"] == cli["label"]
    assert max(abs(served["probabilities"][c] - cli["probabilities"][c]) for c in cli["probabilities"]) < 1e-4
    # the README's deploy block, its predictor.predict forwarded to this endpoint
    sdk = _run_readme(clean_src, tmp_path / "sdk.json", endpoint["url"])
    assert sdk["result"]["predictions"][0]["label"] == cli["label"]
    # code/requirements.txt was installed at start-up and left the container's torch alone
    after = subprocess.run([str(SMPY), "-m", "pip", "show", "torch"], capture_output=True, text=True).stdout
    assert after == endpoint["torch_before"] and "Version: 2.13.0" in after


def test_endpoint_takes_metadata_like_the_predictor(endpoint, job, clean_src):
    """The documented JSON shape, {"images": [base64], "metadata": [{"age", "sex", "site"}]}, through the toolkit
    and TorchServe: the in-process probabilities within 1e-4; no metadata: the image-only fallback; a value
    outside the vocabulary or range: 400 naming the image and the field, as JSON without internals."""
    import base64

    from medpipe.infer.predictor import Predictor

    image = (clean_src / "ISIC_0024306.jpg").read_bytes()
    predictor = Predictor(job["base"] / "model", device="cpu")
    assert predictor.metadata_spec is not None and predictor.metadata_spec.fields == ("age", "sex", "site")
    given = {"age": 70, "sex": "male", "site": "face"}
    headers = {"Content-Type": "application/json", "Accept": "application/json"}

    def invoke(metadata):
        request = {"images": [base64.b64encode(image).decode()], **({"metadata": metadata} if metadata else {})}
        return _http(endpoint["url"] + "/invocations", json.dumps(request).encode(), headers)

    for metadata, values in (([given], given), (None, None), ([None], None)):
        st, _, body = invoke(metadata)
        assert st == 200, body[:500]
        got = json.loads(body)["predictions"][0]["probabilities"]
        want = predictor.predict_bytes([image], metadata=[values])[0].probabilities
        assert max(abs(got[c] - want[c]) for c in want) < 1e-4, (metadata, got, want)
    for bad, field in (({"site": "moon"}, "site: 'moon'"), ({"age": 400}, "age")):
        st, ctype, body = invoke([bad])
        assert st == 400 and ctype.startswith("application/json"), body[:500]
        err = json.loads(body)
        assert err["error"] == "invalid_metadata" and f"images[0]: {field}" in err["message"], err
        _assert_clean(body)


def test_endpoint_client_errors_are_json_without_traceback(endpoint, clean_src):
    from PIL import Image
    import io

    image = (clean_src / "ISIC_0024306.jpg").read_bytes()
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    cases = [(image[: len(image) // 2], "image/jpeg", "application/json", 400),
             (gif.getvalue(), "image/gif", "application/json", 415),
             (gif.getvalue(), "image/jpeg", "application/json", 415),
             (image, "image/jpeg", "application/xml", 406)]
    for body, ctype, accept, status in cases:
        st, rtype, out = _http(endpoint["url"] + "/invocations", body, {"Content-Type": ctype, "Accept": accept})
        assert st == status, (ctype, accept, st, out[:300])
        err = json.loads(out)
        assert set(err) >= {"error", "message"} and rtype.startswith("application/json")
        _assert_clean(out)


def big_camera_jpeg(noise: int = 16, w: int = 6000, h: int = 4000) -> bytes:
    """A 24 MP camera-like JPEG of about 55 MB: smooth shading plus sensor noise, quality 100, no chroma
    subsampling (what a dermatoscope's 'fine' setting writes)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(60, 190, (h // 100, w // 100, 3), dtype=np.uint8))
    arr = np.asarray(small.resize((w, h), Image.Resampling.BILINEAR)).copy()
    tile = rng.integers(0, 2 * noise + 1, (509, 511, 3), dtype=np.uint8)
    arr += np.tile(tile, (h // 509 + 1, w // 511 + 1, 1))[:h, :w]
    arr -= noise
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=100, subsampling=0)
    return buf.getvalue()


def _declared_status(url: str, length: int) -> int:
    """The status a server answers to a POST /invocations that declares ``length`` bytes, before any is sent
    (sending them to a server that already refused would end in a connection reset)."""
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"POST /invocations HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\n"
                  f"Content-Length: {length}\r\n\r\n".encode())
        return int(s.recv(4096).split(b" ", 2)[1])


def _worker_peak_mb(session: int) -> dict[int, float]:
    """VmHWM (peak resident MB) of each TorchServe Python worker of the endpoint's process session."""
    peaks = {}
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or os.getsid(int(proc.name)) != session:
                continue
            if b"model_service_worker" not in (proc / "cmdline").read_bytes():
                continue
            hwm = re.search(r"VmHWM:\s+(\d+) kB", (proc / "status").read_text())
            peaks[int(proc.name)] = int(hwm.group(1)) / 1024
        except (OSError, AttributeError):
            continue
    return peaks


def test_async_endpoint_answers_a_55mb_24mp_jpeg(job, sdk, endpoint, tmp_path, capsys):
    """The async deploy block's model environment, served by the real toolkit and TorchServe: TorchServe's
    body limit raised by TS_MAX_REQUEST_SIZE, a 24 MP JPEG of ~55 MB is answered like `medpipe predict` answers
    it, within a stated peak memory of the worker; the real-time endpoint (TorchServe's 6.5 MB default) refuses
    it 413, and a bomb of the same bytes (its header declaring 65000x65000) is refused 413 from the header."""
    from medpipe.cli import main
    from tests.test_large_images import jpeg_declaring

    big = big_camera_jpeg()
    assert len(big) > 50 * 1024 * 1024
    headers = {"Content-Type": "image/jpeg", "Accept": "application/json"}
    assert _declared_status(endpoint["url"], len(big)) == 413  # TorchServe's 6.5 MB default, from the header
    model_env = _calls(sdk, 5, "create_model")[0]["container_defs"]["Environment"]
    with _toolkit_endpoint(job, model_env, tmp_path / "async") as ep:
        described = json.loads(_http(ep["management"] + "/models/model")[2])[0]
        assert described["responseTimeout"] == 3600, described  # TS_DEFAULT_RESPONSE_TIMEOUT reached TorchServe
        small = big_camera_jpeg(w=600, h=400)  # the worker loads the model on its first request: then measure
        assert _http(ep["url"] + "/invocations", small, headers)[0] == 200
        before = _worker_peak_mb(ep["session"])
        st, ctype, body = _http(ep["url"] + "/invocations", big, headers, timeout=300)
        assert st == 200 and ctype.startswith("application/json"), body[:500]
        after = _worker_peak_mb(ep["session"])
        st_bomb, _, bomb_body = _http(ep["url"] + "/invocations", jpeg_declaring(big, 65000, 65000), headers)
    assert before and after.keys() == before.keys()
    grew = max(after[p] - before[p] for p in after)
    # measured: +107 MB for the 54.7 MB body (463 -> 570 MB): the body's copies between TorchServe's socket, the
    # toolkit and the handler; the image itself is decoded at 750x500 (a full 24 MP decode alone is 69 MB more)
    assert grew < 5 * len(big) / 2**20, grew
    assert st_bomb == 413 and json.loads(bomb_body)["error"] == "image_too_large", bomb_body[:300]
    served = json.loads(body)["predictions"][0]
    (tmp_path / "big.jpg").write_bytes(big)
    model = str(job["base"] / "model")
    assert main(["predict", "--model", model, "--json", "--device", "cpu", str(tmp_path / "big.jpg")]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert served["label"] == cli["label"]
    assert max(abs(served["probabilities"][c] - cli["probabilities"][c]) for c in cli["probabilities"]) < 1e-4
    print(f"worker peak RSS {max(before.values()):.0f} -> {max(after.values()):.0f} MB for a {len(big) / 1e6:.1f} MB "
          f"body (+{grew:.0f} MB)")
