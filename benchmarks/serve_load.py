"""Load test: medpipe serve (dynamic batching, each CPU backend) against a naive per-request handler and
TorchServe, in one run.

    python benchmarks/serve_load.py [--clients 8] [--requests 320] [--size 224] [--ts-configs 1x8x10]

Both servers run as real processes on loopback and load the same package (an untrained DenseNet121
at --size; weights do not change speed). Each gets the same two phases from the same client code,
sending 600x450 synthetic dermatoscopy JPEGs over keep-alive connections:
  lone   one client, requests one after another -> p50 latency of a lone request;
  load   --clients concurrent clients, --requests in total (bounded; stops by itself) -> throughput
         and p50/p95/p99 latency, while a separate client times GET /ping every 100 ms.
medpipe runs once per backend (--backends); the fastest one is compared and should be the `auto` default.
The naive side is benchmarks/_naive_server.py (full decode, eager NCHW forward at batch 1, as many
forwards at once as CPUs: the default inference-toolkit behaviour). TorchServe (the version the
SageMaker PyTorch inference toolkit uses, from the `.venv-sm` venv that `make test` builds; needs a
JRE, which .ci/run installs) runs benchmarks/_ts_handler.py: the same decoder, eval preset and eager
model, batched by TorchServe; --ts-configs lists WORKERSxBATCHxDELAY_MS settings (best one compared).
The int8 and openvino backends need an INT8 model: the benchmark's package is untrained (speed does not
depend on the weights), so its INT8 model is made with force=True on a synthetic validation split (once,
under .bench/int8_pkg{size}/, shared with serve_profile.py: _common.int8_package); its
gate figures mean nothing here (README: gate figures on real data). openvino (OpenVINO running that
INT8 graph) is measured when OpenVINO is installed (medpipe-imaging[openvino]). Ratios come from one run.

    python benchmarks/serve_load.py --int8-peer     # -> benchmarks/results/serve_load_int8_peer.json

The fair peer: medpipe's openvino backend against TorchServe whose handler (benchmarks/_ts_handler_int8.py)
runs the same INT8 graph through the same medpipe Predictor and decoder (--ts-int8-configs, best one
compared), the FP32 TorchServe peer (--ts-configs), OpenVINO's benchmark_app on that graph, the forward
alone through medpipe's Predictor at batch 8, the decode cost per image on one core, and the end-to-end
limit they imply when decode and forward share the cores: 1 / (decode_s / cores + 1 / forward_images_per_s).
``--before-src OLD/src`` serves medpipe from an earlier source tree too, first, in the same run ("before").
Where the served figure's time goes: benchmarks/serve_profile.py (py-spy under the same load).
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, int8_package, synth_dataset, write_result  # noqa: E402

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


def drive(port: int, images: list[bytes], clients: int, total: int, path: str = "/invocations") -> dict:
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
            conn.request("POST", path, images[i % len(images)], {"Content-Type": "image/jpeg"})
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


def measure(name: str, cmd: list[str], port: int, images: list[bytes], args, path: str = "/invocations",
            env: dict | None = None, after_ready=None) -> dict:
    """Start ``cmd`` (its own process group), wait for /ping, run the lone and load phases, stop it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=env or {**os.environ, "PYTHONPATH": os.pathsep.join(
                                filter(None, [str(ROOT.parent / "src"), os.environ.get("PYTHONPATH")]))})
    try:
        wait_ready(port, proc)
        if after_ready:
            after_ready()
        drive(port, images, 1, 10, path)  # warm-up
        lone = drive(port, images, 1, args.lone, path)
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
        load = drive(port, images, args.clients, args.requests, path)
        stop.set()
        pt.join()
        row = {"name": name, "lone_p50_ms": lone["p50_ms"], "rps": load["rps"], "p50_ms": load["p50_ms"],
               "p95_ms": load["p95_ms"], "p99_ms": load["p99_ms"], "errors": load["errors"] + lone["errors"],
               "ping_p99_ms": 1000 * pct(pings, 99), "ping_max_ms": 1000 * max(pings), "pings": len(pings)}
        print(f"{name:>18}: {row['rps']:6.1f} req/s  p50 {row['p50_ms']:6.1f}  p95 {row['p95_ms']:6.1f}  "
              f"p99 {row['p99_ms']:6.1f} ms  lone p50 {row['lone_p50_ms']:5.1f} ms  "
              f"/ping p99 {row['ping_p99_ms']:.1f} ms  errors {row['errors']}", flush=True)
        return row
    finally:
        try:  # the whole group: TorchServe's frontend (java) and its Python workers too
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(10)


def torchserve_missing(venv: Path) -> str | None:
    if not (venv / "bin" / "torchserve").is_file():
        return f"no TorchServe in {venv} (make sagemaker-venv builds it)"
    if not shutil.which("java"):
        return "no java on PATH (TorchServe needs a JRE: apt-get install default-jre-headless)"
    return None


def measure_torchserve(pkg: Path, tmp: Path, venv: Path, config: str, device: str, images, args,
                       int8: bool = False) -> dict:
    """TorchServe with the same model and preprocessing; ``config`` = WORKERSxBATCHxDELAY_MS. ``int8``: the
    handler runs the package's INT8 model on OpenVINO (benchmarks/_ts_handler_int8.py), each worker with
    cores / workers OpenVINO threads, OpenVINO from ``args.ts_openvino``."""
    from medpipe.infer.quantize import INT8_FILE, INT8_META

    workers, batch, delay = (int(v) for v in config.split("x"))
    kind = "int8" if int8 else "fp32"
    store = tmp / f"ts_store_{kind}_{config}"
    store.mkdir()
    files = [pkg / "weights.safetensors", pkg / "model.json", ROOT / "_ts_common.py"] + \
        ([pkg / INT8_FILE, pkg / INT8_META] if int8 else [])
    handler = ROOT / ("_ts_handler_int8.py" if int8 else "_ts_handler.py")
    subprocess.run([str(venv / "bin" / "torch-model-archiver"), "--model-name", "medpipe", "--version", "1.0",
                    "--handler", str(handler), "--extra-files", ",".join(map(str, files)), "--export-path", str(store),
                    "--archive-format", "no-archive", "--force"], check=True)
    port, mport, xport = free_port(), free_port(), free_port()
    cfg = tmp / f"ts_{config}.properties"
    cfg.write_text(f"inference_address=http://127.0.0.1:{port}\nmanagement_address=http://127.0.0.1:{mport}\n"
                   f"metrics_address=http://127.0.0.1:{xport}\nmodel_store={store}\ninstall_py_dep_per_model=false\n"
                   "default_response_timeout=120\n" + ("number_of_gpu=0\n" if device == "cpu" else ""))
    ts_tmp = tmp / f"ts_tmp_{kind}_{config}"  # TorchServe keeps its pid file in TMPDIR: one per server
    ts_tmp.mkdir()
    path = [str(ROOT.parent / "src"), *([str(Path(args.ts_openvino).resolve())] if int8 else []),
            os.environ.get("PYTHONPATH")]
    env = {**os.environ, "TMPDIR": str(ts_tmp), "JAVA_TOOL_OPTIONS": "-Xmx2g", "LOG_LOCATION": str(ts_tmp / "logs"),
           "METRICS_LOCATION": str(ts_tmp / "logs"), "PYTHONPATH": os.pathsep.join(filter(None, path)),
           "MEDPIPE_TS_THREADS": str(max(1, (os.cpu_count() or 1) // workers)), "MEDPIPE_TS_MAX_BATCH": str(batch)}

    def register():
        c = http.client.HTTPConnection("127.0.0.1", mport, timeout=300)
        c.request("POST", f"/models?url=medpipe&model_name=medpipe&batch_size={batch}&max_batch_delay={delay}"
                          f"&initial_workers={workers}&synchronous=true&response_timeout=120")
        r = c.getresponse()
        body = r.read()
        if r.status != 200:
            raise SystemExit(f"TorchServe did not register the model: {r.status} {body[:300]!r}")

    cmd = [str(venv / "bin" / "torchserve"), "--start", "--foreground", "--ncs", "--disable-token-auth",
           "--enable-model-api", "--model-store", str(store), "--ts-config", str(cfg)]
    return measure(f"torchserve{'-int8' if int8 else ''}/{config}", cmd, port, images, args,
                   path="/predictions/medpipe", env=env, after_ready=register)


def add_int8_model(pkg: Path, tmp: Path) -> None:
    """An INT8 model for the (untrained) benchmark package, calibrated on a synthetic validation split."""
    from medpipe.data.sources import ingest
    from medpipe.data.splits import ensure_splits
    from medpipe.infer.quantize import install_int8, quantize_package

    data = tmp / "int8_data"
    ingest(synth_dataset(200), data, workers=None)
    ensure_splits(data, seed=0, val=0.15, test=0.15)
    int8, info = quantize_package(pkg, data, force=True)
    install_int8(pkg, int8, info)


def decode_cost(pkg: Path, images: list[bytes], rounds: int = 3) -> float:
    """Seconds to decode one image to model pixels with the package's decoder, one core (best of ``rounds``)."""
    from medpipe.package import read_meta

    spec = read_meta(pkg).preprocessing
    best = float("inf")
    for _ in range(rounds + 1):  # the first round warms the caches
        t = time.perf_counter()
        for data in images:
            spec.decode(data)
        best = min(best, (time.perf_counter() - t) / len(images))
    return best


def forward_limit(pkg: Path, images: list[bytes], batch: int = 8, seconds: float = 15.0, streams: int = 1) -> dict:
    """Images/s of medpipe's own Predictor (openvino backend with ``streams`` infer streams: normalisation, the
    INT8 forward, softmax) on decoded pixels at ``batch``, every core, no HTTP and no decoding."""
    import torch

    from medpipe.infer.predictor import Predictor

    torch.set_num_threads(1)  # as medpipe serve does for OpenVINO (torch's idle threads would spin on its cores)
    pred = Predictor(pkg, device="cpu", backend="openvino", max_batch=16, streams=streams)
    pixels = [pred.decode(d) for d in images[:batch]]
    pred.probabilities(pixels)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        pred.probabilities(pixels)
        n += batch
    return {"batch": batch, "images_per_s": n / (time.perf_counter() - t0), "backend": pred.backend,
            "streams": streams}


def benchmark_app(pkg: Path, size: int, batch: int = 8, seconds: int = 15) -> dict:
    """OpenVINO's own benchmark_app on the package's INT8 ONNX graph (its best: the throughput hint)."""
    import re

    from medpipe.infer.quantize import INT8_FILE

    exe = shutil.which("benchmark_app") or str(Path(sys.executable).parent / "benchmark_app")
    out = {}
    for hint in ("throughput", "latency"):
        r = subprocess.run([exe, "-m", str(pkg / INT8_FILE), "-d", "CPU", "-shape", f"[{batch},3,{size},{size}]",
                            "-t", str(seconds), "-hint", hint],
                           capture_output=True, text=True, timeout=600, check=False)
        m = re.search(r"Throughput:\s+([0-9.]+) FPS", r.stdout)
        out[hint] = float(m.group(1)) if m else None
        if not m:
            print(f"benchmark_app ({hint}) gave no throughput: {(r.stdout + r.stderr)[-500:]}")
    return {"batch": batch, "images_per_s": out}


def int8_peer(args, pkg: Path, tmp: Path, images: list[bytes]) -> None:
    """medpipe (openvino backend) against TorchServe running the same INT8 OpenVINO model and decoder, the FP32
    TorchServe peer, the forward limit (benchmark_app and medpipe's Predictor) and the decode cost, one run."""
    load = {"before": os.getloadavg()}
    cores = os.cpu_count() or 1
    decode_s = decode_cost(pkg, images)
    stream_counts = [int(x) for x in args.streams.split(",")]
    forwards = {n: forward_limit(pkg, images, streams=n) for n in stream_counts}
    forward = max(forwards.values(), key=lambda f: f["images_per_s"])  # the limit: the best forward medpipe has
    app = benchmark_app(pkg, args.size)
    limit = 1.0 / (decode_s / cores + 1.0 / forward["images_per_s"])  # decode and forward share the cores
    print(f"decode {1000 * decode_s:.1f} ms/image (one core); forward (batch 8, Predictor) "
          + ", ".join(f"{n} stream(s) {f['images_per_s']:.1f} img/s" for n, f in forwards.items())
          + f", benchmark_app {app['images_per_s']}; end-to-end limit {limit:.1f} img/s")

    def medpipe(name: str, src: Path, streams: int | None = None) -> dict:
        port = free_port()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))}
        return measure(name, [sys.executable, "-m", "medpipe", "serve", "--model", str(pkg), "--port", str(port),
                              "--backend", "openvino", "--device", "cpu",
                              *(["--streams", str(streams)] if streams else [])], port, images, args, env=env)

    before = medpipe("medpipe/openvino (before)", Path(args.before_src).resolve()) if args.before_src else None
    meds = {n: medpipe(f"medpipe/openvino --streams {n}", ROOT.parent / "src", n) for n in stream_counts}
    best_streams = max(meds, key=lambda n: meds[n]["rps"])
    med = meds[best_streams]
    ts_int8 = {c: measure_torchserve(pkg, tmp, Path(args.ts_venv), c, "cpu", images, args, int8=True)
               for c in args.ts_int8_configs.split(",")}
    ts_fp32 = {c: measure_torchserve(pkg, tmp, Path(args.ts_venv), c, "cpu", images, args)
               for c in args.ts_configs.split(",") if c}
    load["after"] = os.getloadavg()
    best = max(ts_int8, key=lambda c: ts_int8[c]["rps"])
    by_streams = {n: {"throughput_vs_torchserve_int8": m["rps"] / ts_int8[best]["rps"],
                      "lone_p50_vs_torchserve_int8": m["lone_p50_ms"] / ts_int8[best]["lone_p50_ms"],
                      "served_vs_limit": m["rps"] / limit} for n, m in meds.items()}
    ratios = dict(by_streams[best_streams], medpipe_streams=best_streams)
    if ts_fp32:
        fp32 = max(ts_fp32.values(), key=lambda r: r["rps"])
        ratios["throughput_vs_torchserve_fp32"] = med["rps"] / fp32["rps"]
        ratios["lone_p50_vs_torchserve_fp32"] = med["lone_p50_ms"] / fp32["lone_p50_ms"]
    for n, r in by_streams.items():
        print(f"--streams {n}:", "  ".join(f"{k} {v:.2f}" for k, v in r.items()))
    print("best:", "  ".join(f"{k} {v:.2f}" for k, v in ratios.items()), f"(load average {load})")
    if before is not None:
        before = {"source": str(args.before_src), "medpipe": before, "ratios": {
            "throughput_vs_torchserve_int8": before["rps"] / ts_int8[best]["rps"],
            "lone_p50_vs_torchserve_int8": before["lone_p50_ms"] / ts_int8[best]["lone_p50_ms"],
            "served_vs_limit": before["rps"] / limit}}
        print("before:", "  ".join(f"{k} {v:.2f}" for k, v in before["ratios"].items()))
    path = write_result("serve_load_int8_peer", {
        "settings": vars(args), "load_average": load, "cores": cores, "decode_ms_per_image": 1000 * decode_s,
        "forward_limit": forward, "forward_by_streams": forwards, "benchmark_app": app,
        "end_to_end_limit_images_per_s": limit, "medpipe": med, "medpipe_by_streams": meds,
        "ratios_by_streams": by_streams, "torchserve_int8": ts_int8, "torchserve_int8_best": best, "torchserve_fp32": ts_fp32,
        "ratios": ratios, **({"before": before} if before else {}), "targets": {"throughput_vs_torchserve_int8": 1.5, "lone_p50_vs_torchserve_int8": 0.8,
                                      "served_vs_limit": 0.8}})
    print(f"wrote {path}")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=320)
    ap.add_argument("--lone", type=int, default=40)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--backends", default=None,
                    help="medpipe backends to measure, comma-separated (default: openvino,int8,onnx,eager on "
                         "CPU, openvino only when installed; eager,cudagraph on CUDA)")
    ap.add_argument("--ts-configs", default="1x8x10",
                    help="TorchServe settings WORKERSxBATCHxDELAY_MS, comma-separated ('' skips TorchServe)")
    ap.add_argument("--ts-venv", default=str(ROOT.parent / ".venv-sm"), help="venv holding torchserve")
    ap.add_argument("--device", default="auto", help="every server runs on this device (auto: CUDA when available)")
    ap.add_argument("--int8-peer", action="store_true",
                    help="instead: medpipe's openvino backend against TorchServe running the same INT8 model "
                         "(--ts-int8-configs), the forward limit and decode cost (serve_load_int8_peer.json)")
    ap.add_argument("--streams", default="1,2",
                    help="--int8-peer: medpipe's --streams settings served (and forward-timed) in the same run; the "
                         "best-throughput one gives the headline ratios, the best forward the limit")
    ap.add_argument("--ts-int8-configs", default="1x8x10,2x4x10,1x4x5", help="WORKERSxBATCHxDELAY_MS for --int8-peer")
    ap.add_argument("--before-src", default=None,
                    help="--int8-peer: also serve with the medpipe of this source tree (an earlier commit's src/, e.g. "
                         "from git archive), in the same run against the same peers; its figures go under \"before\"")
    ap.add_argument("--ts-openvino", default=str(ROOT.parent / ".bench" / "ts-openvino"),
                    help="folder holding openvino for TorchServe's workers (pip install --target FOLDER --no-deps "
                         "openvino==<the version medpipe uses> openvino-telemetry)")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.int8_peer:
        folder = synth_dataset(200)
        images = [p.read_bytes() for p in sorted(folder.rglob("*.jpg"))[:32]]
        with tempfile.TemporaryDirectory() as tmp:
            int8_peer(args, int8_package(args.size), Path(tmp), images)
        return

    from medpipe.utils import resolve_device

    device = resolve_device(args.device).type
    args.device = device
    from medpipe.infer.openvino_runtime import available as openvino_available

    cpu_default = ("openvino," if openvino_available() else "") + "int8,onnx,eager"
    args.backends = args.backends or (cpu_default if device == "cpu" else "eager,cudagraph")

    folder = synth_dataset(200)
    images = [p.read_bytes() for p in sorted(folder.rglob("*.jpg"))[:32]]
    ts_rows, ts_skipped = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pkg = (int8_package(args.size) if {"int8", "openvino"} & set(args.backends.split(","))
               else make_package(tmp / "pkg", args.size))
        port = free_port()
        naive = measure("naive", [sys.executable, str(ROOT / "_naive_server.py"), str(pkg), str(port), device],
                        port, images, args)
        ts_skipped = torchserve_missing(Path(args.ts_venv)) if args.ts_configs else "not asked for"
        if ts_skipped:
            print(f"TorchServe skipped: {ts_skipped}")
        else:
            for config in args.ts_configs.split(","):
                ts_rows[config] = measure_torchserve(pkg, tmp, Path(args.ts_venv), config, device, images, args)
        rows = {}
        for backend in args.backends.split(","):
            port = free_port()
            rows[backend] = measure(f"medpipe/{backend}", [sys.executable, "-m", "medpipe", "serve", "--model",
                                    str(pkg), "--port", str(port), "--backend", backend, "--device", device],
                                    port, images, args)
    best = max(rows, key=lambda b: rows[b]["rps"])
    med = rows[best]
    ratios = {"throughput": med["rps"] / naive["rps"], "lone_p50": med["lone_p50_ms"] / naive["lone_p50_ms"]}
    print(f"fastest medpipe backend: {best}.  throughput medpipe/naive = {ratios['throughput']:.2f}x   "
          f"lone p50 medpipe/naive = {ratios['lone_p50']:.2f}   /ping p99 under load {med['ping_p99_ms']:.0f} ms "
          "(target < 2000)")
    if ts_rows:
        ts_best = max(ts_rows, key=lambda c: ts_rows[c]["rps"])
        ts = ts_rows[ts_best]
        ratios["throughput_vs_torchserve"] = med["rps"] / ts["rps"]
        ratios["lone_p50_vs_torchserve"] = med["lone_p50_ms"] / ts["lone_p50_ms"]
        print(f"best TorchServe: {ts_best}.  throughput medpipe/TorchServe = {ratios['throughput_vs_torchserve']:.2f}x "
              f"(target >= 2)   lone p50 medpipe/TorchServe = {ratios['lone_p50_vs_torchserve']:.2f} (target <= 0.6)")
    path = write_result("serve_load" if device == "cpu" else f"serve_load_{device}",
                        {"settings": vars(args), "naive": naive, "torchserve": ts_rows, "torchserve_skipped": ts_skipped,
                         "medpipe": rows, "best": best, "ratios": ratios,
                         "targets": {"throughput_vs_torchserve": 2.0, "lone_p50_vs_torchserve": 0.6,
                                     "ping_p99_ms": 2000}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
