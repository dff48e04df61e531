"""Monitoring: false alarms on unshifted windows, detection of realistic shifts, the label-free estimate's
error, and the cost of data capture on serving throughput.

    python benchmarks/monitor.py [--count 1200] [--windows 60]        # drift part + capture cost -> monitor.json
    python benchmarks/monitor.py --shifts jpeg_quality [--model PKG]  # re-run unshifted + these shifts, merged
    python benchmarks/monitor.py --capture-only [--rounds 6]          # -> monitor_capture_cost.json

Synthetic dermatoscopy JPEGs (medpipe.data.synthetic, 160x120) watched by densenet-test (32 px) trained
for --train-epochs on another synthetic set of the same generator (and calibrated on its validation
split, as `medpipe train` does), or the package given with --model. A baseline
(medpipe.monitor.drift.statistics) is made on a third of the images; windows are drawn at random
(without replacement inside a window) from the other two thirds, unshifted or shifted (the fingerprints
carry the projected penultimate-layer embedding, so the embedding-drift test runs too): a colour cast
(red x(1+s), blue x(1-s)), a Gaussian blur, a JPEG-quality drop (the unshifted images are JPEG quality
90), and a melanoma-clinic class mix (mel drawn k times as often). Every window runs the checks of
``medpipe monitor check`` (medpipe.monitor.drift.check_window, default constraints). The false-alarm
rate is the share of unshifted windows with any violation; the detection rate the share of shifted
ones. The label-free estimate's error is |expected - measured| accuracy and balanced accuracy per
window (a small model on synthetic images: the figures show the estimator's behaviour, not a
dermatology model's).

Capture cost: two real `medpipe serve --backend eager --threads 1 --decode-workers 1` processes, capture
off and on (default settings: fingerprint + embedding, every request), both up, loaded in turn by 8
client threads with 8 different 600x450 JPEGs, off/on then on/off in alternate rounds; a capture-on
round lasts until its last record is written. Reported: requests per second of each round and the CPU
seconds per request of each server (with its decode workers), which other load on the machine does not
move; for an untrained DenseNet121 at 224 px (the served model) and densenet-test at 32 px (the worst
case: inference costs next to nothing, so capture's own decode of each image shows fully).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "tests" / "data" / "densenet-test"


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


SHIFTS = {
    "colour_cast": (lambda im, s: Image.fromarray(np.clip(np.asarray(im, float) * [1 + s, 1, 1 - s], 0, 255)
                                                  .astype(np.uint8)), (0.05, 0.1, 0.2)),
    "blur": (lambda im, s: im.filter(ImageFilter.GaussianBlur(s)), (0.5, 1.0, 2.0)),
    "jpeg_quality": (None, (50, 20, 8)),
}


_EMBEDDERS: dict = {}


def _features(predictor, blobs: list[bytes]) -> tuple[np.ndarray, list[dict]]:
    """Probabilities and fingerprints with the projected embedding of the same forward pass, as serve captures."""
    from medpipe.monitor.capture import fingerprint
    from medpipe.monitor.embedding import Embedder, encode

    emb = _EMBEDDERS.setdefault(id(predictor), Embedder(predictor))
    parts = [emb.probabilities([predictor.decode(b) for b in blobs[i:i + 64]]) for i in range(0, len(blobs), 64)]
    prints = [fingerprint("bytes", b) for b in blobs]
    for fp, e in zip(prints, np.concatenate([e for _, e in parts])):
        fp.update(embedding=encode(e), embedding_projection=emb.id)
    return np.concatenate([p for p, _ in parts]), prints


def train_model(root: Path, epochs: int) -> Path:
    """densenet-test trained (and temperature-calibrated on its validation split) on another synthetic set."""
    from medpipe.cli import main as cli
    from medpipe.data.sources import ingest
    from medpipe.data.synthetic import SynthSpec, write_synthetic

    write_synthetic(root / "raw", SynthSpec(count=700, width=160, height=120, seed=8), fmt="folders", workers=2)
    ingest(root / "raw", root / "data", workers=2)
    assert cli(["train", "--data", str(root / "data"), "--out", str(root / "run"), "--model", "densenet-test",
                "--image-size", "32", "--batch-size", "16", "--epochs", str(epochs), "--bootstrap", "0",
                "--threads", "2", "--lr", "0.003", "--warmup-epochs", "0.5"]) == 0
    return root / "run" / "model"


def drift_part(count: int, n_windows: int, sizes: tuple[int, ...], model: Path, only: list[str] | None = None) -> dict:
    """Unshifted windows and every shift (``only``: just these names of :data:`SHIFTS` / melanoma_clinic)."""
    from medpipe.data.synthetic import HAM_CLASSES, SynthSpec, write_synthetic
    from medpipe.infer.predictor import Predictor
    from medpipe.monitor import drift

    tmp = Path(tempfile.mkdtemp(prefix="medpipe-monitor-bench-"))
    write_synthetic(tmp, SynthSpec(count=count, width=160, height=120, seed=7), fmt="folders", workers=2)
    import pandas as pd

    meta = pd.read_csv(tmp / "HAM10000_metadata.csv")
    paths = {p.stem: p for p in tmp.rglob("*.jpg")}
    labels = np.array([list(HAM_CLASSES).index(d) for d in meta["dx"]])
    images = [Image.open(paths[i]).convert("RGB") for i in meta["image_id"]]
    order = np.random.default_rng(0).permutation(len(images))
    base, pool = order[: count // 3], order[count // 3:]
    predictor = Predictor(model, device="cpu")
    raw = [_jpeg(im) for im in images]
    p_base, f_base = _features(predictor, [raw[i] for i in base])
    stats = drift.statistics({}, predictor.classes, p_base, labels[base], f_base)
    cons = dict(drift.CONSTRAINTS)
    p_pool, f_pool = _features(predictor, [raw[i] for i in pool])
    rng = np.random.default_rng(1)
    out: dict = {"baseline_images": int(len(base)), "pool_images": int(len(pool)), "constraints": cons, "windows": {}}

    def run(probs, prints, y, weights=None):
        res = {}
        for n in (n for n in sizes if n <= len(probs)):
            hits, err_acc, err_bacc, fired = 0, [], [], {}
            for _ in range(n_windows):
                idx = rng.choice(len(probs), n, replace=False, p=weights)
                w = drift.check_window(stats, cons, probs[idx], [prints[i] for i in idx], (y[idx], probs[idx]))
                hits += bool(w["violations"])
                for v in {v.get("feature_name") or v["constraint_check_type"] for v in w["violations"]}:
                    fired[v] = fired.get(v, 0) + 1
                err_acc.append(abs(w["estimated"]["accuracy"] - w["measured"]["accuracy"]))
                err_bacc.append(abs(w["estimated"]["balanced_accuracy"] - w["measured"]["balanced_accuracy"]))
            res[n] = {"flagged_share": hits / n_windows, "fired_share": {k: c / n_windows for k, c in fired.items()},
                      "abs_error_accuracy_mean": float(np.mean(err_acc)),
                      "abs_error_balanced_accuracy_mean": float(np.mean(err_bacc))}
        return res

    y_pool = labels[pool]
    out["windows"]["unshifted"] = run(p_pool, f_pool, y_pool)
    for name, (fn, strengths) in SHIFTS.items():
        for s in strengths if only is None or name in only else ():
            blobs = [_jpeg(images[i], quality=s) if fn is None else _jpeg(fn(images[i], s)) for i in pool]
            p, f = _features(predictor, blobs)
            out["windows"][f"{name}_{s}"] = run(p, f, y_pool)
    mel = HAM_CLASSES.index("mel")
    for k in (2, 4) if only is None or "melanoma_clinic" in only else ():
        w = np.where(y_pool == mel, float(k), 1.0)
        out["windows"][f"melanoma_clinic_x{k}"] = run(p_pool, f_pool, y_pool, w / w.sum())
    return out


def _server(model: Path, capture: str | None, sample: float) -> tuple[subprocess.Popen, int]:
    port = free_port()
    args = [sys.executable, "-m", "medpipe", "serve", "--model", str(model), "--port", str(port), "--backend",
            "eager", "--threads", "1", "--decode-workers", "1"]
    if capture:
        args += ["--capture", capture, "--capture-sample", str(sample)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/ping")
            if c.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def _load(port: int, bodies: list[bytes], requests: int, clients: int) -> float:
    """Requests per second of ``clients`` threads sending ``requests`` in all (the bodies in turn)."""
    done = []

    def client(k, n):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for i in range(n):
            c.request("POST", "/invocations", bodies[(k + i * clients) % len(bodies)], {"Content-Type": "image/jpeg"})
            r = c.getresponse()
            r.read()
            done.append(r.status)

    t = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k, requests // clients)) for k in range(clients)]
    [th.start() for th in threads]
    [th.join() for th in threads]
    assert set(done) == {200}, set(done)
    return len(done) / (time.perf_counter() - t)


def _counter(port: int, name: str) -> float:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def _cpu_s(proc: subprocess.Popen) -> float:
    """CPU seconds (user + system) of a server process and its decode workers so far."""
    import psutil

    total = 0.0
    server = psutil.Process(proc.pid)
    for p in [server, *server.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _drained(folder: Path, expected: int, seen: dict, timeout: float = 300.0) -> None:
    """Wait until ``expected`` records are in the capture files, reading only what is new on each look (the
    files, not the server's /metrics: asking the server would add its own work to what is measured)."""
    t = time.time()
    while time.time() - t < timeout:
        for f in folder.rglob("*.jsonl"):
            with open(f, "rb") as fh:
                fh.seek(seen.get(f, (0, 0))[0])
                chunk = fh.read()
            if chunk:
                at, n = seen.get(f, (0, 0))
                seen[f] = (at + len(chunk), n + chunk.count(b"\n"))
        if sum(n for _, n in seen.values()) >= expected:
            return
        time.sleep(0.02)
    raise RuntimeError("the capture writer did not catch up (records dropped?)")


def _densenet121(folder: Path) -> Path:
    """An untrained DenseNet121 package at 224 px (speed does not depend on the weights)."""
    import torch

    from medpipe.data.synthetic import HAM_CLASSES
    from medpipe.models import create_model
    from medpipe.package import save_package
    from medpipe.preprocess import PreprocessSpec

    torch.manual_seed(0)
    save_package(folder, create_model("densenet121", 7), name="bench121", arch="densenet121",
                 classes=list(HAM_CLASSES), spec=PreprocessSpec(image_size=224))
    return folder


def capture_cost(name: str, model: Path, bodies: list[bytes], rounds: int, per_round: int, clients: int,
                 tmp: Path) -> dict:
    """Throughput with capture off vs on (every request: fingerprint + embedding), two servers up side by side
    and loaded in turn, off/on then on/off in alternate rounds. A capture-on round ends when its last record
    is written (the writer's work counts against it, none of it spills into the next round)."""
    off, p_off = _server(model, None, 1.0)
    on, p_on = _server(model, str(tmp / f"cap_{name}"), 1.0)
    seen: dict = {}
    rates: dict = {"off": [], "on": []}
    cpu = {"off": 0.0, "on": 0.0}
    sent = 0
    try:
        for port in (p_off, p_on):
            _load(port, bodies, 2 * clients, clients)  # warm-up
        sent = 2 * clients
        _drained(tmp / f"cap_{name}", sent, seen)
        for r in range(rounds):
            for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                proc = off if mode == "off" else on
                c0 = _cpu_s(proc)
                if mode == "off":
                    rates["off"].append(_load(p_off, bodies, per_round, clients))
                else:
                    t = time.perf_counter()
                    _load(p_on, bodies, per_round, clients)
                    sent += per_round
                    _drained(tmp / f"cap_{name}", sent, seen)
                    rates["on"].append(per_round / (time.perf_counter() - t))
                cpu[mode] += _cpu_s(proc) - c0
        captured, dropped = _counter(p_on, "medpipe_capture_captured_total"), _counter(p_on, "medpipe_capture_dropped_total")
    finally:
        for proc in (off, on):
            proc.terminate()
            proc.wait(30)
    pairs = [b / a for a, b in zip(rates["off"], rates["on"])]
    return {"model": name, "rounds": rounds, "requests_per_round": per_round, "clients": clients,
            "req_per_s_off": rates["off"], "req_per_s_on": rates["on"],
            "req_per_s_off_mean": float(np.mean(rates["off"])), "req_per_s_on_mean": float(np.mean(rates["on"])),
            "throughput_cost_pct": float(100 * (1 - np.mean(rates["on"]) / np.mean(rates["off"]))),
            "throughput_cost_pct_median_of_rounds": float(100 * (1 - np.median(pairs))),
            # CPU per request (server + decode workers): on a CPU-bound machine throughput is its inverse, and
            # other load on the machine hardly moves it
            "cpu_ms_per_request_off": 1000 * cpu["off"] / (rounds * per_round),
            "cpu_ms_per_request_on": 1000 * cpu["on"] / (rounds * per_round),
            "cpu_cost_pct": float(100 * (1 - cpu["off"] / cpu["on"])),
            "records_captured": captured, "records_dropped": dropped, "requests_to_capture_server": sent}


def capture_part(rounds: int, requests: int, clients: int) -> dict:
    """Capture's cost on serving throughput: DenseNet121 at 224 px (the served model) and densenet-test at
    32 px (the worst case: inference costs next to nothing, so capture's own decode of each image shows
    fully), 8 different 600x450 JPEGs (HAM10000's size), default capture settings, every request captured."""
    from medpipe.data.synthetic import SynthSpec, write_synthetic
    from medpipe.monitor.capture import fingerprint

    tmp = Path(tempfile.mkdtemp(prefix="medpipe-capture-bench-"))
    write_synthetic(tmp / "img", SynthSpec(count=8, width=600, height=450, seed=3), fmt="folders", workers=1)
    bodies = [p.read_bytes() for p in sorted((tmp / "img").rglob("*.jpg"))]
    load_before = os.getloadavg()
    models = [capture_cost("densenet121_224px", _densenet121(tmp / "d121"), bodies, rounds, requests, clients, tmp),
                capture_cost("densenet-test_32px", PKG, bodies, rounds, requests * 8, clients, tmp)]
    t = time.process_time()  # CPU time: the wall time of a loaded machine would count other work
    for i in range(200):
        fingerprint("bytes", bodies[i % len(bodies)])
    return {"image": f"600x450 JPEG (8 synthetic, ~{np.mean([len(b) for b in bodies]) / 1024:.0f} KB)",
            "server": "medpipe serve --backend eager --threads 1 --decode-workers 1 --capture DIR --capture-sample 1.0",
            "capture": "default: fingerprint + embedding, no pixels", "clients": clients,
            "fingerprint_cpu_ms_per_image": (time.process_time() - t) * 5, "load_average_before": load_before,
            "load_average_after": os.getloadavg(), "models": models}


def merge_drift(old: dict, new: dict, shifts: list[str]) -> dict:
    """monitor.json's drift block with the re-run windows (unshifted and ``shifts``) replaced, the others kept."""
    merged = dict(old)
    merged["windows"] = {**old.get("windows", {}), **new["windows"]}
    merged.setdefault("reruns", []).append({
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "windows": sorted(new["windows"]), "model": new["model"],
        "baseline_images": new["baseline_images"], "pool_images": new["pool_images"],
        "load_average": os.getloadavg(), "note": f"only the unshifted windows and {shifts} re-run; the other rows "
        "are the earlier run's"})
    return merged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=1200)
    ap.add_argument("--windows", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=6, help="capture cost: off/on rounds per model")
    ap.add_argument("--requests", type=int, default=48, help="capture cost: requests per DenseNet121 round "
                    "(x8 for densenet-test)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--train-epochs", type=int, default=6, help="epochs of the model the drift part watches")
    ap.add_argument("--skip-capture", action="store_true", help="only the drift part")
    ap.add_argument("--capture-only", action="store_true", help="only capture's cost (monitor_capture_cost.json)")
    ap.add_argument("--shifts", help="comma-separated shifts to re-run with the unshifted windows (e.g. "
                    "jpeg_quality); merged into monitor.json, the other rows kept")
    ap.add_argument("--model", type=Path, help="watch this package instead of training one (e.g. tests/data/"
                    "densenet-test, when the machine is too loaded to train)")
    ap.add_argument("--print-only", action="store_true", help="print the result, write no results file")
    a = ap.parse_args()
    t = time.time()
    if a.capture_only:
        result = {**capture_part(a.rounds, a.requests, a.clients), "seconds": round(time.time() - t, 1)}
        print(json.dumps(result, indent=1) if a.print_only else write_result("monitor_capture_cost", result))
        return
    only = a.shifts.split(",") if a.shifts else None
    model = a.model or train_model(Path(tempfile.mkdtemp(prefix="medpipe-monitor-model-")), a.train_epochs)
    result = {"drift": drift_part(a.count, a.windows, (50, 100, 200), model, only)}
    result["drift"]["model"] = str(a.model) if a.model else f"densenet-test trained {a.train_epochs} epochs"
    if only:
        old = json.loads((ROOT / "benchmarks" / "results" / "monitor.json").read_text())
        result = {**{k: v for k, v in old.items() if k not in ("benchmark", "when", "machine")},
                  "first_run_when": old.get("first_run_when", old.get("when")),
                  "drift": merge_drift(old["drift"], result["drift"], only)}
    elif not a.skip_capture:
        result["capture"] = capture_part(a.rounds, a.requests, a.clients)
    result["seconds" if not only else "rerun_seconds"] = round(time.time() - t, 1)
    print(json.dumps(result, indent=1) if a.print_only else write_result("monitor", result))


if __name__ == "__main__":
    main()
