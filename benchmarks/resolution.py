"""Resolution within the training budget: what an epoch costs at each input size, and whether random resized
crops from a larger pixel cache pay at the same per-epoch cost.

    python benchmarks/resolution.py timing  [--sizes 64,96,128 --steps 6]        # per-epoch seconds per size
    python benchmarks/resolution.py quality [--cache-size 96 --epochs 12 --jobs 2 --seeds 1]
    python benchmarks/resolution.py summary                                      # both parts -> one JSON

Both parts use the real HAM10000 dev set (../shared/data/ham10000-dev), ingested once by
``benchmarks/quality.py`` into ``.bench/quality/data-all``, and split seed 0 (lesion-grouped 70/15/15).

``timing``: DenseNet121 (the default model) on one thread, the default recipe, for each training size: the
real training source (pixel cache at that size -> seeded MONAI train preset) and ``train_step`` for
``--steps`` batches after two warm-up steps, then the validation pass over the whole validation split. The
epoch estimate is steps_per_epoch x seconds per step + validation seconds (what ``--budget`` times as the first
epoch), and the epoch count a 25-minute budget buys is floor(1500 / that), as ``TimeBudget`` decides it.
A crop from a larger cache costs the same per epoch as its training size (the network sees the training size);
``--cache-size`` adds a row measuring that.

``quality``: ``benchmarks/quality.py`` with a fixed epoch count (``--epochs``), split/training seed 0..N-1,
the default recipe (64 px from the 64 px cache) against the candidate ``cache_size: S`` (64 px random resized
crops, area 60-100%, from the S px cache; validation and test at 64 px as served), ``--jobs`` runs at once.

``summary`` writes benchmarks/results/quality_resolution.json from both parts' files (each records its load
average, threads and command).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine  # noqa: E402

WORK = ROOT.parent / ".bench" / "quality"
TIMING_OUT = ROOT.parent / ".bench" / "resolution_timing.json"
QUALITY_OUT = ROOT.parent / ".bench" / "resolution_quality.json"
RESULT = ROOT / "results" / "quality_resolution.json"
BUDGET_S = 1500.0


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def time_size(data: Path, size: int, cache_size: int, steps: int, threads: int) -> dict:
    """Seconds per training step and for the validation pass of DenseNet121 at ``size`` (split seed 0)."""
    import torch

    from medpipe.config import make_config
    from medpipe.train.data import CachedSource
    from medpipe.train.engine import Engine, train_step
    from medpipe.train.predict import predict_logits

    cfg = make_config({"image_size": size, "cache_size": cache_size, "threads": threads, "workers": 0,
                       "split_seed": 0, "seed": 0})
    torch.set_num_threads(threads)
    source = CachedSource(data, cfg)
    engine = Engine.create(cfg, source, torch.device("cpu"))
    bf16 = engine.precision == "bf16"  # what the training run would use (auto: bf16 only where it is faster)
    batches = source.epoch(0)
    load0 = _load()
    for b, (x, y) in enumerate(batches):
        if b == 2:
            t0 = time.perf_counter()
        train_step(engine.model, x, y, engine.loss_fn, engine.optimizer, engine.scheduler, cfg.grad_clip,
                   engine.device, bf16=bf16)
        if b == steps + 1:
            break
    step_s = (time.perf_counter() - t0) / steps
    t0 = time.perf_counter()
    predict_logits(engine.model, source.val.pixels, source.val.rows, cfg.preprocess(), engine.device, bf16=bf16)
    val_s = time.perf_counter() - t0
    epoch_s = source.steps_per_epoch * step_s + val_s
    source.close()
    return {"image_size": size, "cache_size": cfg.train_cache_size, "steps_timed": steps, "precision": engine.precision,
            "steps_per_epoch": source.steps_per_epoch, "step_seconds": round(step_s, 3),
            "val_images": len(source.val), "val_seconds": round(val_s, 2), "epoch_seconds": round(epoch_s, 1),
            "epochs_in_25m": max(1, math.floor(BUDGET_S / epoch_s)), "loadavg_before": load0, "loadavg_after": _load()}


def timing(args) -> dict:
    import quality

    data = quality.prepare(args.data or quality.DEV_SET, WORK, None)
    rows = []
    plan = [(s, 0) for s in args.sizes] + ([(args.sizes[0], args.cache_size)] if args.cache_size else [])
    for size, cache in plan:
        r = time_size(data, size, cache, args.steps, args.threads)
        print(json.dumps(r), flush=True)
        rows.append(r)
    payload = {"part": "timing", "command": "python " + shlex.join(sys.argv), "threads": args.threads,
               "nice": os.nice(0), "machine": machine(), "rows": rows, "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    TIMING_OUT.parent.mkdir(parents=True, exist_ok=True)
    TIMING_OUT.write_text(json.dumps(payload, indent=2))
    return payload


def quality_part(args) -> dict:
    import quality

    cand = WORK / f"cache{args.cache_size}.yaml"
    cand.parent.mkdir(parents=True, exist_ok=True)
    cand.write_text(f"cache_size: {args.cache_size}\n")
    name = f"cache{args.cache_size}_crops"
    argv = ["--data", str(args.data or quality.DEV_SET), "--candidate", str(cand), "--name", name, "--recipes", f"default,{name}", "--epochs", str(args.epochs),
            "--seeds", str(args.seeds), "--jobs", str(args.jobs), "--set", f"threads={args.threads}",
            "--image-size", str(args.image_size), "--work", str(WORK), "--out", str(QUALITY_OUT)]
    load0 = _load()
    payload = quality.main(argv)
    payload.update(part="quality", command="python " + shlex.join(sys.argv), quality_argv=argv,
                   loadavg_before=load0, loadavg_after=_load(), nice=os.nice(0))
    QUALITY_OUT.write_text(json.dumps(payload, indent=2, default=float))
    return payload


def _quality_rows(q: dict) -> dict:
    """Per recipe and seed: the test figures quality.py recorded, plus per-class sensitivity from the run's report."""
    out = {}
    for recipe, runs in (q.get("runs") or {}).items():
        for r in runs:
            report = WORK / "runs" / f"{recipe}-seed{r['seed']}" / "report" / "report.json"
            per_class = json.loads(report.read_text())["per_class"] if report.is_file() else {}
            out[f"{recipe}_seed{r['seed']}"] = {
                **{k: r.get(k) for k in ("macro_auc", "balanced_accuracy", "mel_sensitivity_at_spec80",
                                         "mel_sensitivity_at_spec90", "ece", "decision_rule", "epochs", "best_epoch",
                                         "train_seconds")},
                "sensitivity": {c: v.get("sensitivity") for c, v in per_class.items()}}
    return out


def summary(args) -> dict:
    """benchmarks/results/quality_resolution.json from the two parts' files (.bench/resolution_*.json)."""
    out = {"benchmark": "quality_resolution", "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(),
           "data": "HAM10000 dev set (../shared/data/ham10000-dev), split seed 0, test split"}
    if TIMING_OUT.is_file():
        t = json.loads(TIMING_OUT.read_text())
        out["timing"] = {"command": t["command"], "threads": t["threads"], "nice": t["nice"], "when": t["when"],
                         "sizes": {f"{r['image_size']}px_from_{r['cache_size']}": r for r in t["rows"]}}
    if QUALITY_OUT.is_file():
        q = json.loads(QUALITY_OUT.read_text())
        out["quality"] = {"command": q.get("command"), "loadavg_before": q.get("loadavg_before"),
                          "loadavg_after": q.get("loadavg_after"), "nice": q.get("nice"), "when": q.get("when"),
                          "recipes": q.get("recipes"), "common": q.get("common"), "runs": _quality_rows(q),
                          "verdict": {r: {m: {k: v[k] for k in ("difference", "spread", "beats_by_more_than_spread")}
                                          for m, v in per.items()} for r, per in (q.get("verdict") or {}).items()}}
    if args.note:
        out["note"] = args.note
    RESULT.write_text(json.dumps(out, indent=2, default=float))
    print(f"wrote {RESULT}")
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=("timing", "quality", "summary"))
    ap.add_argument("--data", type=Path, help="HAM10000-layout folder (default: quality.py's, the dev set)")
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[64, 96, 128],
                    help="training sizes timed (timing)")
    ap.add_argument("--steps", type=int, default=6, help="timed training steps per size (timing)")
    ap.add_argument("--image-size", type=int, default=64, help="training size of both recipes (quality)")
    ap.add_argument("--cache-size", type=int, default=96, help="the candidate's cache size (quality; timing: "
                    "one more row at the first size from this cache, 0 = none)")
    ap.add_argument("--epochs", type=int, default=12, help="fixed epoch count of every run (quality)")
    ap.add_argument("--seeds", type=int, default=1, help="split seeds 0..N-1 (quality)")
    ap.add_argument("--jobs", type=int, default=2, help="runs trained at once (quality)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--note", help="what the figures say, written into the result (summary)")
    args = ap.parse_args(argv)
    return {"timing": timing, "quality": quality_part, "summary": summary}[args.part](args)


if __name__ == "__main__":
    main()
