"""``medpipe monitor baseline|check|select``: the subcommands, registered on the ``medpipe`` parser by
:mod:`medpipe.cli` (each runs its job in :mod:`medpipe.monitor.jobs` or :mod:`medpipe.monitor.select`)."""

from __future__ import annotations

from medpipe.data.splits import SPLIT_NAMES
from medpipe.infer.backends import BACKENDS


def cmd_monitor_baseline(args) -> int:
    from medpipe.monitor.jobs import baseline  # deferred: torch, pandas and scipy

    stats = baseline(args.model, args.data, args.out, split=args.split, backend=args.backend, device=args.device)
    e = stats["expected"]
    print(f"baseline: {stats['n']} images of split {args.split}; expected accuracy {e['accuracy']:.3f}, balanced "
          f"accuracy {e['balanced_accuracy']:.3f}; wrote {args.out}/statistics.json and constraints.json")
    return 0


def cmd_monitor_check(args) -> int:
    from medpipe.monitor.jobs import check  # deferred: pandas and scipy, only when a check runs

    code, s = check(args.baseline, args.capture, args.out, window=args.window, ground_truth=args.ground_truth,
                    plots=not args.no_plots)
    skipped = ", ".join(f"{k} {v}" for k, v in s["skipped"].items()) or "none"
    print(f"monitor check: {s['images']} images in {s['windows']} windows, {s['violations']} violations; "
          f"skipped or noticed: {skipped}; report {args.out}/report.md")
    return code


def cmd_monitor_select(args) -> int:
    from medpipe.monitor.select import select  # deferred: pandas and scipy, only when a selection runs

    s = select(args.capture, args.budget, args.out, baseline=args.baseline, model=args.model, window=args.window,
               references=args.references, source_prefix=args.source_prefix)
    skipped = ", ".join(f"{k} {v}" for k, v in s["skipped"].items()) or "none"
    print(f"monitor select: {s['selected']} of {s['images']} images ({s['disagree']} with disagreeing decision "
          f"rules, {s['drifted']} from drifted windows); {s['in_manifest']} in {args.out}/manifest.jsonl, "
          f"{s['no_source']} without an image or reference (listed in selected.csv); skipped: {skipped}")
    return 0


def register(sub, parser_class, device) -> None:
    """Add ``medpipe monitor baseline|check|select`` to the ``medpipe`` parser's subcommands (``parser_class``:
    the parser's own class; ``device``: its --device type)."""
    m = sub.add_parser("monitor", help="baseline statistics and drift checks of captured requests",
                       description="baseline statistics and drift checks of captured requests")
    msub = m.add_subparsers(dest="monitor_command", required=True, metavar="STEP", parser_class=parser_class)
    s = msub.add_parser("baseline", help="statistics.json + constraints.json of a model on labelled data")
    s.set_defaults(func=cmd_monitor_baseline)
    s.add_argument("--model", required=True, help="model package folder")
    s.add_argument("--data", required=True, help="ingested data folder")
    s.add_argument("--split", default="val", choices=(*SPLIT_NAMES, "all"),
                   help="labelled images the baseline describes (val: the split the calibration was fitted on)")
    s.add_argument("--out", required=True, help="baseline folder")
    s.add_argument("--backend", default="auto", choices=BACKENDS, help="inference runtime (as serve)")
    s.add_argument("--device", default="auto", type=device, help="auto: CUDA when available, else CPU")
    s = msub.add_parser("check", help="drift and estimated performance per window of captured requests; exit 3 "
                        "when a constraint is violated")
    s.set_defaults(func=cmd_monitor_check)
    s.add_argument("--baseline", required=True, help="folder written by 'medpipe monitor baseline'")
    s.add_argument("--capture", required=True, help="capture folder or s3:// prefix (serve --capture or SageMaker's)")
    s.add_argument("--window", default="500", help="images per window (500) or a duration (30m, 1h, 1d)")
    s.add_argument("--ground-truth", help="CSV eventId,label[,index] or SageMaker groundTruthData JSON Lines")
    s.add_argument("--out", required=True, help="folder for constraint_violations.json, windows.json, report.md")
    s.add_argument("--no-plots", action="store_true", help="write the report without its plots (OUT/plots/*.png)")
    s = msub.add_parser("select", help="the captured cases most worth an expert's label: a SageMaker Ground Truth "
                        "input manifest and a CSV")
    s.set_defaults(func=cmd_monitor_select)
    s.add_argument("--capture", required=True, help="capture folder or s3:// prefix (serve --capture or SageMaker's)")
    s.add_argument("--budget", required=True, type=int, help="how many images to select")
    s.add_argument("--out", required=True, help="folder for manifest.jsonl, selected.csv and images/")
    s.add_argument("--baseline", help="baseline folder: images of drifted windows score higher")
    s.add_argument("--model", help="model package: images its decision rules label differently score higher")
    s.add_argument("--window", default="500", help="images per window (500) or a duration (30m, 1h, 1d)")
    s.add_argument("--references", help="CSV eventId,source-ref[,index]: where the client keeps each image")
    s.add_argument("--source-prefix", help="source-ref prefix of the images written to OUT/images (e.g. the "
                   "s3:// prefix they are uploaded to; default: their local folder)")
