"""`medpipe batch --engine ray` on a real local Ray cluster (``ray.cluster_utils.Cluster``: a head and a worker
node, separate raylets, as Ray's own tests start them): the same rows as the local engine, a rerun that redoes
only missing or broken shards, every item answered exactly once when the worker node is killed mid-job, and a
local `medpipe batch` that never imports Ray. One cluster for the module (start-up is the slow part)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'medpipe-imaging[ray]')")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'medpipe-imaging[ray]')")

from medpipe.cli import main  # noqa: E402
from tests.s3server import s3_env, s3_server  # noqa: E402,F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
IMAGES = 240
SHARD = 12
SLOW_SHARD_S = 0.1  # each shard an actor answers takes this much longer (tests.slow.ray_slow_shards)


@pytest.fixture(scope="module")
def cluster(request):
    from ray.cluster_utils import Cluster

    try:  # the S3 test server's AWS_* settings go to every Ray worker (the nodes read s3:// inputs themselves)
        s3 = request.getfixturevalue("s3_server")
    except pytest.skip.Exception as exc:
        s3 = None
        s3_missing = str(exc)

    # a killed node is declared dead after ~2 s of missed health checks (the default waits much longer)
    fast_death = {"health_check_period_ms": 500, "health_check_timeout_ms": 500, "health_check_failure_threshold": 4}
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 150 * 2**20,
                                                      "include_dashboard": False, "_system_config": fast_death})
    worker = c.add_node(num_cpus=1, object_store_memory=150 * 2**20)
    path = os.pathsep.join([str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    ray.init(address=c.address, logging_level="WARNING", runtime_env={
        "env_vars": {"PYTHONPATH": path, "MEDPIPE_TEST_RAY_SLOW_S": str(SLOW_SHARD_S), **(s3.env if s3 else {})},
        "worker_process_setup_hook": "tests.slow.ray_slow_shards"})
    c.wait_for_nodes()
    c.worker = worker
    c.s3_missing = None if s3 else s3_missing
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny package, IMAGES small images (PNG and JPEG) plus a corrupt and an empty one, and the local
    engine's answer to compare with."""
    import torch
    from PIL import Image

    from medpipe.batch import run_batch
    from medpipe.models import create_model
    from medpipe.package import save_package
    from medpipe.preprocess import PreprocessSpec

    root = tmp_path_factory.mktemp("rayjob")
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        folder = root / "images" / f"site{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (30 + i % 7, 40, 3), np.uint8)).save(
            folder / f"img{i:04d}.{'jpg' if i % 4 == 0 else 'png'}")
    (root / "images" / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "images" / "empty.png").write_bytes(b"")
    torch.manual_seed(0)
    save_package(root / "pkg", create_model("densenet-test", 3).eval(), name="ray-test", arch="densenet-test",
                 classes=["a", "b", "c"], spec=PreprocessSpec(image_size=32))
    run_batch(str(root / "pkg"), str(root / "images"), str(root / "local"), shard_size=SHARD, workers=2)
    return root


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def _assert_same_rows(got: list[dict], want: list[dict]) -> None:
    assert [r["id"] for r in got] == [r["id"] for r in want]  # each item once, in listing order
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if k != "probabilities"} == {k: v for k, v in w.items()
                                                                        if k != "probabilities"}
        if "probabilities" in w:
            assert list(g["probabilities"]) == list(w["probabilities"])
            assert np.allclose(list(g["probabilities"].values()), list(w["probabilities"].values()), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def ray_out(cluster, job):
    out = job / "ray"
    rc = main(["batch", "--engine", "ray", "--ray-address", cluster.address, "--model", str(job / "pkg"),
               "--input", str(job / "images"), "--output", str(out), "--shard-size", str(SHARD), "--per-file"])
    assert rc == 0
    return out


def test_ray_engine_answers_as_the_local_engine(job, ray_out):
    want, got = _rows(job / "local"), _rows(ray_out)
    assert len(got) == IMAGES + 2
    _assert_same_rows(got, want)
    errors = {r["id"]: r["error"] for r in got if "error" in r}
    assert errors == {"corrupt.jpg": "unsupported_format", "empty.png": "empty_image"}
    state = json.loads((ray_out / "batch.json").read_text())
    assert state["engine"] == "ray" and state["ray_actors"] == 2 and state["predicted"] == IMAGES
    assert state["backend"] == json.loads((job / "local" / "batch.json").read_text())["backend"]
    csv_head = (ray_out / "predictions.csv").read_text().splitlines()[0]
    assert csv_head == (job / "local" / "predictions.csv").read_text().splitlines()[0]
    per_file = sorted(p.relative_to(ray_out).as_posix() for p in ray_out.rglob("*.out"))
    assert len(per_file) == IMAGES and per_file[0] == "site0/img0000.jpg.out"


def test_rerun_redoes_only_missing_or_broken_shards(cluster, job, ray_out, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(ray_out, out)
    shards = sorted((out / "shards").glob("part-*.jsonl"))
    assert len(shards) == -(-(IMAGES + 2) // SHARD)
    shards[2].unlink()
    shards[5].unlink()
    lines = shards[7].read_text().splitlines(keepends=True)
    shards[7].write_text("".join(lines[:5]) + lines[5][:20])  # a torn write (what an atomic rename prevents)
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for i, p in enumerate(shards) if i not in (2, 5, 7)}
    from medpipe.batch_ray import run_batch_ray

    s = run_batch_ray(str(job / "pkg"), str(job / "images"), str(out), address=cluster.address, shard_size=SHARD,
                      actors=1)
    assert s["predicted"] == IMAGES and s["errors"] == 2
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards if p.name in kept} == kept
    assert (out / "predictions.jsonl").read_bytes() == (ray_out / "predictions.jsonl").read_bytes()


def test_ray_engine_reads_an_s3_prefix(cluster, job, s3_env):
    """The decoding tasks read the objects from S3 themselves (a real S3 API server on loopback)."""
    if cluster.s3_missing:
        pytest.skip(cluster.s3_missing)
    from medpipe.batch_ray import run_batch_ray

    bucket = s3_env.bucket()
    s3_env.put_tree(job / "images" / "site1", f"s3://{bucket}/in/site1")
    s = run_batch_ray(str(job / "pkg"), f"s3://{bucket}/in", str(job / "from_s3"), address=cluster.address,
                      shard_size=SHARD, actors=1)
    assert s["predicted"] == IMAGES // 3 and s["errors"] == 0
    _assert_same_rows(_rows(job / "from_s3"), [r for r in _rows(job / "local") if r["id"].startswith("site1/")])


def test_ray_engine_carries_manifest_metadata_as_the_local_engine(cluster, tmp_path):
    """A package that takes patient metadata, a CSV manifest with age/sex/site columns: the actors encode each
    row's values as the local engine does (same rows; a value outside the vocabulary is an error row naming it)."""
    import torch
    from PIL import Image

    from medpipe.batch import run_batch
    from medpipe.batch_ray import run_batch_ray
    from medpipe.data.metadata import MetadataSpec
    from medpipe.models import create_model
    from medpipe.package import save_package
    from medpipe.preprocess import PreprocessSpec

    spec = MetadataSpec(fields=("age", "sex", "site"), sex=("female", "male"), site=("back", "face"))
    torch.manual_seed(1)
    save_package(tmp_path / "pkg", create_model("densenet-test", 3, metadata_dim=spec.dim).eval(), name="ray-md",
                 arch="densenet-test", classes=["a", "b", "c"], spec=PreprocessSpec(image_size=32), metadata=spec)
    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(1)
    values = ["70,male,face", ",,", "40,female,back", "70,male,moon"]
    for i in range(len(values)):
        Image.fromarray(rng.integers(0, 255, (36, 40, 3), np.uint8)).save(tmp_path / "in" / f"m{i}.png")
    (tmp_path / "in" / "md.csv").write_text("path,age,sex,site\n" + "".join(f"m{i}.png,{v}\n" for i, v in enumerate(values)))
    common = {"shard_size": 4, "backend": "eager", "device": "cpu"}
    run_batch(str(tmp_path / "pkg"), str(tmp_path / "in" / "md.csv"), str(tmp_path / "local"), workers=1, **common)
    run_batch_ray(str(tmp_path / "pkg"), str(tmp_path / "in" / "md.csv"), str(tmp_path / "ray"),
                  address=cluster.address, actors=1, **common)
    got, want = _rows(tmp_path / "ray"), _rows(tmp_path / "local")
    _assert_same_rows(got, want)
    assert [("error" in r) for r in got] == [False, False, False, True]
    assert got[3]["error"] == "invalid_metadata" and "site: 'moon'" in got[3]["message"]


def test_worker_node_killed_mid_job_answers_every_item_exactly_once(cluster, job, tmp_path):
    """Last in the module: the worker node is gone afterwards."""
    from medpipe.batch_ray import run_batch_ray

    out = tmp_path / "out"
    total = -(-(IMAGES + 2) // SHARD)
    seen: dict = {}

    def kill_when_two_shards_are_written():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            written = len(list((out / "shards").glob("part-*.jsonl"))) if (out / "shards").is_dir() else 0
            if written >= 2:
                seen["written"] = written
                cluster.remove_node(cluster.worker, allow_graceful=False)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_when_two_shards_are_written, daemon=True)
    killer.start()
    s = run_batch_ray(str(job / "pkg"), str(job / "images"), str(out), address=cluster.address, shard_size=SHARD,
                      actors=2)
    killer.join(5)
    assert seen and seen["written"] < total, "the node was not killed while the job ran"
    assert not cluster.worker.any_processes_alive()
    assert s["predicted"] == IMAGES and s["errors"] == 2 and s["items"] == IMAGES + 2
    _assert_same_rows(_rows(out), _rows(job / "local"))
    indices = [r["index"] for p in sorted((out / "shards").glob("part-*.jsonl"))
               for r in map(json.loads, p.read_text().splitlines())]
    assert indices == list(range(IMAGES + 2))


def test_local_batch_never_imports_ray(job, tmp_path):
    code = ("import sys; from medpipe.cli import main; "
            f"rc = main(['batch', '--model', {str(job / 'pkg')!r}, '--input', {str(job / 'images' / 'site1')!r}, "
            f"'--output', {str(tmp_path / 'out')!r}, '--workers', '1']); "
            "print(rc, sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "0 []"


def test_ray_options_need_the_ray_engine(job, tmp_path, capsys):
    args = ["batch", "--model", str(job / "pkg"), "--input", str(job / "images"), "--output", str(tmp_path / "o")]
    assert main([*args, "--ray-address", "auto"]) == 2
    assert "--ray-address and --ray-actors apply to --engine ray" in capsys.readouterr().err
    assert main(["batch", "--engine", "ray", "--url", "http://127.0.0.1:9", "--input", str(job / "images"),
                 "--output", str(tmp_path / "o")]) != 0
    assert "--engine ray runs a local --model" in capsys.readouterr().err


# Ray 2.60's driver as far as SIGTERM goes (seen in a child process: `ray.init`, `ray.shutdown`, then
# signal.getsignal and /proc/self/status): init installs a Python handler, shutdown resets the disposition in C,
# so Python's table still names Ray's handler while the process no longer catches SIGTERM
_FAKE_RAY_ENGINE = r"""
import ctypes, signal, sys
from types import SimpleNamespace
import medpipe.batch_ray as br

libc = ctypes.CDLL(None)
libc.signal.restype, libc.signal.argtypes = ctypes.c_void_p, [ctypes.c_int, ctypes.c_void_p]

def caught(sig):
    line = next(l for l in open("/proc/self/status") if l.startswith("SigCgt"))
    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)

class Data:
    ActorPoolStrategy = staticmethod(lambda **kw: None)
    def from_items(self, rows, **kw): return self
    def map(self, *a, **kw): return self
    def iter_rows(self): return iter(())

class FakeRay:
    data, up = Data(), False
    def is_initialized(self): return self.up
    def init(self, **kw):
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(15))
        self.up = True
    def shutdown(self):
        libc.signal(signal.SIGTERM, 0)  # SIG_DFL, behind Python's back
        self.up = False
    def nodes(self): return [{"Alive": True, "Resources": {"CPU": 1.0}}]
    def cluster_resources(self): return {"CPU": 1.0}
    def put(self, x): return x

br.import_ray, br.package_files = FakeRay, lambda d: {}
br.read_meta = lambda m: SimpleNamespace(preprocessing=None, dir=m, name="m", version="1", classes=["a"])
mine = lambda *a: None
for before in (mine, signal.SIG_DFL):
    signal.signal(signal.SIGTERM, before)
    engine = br.RayEngine("pkg")
    assert list(engine.results([(0, [])])) == [] and not engine.ray.up
    print(signal.getsignal(signal.SIGTERM) is before, caught(signal.SIGTERM))

class Failing(FakeRay):
    def init(self, **kw):
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(15))
        raise Exception("The current node timed out during startup.")  # what Ray raises on a loaded machine

br.import_ray = Failing
try:
    list(br.RayEngine("pkg").results([(0, [])]))
except br.BatchError as exc:
    print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "timed out during startup" in str(exc))
"""


def test_ray_engine_puts_back_the_sigterm_handler_it_found():
    """After the engine's own ray.shutdown(), SIGTERM is handled as before ray.init, in Python's table and in the
    process (a training run's GracefulStop restoring it afterwards then restores that, not Ray's handler). A child
    process with a stand-in for Ray's driver: this process never starts Ray. Ray failing to start (a bare
    Exception) puts them back too and is a BatchError naming the cause."""
    r = subprocess.run([sys.executable, "-c", _FAKE_RAY_ENGINE], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])})
    assert r.returncode == 0, r.stderr[-2000:]
    # (restored, caught): a handler, then SIG_DFL; then Ray failing to start: restored, and a BatchError saying why
    assert r.stdout.split() == ["True", "True", "True", "False", "True", "True"]
