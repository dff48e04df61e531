"""The container image (Containerfile) built and run with podman: SageMaker's bring-your-own-container contract
(`train` on an /opt/ml tree, `serve` from /opt/ml/model), KServe's Open Inference Protocol probes, the SDK's
Estimator/Model(image_uri=...) of docs/guides/containers.md, non-root + read-only root filesystem, SIGTERM.

The image build and the podman constraints of this machine live in tests/container_image.py. Every test
that runs a container skips with the reason where podman, runc or debootstrap is missing or cannot run one.
The entry module's own tests (first below) need no container.
"""

import base64
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from medpipe.sagemaker import container
from tests import container_image as ci

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guides" / "containers.md"
SMVENV = ROOT / ".venv-sm"
TINY_HPS = {"model": "densenet-test", "epochs": "1", "image-size": "32", "batch-size": "8", "bootstrap": "20",
            "threads": "1"}
UID = "1000"
TAG = f"medpipe-test-{os.getpid()}"
# the root filesystem read-only, and nothing else writable but a tmpfs at /tmp (a Kubernetes emptyDir)
READ_ONLY = ["--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp:rw,mode=1777"]


# ---- the entry module, without a container

def test_entry_serve_is_medpipe_serve_on_sagemakers_port(monkeypatch, tmp_path):
    import medpipe.cli

    seen = []
    monkeypatch.setattr(medpipe.cli, "serve", lambda cfg: seen.append(cfg) or 0)
    monkeypatch.delenv("MEDPIPE_HOST", raising=False)
    monkeypatch.delenv("MEDPIPE_PORT", raising=False)
    monkeypatch.setenv("SM_MODEL_DIR", str(tmp_path))
    monkeypatch.delenv("SAGEMAKER_BIND_TO_PORT", raising=False)
    assert container.main(["serve"]) == 0
    monkeypatch.setenv("SAGEMAKER_BIND_TO_PORT", "9123")
    assert container.main(["serve", "--max-batch", "4"]) == 0
    assert [(c.host, c.port, c.model) for c in seen] == [("0.0.0.0", 8080, str(tmp_path)),
                                                        ("0.0.0.0", 9123, str(tmp_path))]
    assert seen[1].max_batch == 4


def test_entry_train_is_the_script_mode_entry(monkeypatch):
    from medpipe.sagemaker import training

    seen = []
    monkeypatch.setattr(training, "main", lambda argv=None: seen.append(argv) or 7)
    assert container.main(["train", "--epochs", "2"]) == 7 and seen == [["--epochs", "2"]]


def test_entry_usage_and_other_commands(capsys):
    assert container.main([]) == 2 and "serve" in capsys.readouterr().err
    assert container.main(["--version"]) == 0 and capsys.readouterr().out.strip()


# ---- the image

def _podman(*args, timeout=300, check=True):
    return ci.podman(*args, timeout=timeout, check=check)


def _get(url: str, timeout: float = 5.0):
    try:
        r = httpx.get(url, timeout=timeout)
    except httpx.HTTPError:
        return None
    return r.status_code


@pytest.fixture(scope="module")
def image() -> str:
    reason = ci.unavailable()
    if reason:
        pytest.skip(f"containers cannot run here: {reason}")
    t = time.monotonic()
    ci.build()
    print(f"image {ci.IMAGE}: built in {time.monotonic() - t:.0f} s, {ci.image_size() / 1e6:.0f} MB")
    return ci.IMAGE


@pytest.fixture(scope="module")
def trained(image, synth_dir, tmp_path_factory) -> Path:
    """`docker run IMAGE train` on a synthetic /opt/ml tree (read-only root filesystem): the package in /opt/ml/model."""
    base = tmp_path_factory.mktemp("byoc") / "opt_ml"
    cfg = base / "input" / "config"
    cfg.mkdir(parents=True)
    shutil.copytree(synth_dir, base / "input" / "data" / "train" / "ham", ignore=shutil.ignore_patterns("*.zip"))
    (cfg / "hyperparameters.json").write_text(json.dumps(TINY_HPS))  # SageMaker writes every value as a string
    (cfg / "resourceconfig.json").write_text(json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]}))
    for sub in ("model", "output", "checkpoints"):
        (base / sub).mkdir()
    subprocess.run(["chown", "-R", f"{UID}:{UID}", str(base)], check=True, timeout=60)
    r = _podman("run", "--rm", *ci.RUN_FLAGS, *READ_ONLY, "-v", f"{base}:/opt/ml", image, "train",
                timeout=900, check=False)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "epoch=1 train_loss=" in r.stdout
    assert {"weights.safetensors", "model.json", "code"} <= {p.name for p in (base / "model").iterdir()}
    assert not (base / "output" / "failure").exists()
    return base


def _start(image: str, name: str, model: Path, *args: str) -> tuple[int, list]:
    """`serve` detached, the model volume at /opt/ml/model, on a free port (another one if a process elsewhere
    took it meanwhile: the host network is shared); /ping polled from the start. Returns (port, answers seen)."""
    for _attempt in range(3):
        port = ci.free_port()
        _podman("rm", "-f", name, check=False)
        _podman("run", "-d", "--name", name, *ci.RUN_FLAGS, *READ_ONLY, "-e", f"SAGEMAKER_BIND_TO_PORT={port}",
                "-v", f"{model}:/opt/ml/model:ro", image, "serve", *args)
        seen, deadline = [], time.monotonic() + 300
        while time.monotonic() < deadline:
            status = _get(f"http://127.0.0.1:{port}/ping", timeout=2)
            seen.append(status)
            if status == 200:
                return port, seen
            if _podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip() != "running":
                break
            time.sleep(0.2)
        logs = _podman("logs", name, check=False)
        _podman("rm", "-f", name, check=False)
        if "already in use" not in logs.stderr:
            break
    raise AssertionError(f"the server never answered /ping 200 (seen {seen[-5:]}): {(logs.stdout + logs.stderr)[-3000:]}")


@pytest.fixture(scope="module")
def server(image, trained):
    name = f"{TAG}-serve"
    port, seen = _start(image, name, trained / "model", "--backend", "onnx")
    yield {"name": name, "url": f"http://127.0.0.1:{port}", "ping_seen": seen}
    _podman("rm", "-f", name, check=False)


def _images(synth_dir: Path, n: int = 3) -> list[Path]:
    return sorted((synth_dir / "HAM10000_images_part_1").glob("*.jpg"))[:n]


@pytest.mark.slow
def test_image_is_labelled_non_root_read_only_without_compilers(image, server):
    info = json.loads(_podman("image", "inspect", image).stdout)[0]
    labels = info["Config"]["Labels"]
    from medpipe import __version__

    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0" and labels["org.opencontainers.image.source"]
    assert info["Config"]["User"] == f"{UID}:{UID}"
    probe = ("id -u; for c in gcc cc g++ clang; do command -v $c && echo COMPILER; done; "
             "touch /opt/medpipe/x 2>/dev/null && echo ROOTFS-WRITABLE; touch /tmp/x && echo TMP-OK")
    r = _podman("run", "--rm", *ci.RUN_FLAGS, *READ_ONLY, "--entrypoint", "sh", image, "-c", probe, timeout=120)
    assert r.stdout.split() == [UID, "TMP-OK"], r.stdout
    # the running server: the same user, and its root filesystem read-only
    r = _podman("exec", server["name"], "sh", "-c", "id -u; touch /home/medpipe/x 2>/dev/null || echo READ-ONLY")
    assert r.stdout.split() == [UID, "READ-ONLY"]


@pytest.mark.slow
def test_served_equals_medpipe_predict_outside(server, trained, synth_dir, capsys):
    from medpipe.cli import main

    # /ping was polled from the container's start: nothing before the model was loaded answered 200
    assert server["ping_seen"][-1] == 200 and 200 not in server["ping_seen"][:-1] and len(server["ping_seen"]) > 1
    images = _images(synth_dir)
    served = []
    for path in images:
        r = httpx.post(server["url"] + "/invocations", content=path.read_bytes(), timeout=60,
                       headers={"Content-Type": "image/jpeg", "Accept": "application/json"})
        assert r.status_code == 200, r.text[:500]
        served.append(r.json()["predictions"][0])
    model = trained / "model"
    assert main(["predict", "--model", str(model), "--json", "--device", "cpu", "--backend", "onnx",
                 *map(str, images)]) == 0
    outside = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()[-len(images):]]
    for s, o in zip(served, outside):
        assert s["label"] == o["label"]
        assert max(abs(s["probabilities"][c] - o["probabilities"][c]) for c in o["probabilities"]) < 1e-5
    r = httpx.get(server["url"] + "/execution-parameters", timeout=10)
    assert r.status_code == 200 and r.json()["BatchStrategy"]


def _guide_blocks(kind: str) -> list[str]:
    return re.findall(r"```" + kind + r"\n(.*?)```", GUIDE.read_text(), flags=re.S)


@pytest.mark.slow
def test_kserve_manifest_probes_and_open_inference_protocol(server, trained, synth_dir):
    from medpipe.package import read_meta

    manifests = [d for block in _guide_blocks("yaml") for d in yaml.safe_load_all(block)
                 if d and d.get("kind") == "InferenceService"]
    assert len(manifests) == 1
    (predictor,) = manifests[0]["spec"]["predictor"]["containers"]
    assert predictor["args"][0] == "serve" and predictor["ports"][0]["containerPort"] == 8080
    probes = [predictor[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe")]
    assert sorted(probes) == ["/v2/health/live", "/v2/health/ready"]
    assert predictor["securityContext"]["readOnlyRootFilesystem"] is True
    for path in probes:
        assert _get(server["url"] + path) == 200, path
    # one image through /v2/models/{name}/infer and through /invocations: the same probabilities
    meta = read_meta(trained / "model")
    jpeg = _images(synth_dir, 1)[0].read_bytes()
    body = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(jpeg).decode()]}]}
    r = httpx.post(f"{server['url']}/v2/models/{meta.name}/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text[:500]
    probs = next(o for o in r.json()["outputs"] if o["name"] == "probabilities")["data"]
    sm = httpx.post(server["url"] + "/invocations", content=jpeg, headers={"Content-Type": "image/jpeg"}, timeout=60)
    expected = sm.json()["predictions"][0]["probabilities"]
    assert max(abs(p - expected[c]) for p, c in zip(probs, meta.classes)) < 1e-6


@pytest.mark.slow
def test_sdk_estimator_and_model_with_image_uri(server, synth_dir, tmp_path, capsys):
    """The guide's SageMaker SDK blocks, run by the real SDK against a stub session; the deployed predictor's
    request is forwarded to this container's /invocations."""
    py = SMVENV / "bin" / "python"
    if not py.is_file() or (SMVENV / "FAILED").is_file():
        pytest.skip(f"{SMVENV}: the SageMaker SDK venv is missing or failed (make sagemaker-venv)")
    shutil.copy(_images(synth_dir, 1)[0], tmp_path / "ISIC_0024306.jpg")
    out = tmp_path / "sdk.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("SM_")}
    r = subprocess.run([str(py), str(ROOT / "tests" / "sagemaker_readme.py"), str(GUIDE), str(out), "--endpoint",
                        server["url"]], cwd=tmp_path, env={**env, "SAGEMAKER_SUPPRESS_V2_WARNING": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    sdk = json.loads(out.read_text())
    calls = [c for b in sdk["blocks"] for c in b["calls"]]
    train = next(c["kwargs"] for c in calls if c["call"] == "train")
    model = next(c["kwargs"] for c in calls if c["call"] == "create_model")["container_defs"]
    assert train["image_uri"] == model["Image"] and train["image_uri"].endswith("/medpipe:0.1.0")
    assert "sagemaker_program" not in train["hyperparameters"]  # your own container: no script mode
    assert train["input_config"][0]["ChannelName"] == "train"
    assert model["ModelDataUrl"].endswith("model.tar.gz")
    assert sdk["result"]["predictions"][0]["label"]


@pytest.mark.slow
def test_bad_model_volume_is_a_clear_error(image, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_text('{"format": 1')
    r = _podman("run", "--rm", *ci.RUN_FLAGS, *READ_ONLY, "-e", f"SAGEMAKER_BIND_TO_PORT={ci.free_port()}",
                "-v", f"{model}:/opt/ml/model:ro", image, "serve", timeout=300, check=False)
    assert r.returncode != 0
    assert "medpipe serve: error: /opt/ml/model/model.json: not valid JSON" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr + r.stdout


@pytest.mark.slow
def test_sigterm_exits_0_within_the_grace_period(server):
    """Last: it stops the shared server. `podman stop -t 30` sends SIGTERM and, 30 s later (SageMaker's grace
    period), SIGKILL: exit code 0 says the server drained and left by itself in time."""
    start = time.monotonic()
    _podman("stop", "-t", "30", server["name"], timeout=120)
    stopped = time.monotonic() - start
    code = _podman("inspect", "--format", "{{.State.ExitCode}}", server["name"]).stdout.strip()
    logs = _podman("logs", server["name"], check=False)
    print(f"SIGTERM: exit {code} after {stopped:.1f} s")
    assert code == "0", (logs.stdout + logs.stderr)[-2000:]
    assert "SIGTERM: not accepting new connections" in logs.stdout + logs.stderr


@pytest.mark.slow
def test_sigterm_during_start_up_is_not_lost(image, trained):
    """PID 1 ignores a signal it has no handler for: SIGTERM 2 s after the start (imports or model loading,
    or already serving on a quick machine) must end the container by itself (143 or 0), not by SIGKILL (137)."""
    name = f"{TAG}-early"
    _podman("rm", "-f", name, check=False)
    _podman("run", "-d", "--name", name, *ci.RUN_FLAGS, *READ_ONLY, "-e", f"SAGEMAKER_BIND_TO_PORT={ci.free_port()}",
            "-v", f"{trained / 'model'}:/opt/ml/model:ro", image, "serve")
    try:
        time.sleep(2)
        _podman("stop", "-t", "30", name, timeout=120)
        code = _podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        assert code in ("143", "0"), code
    finally:
        _podman("rm", "-f", name, check=False)
