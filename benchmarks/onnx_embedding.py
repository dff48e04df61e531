"""The ONNX graph's second output (``embedding``, the penultimate-layer features): its cost and its agreement.

    nice -n 10 python benchmarks/onnx_embedding.py [--size 224] [--batch 8] [--rounds 30] [--threads 1]

One process, one DenseNet121 (seeded random weights, as benchmarks/serve_load.py makes it: weights do not
change speed; ``--run RUN`` takes a trained package instead), exported twice: with the ``embedding`` output
(what medpipe exports now) and without it (logits only, as before). Both ONNX Runtime sessions are built as
the backends build them and run ``InferenceSession.run`` on the same batch in interleaved rounds (the order
swapped every round, so a load change on a shared machine hits both); the figure is the median over rounds
of with / without in the same round.

Agreement, on real HAM10000 dev images decoded as serving does: the embedding of each backend against the
eager model's (the classifier head's input), raw features and the 32-value projection the capture stores:
FP32 ONNX Runtime (max absolute difference), INT8 on ONNX Runtime and on OpenVINO in each precision this
CPU runs (cosine similarity; the INT8 graph is calibrated on as many other dev images, as ``medpipe quantize`` does).

Writes benchmarks/results/onnx_embedding.json with the load average it ran under.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEV_IMAGES, bench_package, parser, write_result  # noqa: E402


def _images(folder: Path, n: int, skip: int = 0) -> list[Path]:
    return sorted(folder.rglob("*.jpg"))[skip:skip + n]


def timing(with_emb: bytes, without: bytes, x: np.ndarray, threads: int | None, rounds: int, warmup: int) -> dict:
    from medpipe.infer.onnx_runtime import INPUT_NAME, onnx_session

    sessions = {"with_embedding": onnx_session(with_emb, threads=threads),
                "logits_only": onnx_session(without, threads=threads)}
    feed = {INPUT_NAME: x}
    for _ in range(warmup):
        for s in sessions.values():
            s.run(None, feed)
    ms: dict[str, list[float]] = {k: [] for k in sessions}
    names = list(sessions)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            sessions[name].run(None, feed)
            ms[name].append(1000 * (time.perf_counter() - t))
    ratio = [a / b for a, b in zip(ms["with_embedding"], ms["logits_only"])]
    return {"median_ms": {k: float(np.median(v)) for k, v in ms.items()},
            "ratio_with_over_without": {"median": float(np.median(ratio)), "p25": float(np.percentile(ratio, 25)),
                                        "p75": float(np.percentile(ratio, 75))},
            "rounds": rounds, "warmup": warmup, "threads": threads}


def _cos(a: np.ndarray, b: np.ndarray) -> dict:
    c = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"min": float(c.min()), "mean": float(c.mean())}


def agreement(model, spec, fp32: bytes, pixels: list, calib: list, threads: int | None) -> dict:
    import torch

    from medpipe.infer import openvino_runtime as ovr
    from medpipe.infer.onnx_runtime import INPUT_NAME, onnx_session, with_embedding
    from medpipe.infer.quantize import quantize_onnx
    from medpipe.monitor.embedding import projection
    from medpipe.preprocess import eval_batch

    x = eval_batch(pixels, spec).numpy()
    with torch.inference_mode():
        ref = with_embedding(model)(torch.from_numpy(x))[1].float().numpy()
    proj = projection(ref.shape[1])
    out: dict = {"images": len(pixels), "features": int(ref.shape[1])}
    got = onnx_session(fp32, threads=threads).run(None, {INPUT_NAME: x})[1]
    out["onnx_fp32"] = {"max_abs_diff_features": float(np.abs(got - ref).max()),
                        "max_abs_diff_projected": float(np.abs(got @ proj - ref @ proj).max()),
                        "max_abs_projected": float(np.abs(ref @ proj).max()), "cosine": _cos(got, ref)}
    int8 = quantize_onnx(fp32, [eval_batch(calib[i:i + 16], spec).numpy() for i in range(0, len(calib), 16)])
    got = onnx_session(int8, threads=threads).run(None, {INPUT_NAME: x})[1]
    out["int8_onnxruntime"] = {"cosine": _cos(got, ref), "cosine_projected": _cos(got @ proj, ref @ proj)}
    if ovr.available():
        for precision in ovr.PRECISIONS:
            if not ovr.supported(precision):
                out[f"int8_openvino_{precision}"] = "not supported on this CPU"
                continue
            got = ovr.OpenVinoSession(int8, threads=threads, precision=precision, max_batch=8).run(None, {INPUT_NAME: x})
            out[f"int8_openvino_{precision}"] = {"cosine": _cos(got[1], ref),
                                                 "cosine_projected": _cos(got[1] @ proj, ref @ proj)}
    return out


def main() -> None:
    ap = parser(__doc__, size=224, batch=8, rounds=30, warmup=3, threads=1, images=str(DEV_IMAGES), run=None)
    ap.add_argument("--agreement-images", type=int, default=64, help="dev images the embeddings are compared on")
    ap.add_argument("--name", default="onnx_embedding", help="writes benchmarks/results/NAME.json")
    args = ap.parse_args()

    from medpipe.infer.onnx_runtime import onnx_bytes
    from medpipe.package import load_package
    from medpipe.preprocess import eval_batch

    pkg = bench_package(args.run, args.size, "onnx_embedding_")
    model, meta = load_package(pkg)
    spec = meta.preprocessing
    threads = args.threads or None
    load_before = os.getloadavg()
    with_emb, without = onnx_bytes(model, spec.image_size), onnx_bytes(model, spec.image_size, embedding=False)
    folder = Path(args.images)
    px = [spec.read(p) for p in _images(folder, args.batch)]
    x = eval_batch(px, spec).numpy() if len(px) == args.batch else \
        np.random.default_rng(0).standard_normal((args.batch, 3, spec.image_size, spec.image_size), dtype=np.float32)
    result = {"model": "trained " + str(pkg) if args.run else "densenet121, seeded random weights",
              "image_size": spec.image_size, "batch": args.batch,
              "speed": timing(with_emb, without, x, threads, args.rounds, args.warmup)}
    n = args.agreement_images
    images = _images(folder, n, skip=0)
    if len(images) >= n:
        pixels = [spec.read(p) for p in images]
        calib = [spec.read(p) for p in _images(folder, n, skip=n)]
        result["agreement"] = agreement(model, spec, with_emb, pixels, calib, threads)
    else:
        result["agreement"] = f"skipped: fewer than {n} JPEGs under {folder}"
    print(write_result(args.name, result, load_before))
    import json

    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
