"""Patient metadata on real dermatoscopy: image-only vs image + metadata vs the fused model without metadata.

    python benchmarks/metadata_quality.py                      # 1 split seed, 8 epochs, 64 px, DenseNet121
    python benchmarks/metadata_quality.py --epochs 3 --seeds 0 --model densenet-test   # a smoke run

Ingests the real HAM10000 dev set (../shared/data/ham10000-dev: its metadata CSV carries age, sex and
localization per image) once into ``--work``, then per split seed trains the default recipe twice from scratch
with the same fixed epoch count (not a time budget: the 2-core machine is shared, so a budget would give the two
runs different epoch counts): image only (``metadata: none``) and with every metadata input (``metadata: auto``,
fields hidden at random with probability ``metadata_mask`` while training). Each package is evaluated on that
seed's test split; the fused one twice, with the record table's metadata and with none (its fallback). Per
variant: macro AUC, balanced accuracy under the package's decision rule, per-class sensitivity, melanoma
sensitivity at 80/90% specificity, ECE. Results go to ``--out`` (benchmarks/results/quality_metadata.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine  # noqa: E402

# ../shared/data/ham10000-dev beside the checkout (a worktree may sit a level deeper)
DEV_SET = next((d / "shared" / "data" / "ham10000-dev" for d in ROOT.parents
                if (d / "shared" / "data" / "ham10000-dev").is_dir()), ROOT.parent / "shared" / "data" / "ham10000-dev")
KEYS = ("macro_auc", "balanced_accuracy", "ece", "mel_sensitivity_at_spec80", "mel_sensitivity_at_spec90")


def _figures(predictor, source, metadata) -> dict:
    """Test-split metrics of ``predictor`` (the package's own decision rule), with ``metadata`` or without."""
    import numpy as np

    from medpipe.metrics import compute_metrics

    t = source.test
    probs = np.concatenate([predictor.probabilities(t.pixels[t.rows[i:i + 64]], metadata=None if metadata is None
                                                    else metadata[i:i + 64]) for i in range(0, len(t.rows), 64)])
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
    for name, extra in (("image_only", ["--metadata", "none"]), ("metadata", ["--metadata", "auto"])):
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
        out[name] = _figures(predictor, source, source.test.metadata)
        if name == "metadata":
            out["metadata_without_metadata"] = _figures(predictor, source, None)
        source.close()
    return out


def main_(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=str(ROOT / ".bench" / "metadata"), help="scratch folder")
    p.add_argument("--seeds", default="0", help="split seeds, comma-separated")
    p.add_argument("--epochs", type=int, default=8, help="training epochs of every run")
    p.add_argument("--model", default="densenet121", help="architecture")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--variants", default="image_only,metadata",
                   help="which runs (separate processes may each run one, then --merge their files)")
    p.add_argument("--merge", nargs="+", help="result files of the same settings to combine into --out (no training)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality_metadata.json"))
    a = p.parse_args(argv)
    if a.merge:
        parts = [json.loads(Path(f).read_text()) for f in a.merge]
        merged = {**parts[0], "command": " & ".join(x["command"] for x in parts)}
        for part in parts[1:]:
            for seed, figures in part["seeds"].items():
                merged["seeds"].setdefault(seed, {}).update(figures)
        Path(a.out).write_text(json.dumps(merged, indent=2) + "\n")
        return 0
    from medpipe.data.sources import ingest

    work = Path(a.work)
    data = work / "data"
    if not (data / "records.csv").is_file():
        ingest(DEV_SET, data, workers=2)
    result = {"benchmark": "metadata_quality", "command": "python benchmarks/" + Path(__file__).name + " " +
              " ".join(argv if argv is not None else sys.argv[1:]), "when": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                      time.gmtime()),
              "machine": machine(), "dataset": str(DEV_SET.name), "epochs": a.epochs, "model": a.model,
              "image_size": 64, "what": "image-only vs image + metadata vs the fused model without metadata, test split",
              "note": "fixed epoch count on a 2-core machine shared by other jobs: timings are not "
                                        "comparable, figures are; one split seed is noisy (few df/vasc)",
              "seeds": {}}
    for seed in [int(s) for s in a.seeds.split(",")]:
        result["seeds"][str(seed)] = run_seed(data, work, seed, a.epochs, a.model, a.threads,
                                              tuple(a.variants.split(",")))
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["seeds"][str(seed)], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main_())
