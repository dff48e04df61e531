"""Data-parallel scaling: the real `medpipe train` under torchrun with different process/thread splits.

    python benchmarks/scaling.py [--count 600 --size 64 --epochs 2]

On CPU: 1 process x 2 threads against 2 processes x 1 thread (gloo), same data, config and global
batch per step (the per-process batch is halved for 2 processes). On a CUDA machine: 1, 2, ... up to
all GPUs, one process per GPU, per-GPU batch fixed. Throughput is the training images/s the run
records in metrics.jsonl (summed over ranks; the last epoch, so start-up and caching are excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, synth_dataset, write_result  # noqa: E402


def run(data: Path, out: Path, nproc: int, threads: int, batch: int, args, device: str) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "medpipe", "train", "--data", str(data), "--out",
           str(out), "--image-size", str(args.size), "--batch-size", str(batch), "--epochs", str(args.epochs),
           "--threads", str(threads), "--bootstrap", "0", "--device", device]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"training failed ({nproc} x {threads}): {r.stderr[-2000:]}")
    last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    return float(last["images_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=600)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32, help="global batch on CPU; per-GPU batch on CUDA")
    args = ap.parse_args()

    import torch

    from medpipe.data.sources import ingest

    folder = synth_dataset(args.count)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        ingest(folder, data)
        if torch.cuda.is_available():
            for n in range(1, torch.cuda.device_count() + 1):
                ips = run(data, Path(tmp) / f"gpu{n}", n, 4, args.batch, args, "cuda")
                rows.append({"setup": f"{n} GPU x 1 process", "processes": n, "images_per_s": ips})
        else:
            cores = os.cpu_count() or 2
            for nproc, threads in ((1, cores), (cores, 1)):
                ips = run(data, Path(tmp) / f"cpu{nproc}", nproc, threads, args.batch // nproc, args, "cpu")
                rows.append({"setup": f"{nproc} process x {threads} threads", "processes": nproc,
                             "images_per_s": ips})
    base = rows[0]["images_per_s"]
    print(f"{'setup':<28}{'images/s':>10}{'vs first':>10}")
    for r in rows:
        r["speedup"] = r["images_per_s"] / base
        print(f"{r['setup']:<28}{r['images_per_s']:>10.1f}{r['speedup']:>9.2f}x")
    name = "scaling_cuda" if torch.cuda.is_available() else "scaling"
    print(f"wrote {write_result(name, {'settings': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
