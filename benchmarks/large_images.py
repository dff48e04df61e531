"""Camera-size JPEGs: latency and peak memory of decode + predict, draft (DCT-scaled) vs full decode.

    python benchmarks/large_images.py [--image-size 224] [--reps 5]

For 0.3, 6, 12 and 24 MP JPEGs (640x480, 3000x2000, 4000x3000, 6000x4000; the camera-like images of
tests/test_large_images.py, quality 90) and each decode mode (draft: medpipe's; full: decode every pixel,
then the same resize): a fresh torch-free process (what a decode worker imports) decodes the image
``reps`` times after a warm-up on the small one; its peak RSS (``VmHWM``) minus its peak before the
first large decode is what decoding that image added. A second fresh process loads a DenseNet121 package
(random weights, ``--image-size`` px input: the cost does not depend on the weights) and times ``reps``
decode + predict of the image. Then ``medpipe serve --profile async`` (the real server; the 6 MB real-time
cap refuses the larger images) answers each image once, and the peak RSS of the server and its decode
processes together is sampled while it does.

Writes benchmarks/results/large_images.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import write_result  # noqa: E402

SIZES = {"0.3MP": (640, 480), "6MP": (3000, 2000), "12MP": (4000, 3000), "24MP": (6000, 4000)}

DECODE_CHILD = r"""
import json, statistics, sys, time
from medpipe.data import imageio

def hwm_mb():  # peak RSS of this process image (VmHWM: unlike ru_maxrss, not inherited from the parent at fork)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024

path, draft, reps, side = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
data = open(path, "rb").read()
imageio.decode_image(open(sys.argv[5], "rb").read(), size=(side, side))  # warm-up: the small image
before = hwm_mb()
times = []
for _ in range(reps):
    t = time.perf_counter()
    imageio.decode_image(data, size=(side, side), draft=draft)
    times.append(time.perf_counter() - t)
print(json.dumps({"decode_ms": 1000 * statistics.median(times), "decode_rss_before_mb": before,
                  "decode_peak_rss_mb": hwm_mb()}))
"""

PREDICT_CHILD = r"""
import json, statistics, sys, time
from medpipe.data import imageio
from medpipe.infer.predictor import Predictor

pkg, path, draft, reps = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
p = Predictor(pkg)
data = open(path, "rb").read()
p.probabilities([imageio.decode_image(data, size=p.size, draft=draft)])  # warm-up
times = []
for _ in range(reps):
    t = time.perf_counter()
    probs = p.probabilities([imageio.decode_image(data, size=p.size, draft=draft)])
    times.append(time.perf_counter() - t)
print(json.dumps({"decode_predict_ms": 1000 * statistics.median(times),
                  "probabilities": [round(float(x), 4) for x in probs[0]]}))
"""


def _child(code: str, *args) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_package(out: Path, image_size: int) -> Path:
    import torch

    from medpipe.models import create_model
    from medpipe.package import save_package
    from medpipe.preprocess import PreprocessSpec

    if not (out / "model.json").is_file():
        torch.manual_seed(0)
        save_package(out, create_model("densenet121", 7), name="bench", arch="densenet121",
                     classes=[f"c{i}" for i in range(7)], spec=PreprocessSpec(image_size=image_size))
    return out


def in_process(pkg: Path, files: dict[str, Path], reps: int, side: int) -> list[dict]:
    """Per size and decode mode: decode alone in a fresh torch-free process (latency and the peak RSS it added),
    then decode + predict in a fresh process with the model (latency, probabilities)."""
    rows = []
    for label, path in files.items():
        for draft in (True, False):
            flag = "1" if draft else "0"
            row = {"image": label, "pixels": "x".join(map(str, SIZES[label])), "bytes": path.stat().st_size,
                   "decode": "draft" if draft else "full",
                   **_child(DECODE_CHILD, path, flag, reps, side, files["0.3MP"]),
                   **_child(PREDICT_CHILD, pkg, path, flag, reps)}
            row["decode_added_rss_mb"] = row["decode_peak_rss_mb"] - row["decode_rss_before_mb"]
            rows.append(row)
            print(f"{label:>6} {row['decode']:>5}: decode {row['decode_ms']:7.1f} ms (+{row['decode_added_rss_mb']:4.0f} MB "
                  f"peak RSS over {row['decode_rss_before_mb']:.0f} MB), decode+predict {row['decode_predict_ms']:7.1f} ms",
                  flush=True)
    return rows


def served(pkg: Path, files: dict[str, Path]) -> list[dict]:
    """One request per image to `medpipe serve --profile async`; peak RSS of the process tree while answering."""
    import threading

    from tests._server import Server

    s = Server(pkg, "--profile", "async", log=pkg.parent / "serve.log").wait_ready()
    rows = []
    try:
        for label, path in files.items():
            data = path.read_bytes()
            peak, stop = [0.0], threading.Event()

            def sample():
                while not stop.is_set():
                    peak[0] = max(peak[0], _tree_rss_mb(s.proc.pid))
                    time.sleep(0.01)

            base = _tree_rss_mb(s.proc.pid)
            th = threading.Thread(target=sample, daemon=True)
            th.start()
            t = time.perf_counter()
            st, _, body = s.invoke(data, timeout=300)
            ms = 1000 * (time.perf_counter() - t)
            stop.set()
            th.join()
            rows.append({"image": label, "status": st, "latency_ms": ms, "rss_before_mb": base,
                         "peak_rss_mb": max(peak[0], base)})
            print(f"{label:>6} served: {st} in {ms:7.1f} ms; server tree RSS {base:.0f} -> peak {rows[-1]['peak_rss_mb']:.0f} MB",
                  flush=True)
    finally:
        s.stop()
    return rows


def _tree_rss_mb(pid: int) -> float:
    """RSS of ``pid`` and its children (the decode processes), from /proc."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as fh:
                total += int(fh.read().split()[1])
            with open(f"/proc/{p}/task/{p}/children") as fh:
                todo += [int(c) for c in fh.read().split()]
        except (OSError, ValueError):
            continue
    return total * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--work", default=str(Path(__file__).resolve().parents[1] / ".bench" / "large_images"))
    args = ap.parse_args()

    from tests.test_large_images import camera_jpeg

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pkg = make_package(work / f"pkg{args.image_size}", args.image_size)
    files = {}
    for label, (w, h) in SIZES.items():
        files[label] = work / f"{label}.jpg"
        if not files[label].is_file():
            files[label].write_bytes(camera_jpeg(w, h, seed=3))
    rows = in_process(pkg, files, args.reps, args.image_size)
    serve_rows = served(pkg, files)
    path = write_result("large_images", {
        "model": f"DenseNet121, random weights, {args.image_size} px input, eager backend in-process; serve: auto",
        "reps": args.reps, "in_process": rows, "serve_async_profile": serve_rows,
        "note": "one run on a shared 2-core machine under load from other jobs (load average ~8-10): latencies are "
                "noisy; decode_added_rss_mb: VmHWM of a fresh torch-free process minus its value before the "
                "first large decode; serve rows: RSS of the server and its decode processes, sampled every 10 ms"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
