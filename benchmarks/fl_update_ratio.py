"""How far honest sites move the model in a round: the data behind ``--max-update-ratio``.

    python benchmarks/fl_update_ratio.py [--count 1200 --sites 3 --alpha 0.5 --rounds 3 --size 64]

Builds the same synthetic federation as ``benchmarks/federated.py`` (its ``build``: per-site colour
casts, a Dirichlet class split), runs the default federated recipe in one process with the server's
own code (``medpipe.fl.strategy.simulate_rounds``: round configuration, checks, aggregation, server
optimiser) and prints, per round and site, the update ratio
``||update - global|| / ||global||`` the server checks, and whether the default limit
(``MAX_UPDATE_RATIO``) would have excluded it. Prints only; ``--out NAME`` writes
benchmarks/results/NAME.json.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, synth_dataset, write_result  # noqa: E402
from federated import build  # noqa: E402


def main() -> None:
    ap = parser(__doc__, count=1200, size=64, seed=0)
    ap.add_argument("--sites", type=int, default=3, help="federated sites")
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the class split")
    ap.add_argument("--rounds", type=int, default=3, help="federated rounds")
    ap.add_argument("--local-epochs", type=int, default=1, help="epochs each site trains per round")
    ap.add_argument("--model", default="densenet121", help="model architecture")
    ap.add_argument("--out", help="also write benchmarks/results/OUT.json")
    args = ap.parse_args()

    import torch

    from medpipe.config import make_config
    from medpipe.fl.aggregate import MAX_UPDATE_RATIO, Guard
    from medpipe.fl.site import Site, to_numpy
    from medpipe.fl.strategy import DEFAULTS, simulate_rounds
    from medpipe.models import create_model

    tc = make_config({"model": args.model, "image_size": args.size, "seed": args.seed, "test_fraction": 0.0,
                      "val_fraction": 0.15, "workers": 0, "bootstrap": 0}).validate()
    raw = synth_dataset(args.count, seed=args.seed, width=160, height=120)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        _, classes, folders = build(raw, Path(tmp), args.sites, args.alpha, args.seed)
        torch.manual_seed(args.seed)
        model = create_model(tc.model, len(classes))
        sites = [Site(folders[s], s, tc.to_dict(), classes) for s in folders if s != "pooled"]
        cfg = {"rounds": args.rounds, "local_epochs": args.local_epochs, "strategy": "fedavg", "aggregation": "mean",
               **DEFAULTS}
        t0 = [time.perf_counter()]

        def record(rnd, _arrays, result):
            for name, u in result.used.items():
                rows.append({"round": rnd, "site": name, "n_train": u["n_train"], "update_ratio": u["update_ratio"],
                             "excluded_by_default": u["update_ratio"] > MAX_UPDATE_RATIO})
                print(rows[-1], flush=True)
            for name, reason in result.excluded.items():  # another check failed (never expected): say so
                print(f"round {rnd}: site {name} excluded: {reason}", flush=True)
            print(f"round {rnd}: {time.perf_counter() - t0[0]:.0f}s", flush=True)
            t0[0] = time.perf_counter()

        simulate_rounds(sites, to_numpy(model.state_dict()), cfg, [n for n, _ in model.named_parameters()], tc.lr,
                        tc.warmup_epochs, on_round=record,  # measure: no ratio limit
                        guard=Guard(max_update_ratio=float("inf"), local_epochs=args.local_epochs))
    worst = max(r["update_ratio"] for r in rows)
    print(f"largest honest update ratio {worst:.4f}; default limit {MAX_UPDATE_RATIO} ({MAX_UPDATE_RATIO / worst:.0f}x)")
    if args.out:
        print(f"wrote {write_result(args.out, {'args': vars(args), 'rows': rows, 'max_ratio': worst})}")


if __name__ == "__main__":
    main()
