"""Patient metadata on real dermatoscopy: image-only vs image + metadata vs the fused model without metadata.

    python benchmarks/metadata_quality.py                      # 1 split seed, 8 epochs, 64 px, DenseNet121
    python benchmarks/metadata_quality.py --epochs 3 --seeds 0 --model densenet-test   # a smoke run
    python benchmarks/metadata_quality.py --model densenet-test --variants metablock --block NAME  # MetaBlock fusion

Ingests the real HAM10000 dev set (../shared/data/ham10000-dev: its metadata CSV carries age, sex and
localization per image) once into ``--work``, then per split seed trains the default recipe from scratch per
variant with the same fixed epoch count (not a time budget: the 2-core machine is shared, so a budget would give
the runs different epoch counts): image only (``metadata: none``), with every metadata input (``metadata:
auto``, fields hidden at random with probability ``metadata_mask`` while training) fused by concatenation, and
(``--variants metablock``) fused by MetaBlock gating (``metadata_fusion: metablock``). Each package is evaluated
on that seed's test split; the fused one twice, with the record table's metadata and with none (its fallback). Per
variant: macro AUC, balanced accuracy under the package's decision rule, per-class sensitivity, melanoma
sensitivity at 80/90% specificity, ECE; with several seeds, their mean and SD (``summary``). Results go to
``--out`` (benchmarks/results/quality_metadata.json; ``--block NAME`` keeps the file's other blocks). Each
run's validation and test probabilities are kept in ``--work`` (``probs-VARIANT-sSEED.npz``) for
benchmarks/decision_rules.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine  # noqa: E402

# ../shared/data/ham10000-dev beside the checkout (a worktree may sit a level deeper)
DEV_SET = next((d / "shared" / "data" / "ham10000-dev" for d in ROOT.parents
                if (d / "shared" / "data" / "ham10000-dev").is_dir()), ROOT.parent / "shared" / "data" / "ham10000-dev")
# variant name -> training options over the default recipe
VARIANTS = {"image_only": ["--metadata", "none"], "metadata": ["--metadata", "auto"],
            "metablock": ["--metadata", "auto", "--metadata-fusion", "metablock"]}
KEYS = ("macro_auc", "balanced_accuracy", "ece", "mel_sensitivity_at_spec80", "mel_sensitivity_at_spec90")


def _probs(predictor, split, metadata):
    """Class probabilities of every image of ``split`` (with ``metadata`` rows, or none)."""
    import numpy as np

    return np.concatenate([predictor.probabilities(split.pixels[split.rows[i:i + 64]], metadata=None if metadata is None
                                                   else metadata[i:i + 64]) for i in range(0, len(split.rows), 64)])


def _figures(predictor, source, metadata, save: Path | None = None) -> dict:
    """Test-split metrics of ``predictor`` (the package's own decision rule), with ``metadata`` or without;
    ``save`` keeps the validation and test probabilities (an .npz, for benchmarks/decision_rules.py)."""
    import numpy as np

    from medpipe.metrics import compute_metrics

    t, v = source.test, source.val
    probs = _probs(predictor, t, metadata)
    if save is not None:
        np.savez(save, classes=np.array(predictor.classes), test_probs=probs, test_labels=t.labels,
                 val_probs=_probs(predictor, v, None if metadata is None else v.metadata), val_labels=v.labels)
    m = compute_metrics(t.labels, probs, predictor.classes, bootstrap=0, pred=predictor.labels(probs))
    out = {k: m.get(k) for k in KEYS}
    out["sensitivity"] = {c: v["sensitivity"] for c, v in m["per_class"].items()}
    return out


def run_seed(data: Path, work: Path, seed: int, epochs: int, model: str, threads: int,
             variants: tuple[str, ...] = ("image_only", "metadata")) -> dict:
    from medpipe.cli import main
    from medpipe.config import make_config
    from medpipe.infer.predictor import Predictor
    from medpipe.train.data import CachedSource

    args = ["--model", model, "--image-size", "64", "--epochs", str(epochs), "--split-seed", str(seed),
            "--bootstrap", "0", "--threads", str(threads), "--precision", "fp32"]
    out = {}
    for name, extra in VARIANTS.items():
        if name not in variants:
            continue
        run = work / f"{name}-s{seed}"
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.time()
        assert main(["train", "--data", str(data), "--out", str(run), *args, *extra]) == 0, name
        out[f"{name}_train_seconds"] = round(time.time() - t0, 1)
        cfg = make_config({"image_size": 64, "split_seed": seed, "metadata": extra[1]}).validate()
        source = CachedSource(data, cfg)
        predictor = Predictor(run / "model", device="cpu", backend="eager")
        out[name] = _figures(predictor, source, source.test.metadata, work / f"probs-{name}-s{seed}.npz")
        if extra[1] == "auto":
            out[f"{name}_without_metadata"] = _figures(predictor, source, None,
                                                       work / f"probs-{name}_without_metadata-s{seed}.npz")
        source.close()
    return out


def summary(seeds: dict) -> dict:
    """Per variant, mean and SD over split seeds of the headline figures (SD: the spread a difference must beat)."""
    import statistics

    names = sorted({k for fig in seeds.values() for k, v in fig.items() if isinstance(v, dict) and "macro_auc" in v})
    out = {}
    for name in names:
        runs = [fig[name] for fig in seeds.values() if name in fig]
        out[name] = {"n_seeds": len(runs)}
        for key in ("macro_auc", "balanced_accuracy", "ece"):
            vals = [r[key] for r in runs if r.get(key) is not None]
            out[name][key] = {"mean": round(statistics.fmean(vals), 4),
                              "sd": round(statistics.stdev(vals), 4) if len(vals) > 1 else None}
        out[name]["bcc_sensitivity_mean"] = round(statistics.fmean(r["sensitivity"]["bcc"] for r in runs), 4)
        out[name]["mel_sensitivity_mean"] = round(statistics.fmean(r["sensitivity"]["mel"] for r in runs), 4)
    return out


def store(result: dict, out: Path, block: str | None) -> None:
    """Write ``result`` (with its summary) to ``out``; with ``block``, as that entry of the file's ``blocks``,
    keeping the other blocks."""
    result = {**result, "summary": summary(result["seeds"])}
    if block:
        doc = json.loads(out.read_text()) if out.is_file() else {}
        doc.setdefault("benchmark", "metadata_quality")
        doc.setdefault("blocks", {})[block] = result
        result = doc
    out.write_text(json.dumps(result, indent=2) + "\n")


def merge(files: list[str]) -> dict:
    """Result files of the same settings (e.g. one process per variant) as one result."""
    parts = [json.loads(Path(f).read_text()) for f in files]
    merged = {**parts[0], "command": " & ".join(x["command"] for x in parts)}
    for part in parts[1:]:
        for seed, figures in part["seeds"].items():
            merged["seeds"].setdefault(seed, {}).update(figures)
    merged.pop("summary", None)
    return merged


def main_(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=str(ROOT.parent / ".bench" / "metadata"), help="scratch folder")
    p.add_argument("--seeds", default="0", help="split seeds, comma-separated")
    p.add_argument("--epochs", type=int, default=8, help="training epochs of every run")
    p.add_argument("--model", default="densenet121", help="architecture")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--variants", default="image_only,metadata",
                   help=f"which runs, among {', '.join(VARIANTS)} (separate processes may each run one, then "
                        "--merge their files)")
    p.add_argument("--merge", nargs="+", help="result files of the same settings to combine into --out (no training)")
    p.add_argument("--block", help="store the result as this entry of --out's 'blocks', keeping the others")
    p.add_argument("--out", default=str(ROOT / "results" / "quality_metadata.json"))
    a = p.parse_args(argv)
    if a.merge:
        store(merge(a.merge), Path(a.out), a.block)
        return 0
    from medpipe.data.sources import ingest

    work = Path(a.work)
    data = work / "data"
    if not (data / "records.csv").is_file():
        ingest(DEV_SET, data, workers=2)
    result = {"benchmark": "metadata_quality", "command": "python benchmarks/" + Path(__file__).name + " " +
              " ".join(argv if argv is not None else sys.argv[1:]), "when": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                      time.gmtime()),
              "machine": machine(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
              "dataset": str(DEV_SET.name), "epochs": a.epochs, "model": a.model, "image_size": 64,
              "what": "image-only vs image + metadata vs the fused model without metadata, test split",
              "note": "fixed epoch count on a 2-core machine shared by other jobs: timings are not "
                      "comparable, figures are; one split seed is noisy (few df/vasc)",
              "seeds": {}}
    for seed in [int(s) for s in a.seeds.split(",")]:
        result["seeds"][str(seed)] = run_seed(data, work, seed, a.epochs, a.model, a.threads,
                                              tuple(a.variants.split(",")))
        result["seeds"][str(seed)]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        store(result, Path(a.out), a.block)
        print(json.dumps(result["seeds"][str(seed)], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main_())
