"""The ``medpipe`` command: one parser for every subcommand, each a thin call into the library.

    medpipe synth OUT [--count N] [--seed S] [--format folders|dataverse]
    medpipe ingest SOURCE --out DATA_DIR [--format auto|ham10000|dataverse|folders|groundtruth|csv]
    medpipe split --data DATA_DIR [--split-seed S] [--val-fraction 0.15] [--test-fraction 0.15]
    medpipe cache --data DATA_DIR --image-size 64
    medpipe train --data DATA_DIR --out RUN_DIR [--epochs N ...]   (one option per TrainConfig field)
    medpipe evaluate --model RUN/model --data DATA_DIR [--split test] [--tta]
    medpipe predict (--model RUN/model | --url URL) IMAGE... [--age 60 --sex male --site back | --metadata-csv F]
    medpipe serve [--model RUN/model] [--port 8080 ...]            (one option per ServeConfig field)
    medpipe batch (--model RUN/model | --url URL) --input IMAGES --output OUT [--engine ray]
    medpipe shard --data DATA_DIR --out SHARDS
    medpipe export --model RUN/model --format onnx|torchscript|bundle|sagemaker --out PATH
    medpipe package --model RUN/model        (the same as export --format sagemaker, default MODEL/model.tar.gz)

One name per concept across subcommands (``--split-seed``, ``--val-fraction``, ``--test-fraction``,
``--image-size``, ``--shard-size``, ``--out``); an older spelling still works, hidden from ``--help``, and
warns once. Every option has help text that ends with its default (printed once). Options are checked
when they are parsed (a wrong value or an out-of-range number exits 2 with one line: the option and the
reason; the usage only with ``--help``); an unknown option suggests the closest known one (by spelling,
or by initials: ``--learning-rate`` -> ``--lr``); ``-v`` works anywhere on the line, also after ``tune``
and ``fl``. A :class:`medpipe.errors.MedpipeError` ends the command with its message and the exit
code of its row in ``medpipe.errors.TABLE``; anything else is an internal error (``-v`` shows the
traceback). Every subcommand is ``main([...])``-callable in-process (tests do that).

Building the parser and parsing import only light modules (the choices come from torch-free modules);
torch and MONAI load inside the command that runs, so ``--help`` and usage errors answer at once.

Size: over 650 lines because it is every subcommand's parser and thin body in one place (the option
helpers live in ``cli_options``); splitting the subcommands across modules would split the one parser.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from medpipe.utils import exit_process, to_json  # noqa: F401 - medpipe.cli.exit_process for __main__
from medpipe import __version__, tune
from medpipe.batch import run_batch
from medpipe.batch_ray import run_batch_ray
from medpipe.errors import ConfigError, MedpipeError, exit_code
from medpipe.config import (TrainConfig, make_config,
                            resume_config)
from medpipe.data.cache import build_cache
from medpipe.data.imageio import DEFAULT_MAX_PIXELS, ImageError
from medpipe.data.metadata import per_image_metadata as predict_metadata
from medpipe.data.sources import (FORMATS as INGEST_FORMATS, check_data_folder, format_report, ingest, load_records,
                                  regular_file_problem)
from medpipe.data.splits import SPLIT_NAMES, ensure_splits, summarize
from medpipe.data.synthetic import FORMATS as SYNTH_FORMATS, SynthSpec, write_synthetic
from medpipe.decision import RULES as DECISION_RULES
from medpipe.export import FORMATS as EXPORT_FORMATS, check_target, export_model
from medpipe.fl import cli as fl_cli
from medpipe.monitor import cli as monitor_cli
from medpipe.infer.backends import BACKENDS
from medpipe.infer.client import predict_url
from medpipe.infer.quantize import format_gate, install_int8, quantize_package
from medpipe.package import load_package
from medpipe.preprocess import INTERPOLATIONS
from medpipe.sagemaker.env import model_server_dir, serve_port
from medpipe.sagemaker.layout import download_wheels, package
from medpipe.serve.app import serve
from medpipe.serve.config import ServeConfig
from medpipe.serve.profiles import PROFILE_ENV, PROFILES, apply_profile
from medpipe.cli_options import (NON_NEGATIVE, POSITIVE, Parser, SERVE_HELP, WORKERS, _progress, add_config_options,
                                 add_dataclass_options, add_metadata_options, add_pixel_options, add_split_options,
                                 add_verbose,
                                 dataclass_values, device, number, old_spelling, suggest, walk)  # noqa: F401 - re-exported

log = logging.getLogger("medpipe")





# -- subcommands ---------------------------------------------------------------------------------------


def cmd_synth(args) -> int:
    spec = SynthSpec(count=args.count, width=args.width, height=args.height, seed=args.seed)
    summary = write_synthetic(args.out, spec, fmt=args.format, workers=args.workers, progress=_progress())
    print(f"synthesised {summary['images']} images of {summary['lesions']} lesions into {summary['out']}")
    print("  classes: " + ", ".join(f"{c}={n}" for c, n in summary["classes"].items()))
    if "dataverse_zip" in summary:
        print(f"  dataverse zip: {summary['dataverse_zip']}")
    return 0


def cmd_ingest(args) -> int:
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    report = ingest(args.source, args.out, fmt=args.format, classes=classes, s3_root=args.s3_root,
                    label_attribute=args.label_attribute, max_pixels=args.max_pixels, workers=args.workers,
                    strict=False, progress=_progress(), metadata_columns=args.metadata_columns)
    print(format_report(report))
    print(f"  wrote {args.out}/records.csv, classes.json, ingest_report.json")
    if args.strict and report["defects"]:
        raise MedpipeError(f"--strict: {report['dropped']} defects (see {args.out}/ingest_report.json)")
    return 0


def cmd_split(args) -> int:
    splits, reused = ensure_splits(args.data, seed=args.split_seed, val=args.val_fraction, test=args.test_fraction,
                                   force=args.force)
    print(f"{'reused' if reused else 'wrote'} {args.data}/splits.csv (split seed {args.split_seed}; "
          f"{splits['group_id'].nunique()} groups, none shared across splits)")
    print(summarize(splits).to_string())
    return 0


def cmd_cache(args) -> int:
    table, _ = load_records(args.data)
    cache = build_cache(table, f"{args.data}/cache", (args.image_size, args.image_size), args.interpolation,
                        workers=args.workers, progress=_progress())
    print(f"pixel cache {cache.pixels.shape} uint8 at {cache.folder}")
    return 0


def cmd_train(args) -> int:
    if "://" not in str(args.data):  # a missing local folder is refused before torch is imported
        check_data_folder(args.data)
    from medpipe.pipeline import load_handler, run  # deferred: torch

    handlers = [load_handler(h) for h in args.handler or []]
    summary = run(args.data, args.out, args.train_config, resume=args.resume or False, force=args.force,
                  handlers=handlers, progress=_progress())
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
    from medpipe.evaluate import evaluate_package  # deferred: torch

    out = args.out or str(Path(args.model) / ".." / f"report_{args.split}")
    result = evaluate_package(args.model, args.data, out, split=args.split, splits_csv=args.splits, tta=args.tta,
                              bootstrap=args.bootstrap, backend=args.backend, device=args.device,
                              decision_rule=args.decision_rule,
                              progress=_progress())
    m = result["metrics"]
    print(f"{args.split}: n={m['n']} macro AUC {m['macro_auc']:.4f} (95% CI {m['macro_auc_ci95'][0]:.3f}-"
          f"{m['macro_auc_ci95'][1]:.3f}) balanced accuracy {m['balanced_accuracy']:.4f} ECE {m['ece']:.4f}")
    for c, pc in m["per_class"].items():
        print(f"  {c:>6}: AUC {pc['auc']:.3f}  sens {pc['sensitivity']:.3f}  spec {pc['specificity']:.3f}  n={pc['support']}")
    print(f"report: {result['report_md']}")
    return 0


# Why a decision rule may label an image with a class that is not its most likely one (medpipe.decision)
RULE_WHY = {
    "prior": "the balanced-accuracy rule 'prior'",
    "class_bias": "the balanced-accuracy rule 'class_bias'",
}
RULE_NOTE = ("note: the package's decision rule chose the labels marked 'flagged': fitted on the validation split "
             "for balanced accuracy, it weighs rare classes up, so a rare class can be named although another is "
             "more likely (the probabilities are unchanged; --decision-rule argmax names the most likely class)")


def describe(r: dict) -> tuple[str, bool]:
    """``label (p)``, and where the decision rule chose another class than the most likely one, why
    (``df (0.032; flagged by the balanced-accuracy rule 'prior'; most likely: nv 0.699)``); and whether so."""
    probs, label = r["probabilities"], r["label"]
    top = r.get("most_likely") or max(probs, key=probs.get)
    if label == top:
        return f"{label} ({probs[label]:.3f})", False
    rule = r.get("decision_rule", "argmax")
    why = RULE_WHY.get(rule, f"the decision rule '{rule}'")
    return f"{label} ({probs[label]:.3f}; flagged by {why}; most likely: {top} {probs[top]:.3f})", True


def _predict_rows(args, paths: list[str], metadata: dict[str, dict] | None = None) -> list[dict]:
    if args.url:
        return predict_url(args.url, paths, metadata)
    from medpipe.infer.predictor import Predictor  # deferred: torch

    predictor = Predictor(args.model, device=args.device, backend=args.backend, decision_rule=args.decision_rule)
    given = [(metadata or {}).get(p) for p in paths] if metadata else [None] * len(paths)
    predictor.encode_metadata(metadata and given, len(paths), list(paths))  # all checked first: exit 2 naming it
    rows = []
    for path, values in zip(paths, given):
        try:
            pred = predictor.predict_files([path], args.tta, metadata and [values])[0]
            rows.append({"image": path, **pred.as_dict()})
        except ImageError as exc:
            rows.append({"image": path, "error": exc.code, "message": exc.reason})
    return rows


def cmd_predict(args) -> int:
    if args.url and args.tta:
        raise ConfigError("--tta applies to a local --model; a server averages flips when started with --tta")
    # the inputs are checked before the model loads; each path is named once (the row's "image")
    problems = {p: regular_file_problem(p) for p in args.images}
    readable = [p for p in args.images if problems[p] is None]
    found = iter(_predict_rows(args, readable, predict_metadata(args.images, {
        "age": args.age, "sex": args.sex, "site": args.site}, args.metadata_csv)) if readable else [])
    results = [next(found) if problems[p] is None else {"image": p, "error": "unreadable_file", "message": problems[p]}
               for p in args.images]
    flagged = False
    for r in results:
        if "error" in r:
            prefix = f"{r['image']}: "
            r["message"] = r["message"][len(prefix):] if r["message"].startswith(prefix) else r["message"]
        if args.json:
            print(to_json(r))
        elif "error" in r:
            print(f"{r['image']}: error: {r['message']}")
        else:
            text, why = describe(r)
            flagged |= why
            probs = "  ".join(f"{c}={p:.3f}" for c, p in sorted(r["probabilities"].items(), key=lambda kv: -kv[1]))
            print(f"{r['image']}: {text}  [{probs}]")
    if flagged:
        print(RULE_NOTE)
    failed = sum("error" in r for r in results)
    return 1 if failed == len(results) else 0


SERVE_MODULES = ("fastapi", "uvicorn", "prometheus_client")
EXIT_RETRY = 75  # sysexits.h EX_TEMPFAIL: some batch rows are missing; rerunning the same command asks again


def cmd_serve(args) -> int:
    import importlib.util

    missing = [m for m in SERVE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise MedpipeError(f"serving needs the serve extra ({', '.join(missing)} missing): "
                           "pip install 'medpipe-imaging[serve]'")

    values = dataclass_values(args, ServeConfig)
    # Container form: SageMaker runs the image with the argument `serve`; the image sets MEDPIPE_HOST=0.0.0.0.
    if "model" not in values:
        values["model"] = str(model_server_dir())
        if not os.environ.get("SM_MODEL_DIR") and not Path(values["model"]).is_dir():
            raise ConfigError("which model? pass --model RUN/model (the model package `medpipe train` wrote); "
                              f"without it serve uses $SM_MODEL_DIR or {values['model']}, as in a SageMaker "
                              "container, and there is neither")
    values.setdefault("host", os.environ.get("MEDPIPE_HOST") or ServeConfig.host)
    values.setdefault("port", serve_port(default=ServeConfig.port))
    values.setdefault("profile", os.environ.get(PROFILE_ENV) or ServeConfig.profile)
    return serve(ServeConfig(**apply_profile(values)))


def cmd_batch(args) -> int:
    if args.engine != "ray" and (args.ray_address or args.ray_actors):
        raise ConfigError("--ray-address and --ray-actors apply to --engine ray")
    run, ray = run_batch, {}  # torch loads when the engine starts; Ray only with --engine ray
    if args.engine == "ray":
        run, ray = run_batch_ray, {"address": args.ray_address, "actors": args.ray_actors}
    s = run(args.model, args.input, args.output, url=args.url, per_file=args.per_file,
                  manifest_out=args.manifest_out, label_attribute=args.label_attribute, batch_size=args.batch_size,
                  shard_size=args.shard_size, workers=args.workers, backend=args.backend, device=args.device,
                  concurrency=args.concurrency, max_error_rate=args.max_error_rate, retries=args.retries,
                  progress=_progress(),
                  s3_root=args.s3_root, decision_rule=args.decision_rule, tta=args.tta, **ray)
    print(f"batch: {s['predicted']} predicted, {s['errors']} errors of {s['items']} "
          f"-> {s['outputs']['jsonl']}, {s['outputs']['csv']}")
    if s["errors"]:
        print(f"error rows carry the reason; see {s['outputs']['csv']}", file=sys.stderr)
    for r in s["per_file_refused"]:
        print(f"medpipe batch: --per-file output for id {r['id']!r} refused: {r['reason']}", file=sys.stderr)
    if s["missing"]:
        print(f"medpipe batch: {s['missing']} rows got no answer from the server (busy or unreachable after "
              f"retries); run the same command again to ask for exactly those", file=sys.stderr)
        return EXIT_RETRY
    if s["threshold_exceeded"]:
        print(f"medpipe batch: error rate {s['error_rate']:.1%} is over --max-error-rate "
              f"{args.max_error_rate:.1%}", file=sys.stderr)
        return 3
    return 1 if s["predicted"] == 0 else 0


def cmd_shard(args) -> int:
    from medpipe.data.shards import write_shards  # deferred: torch

    index = write_shards(args.data, args.out, size=args.image_size, interpolation=args.interpolation,
                         per_shard=args.shard_size, split_seed=args.split_seed, val=args.val_fraction,
                         test=args.test_fraction,
                         progress=_progress())
    print(f"wrote {len(index['shards'])} shards to {args.out} (train {index['counts']['train']}, val "
          f"{index['counts']['val']}, test {index['counts']['test']} images at {args.image_size}x{args.image_size}); "
          f"train with: medpipe train --data {args.out} --image-size {args.image_size}")
    return 0


def cmd_export(args) -> int:
    if args.format == "sagemaker":
        return _sagemaker_layout(args)
    r = export_model(args.model, args.format, args.out, force=args.force, data=args.data,
                     calibration=args.calibration, with_preprocessing=args.with_preprocessing)
    check = f" (max |export - eager| {r['max_abs_diff']:.1e})" if "max_abs_diff" in r else ""
    print(f"wrote {args.format}: {r['out']}{check}")
    if "int8" in r:
        print(format_gate(r["int8"]))
    return 0


def _sagemaker_layout(args) -> int:
    """``medpipe package`` and ``medpipe export --format sagemaker``: the deployable layout (a folder, or
    model.tar.gz when --out ends in .tar.gz), optionally with every wheel vendored for offline endpoints."""

    load_package(args.model)  # verify before packaging
    check_target(Path(args.out), "sagemaker" if args.out.endswith((".tar.gz", ".tgz")) else "bundle", args.force)
    if not args.offline:
        print(f"wrote sagemaker: {package(args.model, args.out)}")
        return 0
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(f"wrote sagemaker: {package(args.model, args.out, download_wheels(tmp, args.python_version))}")
    return 0


def cmd_quantize(args) -> int:
    int8, info = quantize_package(args.model, args.data, calibration=args.calibration, force=args.force)
    print(f"wrote {install_int8(args.model, int8, info)} ({len(int8) / 1e6:.1f} MB)")
    print(format_gate(info))
    return 0


def add_sagemaker_options(s) -> None:
    s.add_argument("--offline", action="store_true", help="sagemaker: vendor every wheel into code/wheels "
                   "(network-isolated endpoints; installed with --no-index)")
    s.add_argument("--python-version", default="3.11", help="sagemaker --offline: the container's Python")


def cmd_runs(args) -> int:
    from medpipe.track import list_runs  # deferred: torch

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


def add_int8_options(s, force: bool = True) -> None:
    s.add_argument("--data", help="the ingested data folder the model was trained on (its validation "
                                  "split calibrates and gates the INT8 model)")
    s.add_argument("--calibration", help="calibrate on this image folder instead (the gate still "
                                         "uses the validation split)")
    if force:
        s.add_argument("--force", action="store_true", help="write the INT8 model even if it fails the accuracy "
                                                            "gate (marked failed; --backend auto never picks it)")


def _data_commands(command) -> None:
    """synth, ingest, split, cache: making and preparing a dataset."""

    s = command("synth", cmd_synth, "write a synthetic dataset in the HAM10000 layout")
    s.add_argument("out", help="folder to write")
    s.add_argument("--count", type=POSITIVE, default=500, help="images")
    s.add_argument("--width", type=POSITIVE, default=600, help="image width in pixels")
    s.add_argument("--height", type=POSITIVE, default=450, help="image height in pixels")
    s.add_argument("--seed", type=int, default=0, help="seed of the generated images and labels")
    s.add_argument("--format", choices=SYNTH_FORMATS, default="folders",
                   help="folders: HAM10000 folders + metadata CSV; dataverse: also dataverse_files.zip "
                        "(the Harvard download form)")
    s.add_argument("--workers", type=WORKERS, default=None, help="processes (default: all cores)")

    s = command("ingest", cmd_ingest, "read a dataset into a validated record table")
    s.add_argument("source", help="HAM10000 folder, dataverse_files.zip, class folders, GT manifest (or s3://) or CSV")
    s.add_argument("--out", required=True, help="data directory to write")
    s.add_argument("--format", default="auto", choices=INGEST_FORMATS,
                   help="auto: detect; ham10000: metadata CSV + image folders; dataverse: the Harvard zip; "
                        "folders: one folder per class; groundtruth: a SageMaker Ground Truth manifest; "
                        "csv: a CSV with path and label columns")
    s.add_argument("--classes", help="comma-separated class list (others are 'unknown_label')")
    s.add_argument("--s3-root", help="local folder s3://bucket/key references map onto (default: copied into OUT/s3)")
    s.add_argument("--label-attribute", help="Ground Truth label attribute (default: the only one; required when a "
                                             "chained manifest has several)")
    add_metadata_options(s, ingest=True)
    s.add_argument("--max-pixels", type=POSITIVE, default=DEFAULT_MAX_PIXELS, help="largest image accepted")
    s.add_argument("--workers", type=WORKERS, default=None, help="decoding processes (default: all cores)")
    s.add_argument("--strict", action="store_true", help="exit non-zero on any defect")

    s = command("split", cmd_split, "lesion-grouped, stratified, seeded train/val/test split")
    s.add_argument("--data", required=True, help="ingested data directory")
    add_split_options(s)
    s.add_argument("--force", action="store_true", help="rewrite even when a matching split exists")

    s = command("cache", cmd_cache, "decode every image once into the uint8 pixel cache")
    s.add_argument("--data", required=True, help="ingested data directory")
    add_pixel_options(s, INTERPOLATIONS)
    s.add_argument("--workers", type=WORKERS, default=None, help="decoding processes (default: all cores)")


def _training_commands(command) -> None:
    """train, evaluate: fitting a model and measuring it."""

    s = command("train", cmd_train, "train a MONAI classifier; writes RUN_DIR/{model,report,checkpoints}")
    s.add_argument("--data", required=True, help="ingested data directory, or a shard folder or s3:// prefix")
    s.add_argument("--out", required=True, help="run directory")
    s.add_argument("--config", help="YAML config (keys as in config.yaml); options given here override it")
    s.add_argument("--resume", nargs="?", const="last", default=None,
                   help="continue from RUN_DIR/checkpoints/last.pt (or the checkpoint path given) with the run's own "
                        "config; options given again must match it")
    s.add_argument("--force", action="store_true", help="start over in a run folder that holds a previous run")
    s.add_argument("--handler", action="append", metavar="MODULE:NAME[:ARG,...]",
                   help="add a training event handler: NAME(ARG, ...) from MODULE, an object with attach(engine)")
    add_config_options(s)

    s = command("evaluate", cmd_evaluate, "metrics with CIs, calibration and plots for a model package")
    s.add_argument("--model", required=True, help="model package folder")
    s.add_argument("--data", required=True, help="ingested data directory")
    s.add_argument("--split", default="test", choices=(*SPLIT_NAMES, "all"), help="which images to evaluate")
    s.add_argument("--splits", help="splits.csv to use (default DATA/splits.csv)")
    s.add_argument("--out", help="report folder (default next to the model)")
    s.add_argument("--tta", action="store_true", help="average over flips")
    s.add_argument("--bootstrap", type=NON_NEGATIVE, default=1000, help="resamples for the 95%% CIs (0 = none)")
    s.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="inference runtime (the same default as serve); int8: the package's INT8 model on ONNX "
                        "Runtime; openvino: the same INT8 model on OpenVINO (needs its OpenVINO gate)")
    s.add_argument("--device", default="auto", type=device, help="auto: CUDA when available, else CPU")
    s.add_argument("--decision-rule", choices=DECISION_RULES, help="label rule (medpipe.decision; default: the package's own)")


def _inference_commands(command) -> None:
    """predict, serve, batch: running a model package on images."""

    s = command("predict", cmd_predict, "the label (and why, where the decision rule did not pick the most "
                                        "likely class) and every class probability per image")
    s.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="model package folder (or a run folder)")
    g.add_argument("--url", help="a running medpipe/SageMaker-compatible server, e.g. http://127.0.0.1:8080")
    s.add_argument("--device", default="auto", type=device, help="auto: CUDA when available, else CPU")
    s.add_argument("--backend", default="auto", choices=BACKENDS, help="inference runtime (as for serve)")
    s.add_argument("--tta", action="store_true", help="average over flips")
    s.add_argument("--decision-rule", choices=DECISION_RULES, help="label rule (medpipe.decision; default: the package's own)")
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    add_metadata_options(s)

    s = command("serve", cmd_serve, "HTTP inference service (SageMaker hosting contract, web page at /)")
    add_dataclass_options(s, ServeConfig, SERVE_HELP, choices={"backend": BACKENDS, "decision_rule": DECISION_RULES,
                                                          "profile": sorted(PROFILES)},
                          types={"device": device, "port": number(int, 0, 65535)})

    s = command("batch", cmd_batch, "predictions for a folder, manifest or record table (resumable)")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="model package folder (or a run folder)")
    g.add_argument("--url", help="send each file to a running server's /invocations instead")
    s.add_argument("--input", required=True, help="image folder (recursive), CSV or Ground Truth manifest, "
                                                  "an ingested data folder, or an s3:// prefix or manifest")
    s.add_argument("--output", required=True, help="output folder or s3:// prefix (rerun with the same to resume)")
    s.add_argument("--per-file", action="store_true", help="also write <input>.out per file (batch transform)")
    s.add_argument("--manifest-out", help="write a Ground Truth output manifest of the predictions here")
    s.add_argument("--label-attribute", default="medpipe-label", help="label attribute of the --manifest-out "
                                                                      "entries")
    s.add_argument("--batch-size", type=POSITIVE, default=32, help="images per forward pass")
    s.add_argument("--shard-size", type=POSITIVE, default=256, help="items per atomically written output shard")
    s.add_argument("--workers", type=WORKERS, default=None, help="decoding threads (default: all cores)")
    s.add_argument("--backend", default="auto", choices=BACKENDS, help="inference runtime")
    s.add_argument("--decision-rule", choices=DECISION_RULES, help="label rule (medpipe.decision; default: the package's own)")
    s.add_argument("--tta", action="store_true", help="average each image over its four flips (local model only)")
    s.add_argument("--device", default="auto", type=device, help="auto: CUDA when available, else CPU")
    s.add_argument("--concurrency", type=POSITIVE, default=None,
                   help="with --url: requests in flight (default: the server's MaxConcurrentTransforms)")
    s.add_argument("--max-error-rate", type=number(float, 0, 1), default=None,
                   help="exit 3 when the share of error rows is above this (e.g. 0.05)")
    s.add_argument("--s3-root", help="local folder holding s3://bucket/key references of a Ground Truth manifest "
                                     "as S3_ROOT/bucket/key (as for ingest); without it they are read from S3")
    s.add_argument("--engine", default="local", choices=("local", "ray"),
                   help="local: this machine; ray: the shards answered on a Ray cluster (Ray Data; the ray extra)")
    s.add_argument("--ray-address", help="with --engine ray: the cluster (auto, HOST:PORT or ray://HOST:PORT; "
                                         "default: a Ray instance started for this job on this machine)")
    s.add_argument("--ray-actors", type=POSITIVE, default=None,
                   help="with --engine ray: predictor actors, one model each (default: one per node)")
    s.add_argument("--retries", type=NON_NEGATIVE, default=6,
                   help="with --url: attempts after the first for an answer that is 503/429/502/504 or a dropped "
                        "connection (exponential backoff, Retry-After honoured); rows still unanswered make the "
                        f"command exit {EXIT_RETRY} and a rerun asks for them again")


def _packaging_commands(command) -> None:
    """shard, export, quantize, package: packing data and models for where they go next."""

    s = command("shard", cmd_shard, "pack records + cached pixels into tar shards for streaming training")
    s.add_argument("--data", required=True, help="ingested data folder")
    s.add_argument("--out", required=True, help="shard folder or s3:// prefix (each shard one object, index last)")
    add_pixel_options(s, INTERPOLATIONS)
    s.add_argument("--shard-size", type=POSITIVE, default=1000, help="images per shard")
    old_spelling(s, "--per-shard", "--shard-size")
    add_split_options(s)

    s = command("export", cmd_export, "export a package: onnx, torchscript, MONAI bundle or SageMaker tarball")
    s.add_argument("--model", required=True, help="model package folder")
    s.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                   help="onnx / torchscript: one file; onnx-int8: the gated INT8 model; bundle: a MONAI bundle folder; "
                        "sagemaker: model.tar.gz for the SageMaker PyTorch inference toolkit")
    s.add_argument("--out", required=True, help="file (onnx, onnx-int8, torchscript, sagemaker model.tar.gz) or folder "
                                                "(bundle, sagemaker layout), never inside a model package")
    s.add_argument("--force", action="store_true", help="replace an existing --out (and its sidecar); onnx-int8: "
                                                        "also write a model that fails the accuracy gate")
    add_int8_options(s, force=False)
    add_sagemaker_options(s)
    s.add_argument("--with-preprocessing", action="store_true",
                   help="onnx: take uint8 RGB N x S x S x 3 pixels (decoded and resized by the package's rule)")

    s = command("quantize", cmd_quantize, "INT8 model for CPUs, checked by an accuracy gate, stored in the package")
    s.add_argument("--model", required=True, help="model package folder")
    add_int8_options(s)

    s = command("package", cmd_export, "the SageMaker deployable layout of a model package (folder or model.tar.gz); "
                                       "the same as export --format sagemaker")
    s.add_argument("--model", required=True, help="model package folder")
    s.add_argument("--out", required=True, help="model.tar.gz path, or a new folder")
    s.add_argument("--force", action="store_true", help="replace an existing --out")
    add_sagemaker_options(s)
    s.set_defaults(format="sagemaker")


def _tracking_commands(command) -> None:
    """runs: the tracked (MLflow) training runs."""
    s = command("runs", cmd_runs, "tracked training runs (MLflow) with their key metrics, best first")
    s.add_argument("--track", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI)")
    s.add_argument("--experiment", default="medpipe", help="MLflow experiment to list")
    s.add_argument("--metric", default="best_val_auc", help="sort by this metric, highest first")
    s.add_argument("--plot", help="also write a PNG of validation AUC per epoch for these runs")


def build_parser() -> Parser:
    p = Parser(prog="medpipe", description="MONAI pipeline for 2D medical image classification")
    p.add_argument("--version", action="version", version=f"medpipe {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", default=False,
                   help="debug logging (and the traceback of an internal error)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    def command(name: str, func, help: str) -> Parser:
        s = sub.add_parser(name, help=help, description=help)
        s.set_defaults(func=func)
        return s

    _data_commands(command)
    _training_commands(command)
    _inference_commands(command)
    _packaging_commands(command)
    _tracking_commands(command)
    monitor_cli.register(sub, Parser, device)

    tune.add_parser(sub)  # `medpipe tune` (its options live with the search)

    fl_cli.register(sub, add_config_options)
    for name, old, new in (("partition", "--seed", "--partition-seed"), ("server", "--run-dir", "--out"),
                           ("simulate", "--run-dir", "--out")):  # fl's older spellings
        old_spelling(next(c for n, c in walk(sub.choices["fl"], "") if n == f" {name}"), old, new)
    add_verbose(p)  # -v anywhere: on every subcommand, tune's and fl's included
    p.subparsers = sub.choices
    return p


def parse(parser: Parser, argv: list[str] | None):
    """Parse and check: unknown options get a suggestion, the training config is built (and so
    validated) here, so every refusal is a usage error (exit 2) that names the option and the reason."""
    args, extras = parser.parse_known_args(argv)
    sub = parser.subparsers[args.command]
    if getattr(args, "fl_command", None):  # medpipe fl SITE-COMMAND: its own options
        sub = next(c for n, c in walk(sub, "fl") if n == f"fl {args.fl_command}")
    if extras:
        sub.unknown(extras)
    if args.command == "train":
        overrides = dataclass_values(args, TrainConfig)
        try:
            if args.resume:  # the run's own config; options given again must match it
                from medpipe.pipeline import saved_config  # deferred: torch, only when there is a checkpoint to read

                args.train_config = resume_config(saved_config(args.out, args.resume), overrides, args.config)
            else:
                args.train_config = make_config(overrides, args.config)
        except MedpipeError as exc:
            sub.error(str(exc))
    if args.command in ("split", "shard") and args.val_fraction + args.test_fraction >= 1:
        sub.error(f"--val-fraction + --test-fraction must be < 1 (nothing would be left to train on), got "
                  f"{args.val_fraction} + {args.test_fraction}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parse(parser, argv)
    except SystemExit as exc:  # a usage error (argparse printed the reason and the usage) or --help/--version
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except MedpipeError as exc:
        print(f"medpipe {args.command}: {exc.prefix}{exc}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        print(f"medpipe {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # never a raw traceback for a user; -v shows it
        if args.verbose:
            raise
        print(f"medpipe {args.command}: internal error: {exc.__class__.__name__}: {str(exc)[:300]} "
              "(run with -v for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    exit_process(main())
