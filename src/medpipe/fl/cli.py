"""``medpipe fl ...``: federated training on Flower (see medpipe.fl)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from medpipe.config import TrainConfig, make_config
from medpipe.errors import MedpipeError
from medpipe.fl.aggregate import MAX_EXAMPLES, MAX_UPDATE_RATIO, METHODS, TRIM_FRACTION
from medpipe.fl.certs import make_certs
from medpipe.fl.partition import partition
from medpipe.fl.strategy import BATCHNORM, DEFAULTS, LABEL_SKEW, LOCAL_OPTIMIZER, LR_SCHEDULES, SERVER_OPTIMIZERS


def _train_overrides(args) -> dict:
    """The sites' training config: the YAML file, then the training options given (one per TrainConfig field)."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    return make_config(given, args.config).to_dict()


def cmd_certs(args) -> int:
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    out = make_certs(args.out, sites, args.host or None, days=args.days)
    print(f"CA {out['ca']}; server certificate {out['server_cert']} for {', '.join(out['hosts'])}")
    for s, k in out["sites"].items():
        print(f"  site {s}: private key {k['private_key']} (give to the site), public key {k['public_key']}")
    return 0


def cmd_partition(args) -> int:
    s = partition(args.data, args.out, by=args.by, sites=args.sites, dirichlet=args.dirichlet,
                  seed=args.partition_seed)
    for name, v in s["sites"].items():
        print(f"  {name}: {v['images']} images, {v['groups']} groups, " +
              " ".join(f"{c}={n}" for c, n in v["class_counts"].items()))
    for name, why in s["skipped"].items():
        print(f"  skipped {name}: {why}")
    print(f"wrote {len(s['sites'])} site folders under {args.out} (partition.json)")
    return 0


def _server_kwargs(args) -> dict:
    return dict(rounds=args.rounds, min_sites=args.min_sites, fraction=args.fraction, strategy=args.strategy,
                mu=args.mu, local_epochs=args.local_epochs,
                classes=[c.strip() for c in args.classes.split(",")] if args.classes else None,
                train_config=_train_overrides(args), round_timeout=args.round_timeout,
                straggler_wait=args.straggler_wait, wait_for_sites=args.wait_for_sites, host=args.host, port=args.port,
                aggregation=args.aggregation, trim=args.trim, max_update_ratio=args.max_update_ratio,
                max_examples=args.max_examples, site_examples=_site_examples(args.site_examples),
                algorithm={"lr_schedule": args.lr_schedule, "local_optimizer": args.local_optimizer,
                           "batchnorm": args.batchnorm, "server_optimizer": args.server_optimizer,
                           "server_lr": args.server_lr, "server_momentum": args.server_momentum,
                           "label_skew": args.label_skew})


def _site_examples(specs: list[str]) -> dict[str, int]:
    out = {}
    for spec in specs or []:
        name, _, n = spec.partition("=")
        if not name or not n.isdigit() or int(n) < 1:
            raise MedpipeError(f"--site-examples {spec!r}: expected NAME=N with N a positive integer")
        out[name] = int(n)
    return out


def _deploy():
    """medpipe.fl.deploy, loaded when a federated command runs (not for ``medpipe --help``)."""
    from medpipe.fl import deploy  # deferred: torch and the training job

    return deploy


def cmd_server(args) -> int:
    run_server = _deploy().run_server
    keys = list(args.site_keys or [])
    s = run_server(args.run_dir, certs=args.certs, site_keys=keys, insecure=args.insecure,
                   round_callbacks=args.round_callback, **_server_kwargs(args))
    print(f"federated run finished: {s['rounds']} rounds, best round {s['best_round']} "
          f"(pooled val macro AUC {s['best_pooled_auc']}); model package {s['model_dir']}")
    return 0


def cmd_simulate(args) -> int:
    simulate = _deploy().simulate
    kw = _server_kwargs(args)
    kw.pop("host")
    s = simulate(args.data, args.run_dir, by=args.by, sites=args.sites, dirichlet=args.dirichlet,
                 seed=args.partition_seed, threads=args.site_threads, round_callbacks=args.round_callback, **kw)
    print(f"simulated federated run finished: best round {s['best_round']} (pooled val macro AUC "
          f"{s['best_pooled_auc']}); model package {s['model_dir']}")
    return 0


def cmd_site(args) -> int:
    run_site = _deploy().run_site
    overrides = {"threads": args.threads} if args.threads else {}
    if args.device:
        overrides["device"] = args.device
    return run_site(args.data, server=args.server, ca=args.ca, key=args.key, name=args.name,
                    runtime_port=args.runtime_port, overrides=overrides, insecure=args.insecure,
                    handlers=args.handler or [])


def add_server_options(s: argparse.ArgumentParser, add_config_options) -> None:
    s.add_argument("--rounds", type=int, default=5, help="federated rounds")
    s.add_argument("--min-sites", type=int, default=2, help="sites needed to start and to complete a round")
    s.add_argument("--fraction", type=float, default=1.0, help="share of connected sites sampled per round")
    s.add_argument("--strategy", choices=["fedavg", "fedprox"], default="fedavg",
                   help="aggregation: fedavg (weighted mean) or fedprox (with a proximal term, --mu)")
    s.add_argument("--mu", type=float, default=0.01, help="FedProx proximal weight")
    s.add_argument("--aggregation", choices=list(METHODS), default="mean",
                   help="mean: weighted by sample counts (FedAvg/FedProx); median or trimmed-mean: robust, unweighted "
                        "(Flower's FedMedian / FedTrimmedAvg)")
    s.add_argument("--trim", type=float, default=TRIM_FRACTION,
                   help="trimmed-mean: share of the sites' values dropped at each end, per coordinate")
    s.add_argument("--max-update-ratio", type=float, default=MAX_UPDATE_RATIO,
                   help="exclude an update whose distance from the global model exceeds this times the global norm")
    s.add_argument("--max-examples", type=int, default=MAX_EXAMPLES,
                   help="most num-examples a site without --site-examples may report")
    s.add_argument("--site-examples", action="append", default=[], metavar="NAME=N",
                   help="a site's registered image count: its num-examples may not exceed it (repeat per site)")
    s.add_argument("--local-epochs", type=int, default=1, help="local epochs per round at each site")
    s.add_argument("--lr-schedule", choices=list(LR_SCHEDULES), default=DEFAULTS["lr_schedule"],
                   help="rounds: the training recipe's warm-up + cosine laid across all rounds, the server sets each "
                        "round's rate; local: a fresh warm-up + cosine inside every round")
    s.add_argument("--local-optimizer", choices=list(LOCAL_OPTIMIZER), default=DEFAULTS["local_optimizer"],
                   help="reset: a fresh AdamW at each site every round; keep: each site keeps its AdamW state")
    s.add_argument("--batchnorm", choices=list(BATCHNORM), default=DEFAULTS["batchnorm"],
                   help="recompute (the default, the best measured): after each server step the sites measure the "
                        "global model's BatchNorm statistics on their training images and the server pools them (one "
                        "more message per round); global: statistics averaged like the weights; local: each site "
                        "trains with its own (SiloBN), the package carries the averaged ones")
    s.add_argument("--server-optimizer", choices=list(SERVER_OPTIMIZERS), default=DEFAULTS["server_optimizer"],
                   help="the server's step from the aggregate: fedavg (take it), fedavgm (server momentum, the "
                        "default), fedadam or fedyogi (Flower's)")
    s.add_argument("--label-skew", choices=list(LABEL_SKEW), default=DEFAULTS["label_skew"],
                   help="calibrate (the default, the best measured): each site's training loss adds log(its class "
                        "frequencies / the federation's) to the logits (FedLC-style logit calibration; sites report "
                        "their training class counts to the server); none: each site fits its own class mix")
    s.add_argument("--server-lr",
                   help="server optimiser learning rate: a number, or auto (fedavgm only: N^2/sum(n_k^2) of each "
                        "round's site image counts); default 2 for fedavgm, measured; Flower's 0.1 fedadam, 0.01 fedyogi")
    s.add_argument("--server-momentum", type=float,
                   help="fedavgm's momentum, fedadam/fedyogi's beta_1 (default 0.5 for fedavgm, 0.9 for the others)")
    s.add_argument("--classes", help="the run's class vocabulary, comma-separated (default the 7 HAM10000 classes)")
    s.add_argument("--round-timeout", type=float, default=3600.0, help="seconds a round waits for sites at most")
    s.add_argument("--straggler-wait", type=float, default=120.0,
                   help="seconds to wait for the remaining sites once --min-sites have answered")
    s.add_argument("--wait-for-sites", type=float, default=600.0, help="seconds to wait for --min-sites to connect")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (loopback unless told; 0.0.0.0 for all)")
    s.add_argument("--port", type=int, default=9092, help="TCP port of the server's Fleet API")
    s.add_argument("--round-callback", action="append", default=[], metavar="MODULE:FUNCTION",
                   help="called with each round's record (e.g. experiment tracking); repeat for several")
    s.add_argument("--config", help="YAML training config for the sites' local training")
    add_config_options(s)


def register(sub, add_config_options) -> None:
    """Add ``medpipe fl ...`` to the ``medpipe`` parser's subcommands; ``add_config_options(parser)`` adds
    the training options (the same as ``medpipe train``'s), given by the parser that owns them."""
    fl = sub.add_parser("fl", help="federated training across sites (Flower; fl extra)")
    fsub = fl.add_subparsers(dest="fl_command", required=True)

    s = fsub.add_parser("certs", help="CA, server TLS certificate and per-site authentication keys")
    s.add_argument("--out", required=True, help="certificate folder to write")
    s.add_argument("--sites", required=True, help="site names, comma-separated")
    s.add_argument("--host", action="append", help="server name or IP in the certificate (repeat; default loopback)")
    s.add_argument("--days", type=int, default=365, help="certificate validity in days")
    s.set_defaults(func=cmd_certs)

    s = fsub.add_parser("partition", help="cut one ingested dataset into site folders (simulation)")
    s.add_argument("--data", required=True, help="one ingested data folder")
    s.add_argument("--out", required=True, help="folder of the site folders to write")
    s.add_argument("--by", help="metadata column: one site per value (e.g. dataset, localization)")
    s.add_argument("--sites", type=int, default=0, help="number of sites (Dirichlet), or the most sites for --by")
    s.add_argument("--dirichlet", type=float, help="alpha of the per-class Dirichlet split (small = non-IID)")
    s.add_argument("--partition-seed", type=int, default=0, help="seed of the partition")
    s.set_defaults(func=cmd_partition)

    s = fsub.add_parser("server", help="run the federation's server (Flower SuperLink + medpipe ServerApp)")
    s.add_argument("--out", dest="run_dir", required=True, help="run folder (checkpoints, log, model package)")
    s.add_argument("--certs", help="folder from 'medpipe fl certs' (ca.crt, server.pem, server.key)")
    s.add_argument("--site-keys", nargs="*", help="public keys of the sites allowed to join (NAME.pub)")
    s.add_argument("--insecure", action="store_true", help="no TLS, no site authentication (loopback experiments)")
    add_server_options(s, add_config_options)
    s.set_defaults(func=cmd_server)

    s = fsub.add_parser("simulate", help="one machine, real processes: partition DATA into sites and run them")
    s.add_argument("--data", required=True, help="one ingested data folder")
    s.add_argument("--out", dest="run_dir", required=True,
                   help="run folder: RUN/sites, RUN/certs, RUN/server (the model package in RUN/server/model)")
    s.add_argument("--by", help="metadata column: one site per value")
    s.add_argument("--sites", type=int, default=0, help="number of sites (Dirichlet), or the most sites for --by")
    s.add_argument("--dirichlet", type=float, help="alpha of the per-class Dirichlet split")
    s.add_argument("--partition-seed", type=int, default=0, help="seed of the partition")
    s.add_argument("--site-threads", type=int, default=1, help="torch threads per site process")
    add_server_options(s, add_config_options)
    s.set_defaults(func=cmd_simulate)

    s = fsub.add_parser("site", help="run a site (Flower SuperNode + medpipe ClientApp) on its own data")
    s.add_argument("--data", required=True, help="this site's ingested data folder")
    s.add_argument("--server", default="127.0.0.1:9092", help="server address host:port")
    s.add_argument("--ca", help="the federation's CA certificate (ca.crt)")
    s.add_argument("--key", help="this site's private key (CERTS/sites/NAME)")
    s.add_argument("--name", help="site name (default: the key file's name)")
    s.add_argument("--runtime-port", type=int, default=9094, help="local port of the SuperNode's runtime API")
    s.add_argument("--threads", type=int, default=0, help="torch threads for local training (0: torch default)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="local training device (default: the run's; auto: CUDA when available, else CPU)")
    s.add_argument("--insecure", action="store_true", help="no TLS, no authentication (loopback experiments)")
    s.add_argument("--handler", action="append", metavar="MODULE:NAME[:ARG,...]",
                   help="add a training event handler to every round's local training (as train --handler)")
    s.set_defaults(func=cmd_site)
