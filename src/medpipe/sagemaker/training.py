"""The SageMaker training contract (script mode): ``sagemaker_entry.py`` at the repository root calls :func:`main`.

Hyperparameters arrive as ``--key value`` arguments (and in ``SM_HPS`` / ``input/config/hyperparameters.json``,
string values parsed as JSON where possible); keys starting with ``sagemaker_`` belong to the platform.
The raw dataset is read from the ``train`` channel (or the only channel), ingested into a local work
folder, and trained on through the same training function as ``medpipe train``.

Outputs: ``SM_MODEL_DIR`` receives the deployable inference layout itself (package + ``code/``; SageMaker
tars that folder into the job's ``model.tar.gz``, which deploys as is); the evaluation and ingest
reports, config, splits and metrics go to ``SM_OUTPUT_DATA_DIR``; checkpoints to the checkpoint folder
(``<base>/checkpoints`` or the ``checkpoint-local-path`` hyperparameter; synced with S3 by SageMaker, so
a Spot-interrupted job resumes). On failure the reason goes to ``<base>/output/failure`` and the exit
status is non-zero. Paths: :mod:`medpipe.sagemaker.env`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from medpipe.config import make_config
from medpipe.data.sources import format_report, ingest
from medpipe.errors import TrainingInterrupted, exit_code
from medpipe.sagemaker.env import CHECKPOINT_HP, SageMakerEnv, load_env, parse_value
from medpipe.sagemaker.layout import write_layout
from medpipe.utils import exit_process, to_json  # noqa: F401 - sagemaker_entry.py exits through exit_process

log = logging.getLogger(__name__)

INGEST_KEYS = {"data_format": "auto", "s3_root": None, "label_attribute": None, "channel": None, "work_dir": None,
               CHECKPOINT_HP: None}


def parse_hyperparameter_args(argv: list[str]) -> dict:
    """``--key value`` pairs (as SageMaker passes them) -> dict; values parsed as JSON where possible."""
    out: dict = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ValueError(f"unexpected argument {tok!r}; hyperparameters come as --key value")
        key = tok[2:]
        if "=" in key:
            key, val = key.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            val = argv[i + 1]
            i += 2
        else:
            val, i = "true", i + 1
        out[key.replace("-", "_")] = parse_value(val)
    return out


def write_failure(sm: SageMakerEnv, reason: str) -> None:
    try:
        sm.failure_file.parent.mkdir(parents=True, exist_ok=True)
        sm.failure_file.write_text(reason[:1024])
    except OSError:
        pass


def options(sm: SageMakerEnv, argv: list[str]) -> tuple[dict, dict]:
    """(training options, ingest/job options) from the hyperparameter files, SM_HPS and the arguments."""
    hps = {k.replace("-", "_"): v for k, v in sm.hyperparameters.items()}
    hps.update(parse_hyperparameter_args(argv))
    hps = {k: v for k, v in hps.items() if not k.startswith("sagemaker_")}
    job = {k: hps.pop(k, default) for k, default in INGEST_KEYS.items()}
    if sm.num_gpus and "device" not in hps:
        hps["device"] = "cuda"
    return hps, job


def ingest_channel(sm: SageMakerEnv, job: dict, data_dir: Path, done: Path) -> dict:
    """Ingest the input channel into ``data_dir`` once per host (local rank 0; the others wait for it)."""

    if not sm.channels:
        raise FileNotFoundError(f"no input channel under {sm.base / 'input' / 'data'}; give the estimator a 'train' channel")
    channel = job["channel"] or ("train" if "train" in sm.channels else sorted(sm.channels)[0])
    if channel not in sm.channels:
        raise FileNotFoundError(f"channel {channel!r} not among {sorted(sm.channels)}")
    source = sm.channels[channel]
    entries = [p for p in source.iterdir() if not p.name.startswith(".")] if source.is_dir() else []
    if len(entries) == 1 and entries[0].is_file():  # a single zip or manifest in the channel
        source = entries[0]
    if int(os.environ.get("LOCAL_RANK", "0") or 0) == 0:  # once per host, also under torchrun
        report = ingest(source, data_dir, fmt=job["data_format"], s3_root=job["s3_root"],
                        label_attribute=job["label_attribute"])
        done.write_text(json.dumps(report))
        return report
    deadline = time.time() + 3600
    while not done.is_file():
        if time.time() > deadline:
            raise TimeoutError(f"local rank 0 did not finish ingesting into {data_dir}")
        time.sleep(1)
    return json.loads(done.read_text())


def run(argv: list[str] | None = None, environ: dict | None = None) -> int:
    from medpipe.pipeline import run as train  # deferred: torch; a failure to load it reaches output/failure

    sm = load_env(environ)
    hps, job = options(sm, list(sys.argv[1:] if argv is None else argv))
    cfg = make_config(hps)
    work = Path(job["work_dir"] or os.environ.get("MEDPIPE_SM_WORK", "/tmp/medpipe-sagemaker"))
    data_dir, run_dir = work / "data", work / "run"
    report = ingest_channel(sm, job, data_dir, work / "ingest.done")
    print(format_report(report), flush=True)
    sm.output_data_dir.mkdir(parents=True, exist_ok=True)
    (sm.output_data_dir / "ingest_report.json").write_text(to_json(report, indent=2))
    resume = (sm.checkpoint_dir / "last.pt").is_file()
    if resume:
        print(f"found {sm.checkpoint_dir / 'last.pt'}: resuming (Spot restart)", flush=True)
    try:
        summary = train(data_dir, run_dir, cfg, resume=resume, force=not resume, checkpoint_dir=sm.checkpoint_dir,
                        model_dir=sm.model_dir if sm.is_primary else run_dir / "model",
                        report_dir=sm.output_data_dir / "report")
    except TrainingInterrupted as exc:
        print(str(exc), flush=True)
        return exit_code(exc)
    if sm.is_primary and summary.get("model_dir"):  # SageMaker tars this folder: it must deploy as is
        write_layout(sm.model_dir)
    for name in ("config.yaml", "splits.csv", "splits.json", "metrics.jsonl"):
        if (run_dir / name).is_file():
            (sm.output_data_dir / name).write_bytes((run_dir / name).read_bytes())
    print(json.dumps({k: v for k, v in summary.items() if k in ("model_dir", "best_epoch", "val", "test")},
                     default=float), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("SM_LOG_LEVEL_NAME", "INFO"), format="%(levelname)s %(message)s")
    try:
        return run(argv)
    except Exception as exc:
        sm = load_env()
        reason = f"{exc.__class__.__name__}: {exc}"
        write_failure(sm, reason)
        traceback.print_exc()  # the job log (CloudWatch) is for operators; the failure file is the summary
        print(f"medpipe sagemaker: failed: {reason}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":  # pragma: no cover
    exit_process(main())
