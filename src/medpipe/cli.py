"""The ``medpipe`` command: thin subcommands over library calls.

    medpipe synth OUT [--count N] [--seed S] [--format folders|dataverse]
    medpipe ingest SOURCE --out DATA_DIR [--format auto|ham10000|dataverse|folders|groundtruth|csv]
    medpipe split --data DATA_DIR [--seed S] [--val 0.15] [--test 0.15]
    medpipe cache --data DATA_DIR --size 64

Every subcommand is ``main([...])``-callable in-process (tests do that).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from medpipe import __version__
from medpipe.errors import MedpipeError

log = logging.getLogger("medpipe")


def _progress() -> bool:
    return sys.stderr.isatty()


def cmd_synth(args) -> int:
    from medpipe.data.synthetic import SynthSpec, write_synthetic

    spec = SynthSpec(count=args.count, width=args.width, height=args.height, seed=args.seed)
    summary = write_synthetic(args.out, spec, fmt=args.format, workers=args.workers, progress=_progress())
    print(f"synthesised {summary['images']} images of {summary['lesions']} lesions into {summary['out']}")
    print("  classes: " + ", ".join(f"{c}={n}" for c, n in summary["classes"].items()))
    if "dataverse_zip" in summary:
        print(f"  dataverse zip: {summary['dataverse_zip']}")
    return 0


def cmd_ingest(args) -> int:
    from medpipe.data.sources import IngestError, format_report, ingest

    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    try:
        report = ingest(args.source, args.out, fmt=args.format, classes=classes, s3_root=args.s3_root,
                        label_attribute=args.label_attribute, max_pixels=args.max_pixels, workers=args.workers,
                        strict=False, progress=_progress())
    except IngestError as exc:
        raise MedpipeError(str(exc)) from None
    print(format_report(report))
    print(f"  wrote {args.out}/records.csv, classes.json, ingest_report.json")
    if args.strict and report["defects"]:
        raise MedpipeError(f"--strict: {report['dropped']} defects (see {args.out}/ingest_report.json)")
    return 0


def cmd_split(args) -> int:
    from medpipe.data.splits import ensure_splits, summarize

    splits, reused = ensure_splits(args.data, seed=args.seed, val=args.val, test=args.test, force=args.force)
    print(f"{'reused' if reused else 'wrote'} {args.data}/splits.csv (seed {args.seed}; "
          f"{splits['group_id'].nunique()} groups, none shared across splits)")
    print(summarize(splits).to_string())
    return 0


def cmd_cache(args) -> int:
    from medpipe.data.cache import build_cache
    from medpipe.data.sources import load_records

    table, _ = load_records(args.data)
    cache = build_cache(table, f"{args.data}/cache", (args.size, args.size), args.interpolation,
                        workers=args.workers, progress=_progress())
    print(f"pixel cache {cache.pixels.shape} uint8 at {cache.folder}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medpipe", description="MONAI pipeline for 2D medical image classification")
    p.add_argument("--version", action="version", version=f"medpipe {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write a synthetic dataset in the HAM10000 layout")
    s.add_argument("out")
    s.add_argument("--count", type=int, default=500)
    s.add_argument("--width", type=int, default=600)
    s.add_argument("--height", type=int, default=450)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--format", choices=["folders", "dataverse"], default="folders",
                   help="'dataverse' also writes dataverse_files.zip (the Harvard download form)")
    s.add_argument("--workers", type=int, default=None)
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("ingest", help="read a dataset into a validated record table")
    s.add_argument("source", help="HAM10000 folder, dataverse_files.zip, class folders, GT manifest or CSV")
    s.add_argument("--out", required=True, help="data directory to write")
    s.add_argument("--format", default="auto",
                   choices=["auto", "ham10000", "dataverse", "folders", "groundtruth", "csv"])
    s.add_argument("--classes", help="comma-separated class list (others are 'unknown_label')")
    s.add_argument("--s3-root", help="local folder that s3://bucket/key references map onto (bucket/key)")
    s.add_argument("--label-attribute", help="Ground Truth label attribute (default: the only one; required when a "
                                             "chained manifest has several)")
    s.add_argument("--max-pixels", type=int, default=40_000_000)
    s.add_argument("--workers", type=int, default=None)
    s.add_argument("--strict", action="store_true", help="exit non-zero on any defect")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("split", help="lesion-grouped, stratified, seeded train/val/test split")
    s.add_argument("--data", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--val", type=float, default=0.15)
    s.add_argument("--test", type=float, default=0.15)
    s.add_argument("--force", action="store_true", help="rewrite even when a matching split exists")
    s.set_defaults(func=cmd_split)

    s = sub.add_parser("cache", help="decode every image once into the uint8 pixel cache")
    s.add_argument("--data", required=True)
    s.add_argument("--size", type=int, default=64)
    s.add_argument("--interpolation", default="bicubic")
    s.add_argument("--workers", type=int, default=None)
    s.set_defaults(func=cmd_cache)

    _add_late_commands(sub)
    return p


def _add_late_commands(sub) -> None:
    """Subcommands that live in heavier modules register themselves here."""
    try:
        from medpipe import commands
    except ImportError:  # pragma: no cover
        return
    commands.register(sub)
    from medpipe import tune

    tune.add_parser(sub)
    from medpipe.fl import cli as fl_cli  # medpipe fl ...: imports Flower only when a command runs

    fl_cli.register(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except MedpipeError as exc:
        print(f"medpipe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # never a raw traceback for a user; -v shows it
        if args.verbose:
            raise
        print(f"medpipe {args.command}: internal error: {exc.__class__.__name__}: {str(exc)[:300]} "
              "(run with -v for the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"medpipe {args.command}: interrupted", file=sys.stderr)
        return 130


def exit_process(rc: int):
    """End a command-line process with ``rc``. Inside a multi-process launch (WORLD_SIZE > 1) every
    output is written (atomically, fsynced) by now, so the interpreter's teardown is skipped: a
    communication library's destructor that blocks on a peer which has already exited must not turn
    a finished job into a hung one (seen once: rank 0 of a gloo job stuck at exit after writing
    everything)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":  # pragma: no cover
    exit_process(main())
