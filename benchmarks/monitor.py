"""Monitoring: false alarms on unshifted windows, detection of realistic shifts, the label-free estimate's
error, and the cost of data capture on serving throughput, in one run.

    python benchmarks/monitor.py [--count 1200] [--windows 60] [--requests 300]

Synthetic dermatoscopy JPEGs (medpipe.data.synthetic, 160x120) watched by densenet-test (32 px) trained
for --train-epochs on another synthetic set of the same generator (and calibrated on its validation
split, as `medpipe train` does). A baseline (medpipe.monitor.drift.statistics) is made on a third of
the images; windows are drawn at random (without replacement inside a window) from the other two
thirds, unshifted or shifted (the fingerprints carry the projected penultimate-layer embedding, so the
embedding-drift test runs too): a colour cast (red x(1+s), blue x(1-s)), a Gaussian blur, a JPEG-quality
drop, and a melanoma-clinic class mix (mel drawn k times as often). Every window runs the checks of
``medpipe monitor check`` (medpipe.monitor.drift.check_window, default constraints). The false-alarm
rate is the share of unshifted windows with any violation; the detection rate the share of shifted
ones. The label-free estimate's error is |expected - measured| accuracy and balanced accuracy per
window (a small model on synthetic images: the figures show the estimator's behaviour, not a
dermatology model's). Capture cost: two real `medpipe serve` processes, capture
off and on (fingerprints; every request, and 10%), the same requests from 4 client threads, alternated
twice, for densenet-test at 32 px (the worst case: inference costs next to nothing, so capture's second
decode of each image shows fully) and an untrained DenseNet121 at 224 px (the served model's cost).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
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


def drift_part(count: int, n_windows: int, sizes: tuple[int, ...], model: Path) -> dict:
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
        for s in strengths:
            blobs = [_jpeg(images[i], quality=s) if fn is None else _jpeg(fn(images[i], s)) for i in pool]
            p, f = _features(predictor, blobs)
            out["windows"][f"{name}_{s}"] = run(p, f, y_pool)
    mel = HAM_CLASSES.index("mel")
    for k in (2, 4):
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


def _load(port: int, body: bytes, requests: int, clients: int = 4) -> float:
    done = []

    def client(n):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for _ in range(n):
            c.request("POST", "/invocations", body, {"Content-Type": "image/jpeg"})
            r = c.getresponse()
            r.read()
            done.append(r.status)

    t = time.perf_counter()
    threads = [threading.Thread(target=client, args=(requests // clients,)) for _ in range(clients)]
    [th.start() for th in threads]
    [th.join() for th in threads]
    assert set(done) == {200}, set(done)
    return len(done) / (time.perf_counter() - t)


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


def capture_part(requests: int) -> dict:
    """Throughput of capture off vs on, alternated twice per setting, with the same 600x450 JPEG."""
    from medpipe.data.synthetic import SynthSpec, write_synthetic

    tmp = Path(tempfile.mkdtemp(prefix="medpipe-capture-bench-"))
    write_synthetic(tmp / "img", SynthSpec(count=7, width=600, height=450, seed=3), fmt="folders", workers=1)
    body = next((tmp / "img").rglob("*.jpg")).read_bytes()
    settings = [("densenet-test_32px", PKG, 1.0, requests), ("densenet-test_32px", PKG, 0.1, requests),
                ("densenet121_224px", _densenet121(tmp / "d121"), 1.0, max(40, requests // 6))]
    out = []
    for name, model, sample, n in settings:
        rates: dict = {"off": [], "on": []}
        for rep in range(2):
            for mode in ("off", "on"):
                proc, port = _server(model, str(tmp / f"cap_{name}_{sample}_{rep}") if mode == "on" else None, sample)
                try:
                    _load(port, body, 8)  # warm-up
                    rates[mode].append(_load(port, body, n))
                finally:
                    proc.terminate()
                    proc.wait(30)
        off, on = np.mean(rates["off"]), np.mean(rates["on"])
        out.append({"model": name, "capture_sample": sample, "requests_per_run": n, "req_per_s_off": rates["off"],
                    "req_per_s_on": rates["on"], "throughput_cost_pct": float(100 * (off - on) / off)})
    from medpipe.monitor.capture import fingerprint

    t = time.perf_counter()
    for _ in range(100):
        fingerprint("bytes", body)
    per_image_ms = (time.perf_counter() - t) * 10
    return {"image": "600x450 JPEG", "clients": 4, "server": "--threads 1 --decode-workers 1",
            "fingerprint_ms_per_image": per_image_ms, "settings": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=1200)
    ap.add_argument("--windows", type=int, default=60)
    ap.add_argument("--requests", type=int, default=240)
    ap.add_argument("--train-epochs", type=int, default=6, help="epochs of the model the drift part watches")
    ap.add_argument("--skip-capture", action="store_true", help="only the drift part")
    ap.add_argument("--print-only", action="store_true", help="print the result, write no results file")
    a = ap.parse_args()
    t = time.time()
    model = train_model(Path(tempfile.mkdtemp(prefix="medpipe-monitor-model-")), a.train_epochs)
    result = {"drift": drift_part(a.count, a.windows, (50, 100, 200), model)}
    if not a.skip_capture:
        result["capture"] = capture_part(a.requests)
    result["seconds"] = round(time.time() - t, 1)
    print(json.dumps(result, indent=1) if a.print_only else write_result("monitor", result))


if __name__ == "__main__":
    main()
