"""Subcommands over training and inference: train, evaluate, predict, package."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from medpipe.config import TrainConfig
from medpipe.errors import MedpipeError


def _progress() -> bool:
    return sys.stderr.isatty()


def add_config_options(p: argparse.ArgumentParser) -> None:
    """One --option per TrainConfig field, defaulting to None so only given values override."""
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        default = f.default if f.default is not MISSING else None
        if kind == "bool":
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"(default {default})")
        elif f.name == "track":  # --track alone: the default store (medpipe.track.resolve_uri)
            p.add_argument(flag, dest=f.name, nargs="?", const="auto", default=None, metavar="URI",
                           help="log to MLflow: a tracking URI, or alone for $MLFLOW_TRACKING_URI or RUN/../mlflow.db")
        else:
            p.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=f"(default {default})")


def config_overrides(args) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}


def cmd_train(args) -> int:
    from medpipe.config import make_config, resume_config
    from medpipe.pipeline import load_handler, run, saved_config
    from medpipe.train.engine import TrainingInterrupted

    if args.resume:
        cfg = resume_config(saved_config(args.out, args.resume), config_overrides(args), args.config)
    else:
        cfg = make_config(config_overrides(args), args.config)
    handlers = [load_handler(h) for h in args.handler or []]
    try:
        summary = run(args.data, args.out, cfg, resume=args.resume or False, force=args.force, handlers=handlers,
                      progress=_progress())
    except TrainingInterrupted as exc:
        print(f"medpipe train: {exc}", file=sys.stderr)
        return TrainingInterrupted.exit_code
    if summary["model_dir"]:  # under torchrun only rank 0 packages the model
        print_summary(summary)
    return 0


def print_summary(summary: dict) -> None:
    print(f"model package: {summary['model_dir']} (best epoch {summary['best_epoch']}, "
          f"temperature {summary['temperature']:.3f})")
    print(f"SageMaker: medpipe package --model {summary['model_dir']} --out model.tar.gz")
    if "test" in summary:
        t = summary["test"]
        print(f"test: macro AUC {t['macro_auc']:.4f} (95% CI {t['macro_auc_ci95'][0]:.3f}-{t['macro_auc_ci95'][1]:.3f}), "
              f"balanced accuracy {t['balanced_accuracy']:.4f}, ECE {t['ece']:.4f}")
        print(f"report: {summary['report']}")
        print("plots: " + ", ".join(summary["plots"]))


def cmd_evaluate(args) -> int:
    from medpipe.evaluate import evaluate_package

    out = args.out or str(Path(args.model) / ".." / f"report_{args.split}")
    result = evaluate_package(args.model, args.data, out, split=args.split, splits_csv=args.splits, tta=args.tta,
                              bootstrap=args.bootstrap, progress=_progress(), backend=args.backend)
    m = result["metrics"]
    print(f"{args.split}: n={m['n']} macro AUC {m['macro_auc']:.4f} (95% CI {m['macro_auc_ci95'][0]:.3f}-"
          f"{m['macro_auc_ci95'][1]:.3f}) balanced accuracy {m['balanced_accuracy']:.4f} ECE {m['ece']:.4f}")
    for c, pc in m["per_class"].items():
        print(f"  {c:>6}: AUC {pc['auc']:.3f}  sens {pc['sensitivity']:.3f}  spec {pc['specificity']:.3f}  n={pc['support']}")
    print(f"report: {result['report_md']}")
    return 0


def cmd_predict(args) -> int:
    from medpipe.data.imageio import ImageError

    if args.url:
        from medpipe.infer.client import predict_url
        results = predict_url(args.url, args.images)
    else:
        from medpipe.infer.predictor import Predictor
        predictor = Predictor(args.model, device=args.device, backend=args.backend)
        results = []
        for path in args.images:
            try:
                results.append({"image": path, **predictor.predict_files([path], tta=args.tta)[0].as_dict()})
            except ImageError as exc:
                results.append({"image": path, "error": exc.code, "message": str(exc)})
    for r in results:
        if args.json:
            print(json.dumps(r))
        elif "error" in r:
            print(f"{r['image']}: error: {r['message']}")
        else:
            probs = "  ".join(f"{c}={p:.3f}" for c, p in sorted(r["probabilities"].items(), key=lambda kv: -kv[1]))
            print(f"{r['image']}: {r['label']} ({r['probabilities'][r['label']]:.3f})  [{probs}]")
    failed = sum("error" in r for r in results)
    return 1 if failed == len(results) else 0


def cmd_package(args) -> int:
    from medpipe.export import check_target
    from medpipe.package import load_package
    from medpipe.sagemaker.layout import download_wheels, package

    load_package(args.model)  # verify before packaging
    check_target(Path(args.out), "sagemaker" if args.out.endswith((".tar.gz", ".tgz")) else "bundle", args.force)
    if not args.offline:
        print(f"wrote {package(args.model, args.out)}")
        return 0
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(f"wrote {package(args.model, args.out, download_wheels(tmp, args.python_version))}")
    return 0


def cmd_serve(args) -> int:
    import os

    try:
        from medpipe.serve.app import ServeConfig, serve
    except ImportError as exc:
        raise MedpipeError(f"serving needs the serve extra ({exc.name} is missing): pip install 'medpipe[serve]'") \
            from None
    values = {k: getattr(args, k) for k in ServeConfig.field_names() if getattr(args, k, None) is not None}
    # Container form: SageMaker runs the image with the argument `serve`; the image sets MEDPIPE_HOST=0.0.0.0.
    from medpipe.sagemaker.env import model_server_dir, serve_port

    values.setdefault("model", str(model_server_dir()))
    values.setdefault("host", os.environ.get("MEDPIPE_HOST") or ServeConfig.host)
    values.setdefault("port", serve_port(default=ServeConfig.port))
    return serve(ServeConfig(**values))


def add_serve_options(s) -> None:
    """One --option per ServeConfig field (see medpipe/serve/app.py for what each limit does)."""
    from medpipe.serve.app import ServeConfig

    types = {"str": str, "int": int, "float": float}
    for f in fields(ServeConfig):
        s.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=f.type if isinstance(f.type, type) else types[f.type], default=None,
                       metavar=f.name.upper(), help=f"(default {f.default})")


def cmd_batch(args) -> int:
    from medpipe.batch import run_batch

    if not args.model and not args.url:
        raise MedpipeError("give --model MODEL or --url http://HOST:PORT")
    s = run_batch(args.model, args.input, args.output, url=args.url, per_file=args.per_file,
                  manifest_out=args.manifest_out, label_attribute=args.label_attribute, batch_size=args.batch_size,
                  shard_size=args.shard_size, workers=args.workers, backend=args.backend, device=args.device,
                  concurrency=args.concurrency, max_error_rate=args.max_error_rate, progress=_progress(),
                  s3_root=args.s3_root)
    print(f"batch: {s['predicted']} predicted, {s['errors']} errors of {s['items']} "
          f"-> {s['outputs']['jsonl']}, {s['outputs']['csv']}")
    if s["errors"]:
        print(f"error rows carry the reason; see {s['outputs']['csv']}", file=sys.stderr)
    if s["threshold_exceeded"]:
        print(f"medpipe batch: error rate {s['error_rate']:.1%} is over --max-error-rate "
              f"{args.max_error_rate:.1%}", file=sys.stderr)
        return 3
    return 1 if s["predicted"] == 0 else 0


def cmd_shard(args) -> int:
    from medpipe.data.shards import write_shards

    index = write_shards(args.data, args.out, size=args.size, interpolation=args.interpolation,
                         per_shard=args.per_shard, split_seed=args.split_seed, val=args.val, test=args.test,
                         progress=_progress())
    print(f"wrote {len(index['shards'])} shards to {args.out} (train {index['counts']['train']}, val "
          f"{index['counts']['val']}, test {index['counts']['test']} images at {args.size}x{args.size}); "
          f"train with: medpipe train --data {args.out} --image-size {args.size}")
    return 0


def cmd_export(args) -> int:
    from medpipe.export import export_model

    r = export_model(args.model, args.format, args.out, force=args.force, data=args.data,
                     calibration=args.calibration, with_preprocessing=args.with_preprocessing)
    check = f" (max |export - eager| {r['max_abs_diff']:.1e})" if "max_abs_diff" in r else ""
    print(f"wrote {args.format}: {r['out']}{check}")
    if "int8" in r:
        from medpipe.infer.quantize import format_gate

        print(format_gate(r["int8"]))
    return 0


def cmd_quantize(args) -> int:
    from medpipe.infer.quantize import format_gate, install_int8, quantize_package

    int8, info = quantize_package(args.model, args.data, calibration=args.calibration, force=args.force)
    print(f"wrote {install_int8(args.model, int8, info)} ({len(int8) / 1e6:.1f} MB)")
    print(format_gate(info))
    return 0


def add_int8_options(s, force: bool = True) -> None:
    s.add_argument("--data", help="the ingested data folder the model was trained on (its validation "
                                  "split calibrates and gates the INT8 model)")
    s.add_argument("--calibration", help="calibrate on this image folder instead (the gate still "
                                         "uses the validation split)")
    if force:
        s.add_argument("--force", action="store_true", help="write the INT8 model even if it fails the accuracy "
                                                            "gate (marked failed; --backend auto never picks it)")


def cmd_runs(args) -> int:
    import os

    from medpipe.track import list_runs

    uri = args.track or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise MedpipeError("give --track URI (e.g. sqlite:///runs/mlflow.db) or set MLFLOW_TRACKING_URI")
    rows = list_runs(uri, args.experiment, metric=args.metric, plot=args.plot)
    print(f"{'run':<34}{'name':<20}{'status':<10}{args.metric:>14}{'best epoch':>12}{'test AUC':>10}{'test bacc':>10}")
    for r in rows:
        cells = [r[args.metric], r["best_epoch"], r["test_macro_auc"], r["test_balanced_accuracy"]]
        text = [f"{v:.4f}" if isinstance(v, float) and not float(v).is_integer() else
                ("-" if v is None else f"{v:g}") for v in cells]
        print(f"{r['run_id']:<34}{str(r['name'])[:19]:<20}{r['status']:<10}{text[0]:>14}{text[1]:>12}{text[2]:>10}"
              f"{text[3]:>10}")
    if args.plot and rows:
        print(f"plot: {args.plot}")
    return 0


def register(sub) -> None:
    from medpipe.export import FORMATS
    from medpipe.infer.predictor import BACKENDS

    s = sub.add_parser("train", help="train a MONAI classifier; writes RUN_DIR/{model,report,checkpoints}")
    s.add_argument("--data", required=True, help="ingested data directory")
    s.add_argument("--out", required=True, help="run directory")
    s.add_argument("--config", help="YAML config (keys as in config.yaml); options given here override it")
    s.add_argument("--resume", nargs="?", const="last", default=None,
                   help="continue from RUN_DIR/checkpoints/last.pt (or the checkpoint path given) with the run's own "
                        "config; options given again must match it")
    s.add_argument("--force", action="store_true", help="start over in a run folder that holds a previous run")
    s.add_argument("--handler", action="append", metavar="MODULE:NAME[:ARG,...]",
                   help="add a training event handler: NAME(ARG, ...) from MODULE, an object with attach(engine)")
    add_config_options(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("runs", help="tracked training runs (MLflow) with their key metrics, best first")
    s.add_argument("--track", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI)")
    s.add_argument("--experiment", default="medpipe")
    s.add_argument("--metric", default="best_val_auc", help="sort by this metric, highest first")
    s.add_argument("--plot", help="also write a PNG of validation AUC per epoch for these runs")
    s.set_defaults(func=cmd_runs)

    s = sub.add_parser("evaluate", help="metrics with CIs, calibration and plots for a model package")
    s.add_argument("--model", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    s.add_argument("--splits", help="splits.csv to use (default DATA/splits.csv)")
    s.add_argument("--out", help="report folder (default next to the model)")
    s.add_argument("--tta", action="store_true", help="average over flips")
    s.add_argument("--bootstrap", type=int, default=1000)
    s.add_argument("--backend", default="eager", choices=BACKENDS, help="int8: the package's INT8 model")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("predict", help="top class and every class probability per image")
    s.add_argument("images", nargs="+")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="model package folder (or a run folder)")
    g.add_argument("--url", help="a running medpipe/SageMaker-compatible server, e.g. http://127.0.0.1:8080")
    s.add_argument("--device", default="auto", help="auto: CUDA when available, else CPU")
    s.add_argument("--backend", default="eager", choices=BACKENDS)
    s.add_argument("--tta", action="store_true")
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("serve", help="HTTP inference service (SageMaker hosting contract, web page at /)")
    add_serve_options(s)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("batch", help="predictions for a folder, manifest or record table (resumable)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--model", help="model package folder (or a run folder)")
    g.add_argument("--url", help="send each file to a running server's /invocations instead")
    s.add_argument("--input", required=True, help="image folder (recursive), CSV or Ground Truth manifest, "
                                                  "or an ingested data folder")
    s.add_argument("--output", required=True, help="output folder (re-run with the same one to resume)")
    s.add_argument("--per-file", action="store_true", help="also write <input>.out per file (batch transform)")
    s.add_argument("--manifest-out", help="write a Ground Truth output manifest of the predictions here")
    s.add_argument("--s3-root", help="local folder holding s3://bucket/key references of a Ground Truth manifest "
                                     "as S3_ROOT/bucket/key (as for ingest)")
    s.add_argument("--label-attribute", default="medpipe-label")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--shard-size", type=int, default=256, help="items per atomically written output shard")
    s.add_argument("--workers", type=int, default=None, help="decoding threads (default: all cores)")
    s.add_argument("--backend", default="auto", choices=BACKENDS)
    s.add_argument("--device", default="auto", help="auto: CUDA when available, else CPU")
    s.add_argument("--concurrency", type=int, default=None, help="with --url: requests in flight "
                                                                 "(default: the server's MaxConcurrentTransforms)")
    s.add_argument("--max-error-rate", type=float, default=None,
                   help="exit 3 when the share of error rows is above this (e.g. 0.05)")
    s.set_defaults(func=cmd_batch)

    s = sub.add_parser("shard", help="pack records + cached pixels into tar shards for streaming training")
    s.add_argument("--data", required=True, help="ingested data folder")
    s.add_argument("--out", required=True, help="shard folder (copy it to any fsspec store, e.g. s3://...)")
    s.add_argument("--size", type=int, default=64)
    s.add_argument("--interpolation", default="bicubic")
    s.add_argument("--per-shard", type=int, default=1000)
    s.add_argument("--split-seed", type=int, default=0)
    s.add_argument("--val", type=float, default=0.15, help="validation fraction of the split")
    s.add_argument("--test", type=float, default=0.15, help="test fraction of the split")
    s.set_defaults(func=cmd_shard)

    s = sub.add_parser("export", help="export a package: onnx, torchscript, MONAI bundle or SageMaker tarball")
    s.add_argument("--model", required=True)
    s.add_argument("--format", required=True, choices=FORMATS)
    s.add_argument("--out", required=True, help="file (onnx, onnx-int8, torchscript, sagemaker) or folder (bundle); "
                                                "never inside a model package")
    s.add_argument("--force", action="store_true", help="replace an existing --out (and its sidecar); onnx-int8: "
                                                        "also write a model that fails the accuracy gate")
    add_int8_options(s, force=False)
    s.add_argument("--with-preprocessing", action="store_true",
                   help="onnx: take uint8 RGB N x S x S x 3 pixels (decoded and resized by the package's rule)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("quantize", help="INT8 model for CPUs, checked by an accuracy gate, stored in the package")
    s.add_argument("--model", required=True)
    add_int8_options(s)
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("package", help="the SageMaker deployable layout of a model package (folder or model.tar.gz)")
    s.add_argument("--model", required=True)
    s.add_argument("--out", required=True, help="model.tar.gz path, or a new folder")
    s.add_argument("--offline", action="store_true", help="vendor every wheel into code/wheels (network-isolated "
                   "endpoints; installed with --no-index)")
    s.add_argument("--python-version", default="3.11", help="the container's Python for --offline (default 3.11)")
    s.add_argument("--force", action="store_true", help="replace an existing --out")
    s.set_defaults(func=cmd_package)
