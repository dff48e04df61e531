"""Which imbalance handling gives the best validation balanced accuracy on synthetic images?

    python benchmarks/imbalance.py [--count 800 --epochs 6 --size 64 --seeds 4]

Trains the same DenseNet121 on the same synthetic HAM10000-format data (nv about two thirds, as in
HAM10000) with --imbalance sampler, weighted_loss, focal and none, for each seed, and reports the
best-epoch validation balanced accuracy and macro AUC from each run's metrics.jsonl (the other options at
their defaults). It chose the default (the sampler) until benchmarks/quality.py, on real HAM10000 images,
replaced the recipe (``imbalance: none`` with the ``prior`` decision rule, mixup and EMA).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, synth_dataset, write_result  # noqa: E402

MODES = ("sampler", "weighted_loss", "focal", "none")


def main() -> None:
    ap = parser(__doc__, count=800, epochs=6, size=64, seeds=4)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    args = ap.parse_args()

    import torch

    from medpipe.config import make_config
    from medpipe.data.sources import ingest
    from medpipe.pipeline import run as train

    name = "imbalance" if not torch.cuda.is_available() else "imbalance_cuda"

    def summarise(results: dict) -> dict:
        return {m: {"runs": len(rs), "val_bacc_mean": statistics.mean(r["val_bacc"] for r in rs),
                    "val_bacc_sd": statistics.stdev(r["val_bacc"] for r in rs) if len(rs) > 1 else None,
                    "val_auc_mean": statistics.mean(r["val_auc"] for r in rs)} for m, rs in results.items() if rs}

    folder = synth_dataset(args.count)
    modes = [m for m in args.modes.split(",") if m]
    results = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        ingest(folder, data)
        for seed in range(args.seeds):
            for mode in modes:
                run = Path(tmp) / f"{mode}_{seed}"
                cfg = make_config({"imbalance": mode, "epochs": args.epochs, "image_size": args.size, "seed": seed,
                                   "bootstrap": 0, "patience": args.epochs})
                train(data, run, cfg, evaluate_test=False)
                rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
                best = max(rows, key=lambda r: r["val_bacc"])
                results[mode].append({"seed": seed, "val_bacc": best["val_bacc"], "val_auc": best["val_auc"],
                                      "epoch": best["epoch"]})
                print(f"{mode:>14} seed {seed}: best val balanced accuracy {best['val_bacc']:.4f} "
                      f"(macro AUC {best['val_auc']:.4f}, epoch {best['epoch']})", flush=True)
            # after every seed, so a run cut short still leaves its complete pairs
            write_result(name, {"settings": vars(args), "complete": False, "runs": results,
                                "summary": summarise(results)})
    summary = summarise(results)
    winner = max(summary, key=lambda m: summary[m]["val_bacc_mean"])
    print(f"{'mode':>14}  val_bacc  val_auc")
    for m in modes:
        print(f"{m:>14}  {summary[m]['val_bacc_mean']:.4f}   {summary[m]['val_auc_mean']:.4f}")
    print(f"best validation balanced accuracy: {winner}")
    path = write_result(name, {"settings": vars(args), "complete": True, "runs": results, "summary": summary,
                               "winner": winner})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
