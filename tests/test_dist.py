"""Distributed training with real torchrun processes (gloo on loopback, 2 CPU processes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._server import free_port as _port
from tests.conftest import TINY

pytestmark = [pytest.mark.dist, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]




def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "MEDPIPE_DIST_TIMEOUT_S": "60", "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", **extra}


def _torchrun(args, *, max_restarts=0, env=None, timeout=600):
    # c10d rendezvous (not a static master port): each restart forms a fresh round with its own store keys
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{_port()}", "--rdzv-id", "medpipe-test", "--max-restarts",
           str(max_restarts), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or _env(), timeout=timeout, cwd=ROOT)


def _copy_data(data_dir, tmp_path):
    import shutil

    dst = tmp_path / "data"
    shutil.copytree(data_dir, dst, ignore=shutil.ignore_patterns("cache"))
    return dst


def _metrics(run: Path) -> list[dict]:
    return [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "epoch" in m]  # no events


def test_torchrun_two_processes_train_one_model(data_dir, tmp_path):
    data = _copy_data(data_dir, tmp_path)
    run = tmp_path / "run"
    import mlflow  # the track extra, part of dev

    track = ["--track", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    r = _torchrun(["-m", "medpipe", "train", "--data", str(data), "--out", str(run), *TINY, *track])
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    client = mlflow.MlflowClient(tracking_uri=track[1])  # rank 0 logs: exactly one MLflow run for the job
    runs = client.search_runs([client.get_experiment_by_name("medpipe").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.params["world_size"] == "2"
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "val_auc")) == [1, 2]
    d = json.loads((run / "distributed.json").read_text())
    assert d["world_size"] == 2 and d["ranks_in_sync"] and len(set(d["weights_sha256"])) == 1
    m = _metrics(run)
    assert [x["epoch"] for x in m] == [1, 2] and all(x["world_size"] == 2 for x in m)  # written once
    assert r.stdout.count("epoch=1 train_loss=") == 1
    assert (run / "model" / "model.json").is_file()


def test_gathered_validation_auc_equals_single_process(tmp_path):
    """ROC AUC from 2 ranks equals the 1-rank value on an odd-sized validation set (no padding)."""
    script = tmp_path / "exact.py"
    script.write_text(f"""
import json, os, sys
import numpy as np, torch
sys.path.insert(0, {str(ROOT / 'src')!r})
from medpipe.preprocess import PreprocessSpec
from medpipe.evaluate import compute_metrics
from medpipe.models import create_model
from medpipe.train import distributed
from medpipe.train.engine import predict_logits, predict_logits_dist

dd = distributed.init(torch.device("cpu"))
torch.manual_seed(0)
model = create_model("resnet18", 3).eval()
rng = np.random.default_rng(0)
pixels = rng.integers(0, 256, (41, 32, 32, 3), dtype=np.uint8)
rows = np.arange(41)[::-1].copy()              # 41 rows: odd, and not in storage order
y = np.arange(41) % 3
spec = PreprocessSpec(image_size=32)
dist_logits = predict_logits_dist(model, pixels, rows, spec, torch.device("cpu"), dd)
if dd.main:
    single = predict_logits(model, pixels, rows, spec, torch.device("cpu"))
    a = compute_metrics(y, torch.softmax(dist_logits, 1).numpy(), ["a", "b", "c"], bootstrap=0)["macro_auc"]
    b = compute_metrics(y, torch.softmax(single, 1).numpy(), ["a", "b", "c"], bootstrap=0)["macro_auc"]
    json.dump({{"n": len(dist_logits), "auc_2": a, "auc_1": b,
               "max_diff": float((dist_logits - single).abs().max())}}, open({str(tmp_path / 'out.json')!r}, "w"))
dd.barrier()  # as the pipeline does: rank 1 tearing gloo down while rank 0 still works can abort it (SIGABRT)
dd.close()
""")
    r = _torchrun([str(script)])
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["n"] == 41 and out["max_diff"] < 1e-5
    assert out["auc_2"] == pytest.approx(out["auc_1"], abs=1e-12)


def test_killed_rank_restarts_from_checkpoint_and_finishes(data_dir, tmp_path):
    data = _copy_data(data_dir, tmp_path)
    run = tmp_path / "run"
    args = TINY[:TINY.index("--epochs")] + ["--epochs", "3"] + TINY[TINY.index("--epochs") + 2:]
    # rank 1 is SIGKILLed at global step 5 (in epoch 2) on the first attempt
    r = _torchrun(["-m", "medpipe", "train", "--data", str(data), "--out", str(run), *args,
                   "--handler", "tests.faults:KillRankAtStep:1,5"], max_restarts=1)
    assert r.returncode == 0, "\n".join(x for x in (r.stdout + r.stderr).splitlines() if "medpipe" in x.lower()
                                        or "error" in x.lower())[-6000:]
    assert "resumed from" in r.stdout
    assert [x["epoch"] for x in _metrics(run)] == [1, 2, 3]
    assert json.loads((run / "distributed.json").read_text())["ranks_in_sync"]
    assert (run / "model" / "model.json").is_file()


def test_emulated_two_host_sagemaker_launch(synth_dir, tmp_path):
    """Two processes, each with its own SM_CURRENT_HOST, started once per host without torchrun."""
    from tests.test_sagemaker import _tree

    port = _port()
    procs, bases = [], []
    for host in ("algo-1", "algo-2"):
        base = tmp_path / host / "opt_ml"
        env = _tree(base, synth_dir)
        env.update(SM_HOSTS=json.dumps(["algo-1", "algo-2"]), SM_CURRENT_HOST=host, MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), MEDPIPE_SM_WORK=str(tmp_path / host / "work"),
                   MEDPIPE_DIST_TIMEOUT_S="120")
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "sagemaker_entry.py"), "--epochs", "2",
                                       "--image-size", "32", "--batch-size", "8", "--bootstrap", "20",
                                       "--deterministic", "--threads", "1", "--model", "densenet-test"],
                                      env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
        bases.append(base)
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert (bases[0] / "model" / "model.json").is_file() and (bases[0] / "model" / "code" / "inference.py").is_file()
    assert not (bases[1] / "model").exists() or not any((bases[1] / "model").iterdir())  # written once
    d = json.loads((tmp_path / "algo-1" / "work" / "run" / "distributed.json").read_text())
    assert d["world_size"] == 2 and d["ranks_in_sync"]
    assert outs[0][0].count("epoch=2 train_loss=") == 1 and "epoch=" not in outs[1][0]


def test_torchrun_streams_shards(data_dir, tmp_path):
    data = _copy_data(data_dir, tmp_path)
    shards = tmp_path / "shards"
    r = subprocess.run([sys.executable, "-m", "medpipe", "shard", "--data", str(data), "--out", str(shards),
                        "--image-size", "32", "--shard-size", "4"], capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / "run"
    # with a time budget: rank 0's epoch count (printed once) is every rank's, and the run does exactly that many
    r = _torchrun(["-m", "medpipe", "train", "--data", str(shards), "--out", str(run), *TINY, "--budget", "1s"])
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert r.stdout.count("budget 1s: first epoch took") == 1
    epochs = int(r.stdout.split("budget 1s: first epoch took")[1].split("training ")[1].split()[0])
    assert [x["epoch"] for x in _metrics(run)] == list(range(1, epochs + 1))
    assert json.loads((run / "distributed.json").read_text())["ranks_in_sync"]
    assert (run / "model" / "model.json").is_file()
