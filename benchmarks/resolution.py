"""Resolution within the training budget: what an epoch costs at each input size, and whether random resized
crops from a larger pixel cache pay at the same per-epoch cost.

    python benchmarks/resolution.py timing  [--sizes 64,96,128 --steps 6]        # per-epoch seconds per size
    python benchmarks/resolution.py quality [--cache-size 96 --epochs 12 --jobs 2 --seeds 1]
    python benchmarks/resolution.py summary                                      # both parts -> one JSON

Both parts use the real HAM10000 dev set (../shared/data/ham10000-dev), ingested once by
``benchmarks/quality.py`` into ``.bench/quality/data-all``, and split seed 0 (lesion-grouped 70/15/15).

``timing``: DenseNet121 (the default model) on one thread, the default recipe, for each training size: the
real training source (pixel cache at that size -> seeded MONAI train preset, inline) and ``train_step`` for
``--steps`` batches after two warm-up steps, interleaved across sizes (a change of load falls on every size
alike), then the validation pass over the whole validation split. Each is timed as wall time and as the
process's CPU time: on one thread the CPU time is what the step costs on an idle core, whatever else the shared
machine runs. The epoch estimate is steps_per_epoch x seconds per step + validation seconds (what ``--budget``
times as the first epoch); the epoch count a 25-minute budget buys at that cost is floor(1500 / it), as
``TimeBudget`` decides, and ``cost_vs_first`` the ratio to the first size (scale a quiet machine's measured
epoch count by it). A crop from a larger cache costs the same per step as its training size (the network sees
the training size); ``--cache-size`` adds a row measuring that.

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


def _setup(data: Path, size: int, cache_size: int, threads: int):
    """(config, training source, engine, bf16) of DenseNet121 at ``size`` from a ``cache_size`` cache, split seed 0."""
    import torch

    from medpipe.config import make_config
    from medpipe.train.data import CachedSource
    from medpipe.train.engine import Engine

    cfg = make_config({"image_size": size, "cache_size": cache_size, "threads": threads, "workers": 0,
                       "split_seed": 0, "seed": 0})
    source = CachedSource(data, cfg)
    engine = Engine.create(cfg, source, torch.device("cpu"))
    return cfg, source, engine, engine.precision == "bf16"  # what the run would use (auto: bf16 where faster)


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def timing(args) -> dict:
    """Per size: seconds per training step (augmentation inline + train_step) and for the validation pass, as
    wall time and as this process's CPU time (one thread: the CPU time is the cost on an idle core, whatever the
    load; the wall time is what this loaded machine gave). Steps are interleaved across sizes (one step of each
    in turn), so a change of load falls on every size alike."""
    import quality
    import torch

    from medpipe.train.engine import train_step
    from medpipe.train.predict import predict_logits

    torch.set_num_threads(args.threads)
    data = quality.prepare(args.data or quality.DEV_SET, WORK, None)
    plan = [(s, 0) for s in args.sizes] + ([(args.sizes[0], args.cache_size)] if args.cache_size else [])
    setups = [_setup(data, size, cache, args.threads) for size, cache in plan]
    iters = [iter(src.epoch(0)) for _, src, _, _ in setups]
    wall, cpu = [[] for _ in plan], [[] for _ in plan]
    load0 = _load()
    for step in range(args.steps + 2):  # two warm-up steps of each, not counted
        for i, (cfg, _, engine, bf16) in enumerate(setups):
            w0, c0 = _clocks()
            x, y = next(iters[i])
            train_step(engine.model, x, y, engine.loss_fn, engine.optimizer, engine.scheduler, cfg.grad_clip,
                       engine.device, bf16=bf16)
            w1, c1 = _clocks()
            if step >= 2:
                wall[i].append(w1 - w0)
                cpu[i].append(c1 - c0)
    rows = []
    for i, ((size, _), (cfg, source, engine, bf16)) in enumerate(zip(plan, setups)):
        w0, c0 = _clocks()
        predict_logits(engine.model, source.val.pixels, source.val.rows, cfg.preprocess(), engine.device, bf16=bf16)
        w1, c1 = _clocks()
        steps = source.steps_per_epoch
        epoch_wall = steps * sum(wall[i]) / len(wall[i]) + (w1 - w0)
        epoch_cpu = steps * sum(cpu[i]) / len(cpu[i]) + (c1 - c0)
        rows.append({"image_size": size, "cache_size": cfg.train_cache_size, "precision": engine.precision,
                     "steps_timed": len(wall[i]), "steps_per_epoch": steps,
                     "step_wall_s": round(sum(wall[i]) / len(wall[i]), 3), "step_cpu_s": round(sum(cpu[i]) / len(cpu[i]), 3),
                     "val_images": len(source.val), "val_wall_s": round(w1 - w0, 2), "val_cpu_s": round(c1 - c0, 2),
                     "epoch_wall_s": round(epoch_wall, 1), "epoch_cpu_s": round(epoch_cpu, 1),
                     "epochs_in_25m_at_cpu_cost": max(1, math.floor(BUDGET_S / epoch_cpu))})
        source.close()
    base = rows[0]["epoch_cpu_s"]
    for r in rows:
        r["cost_vs_first"] = round(r["epoch_cpu_s"] / base, 2)
        print(json.dumps(r), flush=True)
    payload = {"part": "timing", "command": "python " + shlex.join(sys.argv), "threads": args.threads,
               "nice": os.nice(0), "loadavg_before": load0, "loadavg_after": _load(), "machine": machine(),
               "rows": rows, "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
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
        out["timing"] = {k: t.get(k) for k in ("command", "threads", "nice", "loadavg_before", "loadavg_after", "when")}
        out["timing"].update({
                         "sizes": {f"{r['image_size']}px_from_{r['cache_size']}": r for r in t["rows"]}})
    if QUALITY_OUT.is_file():
        q = json.loads(QUALITY_OUT.read_text())
        out["quality"] = {"command": q.get("command"), "loadavg_before": q.get("loadavg_before"),
                          "loadavg_after": q.get("loadavg_after"), "nice": q.get("nice"), "when": q.get("when"),
                          "recipes": q.get("recipes"), "common": q.get("common"), "runs": _quality_rows(q),
                          "verdict": {r: {m: {k: v[k] for k in ("difference", "spread", "beats_by_more_than_spread")}
                                          for m, v in per.items()} for r, per in (q.get("verdict") or {}).items()}}
    out["command"] = " ; ".join(part["command"] for part in (out.get("timing"), out.get("quality")) if part) + \
        " ; python benchmarks/resolution.py summary"
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
