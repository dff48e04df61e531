"""The CUDA paths: training (bf16 autocast, channels_last, pinned memory, loader thread), the
predictor, batch and the server on a GPU, and DDP over NCCL. Skipped where no CUDA device exists
(CI); run on a GPU machine with ``python -m pytest -m gpu``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from medpipe.cli import main

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")]

GPU_TRAIN = ["--image-size", "64", "--batch-size", "16", "--epochs", "2", "--bootstrap", "50", "--lr", "0.002",
             "--warmup-epochs", "0.5", "--device", "cuda"]
# cuDNN convolutions may use TF32 on Ampere and later; float32 CPU and GPU probabilities agree to ~1e-3
CROSS_DEVICE_ATOL = 5e-3


@pytest.fixture(scope="module")
def gpu_run(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("gpu_run")
    assert main(["train", "--data", str(data_dir), "--out", str(run), *GPU_TRAIN]) == 0
    return run


def _images(data_dir, n=6):
    from medpipe.data.sources import load_records

    table, _ = load_records(data_dir)
    return [open(p, "rb").read() for p in list(table["path"])[:n]]


def test_training_on_cuda_writes_a_package_that_loads_on_cpu(gpu_run, data_dir):
    from medpipe.infer.predictor import Predictor

    lines = [m for m in map(json.loads, (gpu_run / "metrics.jsonl").read_text().splitlines()) if "epoch" in m]
    assert len(lines) == 2 and all(np.isfinite(x["train_loss"]) for x in lines)
    config = (gpu_run / "config.yaml").read_text()
    assert "device: cuda" in config
    meta = json.loads((gpu_run / "model" / "model.json").read_text())
    assert 0.0 <= meta["metrics"]["test"]["macro_auc"] <= 1.0
    images = _images(data_dir)
    gpu = Predictor(gpu_run / "model", device="cuda").predict_bytes(images)
    cpu = Predictor(gpu_run / "model", device="cpu", backend="eager").predict_bytes(images)
    for g, c in zip(gpu, cpu):
        assert max(abs(g.probabilities[k] - c.probabilities[k]) for k in c.probabilities) < CROSS_DEVICE_ATOL


def test_training_on_cuda_records_gpu_memory_and_utilisation(gpu_run):
    """The CUDA half of the per-epoch resource metrics (train/handlers.py ResourceMetrics): peak GPU memory of
    the epoch, and NVML's utilisation where pynvml is installed (absent, not zero, where it is not). The CPU
    half, and the absence of the GPU fields on CPU, are tests/test_monitor_training.py."""
    lines = [m for m in map(json.loads, (gpu_run / "metrics.jsonl").read_text().splitlines()) if "epoch" in m]
    total_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    try:
        torch.cuda.utilization(0)
        nvml = True
    except Exception:  # noqa: BLE001 - no pynvml / NVML here
        nvml = False
    for m in lines:
        assert 0 < m["gpu_memory_gb"] < total_gb, m
        assert m["rss_mb"] > 50 and m["cpu_percent"] > 0 and m["disk_free_gb"] > 0
        if nvml:
            assert 0 <= m["gpu_utilization"] <= 100, m
        else:
            assert "gpu_utilization" not in m


def test_auto_picks_cuda_and_cuda_graphs(gpu_run):
    from medpipe.infer.predictor import Predictor

    assert Predictor(gpu_run / "model").device.type == "cuda"
    assert Predictor(gpu_run / "model", backend="auto").backend == "cudagraph"


def test_cudagraph_backend_matches_eager(gpu_run, data_dir):
    """CUDA graphs per batch bucket (padded, chunked past the largest) give the eager model's answers."""
    from medpipe.infer.predictor import Predictor

    eager = Predictor(gpu_run / "model", device="cuda", backend="eager")
    graphs = Predictor(gpu_run / "model", device="cuda", backend="cudagraph", max_batch=4)
    assert graphs.backend == "cudagraph" and graphs.runtime.runner.buckets == [1, 2, 4]
    images = _images(data_dir, 7)
    pixels = [eager.decode(b) for b in images]
    for n in (1, 3, 4, 7):  # exact bucket, padded, and chunked (4 + 3)
        a = eager.probabilities(pixels[:n])
        b = graphs.probabilities(pixels[:n])
        assert a.shape == b.shape == (n, len(eager.classes))
        assert np.abs(a - b).max() < 1e-4
    # replays do not leak state between calls: the same input gives the same answer again
    assert np.array_equal(graphs.probabilities(pixels[:3]), graphs.probabilities(pixels[:3]))


def test_batch_on_cuda_equals_the_cuda_predictor(gpu_run, data_dir, tmp_path):
    from medpipe.infer.predictor import Predictor

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, b in enumerate(_images(data_dir, 10)):
        (folder / f"{i:02d}.jpg").write_bytes(b)
    out = tmp_path / "out"
    assert main(["batch", "--model", str(gpu_run / "model"), "--input", str(folder), "--output", str(out),
                 "--device", "cuda", "--batch-size", "4"]) == 0
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 10
    p = Predictor(gpu_run / "model", device="cuda")
    for r in rows:
        ref = p.predict_bytes([(folder / r["path"]).read_bytes()])[0].probabilities
        assert max(abs(r["probabilities"][c] - ref[c]) for c in ref) < 1e-4


def test_server_on_cuda_answers_like_the_cpu_predictor(gpu_run, data_dir, tmp_path):
    from medpipe.infer.predictor import Predictor
    from tests._server import Server, as_json

    images = _images(data_dir, 3)
    cpu = Predictor(gpu_run / "model", device="cpu", backend="eager").predict_bytes(images)
    for backend in ("eager", "cudagraph"):
        srv = Server(gpu_run / "model", "--device", "cuda", "--backend", backend,
                     log=tmp_path / f"serve_{backend}.log").wait_ready()
        try:
            for img, ref in zip(images, cpu):
                status, _, body = srv.invoke(img)
                assert status == 200
                got = as_json(body)["predictions"][0]["probabilities"]
                assert max(abs(got[k] - ref.probabilities[k]) for k in got) < CROSS_DEVICE_ATOL
        finally:
            srv.stop()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank (fewer than 2 here)")
def test_torchrun_two_gpus_over_nccl(data_dir, tmp_path):
    from tests._server import free_port

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "medpipe", "train", "--data", str(data_dir), "--out", str(out),
           *GPU_TRAIN, "--epochs", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((out / "distributed.json").read_text())
    assert info["world_size"] == 2 and info["ranks_in_sync"]
