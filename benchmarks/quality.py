"""Model quality on real dermatoscopy: the old default recipe against today's, or today's against a
candidate, several split seeds.

    python benchmarks/quality.py                                   # old_default vs default (quiet machine)
    python benchmarks/quality.py --candidate STUDY/best_config.yaml  # default vs a candidate from `medpipe tune`
    python benchmarks/quality.py --subset 140 --budget 20s --seeds 1 --out benchmarks/results/quality_smoke.json

Ingests the real HAM10000 dev set (../shared/data/ham10000-dev: 1,984 images, official layout) once
into ``--work``, then for each split seed (lesion-grouped 70/15/15, default 3 seeds) trains each
recipe from scratch at 64x64 under the same budget (``--budget 25m``: the training run measures its
first epoch and sets the epoch count so the schedule ends at the budget; or ``--epochs N``), and
evaluates the package on that seed's test split. Per recipe it prints mean and SD over seeds of test
macro AUC, balanced accuracy (under the package's decision rule and under every rule the package
holds), melanoma sensitivity at 80% and 90% specificity and ECE, then whether ``default`` beats
``old_default`` (and each candidate beats ``default``) on mean macro AUC and mean balanced accuracy by
more than their spread (SD), and whether it reaches the issue's target (AUC >= 0.945, balanced accuracy
>= 0.65).

Results (every run and the summary) go to ``--out`` after each run, so a run cut short keeps its
finished seeds. A tracked result file is not overwritten unless ``--overwrite``.

Running the budget elsewhere: ``--budget`` decides the epoch count from the first epoch's time on the
machine that trains. To run the 2-core budget on a faster machine (or several runs at once), measure
the first epoch on the 2-core machine (``budget 1500s: first epoch took ..., training N epochs``) and
pass those counts: ``--epochs old_default=93,default=93`` trains exactly what the budget would have
trained, wherever it runs. ``--jobs K`` trains K runs at once (separate processes), ``--only
old_default:0,default:2`` picks runs, and ``--merge A.json B.json --out ALL.json`` summarises runs
recorded by several invocations (no training); ``--merge A.json B.json:candidate=NAME`` renames a recipe
of one file, and ``--recipes`` then keeps only the recipes it names.

Recipes (each a set of training config keys over today's defaults): ``default`` is the training config's
defaults (nothing set); ``old_default`` the recipe they replaced (OLD_DEFAULT below); ``candidate`` the first
candidate measured (CANDIDATE below) unless ``--candidate`` gives a YAML training config instead; ``--name
NAME`` records it (and names its run folders, --only and --epochs entries) as NAME, so several candidates
can be measured and merged into one summary, each judged against the default. Without ``--candidate`` the
recipes run are old_default and default; with one, default and the candidate (``--recipes`` chooses).
Nothing here changes a default: a default changes only when this benchmark's full run says so.

To search for a candidate rather than guess one (validation split only; the test split stays for
this script): ``medpipe tune --data .bench/quality/data-all --out .bench/quality/study --space
benchmarks/quality_space.yaml``, then ``--candidate .bench/quality/study/best_config.yaml`` here.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, _tracked, machine  # noqa: E402

DEV_SET = ROOT.parent.parent / "shared" / "data" / "ham10000-dev"
# the default recipe this benchmark replaced (recorded as "default" in result files written before the switch;
# merge those with FILE:default=old_default): class-balanced sampling, almost no weight decay, no EMA, no mixup
OLD_DEFAULT = {"imbalance": "sampler", "weight_decay": 1e-4, "ema_decay": 0.0, "mixup_alpha": 0.0,
               "decision_rule": "argmax"}
# the first candidate measured (it lost to the old default on macro AUC); --recipes candidate runs it. It was
# measured on top of the old defaults, so it carries them (a recipe is a set of options over today's defaults)
CANDIDATE = {
    **OLD_DEFAULT,
    "color_constancy": "shades_of_gray",  # illuminant normalised per image (train and serve)
    "crop_scale": 0.35,                   # random resized crop, 35-100% of the area
    "color_jitter": 1.5,                  # 1.5x the default colour/brightness/contrast jitter
    "label_smoothing": 0.1,
    "ema_decay": 0.999,                   # weights averaged over about the last 1,000 steps
    "decision_rule": "prior",             # logit adjustment chosen on validation (labels only)
    "tta": True,                          # flip TTA in the test evaluation
}
METRICS = ("macro_auc", "balanced_accuracy", "mel_sensitivity_at_spec80", "mel_sensitivity_at_spec90", "ece")
TARGET = {"macro_auc": 0.945, "balanced_accuracy": 0.65}  # on the dev set, mean of 3 split seeds


def subset_dataset(src: Path, dest: Path, n: int, seed: int = 0) -> Path:
    """A stratified sample of ``n`` images of a HAM10000-layout folder, copied (not linked) to ``dest``."""
    import numpy as np
    import pandas as pd

    meta = pd.read_csv(src / "HAM10000_metadata.csv")
    rng = np.random.default_rng(seed)
    frac = min(1.0, n / len(meta))
    keep = [g.iloc[rng.permutation(len(g))[:max(3, round(len(g) * frac))]] for _, g in meta.groupby("dx")]
    sub = pd.concat(keep).sort_values("image_id")
    files = {p.stem: p for p in src.rglob("*.jpg")}
    (dest / "images").mkdir(parents=True, exist_ok=True)
    for image_id in sub["image_id"]:
        shutil.copyfile(files[image_id], dest / "images" / f"{image_id}.jpg")
    sub.to_csv(dest / "HAM10000_metadata.csv", index=False)
    return dest


def prepare(source: Path, work: Path, subset: int | None) -> Path:
    """Ingest (once per source and subset) into WORK/data-<n>; returns the data folder."""
    from medpipe.data.sources import ingest

    tag = f"subset{subset}" if subset else "all"
    data = work / f"data-{tag}"
    if (data / "records.csv").is_file():
        print(f"reusing ingested {data}", flush=True)
        return data
    if subset:
        source = subset_dataset(source, work / f"source-{tag}", subset)
    report = ingest(source, data, progress=True)
    print(f"ingested {source}: {report['records']} images, {report['dropped']} dropped, classes "
          f"{json.dumps(report['class_counts'])}", flush=True)
    return data


def train_run(data: Path, run_dir: Path, overrides: dict, resume: bool = False) -> dict:
    """One training run through the real pipeline (fit, calibrate, decision rules, package, test report).
    ``resume``: continue from the run folder's last checkpoint where it has one (a run stopped or failed
    after some or all of its epochs), with the same config; otherwise the folder is started afresh."""
    from medpipe.config import make_config
    from medpipe.pipeline import run

    cfg = make_config(overrides)
    t0 = time.perf_counter()
    if resume and (run_dir / "checkpoints" / "last.pt").is_file():
        print(f"   resuming {run_dir} from its last checkpoint", flush=True)
        summary = run(data, run_dir, cfg, resume=True)
    else:
        summary = run(data, run_dir, cfg, force=run_dir.exists())
    seconds = time.perf_counter() - t0
    report = json.loads((Path(summary["report"]).with_suffix(".json")).read_text())
    out = {m: report.get(m) for m in METRICS}
    out["decision_rule"] = report.get("decision_rule", "argmax")
    out["balanced_accuracy_by_rule"] = {r: v["balanced_accuracy"] for r, v in report.get("decision_rules", {}).items()}
    out["support"] = {c: v["support"] for c, v in report["per_class"].items()}
    # per-class sensitivity under the package's rule (their mean is the balanced accuracy above)
    out["sensitivity"] = {c: v.get("sensitivity") for c, v in report["per_class"].items()}
    epochs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    out.update(best_epoch=summary.get("best_epoch"), epochs=len(epochs), seconds=round(seconds, 1),
               train_seconds=round(sum(e.get("epoch_seconds", 0.0) for e in epochs), 1),
               val_auc_best=max((e["val_auc"] for e in epochs if e.get("val_auc") is not None), default=None))
    return out


def _stats(values: list) -> dict:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.mean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else None,
            "min": min(vals), "max": max(vals), "n": len(vals)}


def summarise(runs: dict) -> dict:
    out = {}
    for recipe, rs in runs.items():
        if not rs:
            continue
        s = {m: _stats([r[m] for r in rs]) for m in METRICS}
        rules = sorted({k for r in rs for k in r["balanced_accuracy_by_rule"]})
        s["balanced_accuracy_by_rule"] = {k: _stats([r["balanced_accuracy_by_rule"].get(k) for r in rs]) for k in rules}
        s["epochs"] = _stats([r["epochs"] for r in rs])
        classes = sorted({c for r in rs for c in r.get("sensitivity", {})})
        if classes:  # runs recorded before per-class sensitivity was kept have none
            s["sensitivity"] = {c: _stats([r.get("sensitivity", {}).get(c) for r in rs]) for c in classes}
        out[recipe] = s
    return out


def comparisons(summary: dict) -> list[tuple[str, str]]:
    """(recipe, baseline) pairs the verdict judges: today's default against the old one, every other recipe
    against today's default."""
    pairs = [("default", "old_default")] if "old_default" in summary else []
    return [p for p in pairs + [(r, "default") for r in summary if r not in ("default", "old_default")]
            if p[0] in summary and p[1] in summary]


def verdict(summary: dict) -> dict:
    """For each (recipe, baseline) of :func:`comparisons`: does the recipe beat the baseline by more than the
    spread (the larger SD of the two), does it reach the target? ``{recipe: {metric: ...}}``."""
    out: dict = {}
    for name, base in comparisons(summary):
        for m in ("macro_auc", "balanced_accuracy"):
            a, b = summary[base][m], summary[name][m]
            if a["mean"] is None or b["mean"] is None:
                continue
            spread = max(a["sd"] or 0.0, b["sd"] or 0.0)
            out.setdefault(name, {})[m] = {
                "against": base, "difference": b["mean"] - a["mean"], "spread": spread,
                "beats_by_more_than_spread": (b["mean"] - a["mean"]) > spread and a["n"] > 1 and b["n"] > 1,
                "candidate_reaches_target": b["mean"] >= TARGET[m], "target": TARGET[m]}
    return out


def _fmt(s: dict) -> str:
    if s["mean"] is None:
        return "n/a".rjust(13)
    return f"{s['mean']:.3f} ± {s['sd']:.3f}" if s["sd"] is not None else f"{s['mean']:.3f}        "


def print_table(summary: dict) -> None:
    rules = sorted({k for s in summary.values() for k in s["balanced_accuracy_by_rule"]})
    w = max([10, *map(len, summary)])
    head = (f"{'recipe':>{w}} | {'macro AUC':>13} | {'bal. acc':>13} | "
            + " | ".join(f"{'bacc ' + r:>13}" for r in rules)
            + f" | {'mel sens@80':>13} | {'mel sens@90':>13} | {'ECE':>13} | epochs")
    print(head)
    print("-" * len(head))
    for recipe, s in summary.items():
        print(f"{recipe:>{w}} | {_fmt(s['macro_auc'])} | {_fmt(s['balanced_accuracy'])} | "
              + " | ".join(_fmt(s["balanced_accuracy_by_rule"].get(r, {"mean": None})) for r in rules)
              + f" | {_fmt(s['mel_sensitivity_at_spec80'])} | {_fmt(s['mel_sensitivity_at_spec90'])} | "
              f"{_fmt(s['ece'])} | {s['epochs']['mean']:.1f}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEV_SET, help="HAM10000-layout folder (default: the dev set)")
    ap.add_argument("--work", type=Path, default=ROOT.parent / ".bench" / "quality",
                    help="ingested data, pixel cache and run folders (kept between runs)")
    ap.add_argument("--seeds", type=int, default=3, help="split seeds 0..N-1 (each also the training seed)")
    ap.add_argument("--budget", default="25m", help="training budget per run (25m, 90s, 2h); see --epochs")
    ap.add_argument("--epochs", help="a fixed epoch count instead of the budget: N, or per recipe "
                    "default=N,candidate=M (the counts a --budget run measured on the reference machine)")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process")
    ap.add_argument("--only", help="only these runs, RECIPE:SEED[,RECIPE:SEED...]")
    ap.add_argument("--merge", nargs="+", metavar="JSON[:OLD=NEW]",
                    help="summarise the runs recorded in these result files (no training) into --out; "
                         "FILE:OLD=NEW renames that file's recipe OLD")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--subset", type=int, help="a stratified sample of this many images (to prove the script)")
    ap.add_argument("--recipes", help="which recipes to run (default: default and the candidate); with --merge, "
                    "which recipes to keep")
    ap.add_argument("--candidate", type=Path, help="YAML training config used as the candidate recipe")
    ap.add_argument("--name", default="candidate", help="the candidate recipe's name (results, run folders, "
                    "--only, --epochs)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a training option for every run (e.g. threads=2, batch_size=64)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "quality.json")
    ap.add_argument("--overwrite", action="store_true", help="allow replacing a tracked result file")
    ap.add_argument("--resume", action="store_true",
                    help="continue each run from its run folder's last checkpoint where there is one (a run "
                         "interrupted, or failed after training, is finished without training it again); "
                         "'seconds' then counts only this process, 'train_seconds' every epoch")
    args = ap.parse_args(argv)
    if args.out.exists() and _tracked(args.out) and not args.overwrite:
        ap.error(f"{args.out} is a tracked result; pass --overwrite to replace it or choose another --out")
    if args.merge:
        return merge(args.merge, args.out, keep=args.recipes.split(",") if args.recipes else None)
    if not (args.data / "HAM10000_metadata.csv").is_file():
        ap.error(f"{args.data}: no HAM10000_metadata.csv (the dev set is in ../shared/data/ham10000-dev)")
    common, recipes, chosen = plan_recipes(args, ap)
    todo = plan_runs(args, ap, common, recipes, chosen)
    args.work.mkdir(parents=True, exist_ok=True)
    data = prepare(args.data, args.work, args.subset)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    payload = {"benchmark": "quality", "settings": settings, "common": common,
               "recipes": {r: recipes[r] for r in chosen}, "machine": machine(),
               "expected": sorted([r, s] for r, s, _, _ in todo), "runs": {r: [] for r in chosen}, "failed": []}
    execute(todo, data, args, payload)
    print()
    print(f"test split, {len({s for _, s, _, _ in todo})} split seed(s), mean ± SD; {args.image_size}x{args.image_size}, "
          "from scratch, " + (f"epochs {args.epochs}" if args.epochs else f"budget {args.budget}")
          + (f", subset of {args.subset} images" if args.subset else ""))
    report(payload)
    print(f"wrote {args.out}")
    return payload


def plan_recipes(args, ap) -> tuple[dict, dict, list]:
    """The options every run shares, the recipes, and which recipes run."""
    import yaml

    from medpipe.config import TrainConfig

    keys = {f.name for f in fields(TrainConfig)}
    common: dict = {"image_size": args.image_size, "bootstrap": 200}
    if not args.epochs:
        if "budget" not in keys:
            ap.error("this medpipe has no 'budget' training option; pass --epochs N")
        common.update(budget=args.budget, patience=10_000)  # the budget decides the length; no early stop
    for item in args.set:
        k, _, v = item.partition("=")
        common[k.strip().replace("-", "_")] = yaml.safe_load(v)
    if not args.name.replace("_", "").replace("-", "").isalnum() or args.name in ("default", "old_default"):
        ap.error(f"--name {args.name!r}: letters, digits, _ and - only, and not 'default' or 'old_default'")
    recipes = {"old_default": dict(OLD_DEFAULT), "default": {}, args.name: dict(CANDIDATE)}
    if args.candidate:
        from medpipe.config import RUNTIME_KEYS

        loaded = yaml.safe_load(args.candidate.read_text()) or {}
        # the benchmark decides the split, the seed and the run length (a `medpipe tune` best_config.yaml carries
        # the search's short budget), and runtime keys do not change what is trained
        dropped = sorted(k for k in loaded if k in ("seed", "split_seed", "image_size", "bootstrap", *LENGTH_KEYS, *RUNTIME_KEYS))
        if dropped:
            print(f"--candidate {args.candidate}: not used (the benchmark sets them for every recipe): "
                  f"{', '.join(dropped)}", flush=True)
        recipes[args.name] = {k: v for k, v in loaded.items() if k not in dropped}
    # without a --candidate: the old default against today's; with one: today's default against the candidate
    chosen = [r for r in (args.recipes or ("default," + args.name if args.candidate else "old_default,default"))
              .split(",") if r]
    for r in chosen:
        if r not in recipes:
            ap.error(f"unknown recipe {r!r}; choose from {', '.join(recipes)}")
    return common, recipes, chosen


def plan_runs(args, ap, common: dict, recipes: dict, chosen: list) -> list[tuple]:
    """(recipe, seed, run folder, training options) for each run, --only and --epochs applied."""
    jobs = [(r, seed) for seed in range(args.seeds) for r in chosen]
    if args.only:
        wanted = [x.strip() for x in args.only.split(",") if x.strip()]
        unknown = [w for w in wanted if w not in {f"{r}:{s}" for r, s in jobs}]
        if unknown:
            ap.error(f"--only: {', '.join(unknown)} not among the runs (RECIPE:SEED with recipes {chosen} and "
                     f"seeds 0..{args.seeds - 1})")
        jobs = [(r, s) for r, s in jobs if f"{r}:{s}" in wanted]
    per_recipe_epochs = parse_epochs(args.epochs, ap) if args.epochs else {}
    todo = []
    for recipe, seed in jobs:
        overrides = {**common, **recipes[recipe], "split_seed": seed, "seed": seed}
        if per_recipe_epochs:
            n = per_recipe_epochs.get(recipe, per_recipe_epochs.get("*"))
            if n is None:
                ap.error(f"--epochs {args.epochs}: no count for recipe {recipe!r}")
            overrides.update(epochs=n, patience=n)
        todo.append((recipe, seed, args.work / "runs" / f"{recipe}-seed{seed}", overrides))
    return todo


def execute(todo: list[tuple], data: Path, args, payload: dict) -> None:
    """Train and evaluate each run (``--jobs`` at once); the result file is rewritten after every run. A
    run that fails is recorded with its error and the others go on."""
    runs = payload["runs"]

    def save(complete: bool) -> None:
        summary = summarise(runs)
        payload.update(complete=complete, summary=summary, verdict=verdict(summary),
                       when=time.strftime("%Y-%m-%dT%H:%M:%S"))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2, default=float))

    def record(recipe: str, seed: int, res: dict | None, error: BaseException | None = None) -> None:
        if error is not None:
            payload["failed"].append({"recipe": recipe, "seed": seed, "error": f"{error.__class__.__name__}: {error}"})
            print(f"   {recipe} seed {seed}: FAILED ({error.__class__.__name__}: {error})", flush=True)
        else:
            res["seed"] = seed
            runs[recipe].append(res)
            runs[recipe].sort(key=lambda r: r["seed"])
            print(f"   {recipe} seed {seed}: test macro AUC {res['macro_auc']:.4f}, balanced accuracy "
                  f"{res['balanced_accuracy']:.4f} ({res['decision_rule']}), {res['epochs']} epochs, "
                  f"{res['seconds']:.0f} s", flush=True)
        save(False)

    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {}
            for recipe, seed, run_dir, overrides in todo:
                print(f"== {recipe}, split seed {seed}: {overrides}", flush=True)
                futures[pool.submit(train_run, data, run_dir, overrides, args.resume)] = (recipe, seed)
            for fut in as_completed(futures):
                exc = fut.exception()
                record(*futures[fut], None if exc else fut.result(), exc)
    else:
        for recipe, seed, run_dir, overrides in todo:
            print(f"== {recipe}, split seed {seed}: {overrides}", flush=True)
            try:
                record(recipe, seed, train_run(data, run_dir, overrides, args.resume))
            except Exception as exc:  # noqa: BLE001 - one failed run must not lose the others
                record(recipe, seed, None, exc)
    # complete: every run of args.seeds x recipes is here (an --only run is a part, to be merged)
    save(not payload["failed"] and not args.only)


def parse_epochs(text: str, ap: argparse.ArgumentParser) -> dict:
    """``93`` -> every recipe 93 epochs; ``default=93,candidate=94`` -> per recipe."""
    out = {}
    for part in str(text).split(","):
        name, _, n = part.rpartition("=")
        try:
            out[name.strip() or "*"] = int(n)
        except ValueError:
            ap.error(f"--epochs {text!r}: expected N or RECIPE=N[,RECIPE=N]")
        if out[name.strip() or "*"] < 1:
            ap.error(f"--epochs {text!r}: counts must be >= 1")
    return out


# what need not agree between result files merged into one summary: besides options that do not change what is
# trained (threads, workers, device, ...), the run length, which each run records as its epoch count (a --budget
# run and an --epochs run of the same count train the same), and the bootstrap resample count, which changes only
# the evaluation's confidence intervals (none of the figures this benchmark reports)
LENGTH_KEYS = ("budget", "epochs", "patience")
REPORT_KEYS = ("bootstrap",)


def _common(p: dict) -> dict:
    from medpipe.config import RUNTIME_KEYS

    return {k: v for k, v in (p.get("common") or {}).items() if k not in RUNTIME_KEYS + LENGTH_KEYS + REPORT_KEYS}


def _load_renamed(item: str) -> tuple[Path, dict, dict]:
    """``FILE`` or ``FILE:OLD=NEW`` -> (file, payload with recipe OLD renamed NEW, the renaming)."""
    path, rename = item, {}
    head, sep, tail = item.rpartition(":")
    if sep and "=" in tail and not Path(item).exists():
        old, _, new = tail.partition("=")
        path, rename = head, {old.strip(): new.strip()}
    f = Path(path)
    if not f.is_file():
        raise SystemExit(f"--merge: {f}: no such file")
    p = json.loads(f.read_text())
    for old, new in rename.items():
        for key in ("recipes", "runs"):
            section = p.get(key) or {}
            if old not in section and key == "recipes":
                raise SystemExit(f"--merge: {f} has no recipe {old!r} (it has {', '.join(section) or 'none'})")
            if new in section:
                raise SystemExit(f"--merge: {f} already has a recipe {new!r}")
            if old in section:
                section[new] = section.pop(old)
        if old == "default" and new == "old_default" and (p.get("recipes") or {}).get(new) == {}:
            # a file written before the default switch: its "default" (nothing set) trained OLD_DEFAULT
            p["recipes"][new] = dict(OLD_DEFAULT)
        for x in p.get("failed", []):
            if x.get("recipe") == old:
                x["recipe"] = new
    return f, p, rename


def merge(items: list[str], out: Path, keep: list[str] | None = None) -> dict:
    """One summary of the runs recorded in several result files. They must share the training options (less
    threads, workers, device and the run length, which each run records as its epoch count) and give a recipe
    of the same name the same options; a seed recorded twice must hold the same figures. ``FILE:OLD=NEW``
    renames a recipe of one file (two candidates measured separately, both called ``candidate``); ``keep``
    drops every other recipe. ``complete`` when every kept recipe has every seed 0..N-1 (N: the largest
    ``--seeds`` among the files)."""
    loaded = [_load_renamed(str(i)) for i in items]
    files, payloads, renames = [f for f, _, _ in loaded], [p for _, p, _ in loaded], [r for _, _, r in loaded]
    if keep:
        for p in payloads:
            for key in ("recipes", "runs"):
                p[key] = {k: v for k, v in (p.get(key) or {}).items() if k in keep}
            p["failed"] = [x for x in p.get("failed", []) if x.get("recipe") in keep]
        missing = [k for k in keep if not any(k in p["recipes"] for p in payloads)]
        if missing:
            raise SystemExit(f"--merge: no file has recipe(s) {', '.join(missing)}")
    recipes: dict = {}
    for f, p in zip(files, payloads):
        if _common(p) != _common(payloads[0]):
            raise SystemExit(f"--merge: {f} has other training options than {files[0]} ({_common(p)!r} vs "
                             f"{_common(payloads[0])!r}); results of different settings do not belong in one summary")
        for name, options in (p.get("recipes") or {}).items():
            if recipes.setdefault(name, options) != options:
                raise SystemExit(f"--merge: recipe {name!r} has other options in {f} ({options!r} vs "
                                 f"{recipes[name]!r})")
    runs: dict = {}
    for f, p in zip(files, payloads):
        for recipe, rs in p.get("runs", {}).items():
            have = {r["seed"]: r for r in runs.get(recipe, [])}
            for r in rs:
                if r["seed"] in have:
                    if any(have[r["seed"]].get(m) != r.get(m) for m in METRICS):
                        raise SystemExit(f"--merge: {recipe} seed {r['seed']} is recorded twice with different "
                                         f"figures ({f} and an earlier file)")
                    continue
                runs.setdefault(recipe, []).append(r)
    for rs in runs.values():
        rs.sort(key=lambda r: r["seed"])
    seeds = max(int((p.get("settings") or {}).get("seeds", 0)) for p in payloads)
    complete = all(sorted(r["seed"] for r in runs.get(name, [])) == list(range(seeds)) for name in recipes)
    summary = summarise(runs)
    payload = {"benchmark": "quality", "common": _common(payloads[0]), "recipes": recipes,
               "runs": runs, "summary": summary, "verdict": verdict(summary), "complete": complete,
               "failed": [x for p in payloads for x in p.get("failed", [])],
               "merged_from": [{"file": str(f), "renamed": rn or None, "machine": p.get("machine"),
                                "settings": p.get("settings"), "common": p.get("common"), "when": p.get("when"),
                                "runs": {r: [x["seed"] for x in rs] for r, rs in p.get("runs", {}).items()}}
                               for f, p, rn in zip(files, payloads, renames)],
               "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=float))
    report(payload)
    print(f"merged {len(files)} files: " + ("complete" if complete else "NOT complete") + f"; wrote {out}")
    return payload


def report(payload: dict) -> None:
    print_table(payload["summary"])
    for name, summ in payload["summary"].items():
        if summ.get("sensitivity"):
            print(f"{name} sensitivity per class (mean over seeds): " + ", ".join(
                f"{c} {v['mean']:.2f}" for c, v in summ["sensitivity"].items() if v["mean"] is not None))
    for name, per_metric in payload["verdict"].items():
        for m, v in per_metric.items():
            base = v.get("against", "default")
            print(f"{m}: {name} - {base} = {v['difference']:+.4f} (spread {v['spread']:.4f}): "
                  f"{f'beats {base} by more than the spread' if v['beats_by_more_than_spread'] else 'not separated'}"
                  f"; target {v['target']}: {'reached' if v['candidate_reaches_target'] else 'not reached'}")


if __name__ == "__main__":
    main()
