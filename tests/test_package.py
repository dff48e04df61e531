"""The model package trusted only after checking: model.json against a schema, strict JSON everywhere,
deterministic weight hashes, and files that respect the umask (inside the SageMaker tarball too)."""

import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from medpipe.cli import main
from medpipe.errors import PackageError
from medpipe.package import META, read_meta, save_package

ROOT = Path(__file__).resolve().parents[1]


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    """A real package of an untrained 2-class model at 32x32 (NaN in its metrics, as a class absent from
    a split gives)."""
    import torch

    from medpipe.models import create_model
    from medpipe.preprocess import PreprocessSpec

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("pkg") / "model"
    save_package(out, create_model("densenet121", 2), name="t", arch="densenet121", classes=["benign", "malignant"],
                 spec=PreprocessSpec(image_size=32, interpolation="bilinear"), temperature=1.5,
                 metrics={"val": {"macro_auc": float("nan"), "macro_auc_ci95": [float("nan"), float("inf")]}})
    return out


def test_model_json_is_strict_json_with_null_for_nan(package):
    meta = _strict((package / META).read_text())
    assert meta["metrics"]["val"]["macro_auc"] is None and meta["metrics"]["val"]["macro_auc_ci95"] == [None, None]


@pytest.mark.parametrize("key, value, says", [
    ("calibration.temperature", 0, "'calibration.temperature' must be a finite number > 0"),
    ("calibration.temperature", -1.0, "'calibration.temperature' must be a finite number > 0"),
    ("classes", ["a", "a"], "'classes' must be a list of at least 2 distinct class names"),
    ("classes", ["a", "=cmd()"], "'classes' must be"),
    ("preprocessing.interpolation", "cubicish", "'preprocessing.interpolation' must be a known interpolation"),
    ("preprocessing.image_size", 0, "'preprocessing.image_size' must be an integer in [8, 4096]"),
    ("preprocessing.image_size", "32", "'preprocessing.image_size' must be an integer"),
    ("preprocessing.std", [0.2, 0, 0.2], "'preprocessing.std' must be 3 finite numbers > 0"),
    ("num_classes", 3, "'num_classes' is 3 but 'classes' lists 2"),
    ("architecture", "alexnet", "'architecture' must be one of the registered models"),
    ("weights_sha256", "abc", "'weights_sha256' must be 64 lowercase hex digits"),
    ("classes", None, "missing key 'classes'"),
    ("calibration", None, "missing key 'calibration'"),
])
def test_tampered_model_json_refused_naming_the_key(package, tmp_path, key, value, says, capsys):
    bad = tmp_path / "model"
    shutil.copytree(package, bad)
    meta = json.loads((bad / META).read_text())
    *parents, last = key.split(".")
    node = meta
    for p in parents:
        node = node[p]
    if value is None:
        del node[last]
    else:
        node[last] = value
    (bad / META).write_text(json.dumps(meta))
    with pytest.raises(PackageError) as exc:
        read_meta(bad)
    assert says in str(exc.value), str(exc.value)
    # the command line: a clear message, exit 2 (not 'internal error')
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8")  # an input that exists: predict checks inputs before the model
    assert main(["predict", "--model", str(bad), str(tmp_path / "x.jpg")]) == 2
    err = capsys.readouterr().err
    assert says in err and "internal error" not in err


def test_server_refuses_to_start_on_a_bad_model_json(package, tmp_path):
    pytest.importorskip("uvicorn")
    bad = tmp_path / "model"
    shutil.copytree(package, bad)
    meta = json.loads((bad / META).read_text())
    meta["calibration"]["temperature"] = 0
    (bad / META).write_text(json.dumps(meta))
    from tests._server import free_port

    r = subprocess.run([sys.executable, "-m", "medpipe", "serve", "--model", str(bad), "--port", str(free_port())],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "'calibration.temperature' must be a finite number > 0" in r.stderr and "Traceback" not in r.stderr
    assert "Uvicorn running" not in r.stderr


def test_weights_hash_is_the_same_in_every_process(tmp_path):
    """Identical weights saved by separate processes give byte-identical files (safetensors writes its
    metadata map in a per-process hash order, so more than one metadata key made the hash vary)."""
    code = ("import sys, torch; from medpipe.package import weights_bytes; import hashlib; torch.manual_seed(0); "
            "state = {f'layer{i}.weight': torch.randn(4, 3) for i in range(8)}; "
            "state['step'] = torch.tensor(3); print(hashlib.sha256(weights_bytes(state)).hexdigest())")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}) for seed in range(4)]
    hashes = {p.communicate(timeout=300)[0].strip() for p in procs}
    assert len(hashes) == 1 and len(next(iter(hashes))) == 64


@pytest.mark.parametrize("umask, want", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_respect_the_umask_inside_tarballs_too(package, tmp_path, umask, want):
    from medpipe.utils import atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        pkg = tmp_path / "model"
        shutil.copytree(package, pkg)
        (pkg / "model.tar.gz").unlink(missing_ok=True)
        for name in ("weights.safetensors", META):  # rewrite the package's files under this umask
            data = (pkg / name).read_bytes()
            (pkg / name).unlink()
            from medpipe.utils import atomic_write_bytes
            atomic_write_bytes(pkg / name, data)
        tarball = tmp_path / "model.tar.gz"
        assert main(["package", "--model", str(pkg), "--out", str(tarball)]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == want
    for f in (pkg / "weights.safetensors", pkg / META, tarball):
        assert f.stat().st_mode & 0o777 == want, f  # not mkstemp's 0600 whatever the umask
    with tarfile.open(tarball) as tar:  # inside: readable by the serving user the toolkit runs as
        modes = {m.name: m.mode & 0o777 for m in tar.getmembers() if m.isfile()}
    assert modes and all(m & 0o444 == 0o444 for m in modes.values()), modes


def test_every_json_file_of_a_run_parses_strictly(trained_run):
    files = [p for p in trained_run.rglob("*") if p.suffix in (".json", ".jsonl")]
    assert any(p.name == META for p in files) and any(p.name == "report.json" for p in files)
    for p in files:
        for line in ([p.read_text()] if p.suffix == ".json" else p.read_text().splitlines()):
            _strict(line)


def test_json_safe_replaces_every_non_finite_number():
    import numpy as np

    from medpipe.utils import to_json

    text = to_json({"a": float("nan"), "b": [np.float32("inf"), np.float64(1.5), -math.inf], "c": {"d": 2}})
    assert _strict(text) == {"a": None, "b": [None, 1.5, None], "c": {"d": 2}}
