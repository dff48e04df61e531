"""Federated vs centralized vs each site alone, on sites with different class mixes and cameras.

    python benchmarks/federated.py [--count 1200 --sites 3 --alpha 0.5 --rounds 6 --local-epochs 1 --size 64]

Synthetic HAM10000-format images get a per-site colour cast (different cameras); whole lesions are
dealt to sites by a per-class Dirichlet(alpha) split (different class mixes). One lesion-grouped
test split over all sites is held out; every method trains on the rest and is scored on it:

* centralized: all sites' training data pooled, ``rounds * local_epochs`` epochs;
* FedAvg and FedProx: ``rounds`` rounds of ``local_epochs`` local epochs per site, the sites' updates
  averaged by sample counts with the same code as the Flower ServerApp (``medpipe.fl.site.Site`` +
  ``medpipe.fl.aggregate``), run in one process here (the deployment itself is tested in
  tests/test_fl.py); MB per round = global weights down + update up, per site;
* each site alone: its own data, the same number of epochs.

Prints macro AUC and balanced accuracy on the common test split, MB per round and wall time per
row, and writes benchmarks/results/federated.json. Expectation to check, not to assert: federated
within a few points of centralized and clearly above the sites alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import synth_dataset, write_result  # noqa: E402

CASTS = [(1.0, 1.0, 1.0), (1.18, 0.96, 0.80), (0.82, 0.97, 1.16), (1.05, 1.12, 0.88)]


def build(raw: Path, work: Path, sites: int, alpha: float, seed: int):
    """Cast copies of the images per site, ingested as one folder with a ``site`` column."""
    import pandas as pd
    from PIL import Image

    from medpipe.data.sources import ingest, load_records
    from medpipe.data.splits import ensure_splits
    from medpipe.fl.partition import assign_dirichlet

    base = work / "base"
    ingest(raw, base)
    table, classes = load_records(base)
    site_of = table["group_id"].map(assign_dirichlet(table, sites, alpha, seed))
    rows = []
    for (_, r), site in zip(table.iterrows(), site_of):
        k = int(site.removeprefix("site"))
        img = np.asarray(Image.open(r["path"]).convert("RGB"), np.float32) * np.array(CASTS[k % len(CASTS)])
        out = work / "cast" / f"{r['image_id']}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out, quality=92)
        rows.append({"path": str(out), "label": r["label"], "group": r["group_id"], "site": site})
    pd.DataFrame(rows).to_csv(work / "all.csv", index=False)
    ingest(work / "all.csv", work / "all", fmt="csv", classes=classes)
    table, classes = load_records(work / "all")
    table["site"] = table["image_id"].map(dict(zip([Path(r["path"]).stem for r in rows], [r["site"] for r in rows])))
    splits, _ = ensure_splits(work / "all", seed=seed)
    table["split"] = table["image_id"].map(dict(zip(splits["image_id"], splits["split"])))
    folders = {}
    for name, part in [("pooled", table[table["split"] != "test"])] + \
            [(s, table[(table["site"] == s) & (table["split"] != "test")]) for s in sorted(table["site"].unique())]:
        d = work / "train" / name
        d.mkdir(parents=True, exist_ok=True)
        part.drop(columns=["split", "site"]).to_csv(d / "records.csv", index=False)
        (d / "classes.json").write_text(json.dumps(classes))
        folders[name] = d
    return table, classes, folders


def score(arrays, table, classes, cfg, work: Path) -> dict:
    import torch

    from medpipe.data.cache import build_cache
    from medpipe.evaluate import compute_metrics
    from medpipe.fl.site import predict_logits, to_torch
    from medpipe.models import create_model

    test = table[table["split"] == "test"]
    spec = cfg.preprocess()
    cache = build_cache(test, work / "test_cache", (spec.image_size, spec.image_size), spec.interpolation)
    model = create_model(cfg.model, len(classes))
    model.load_state_dict(to_torch(arrays))
    logits = predict_logits(model.to(memory_format=torch.channels_last), cache.pixels, cache.rows(test["image_id"]),
                            spec, torch.device("cpu"))
    m = compute_metrics(test["class_index"].to_numpy(), torch.softmax(logits, 1).numpy(), classes, bootstrap=0)
    return {"macro_auc": round(float(m["macro_auc"]), 4), "balanced_accuracy": round(float(m["balanced_accuracy"]), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=1200)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--model", default="densenet121")
    ap.add_argument("--mu", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="federated")
    args = ap.parse_args()

    import torch

    from medpipe.config import make_config
    from medpipe.fl.aggregate import weighted_average
    from medpipe.fl.site import Site, to_numpy
    from medpipe.models import create_model

    epochs = args.rounds * args.local_epochs
    tc = make_config({"model": args.model, "image_size": args.size, "seed": args.seed, "test_fraction": 0.0,
                      "val_fraction": 0.15, "workers": 0, "bootstrap": 0}).validate()
    raw = synth_dataset(args.count, seed=args.seed, width=160, height=120)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        table, classes, folders = build(raw, work, args.sites, args.alpha, args.seed)
        site_names = [n for n in folders if n != "pooled"]
        torch.manual_seed(args.seed)
        init = to_numpy(create_model(tc.model, len(classes)).state_dict())
        mb = sum(v.nbytes for v in init.values()) / 2**20

        def alone(name: str) -> tuple[dict, int]:
            site = Site(folders[name], name, tc.to_dict(), classes)
            arrays = init
            for r in range(1, args.rounds + 1):  # the same epochs, numbered as in the federated rounds
                arrays, _ = site.fit(arrays, r, args.local_epochs)
            return arrays, site.n_train

        for name in ["pooled", *site_names]:
            t0 = time.perf_counter()
            arrays, n = alone(name)
            rows.append({"method": "centralized" if name == "pooled" else f"{name} alone", "train_images": n,
                         **score(arrays, table, classes, tc, work), "mb_per_round": 0.0,
                         "wall_s": round(time.perf_counter() - t0, 1)})
            print(rows[-1], flush=True)
        for strategy, mu in (("fedavg", 0.0), ("fedprox", args.mu)):
            t0 = time.perf_counter()
            sites = [Site(folders[s], s, tc.to_dict(), classes) for s in site_names]
            arrays = init
            for r in range(1, args.rounds + 1):
                updates = [(s.fit(arrays, r, args.local_epochs, mu)[0], s.n_train) for s in sites]
                arrays = weighted_average(updates)
            rows.append({"method": strategy, "train_images": sum(s.n_train for s in sites),
                         **score(arrays, table, classes, tc, work),
                         "mb_per_round": round(2 * len(sites) * mb, 1), "wall_s": round(time.perf_counter() - t0, 1)})
            print(rows[-1], flush=True)
    print(f"\n{'method':<16}{'images':>8}{'macro AUC':>11}{'bal acc':>9}{'MB/round':>10}{'wall s':>8}")
    for r in rows:
        print(f"{r['method']:<16}{r['train_images']:>8}{r['macro_auc']:>11.4f}{r['balanced_accuracy']:>9.4f}"
              f"{r['mb_per_round']:>10.1f}{r['wall_s']:>8.1f}")
    path = write_result(args.out, {"args": vars(args), "test_images": int((table["split"] == "test").sum()),
                                   "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
