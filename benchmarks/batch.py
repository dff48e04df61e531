"""Batch inference throughput: `medpipe batch` against a naive one-image-at-a-time loop, same run.

    python benchmarks/batch.py [--count 2000] [--size 224]
    python benchmarks/batch.py --engine ray [--count 1000] [--cpus N]   # Ray Data engine vs local, equal cores

Both sides use the same package (an untrained DenseNet121 at --size; weights do not change speed)
and the same 600x450 synthetic JPEGs. Naive: for each file, Pillow full decode, resize, the MONAI
eval transforms and one eager NCHW forward at batch 1 (in the main thread). medpipe: `run_batch`
(parallel decoding with JPEG draft mode, batched forward, shards written), once per backend (--backends;
on CPU: onnx FP32 and int8, whose INT8 model is made as in serve_load.py: forced on an untrained
package, speed only).

``--engine ray``: the local engine and the Ray engine (a one-node Ray instance started here with ``--cpus``
CPUs, default all, before the clock starts, as a cluster outlives its jobs) over the same files with the same
backend; their ratio of images/s at equal cores (target >= 0.85), and the per-node figure (one node here:
per-node images/s x nodes is the estimate for a bigger cluster while the input store and the driver keep up).
Writes results/batch_ray.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import synth_dataset, write_result  # noqa: E402
from serve_load import add_int8_model, make_package  # noqa: E402


def naive(pkg: Path, files: list[Path], device) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from medpipe.package import load_package, package_spec
    from medpipe.preprocess import KEY, eval_preset

    model, meta = load_package(pkg, device)
    spec = package_spec(meta)
    preset = eval_preset(spec)
    n = 0
    with torch.no_grad():
        for f in files:
            img = Image.open(f).convert("RGB").resize((spec.image_size, spec.image_size), Image.BICUBIC)
            x = preset({KEY: np.asarray(img)})[KEY][None].to(device)
            torch.softmax(model(x), dim=1).cpu()
            n += 1
    return n


def ray_vs_local(args, folder: Path, device) -> None:
    """The Ray engine against the local one, at equal cores, same package, files and backend."""
    import ray

    from medpipe.batch import run_batch
    from medpipe.batch_ray import run_batch_ray

    backend = (args.backends or ("onnx" if device.type == "cpu" else "auto")).split(",")[0]
    cpus = args.cpus or os.cpu_count() or 1
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        pkg = make_package(Path(tmp) / "pkg", args.size)
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING")
        try:
            for engine in ("local", "ray"):
                out = Path(tmp) / f"out_{engine}"
                t = time.perf_counter()
                if engine == "ray":
                    s = run_batch_ray(str(pkg), str(folder), str(out), batch_size=args.batch_size, device=str(device),
                                      backend=backend, actors=args.actors)
                else:
                    s = run_batch(str(pkg), str(folder), str(out), batch_size=args.batch_size, device=str(device),
                                  backend=backend, workers=cpus)
                secs = time.perf_counter() - t
                rows[engine] = {"images_per_s": s["predicted"] / secs, "seconds": secs, "predicted": s["predicted"],
                                "errors": s["errors"], "backend": s["backend"],
                                **{k: s[k] for k in ("ray_actors", "ray_threads_per_actor") if k in s}}
                print(f"{engine:5s}: {rows[engine]['images_per_s']:7.1f} images/s ({s['predicted']} in {secs:.1f} s, "
                      f"backend {s['backend']})", flush=True)
            same = (out.parent / "out_local" / "predictions.csv").read_bytes() == (out / "predictions.csv").read_bytes()
        finally:
            ray.shutdown()
    ratio = rows["ray"]["images_per_s"] / rows["local"]["images_per_s"]
    per_node = rows["ray"]["images_per_s"]  # one node here
    print(f"ray / local at {cpus} cores = {ratio:.2f} (target >= 0.85); predictions.csv identical: {same}")
    print(f"per node: {per_node:.1f} images/s; N nodes of this kind: ~{per_node:.1f} x N images/s while the "
          "input store and the driver keep up")
    path = write_result("batch_ray", {"settings": {**vars(args), "cpus": cpus, "backend": backend},
                                      "engines": rows, "ratio": ratio, "target": 0.85, "csv_identical": same,
                                      "per_node_images_per_s": per_node, "load_average": os.getloadavg()})
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto", help="both sides run on this device (auto: CUDA when available)")
    ap.add_argument("--engine", default="local", choices=("local", "ray"),
                    help="ray: the Ray engine against the local one at equal cores (no naive loop)")
    ap.add_argument("--cpus", type=int, default=None, help="with --engine ray: CPUs of the Ray node (default: all)")
    ap.add_argument("--actors", type=int, default=None, help="with --engine ray: predictor actors (default: 1)")
    ap.add_argument("--backends", default=None, help="medpipe backends, comma-separated (default: onnx,int8 on "
                                                     "CPU, plus openvino when installed; auto on CUDA)")
    args = ap.parse_args()

    from medpipe.batch import run_batch
    from medpipe.utils import resolve_device

    device = resolve_device(args.device)
    from medpipe.infer.openvino_runtime import available as openvino_available

    if args.engine == "ray":
        return ray_vs_local(args, synth_dataset(args.count), device)
    cpu_default = "onnx,int8" + (",openvino" if openvino_available() else "")
    args.backends = args.backends or (cpu_default if device.type == "cpu" else "auto")

    folder = synth_dataset(args.count)
    files = sorted(folder.rglob("*.jpg"))[: args.count]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        pkg = make_package(Path(tmp) / "pkg", args.size)
        if {"int8", "openvino"} & set(args.backends.split(",")):
            add_int8_model(pkg, Path(tmp))
        naive(pkg, files[:5], device)  # warm-up
        t = time.perf_counter()
        n = naive(pkg, files, device)
        naive_s = time.perf_counter() - t
        print(f"naive:   {n / naive_s:7.1f} images/s ({n} in {naive_s:.1f} s)", flush=True)
        for backend in args.backends.split(","):
            t = time.perf_counter()
            summary = run_batch(str(pkg), str(folder), str(Path(tmp) / f"out_{backend}"), batch_size=args.batch_size,
                                device=str(device), backend=backend)
            med_s = time.perf_counter() - t
            m = summary["predicted"]
            rows[backend] = {"images_per_s": m / med_s, "backend": summary["backend"], "errors": summary["errors"],
                             "ratio": (m / med_s) / (n / naive_s)}
            print(f"medpipe/{backend}: {m / med_s:7.1f} images/s ({m} in {med_s:.1f} s, backend {summary['backend']}, "
                  f"{summary['errors']} errors) = {rows[backend]['ratio']:.2f}x naive", flush=True)
    best = max(rows, key=lambda b: rows[b]["images_per_s"])
    ratio = rows[best]["ratio"]
    print(f"medpipe batch ({best}) / naive loop = {ratio:.2f}x (target >= 2.5) [{device.type}]")
    name = "batch" if device.type == "cpu" else f"batch_{device.type}"
    path = write_result(name, {"settings": vars(args), "naive_images_per_s": n / naive_s,
                               "medpipe_images_per_s": rows[best]["images_per_s"], "medpipe_backend": best,
                               "backends": rows, "ratio": ratio, "target": 2.5})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
