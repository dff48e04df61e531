"""Federated vs centralized vs each site alone, and what holds FedAvg back, measured one cause at a time.

    python benchmarks/federated.py                                    # synthetic: casts + Dirichlet(0.5)
    python benchmarks/federated.py --data ../shared/data/ham10000-dev --split dirichlet
    python benchmarks/federated.py --data ../shared/data/ham10000-dev --split age   # natural: age bands
    [--seeds 0,1,2 --rounds 8 --local-epochs 1 --size 64 --model densenet121 --configs fedavg,default,...]

Data: synthetic HAM10000-format images (``--count``) with a colour cast per site (different cameras),
or real HAM10000 images (``--data``, the dev set; ``--max-images`` subsamples). Whole lesions are
dealt to ``--sites`` sites by a per-class Dirichlet(alpha) split (different class mixes), or by age
band (``--split age``: under 45, 45-59, 60 and over; a natural split with very different class
mixes). One lesion-grouped test split over all sites is held out; every row trains on the rest and is
scored on it (macro AUC; balanced accuracy of the argmax, and under the ``prior`` rule a federated
package gets, :func:`medpipe.decision.prior_from_counts` with tau 1 from the row's training class
counts: pooled for centralized and federated rows, the site's own for a site alone):

* ``centralized``: all sites' training data pooled, one run of ``rounds * local_epochs`` epochs with
  the training recipe (one warm-up + cosine);
* ``siteN alone``: the same run on that site's data only;
* one row per federated configuration (:data:`CONFIGS`): ``rounds`` rounds of ``local_epochs`` local
  epochs per site with :func:`medpipe.fl.strategy.simulate_rounds`, the same code as the Flower
  ServerApp (round configuration, the server's checks and aggregation, the server optimiser), in one
  process. ``fedavg`` is the old recipe (a fresh warm-up + cosine in every round); the others change
  one thing at a time; ``default`` is the recipe ``medpipe fl`` uses now.

Every row is scored as it would ship: a centralized or site-alone run by its best validation epoch (what
``medpipe train`` packages; ``best_epoch``), a federated run by its best round under the ServerApp's rule
(the sites' validation figures pooled each round, the highest pooled macro AUC; ``best_round``); each row
also holds its last epoch's / round's figures under ``last``.
Each federated row also gives the rounds it took to reach the centralized macro AUC (the global model
scored on the test split after every round; None: never) and the MB moved per round, all sites together
(global weights down + update up; with ``batchnorm: recompute`` also the weights down again and the BatchNorm
statistics up). Results: benchmarks/results/OUT.json, one entry per seed plus the means
and spreads. The machine and its load (1-minute load average at the start and end) are recorded.

``--deploy CONFIG`` runs that configuration again for the first seed on the real Flower deployment
(``medpipe fl certs``, ``fl server``: a SuperLink with TLS and site authentication, one ``fl site``
SuperNode per site folder, all from ``--fl-venv``) with the same site folders, training config, seed
and rounds, and scores its final global model beside the in-process row. ``--central-auc`` skips the
centralized run (it does not depend on ``--split``: the test split and the pooled folder are the same)
and takes its AUC from an earlier run of that seed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import synth_dataset, write_result  # noqa: E402

CASTS = [(1.0, 1.0, 1.0), (1.18, 0.96, 0.80), (0.82, 0.97, 1.16), (1.05, 1.12, 0.88)]
LEGACY = {"lr_schedule": "local", "local_optimizer": "reset", "batchnorm": "global", "server_optimizer": "fedavg",
          "label_skew": "none"}
ROUNDS_LR = dict(LEGACY, lr_schedule="rounds")
CONFIGS = {  # name -> run configuration keys on top of the common ones
    "fedavg": LEGACY,  # the old recipe: fresh AdamW + warm-up/cosine inside every round
    "fedprox": dict(LEGACY, strategy="fedprox", mu=0.01),
    "rounds-lr": ROUNDS_LR,  # the recipe's schedule across rounds
    "rounds-lr+keep-opt": dict(ROUNDS_LR, local_optimizer="keep"),
    "rounds-lr+local-bn": dict(ROUNDS_LR, batchnorm="local"),
    "rounds-lr+fedavgm": dict(ROUNDS_LR, server_optimizer="fedavgm", server_lr=1.0, server_momentum=0.5),
    "rounds-lr+fedadam": dict(ROUNDS_LR, server_optimizer="fedadam", server_lr=0.01),
    "rounds-lr+fedyogi": dict(ROUNDS_LR, server_optimizer="fedyogi", server_lr=0.01),
    "default": {},  # medpipe.fl.strategy.DEFAULTS
    # around the server momentum (FedAvgM, momentum 0.5 at server lr 1 was the previous default)
    "fedavgm-0.9": dict(ROUNDS_LR, server_optimizer="fedavgm", server_lr=1.0, server_momentum=0.9),
    "fedavgm-lr2": dict(ROUNDS_LR, server_optimizer="fedavgm", server_lr=2.0, server_momentum=0.5),
    "fedavgm+prox": dict(ROUNDS_LR, server_optimizer="fedavgm", server_lr=1.0, server_momentum=0.5,
                         strategy="fedprox", mu=0.01),
    "fedavgm+local-bn": dict(ROUNDS_LR, server_optimizer="fedavgm", server_lr=1.0, server_momentum=0.5,
                             batchnorm="local"),
    "fedadam-0.003": dict(ROUNDS_LR, server_optimizer="fedadam", server_lr=0.003),
    # the server step from the sites' image counts (N^2 / sum n_k^2 each round) instead of a constant
    "fedavgm-auto": dict(ROUNDS_LR, server_optimizer="fedavgm", server_lr="auto", server_momentum=0.5),
    "fedavgm-lr3": dict(ROUNDS_LR, server_optimizer="fedavgm", server_lr=3.0, server_momentum=0.5),
    "fedavg-auto": dict(ROUNDS_LR, server_optimizer="fedavgm", server_lr="auto", server_momentum=0.0),
    # label skew: each site's loss sees its logits + log(site / federation class frequencies) (FedLC-style, the
    # default); without it
    "no-calibrate": {"label_skew": "none"},
    # BatchNorm statistics averaged like the weights, no calibration: the default before this release
    "bn-averaged": {"batchnorm": "global", "label_skew": "none"},
    "bn-averaged+calibrate": {"batchnorm": "global", "label_skew": "calibrate"},
}


def age_band(age) -> str:
    try:
        a = float(age)
    except (TypeError, ValueError):
        return "age45-59"  # unknown ages (13 of the dev set) join the middle band
    if a != a:
        return "age45-59"
    return "age00-44" if a < 45 else ("age45-59" if a < 60 else "age60+")


def _ingest_once(raw: Path, cache: Path, fmt: str | None = None) -> Path:
    from medpipe.data.sources import ingest

    if not (cache / "records.csv").is_file():
        ingest(raw, cache, **({"fmt": fmt} if fmt else {}))
    return cache


def build(raw: Path, work: Path, sites: int, alpha: float, seed: int, *, split: str = "dirichlet",
          casts: bool = True, max_images: int = 0):
    """Site folders (``train/siteN``, ``train/pooled``) of one seeded federation, and the table with each
    image's site and split. ``casts``: cast copies of the images per site (synthetic cameras)."""
    import pandas as pd
    from PIL import Image

    from medpipe.data.sources import ingest, load_records
    from medpipe.data.splits import ensure_splits
    from medpipe.fl.partition import assign_dirichlet

    base = _ingest_once(raw, work.parent / f"base_{raw.name}")
    table, classes = load_records(base)
    if max_images and len(table) > max_images:
        table = table.sample(n=max_images, random_state=seed).sort_index()
    if split == "age":
        site_of = table["age"].map(age_band)
    else:
        site_of = table["group_id"].map(assign_dirichlet(table, sites, alpha, seed))
    folder = work / "all"
    if casts:
        rows = []
        for (_, r), site in zip(table.iterrows(), site_of):
            k = int(site.removeprefix("site"))
            img = np.asarray(Image.open(r["path"]).convert("RGB"), np.float32) * np.array(CASTS[k % len(CASTS)])
            out = work / "cast" / f"{r['image_id']}.jpg"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out, quality=92)
            rows.append({"path": str(out), "label": r["label"], "group": r["group_id"], "site": site})
        pd.DataFrame(rows).to_csv(work / "all.csv", index=False)
        ingest(work / "all.csv", folder, fmt="csv", classes=classes)
        table, classes = load_records(folder)
        table["site"] = table["image_id"].map(dict(zip([Path(r["path"]).stem for r in rows], [r["site"] for r in rows])))
    else:  # the ingested records as they are, a subset in a folder of its own (the images stay where they are)
        folder.mkdir(parents=True, exist_ok=True)
        table = table.assign(site=site_of.to_numpy())
        table.drop(columns=["site"]).to_csv(folder / "records.csv", index=False)
        shutil.copy(base / "classes.json", folder / "classes.json")
        table, classes = load_records(folder)
        table["site"] = site_of.to_numpy()
    splits, _ = ensure_splits(folder, seed=seed)
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


class Scorer:
    """The common test split, cached once; ``score(arrays)`` -> macro AUC and balanced accuracy."""

    def __init__(self, table, classes, cfg, work: Path):
        from medpipe.data.cache import build_cache
        from medpipe.models import create_model

        self.test, self.classes, self.cfg = table[table["split"] == "test"], classes, cfg
        spec = self.spec = cfg.preprocess()
        self.cache = build_cache(self.test, work / "test_cache", (spec.image_size, spec.image_size), spec.interpolation)
        self.model = create_model(cfg.model, len(classes))

    def __call__(self, arrays, counts=None) -> dict:
        """``counts``: the training class counts the model's ``prior`` rule is taken from (tau 1, as a
        federated package's :func:`medpipe.decision.prior_from_counts`); None: no prior-rule figure."""
        import torch

        from medpipe.decision import apply_offsets, balanced_accuracy, prior_from_counts
        from medpipe.evaluate import compute_metrics
        from medpipe.fl.site import predict_logits, to_torch

        self.model.load_state_dict(to_torch(arrays))
        logits = predict_logits(self.model.to(memory_format=torch.channels_last), self.cache.pixels,
                                self.cache.rows(self.test["image_id"]), self.spec, torch.device("cpu"))
        y, probs = self.test["class_index"].to_numpy(), torch.softmax(logits, 1).numpy()
        m = compute_metrics(y, probs, self.classes, bootstrap=0)
        out = {"macro_auc": round(float(m["macro_auc"]), 4), "balanced_accuracy": round(float(m["balanced_accuracy"]), 4)}
        if counts is not None:
            offsets = prior_from_counts(counts, self.classes, "prior", tau=1.0)["rules"]["prior"]["offsets"]
            out["balanced_accuracy_prior"] = round(balanced_accuracy(y, apply_offsets(probs, offsets), len(self.classes)), 4)
        return out


class BestWeights:
    """Engine handler: the weights of the epoch the monitored validation metric last improved, which is what
    ``medpipe train`` packages (the baselines are scored as they would ship, like the federated rows' best round)."""

    def __init__(self):
        self.state, self.epoch = None, 0

    def attach(self, engine) -> None:
        from medpipe.train.engine import Events

        engine.on(Events.BEST_IMPROVED, self._keep)

    def _keep(self, engine) -> None:
        # copies: a CPU tensor's numpy view would follow the weights as training goes on
        self.state = {k: v.detach().cpu().numpy().copy() for k, v in engine.net.state_dict().items()}
        self.epoch = int(engine.state.best_epoch)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy_run(fl_bin: Path, work: Path, folders: dict, site_names: list[str], tc, config: str, rounds: int,
               local_epochs: int, timeout: float = 3600.0) -> dict:
    """The same federated run on the real Flower deployment: ``medpipe fl certs``, ``medpipe fl server`` (a
    SuperLink with TLS and site authentication) and one ``medpipe fl site`` (a SuperNode) per site folder,
    with the in-process run's training config, seed, site folders (their splits and caches) and algorithm.
    Returns the final global model (``checkpoints/global.safetensors``) as arrays."""
    import signal
    import subprocess

    import yaml
    from safetensors.numpy import load_file

    cfg = {**CONFIGS[config]}
    (work / "deploy").mkdir(parents=True, exist_ok=True)
    certs, run, yml = work / "deploy" / "certs", work / "deploy" / "run", work / "deploy" / "train.yaml"
    yml.write_text(yaml.safe_dump({k: v for k, v in tc.to_dict().items() if v is not None}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    med = str(fl_bin / "medpipe")
    subprocess.run([med, "fl", "certs", "--out", str(certs), "--sites", ",".join(site_names)], check=True,
                   capture_output=True, env=env)
    port = _free_port()
    algo = []
    for key in ("lr_schedule", "local_optimizer", "batchnorm", "server_optimizer", "server_lr", "server_momentum",
                "label_skew"):
        if cfg.get(key) is not None:
            algo += [f"--{key.replace('_', '-')}", str(cfg[key])]
    if cfg.get("strategy") == "fedprox":
        algo += ["--strategy", "fedprox", "--mu", str(cfg["mu"])]
    server_cmd = [med, "fl", "server", "--out", str(run), "--certs", str(certs), "--port", str(port),
                  "--site-keys", *[str(certs / "sites" / f"{s}.pub") for s in site_names], "--rounds", str(rounds),
                  "--local-epochs", str(local_epochs), "--min-sites", str(len(site_names)), "--config", str(yml),
                  "--straggler-wait", "600", "--round-timeout", str(timeout), "--wait-for-sites", "600", *algo]
    logs = work / "deploy"
    site_cmds = {s: [med, "fl", "site", "--data", str(folders[s]), "--server", f"127.0.0.1:{port}", "--ca",
                     str(certs / "ca.crt"), "--key", str(certs / "sites" / s), "--runtime-port", str(_free_port()),
                     "--threads", "1"] for s in site_names}
    with contextlib.ExitStack() as stack:
        def spawn(cmd, name):
            out = stack.enter_context(open(logs / f"{name}.log", "wb"))
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)

        procs = [spawn(server_cmd, "server"), *(spawn(cmd, f"site_{s}") for s, cmd in site_cmds.items())]
        try:
            rc = procs[0].wait(timeout)
        finally:
            for p in procs[1:]:  # a site runs until stopped (SIGTERM); then anything left in its process group
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(30)
    if rc != 0:
        raise SystemExit(f"the Flower deployment failed (exit {rc}); see {logs / 'server.log'}:\n"
                         + (logs / "server.log").read_text()[-2000:])
    return load_file(str(run / "checkpoints" / "global.safetensors"))


def run_seed(args, seed: int, raw: Path, casts: bool, configs: list[str]) -> dict:
    """Every row for one seed (partition, split and training seed): centralized, sites alone, federated."""
    import torch

    from medpipe.config import make_config
    from medpipe.fl.bnstats import statistic_names
    from medpipe.fl.site import Site, to_numpy
    from medpipe.fl.strategy import DEFAULTS, BestRound, simulate_rounds
    from medpipe.models import create_model

    epochs = args.rounds * args.local_epochs
    tc = make_config({"model": args.model, "image_size": args.size, "seed": seed, "test_fraction": 0.0,
                      "val_fraction": 0.15, "workers": 0, "bootstrap": 0, "threads": args.threads,
                      "precision": "fp32"}).validate()  # fp32: a bf16 timing check would tie the numerics to the load
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        table, classes, folders = build(raw, work, args.sites, args.alpha, seed, split=args.split, casts=casts,
                                        max_images=args.max_images)
        score = Scorer(table, classes, tc, work)
        site_names = [n for n in folders if n != "pooled"]
        torch.manual_seed(seed)
        model = create_model(tc.model, len(classes))
        init, params = to_numpy(model.state_dict()), [n for n, _ in model.named_parameters()]
        mb = sum(v.nbytes for v in init.values()) / 2**20
        bn_mb = sum(init[k].nbytes for k in statistic_names(init)) / 2**20

        def traffic(cfg: dict) -> float:  # per round: weights down + update up (+ weights down + statistics up)
            return round(len(site_names) * (2 * mb + (mb + bn_mb if cfg.get("batchnorm") == "recompute" else 0)), 2)

        baselines = ([] if args.central_auc is not None else ["pooled"]) + site_names if args.baselines else []
        for name in baselines:  # one continuous run each: the training recipe
            t0 = time.perf_counter()
            site, keep = Site(folders[name], name, tc.to_dict(), classes), BestWeights()
            arrays, _ = site.fit(init, 1, epochs, extra_handlers=(keep,))
            counts = site.source.class_counts
            rows.append({"method": "centralized" if name == "pooled" else f"{name} alone", "train_images": site.n_train,
                         **score(keep.state if keep.state is not None else arrays, counts), "best_epoch": keep.epoch,
                         "last": score(arrays, counts), "mb_per_round": 0.0,
                         "wall_s": round(time.perf_counter() - t0, 1)})
            print(seed, rows[-1], flush=True)
        central = rows[0]["macro_auc"] if rows and rows[0]["method"] == "centralized" else args.central_auc
        for config in configs:
            cfg = {"rounds": args.rounds, "local_epochs": args.local_epochs, "strategy": "fedavg", "mu": 0.0,
                   "aggregation": "mean", **DEFAULTS, **CONFIGS[config]}
            t0, curve, best = time.perf_counter(), [], BestRound()
            sites = [Site(folders[s], s, tc.to_dict(), classes) for s in site_names]
            arrays = simulate_rounds(sites, init, cfg, params, tc.lr, tc.warmup_epochs, best=best,
                                     on_round=lambda rnd, a, result: curve.append(score(a)["macro_auc"]))
            reach = next((i + 1 for i, auc in enumerate(curve) if central is not None and auc >= central), None)
            counts = np.sum([s.source.class_counts for s in sites], axis=0)
            rows.append({"method": config, "train_images": sum(s.n_train for s in sites),
                         **score(best.arrays if best.arrays is not None else arrays, counts), "best_round": best.round,
                         "last": score(arrays, counts), "rounds_to_central": reach, "auc_per_round": curve,
                         "pooled_val_auc_per_round": [round(float(a), 4) for a in best.pooled],
                         "mb_per_round": traffic(cfg), "wall_s": round(time.perf_counter() - t0, 1),
                         "config": {k: v for k, v in cfg.items() if k not in ("rounds", "local_epochs")}})
            print(seed, {k: v for k, v in rows[-1].items() if k != "config"}, flush=True)
        if args.deploy and seed == int(args.seeds.split(",")[0]):  # the first seed, on the real processes
            t0 = time.perf_counter()
            arrays = deploy_run(Path(args.fl_venv) / "bin", work, folders, site_names, tc, args.deploy, args.rounds,
                                args.local_epochs)
            counts = np.sum([Site(folders[s], s, tc.to_dict(), classes).source.class_counts for s in site_names], axis=0)
            rows.append({"method": f"{args.deploy} (Flower deployment, TLS)", **score(arrays, counts),
                         "mb_per_round": traffic({**DEFAULTS, **CONFIGS[args.deploy]}),
                         "wall_s": round(time.perf_counter() - t0, 1)})
            print(seed, rows[-1], flush=True)
        sizes = {s: int((table["site"] == s).sum()) for s in site_names}
        return {"seed": seed, "test_images": int((table["split"] == "test").sum()), "site_images": sizes, "rows": rows}


def summarise(per_seed: list[dict]) -> list[dict]:
    """Mean and spread (min, max) over seeds per method."""
    out = []
    for method in [r["method"] for r in per_seed[0]["rows"]]:
        rs = [r for s in per_seed for r in s["rows"] if r["method"] == method]
        row = {"method": method, "seeds": len(rs)}
        for key in ("macro_auc", "balanced_accuracy", "balanced_accuracy_prior", "last_macro_auc",
                    "last_balanced_accuracy_prior"):
            get = (lambda r, k=key: r["last"][k[5:]]) if key.startswith("last_") else (lambda r, k=key: r[k])
            if any(key not in r and (not key.startswith("last_") or key[5:] not in r.get("last", {})) for r in rs):
                continue
            v = np.array([get(r) for r in rs], float)
            row[key] = round(float(v.mean()), 4)
            row[f"{key}_range"] = [round(float(v.min()), 4), round(float(v.max()), 4)]
        reach = [r.get("rounds_to_central") for r in rs]
        row["rounds_to_central"] = reach if "rounds_to_central" in rs[0] else None
        row["mb_per_round"] = rs[0]["mb_per_round"]
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", help="a HAM10000-layout folder of real images (default: synthetic images)")
    ap.add_argument("--split", choices=["dirichlet", "age"], default="dirichlet")
    ap.add_argument("--count", type=int, default=1200, help="synthetic images")
    ap.add_argument("--max-images", type=int, default=0, help="subsample --data to this many images (0: all)")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--model", default="densenet121")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--configs", default="fedavg,fedprox,default", help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                    help="the centralized and site-alone rows (--no-baselines: federated rows only)")
    ap.add_argument("--central-auc", type=float, help="the centralized AUC to reach, from an earlier run of the "
                    "same seed and split (the centralized row is then not run: it does not depend on --split)")
    ap.add_argument("--work", help="folder for the temporary site folders (default the system's)")
    ap.add_argument("--deploy", help="a configuration to run, for the first seed, on the real Flower "
                    "deployment (SuperLink + SuperNodes with TLS, the --fl-venv's Flower)")
    ap.add_argument("--fl-venv", default=str(Path(__file__).resolve().parents[1] / ".venv-fl"))
    ap.add_argument("--out", default="federated")
    args = ap.parse_args()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        ap.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    if args.deploy and args.deploy not in CONFIGS:
        ap.error(f"--deploy {args.deploy}: unknown; choose from {', '.join(CONFIGS)}")
    if args.split == "age" and not args.data:
        ap.error("--split age needs --data (real images with an age column)")
    raw = Path(args.data).resolve() if args.data else synth_dataset(args.count, seed=0, width=160, height=120)
    work = Path(args.work or tempfile.gettempdir()).resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.work = str(work)
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    per_seed = []
    for seed in args.seeds.split(","):  # the result file is rewritten after each seed (a long run keeps its seeds)
        per_seed.append(run_seed(args, int(seed), raw, casts=not args.data, configs=configs))
        summary = summarise(per_seed)
        size = {"data": "synthetic (per-site colour casts)" if not args.data else f"real: {args.data}",
                "split": args.split, "load_1min_start_end": [round(load0, 2), round(os.getloadavg()[0], 2)],
                "wall_s": round(time.perf_counter() - t0, 1)}
        path = write_result(args.out, {"command": "python benchmarks/federated.py " + " ".join(sys.argv[1:]),
                                       "args": vars(args), **size, "summary": summary, "per_seed": per_seed})
    print(f"\n{'method':<22}{'macro AUC':>10}{'bal acc':>9}{'prior':>7}{'MB/round':>10}  rounds to central")
    for r in summary:
        print(f"{r['method']:<22}{r['macro_auc']:>10.4f}{r['balanced_accuracy']:>9.4f}"
              f"{r.get('balanced_accuracy_prior', float('nan')):>7.4f}{r['mb_per_round']:>10.2f}  "
              f"{r['rounds_to_central']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
