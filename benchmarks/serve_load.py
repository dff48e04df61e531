"""Load test: medpipe serve (dynamic batching, best backend) against a naive per-request handler.

    python benchmarks/serve_load.py [--clients 8] [--requests 320] [--size 224]

Both servers run as real processes on loopback and load the same package (an untrained DenseNet121
at --size; weights do not change speed). Each gets the same two phases from the same client code,
sending 600x450 synthetic dermatoscopy JPEGs over keep-alive connections:
  lone   one client, requests one after another -> p50 latency of a lone request;
  load   --clients concurrent clients, --requests in total (bounded; stops by itself) -> throughput
         and p50/p95/p99 latency, while a separate client times GET /ping every 100 ms.
medpipe runs once per backend (--backends); the fastest one is compared and should be the `auto` default.
The naive side is benchmarks/_naive_server.py (full decode, eager NCHW forward at batch 1, as many
forwards at once as CPUs: the default inference-toolkit behaviour). Ratios come from one run.
"""

from __future__ import annotations

import argparse
import http.client
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, synth_dataset, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent


def make_package(out: Path, size: int) -> Path:
    from medpipe.preprocess import PreprocessSpec
    from medpipe.models import create_model
    from medpipe.package import save_package

    import torch

    torch.manual_seed(0)
    save_package(out, create_model("densenet121", 7).eval(), name="bench-densenet121", arch="densenet121",
                 classes=["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"], spec=PreprocessSpec(image_size=size))
    return out


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    t = time.time()
    while time.time() - t < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/ping")
            if c.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.3)
    raise SystemExit("server not ready")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def drive(port: int, images: list[bytes], clients: int, total: int) -> dict:
    """`clients` threads share `total` requests; returns throughput and latency percentiles (ms)."""
    lock = threading.Lock()
    state = {"next": 0}
    lat: list[float] = []
    errors = [0]

    def worker():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                i = state["next"]
                if i >= total:
                    break
                state["next"] += 1
            t = time.perf_counter()
            conn.request("POST", "/invocations", images[i % len(images)], {"Content-Type": "image/jpeg"})
            r = conn.getresponse()
            r.read()
            dt = time.perf_counter() - t
            with lock:
                lat.append(dt)
                errors[0] += r.status != 200
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    return {"requests": total, "errors": errors[0], "seconds": wall, "rps": total / wall,
            "p50_ms": 1000 * pct(lat, 50), "p95_ms": 1000 * pct(lat, 95), "p99_ms": 1000 * pct(lat, 99)}


def measure(name: str, cmd: list[str], port: int, images: list[bytes], args) -> dict:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                filter(None, [str(ROOT.parent / "src"), os.environ.get("PYTHONPATH")]))})
    try:
        wait_ready(port, proc)
        drive(port, images, 1, 10)  # warm-up
        lone = drive(port, images, 1, args.lone)
        pings: list[float] = []
        stop = threading.Event()

        def pinger():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            while not stop.is_set():
                t = time.perf_counter()
                conn.request("GET", "/ping")
                conn.getresponse().read()
                pings.append(time.perf_counter() - t)
                time.sleep(0.1)
        pt = threading.Thread(target=pinger)
        pt.start()
        load = drive(port, images, args.clients, args.requests)
        stop.set()
        pt.join()
        row = {"name": name, "lone_p50_ms": lone["p50_ms"], "rps": load["rps"], "p50_ms": load["p50_ms"],
               "p95_ms": load["p95_ms"], "p99_ms": load["p99_ms"], "errors": load["errors"] + lone["errors"],
               "ping_p99_ms": 1000 * pct(pings, 99), "ping_max_ms": 1000 * max(pings), "pings": len(pings)}
        print(f"{name:>14}: {row['rps']:6.1f} req/s  p50 {row['p50_ms']:6.1f}  p95 {row['p95_ms']:6.1f}  "
              f"p99 {row['p99_ms']:6.1f} ms  lone p50 {row['lone_p50_ms']:5.1f} ms  "
              f"/ping p99 {row['ping_p99_ms']:.1f} ms  errors {row['errors']}", flush=True)
        return row
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=320)
    ap.add_argument("--lone", type=int, default=40)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--backends", default=None,
                    help="medpipe backends to measure, comma-separated (default: onnx,eager on CPU; eager,cudagraph "
                         "on CUDA)")
    ap.add_argument("--device", default="auto", help="both servers run on this device (auto: CUDA when available)")
    args = ap.parse_args()

    from medpipe.utils import resolve_device

    device = resolve_device(args.device).type
    args.device = device
    args.backends = args.backends or ("onnx,eager" if device == "cpu" else "eager,cudagraph")

    folder = synth_dataset(200)
    images = [p.read_bytes() for p in sorted(folder.rglob("*.jpg"))[:32]]
    with tempfile.TemporaryDirectory() as tmp:
        pkg = make_package(Path(tmp) / "pkg", args.size)
        port = free_port()
        naive = measure("naive", [sys.executable, str(ROOT / "_naive_server.py"), str(pkg), str(port), device],
                        port, images, args)
        rows = {}
        for backend in args.backends.split(","):
            port = free_port()
            rows[backend] = measure(f"medpipe/{backend}", [sys.executable, "-m", "medpipe", "serve", "--model",
                                    str(pkg), "--port", str(port), "--backend", backend, "--device", device],
                                    port, images, args)
    best = max(rows, key=lambda b: rows[b]["rps"])
    med = rows[best]
    ratios = {"throughput": med["rps"] / naive["rps"], "lone_p50": med["lone_p50_ms"] / naive["lone_p50_ms"]}
    print(f"fastest backend: {best}.  throughput medpipe/naive = {ratios['throughput']:.2f}x (target >= 2)   "
          f"lone p50 medpipe/naive = {ratios['lone_p50']:.2f} (target <= 0.65)   "
          f"/ping p99 under load {med['ping_p99_ms']:.0f} ms (target < 2000)")
    path = write_result("serve_load" if device == "cpu" else f"serve_load_{device}", {"settings": vars(args), "naive": naive, "medpipe": rows, "best": best,
                                       "ratios": ratios,
                                       "targets": {"throughput": 2.0, "lone_p50": 0.65, "ping_p99_ms": 2000}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
