"""The SageMaker training contract (script mode), in one place.

Run unchanged as the ``entry_point`` of a SageMaker PyTorch estimator (``sagemaker_entry.py`` at the
repository root calls :func:`main`). Hyperparameters arrive as ``--key value`` arguments (and in
``SM_HPS`` / ``input/config/hyperparameters.json``, string values parsed as JSON where possible);
keys starting with ``sagemaker_`` belong to the platform and are ignored. The raw dataset is read
from the ``train`` channel (or the only channel), ingested into a local work folder, and trained on.

Outputs: the model package and ``model.tar.gz`` go to ``SM_MODEL_DIR``; the evaluation report and
ingest report to ``SM_OUTPUT_DATA_DIR``; checkpoints to ``<base>/checkpoints`` (synced with S3 by
SageMaker, so a Spot-interrupted job resumes automatically). On failure the reason goes to
``<base>/output/failure`` and the exit status is non-zero. ``<base>`` is ``/opt/ml`` unless
``MEDPIPE_SM_BASE`` says otherwise (tests emulate the tree in a temporary folder).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

INGEST_KEYS = {"data_format": "auto", "s3_root": None, "label_attribute": None, "channel": None, "work_dir": None}


@dataclass
class SageMakerEnv:
    base: Path
    model_dir: Path
    output_data_dir: Path
    checkpoint_dir: Path
    channels: dict[str, Path]
    hosts: list[str]
    current_host: str
    num_gpus: int
    hyperparameters: dict

    @property
    def failure_file(self) -> Path:
        return self.base / "output" / "failure"

    @property
    def is_primary(self) -> bool:
        return not self.hosts or self.current_host == sorted(self.hosts)[0]


def _parse_value(v):
    if not isinstance(v, str):
        return v
    try:
        return json.loads(v)
    except ValueError:
        return v


def load_env(environ: dict | None = None) -> SageMakerEnv:
    env = dict(os.environ if environ is None else environ)
    base = Path(env.get("MEDPIPE_SM_BASE", "/opt/ml"))
    config_dir = Path(env.get("SM_INPUT_CONFIG_DIR", base / "input" / "config"))
    hps: dict = {}
    hp_file = config_dir / "hyperparameters.json"
    if hp_file.is_file():
        hps.update({k: _parse_value(v) for k, v in json.loads(hp_file.read_text()).items()})
    if env.get("SM_HPS"):
        hps.update({k: _parse_value(v) for k, v in json.loads(env["SM_HPS"]).items()})
    resource = {}
    rc_file = config_dir / "resourceconfig.json"
    if rc_file.is_file():
        resource = json.loads(rc_file.read_text())
    hosts = json.loads(env["SM_HOSTS"]) if env.get("SM_HOSTS") else resource.get("hosts", [])
    current = env.get("SM_CURRENT_HOST") or resource.get("current_host", "algo-1")
    data_root = Path(env.get("SM_INPUT_DIR", base / "input")) / "data"
    channels: dict[str, Path] = {}
    names = json.loads(env["SM_CHANNELS"]) if env.get("SM_CHANNELS") else \
        sorted(p.name for p in data_root.iterdir() if p.is_dir()) if data_root.is_dir() else []
    for name in names:
        channels[name] = Path(env.get(f"SM_CHANNEL_{name.upper()}", data_root / name))
    return SageMakerEnv(
        base=base, model_dir=Path(env.get("SM_MODEL_DIR", base / "model")),
        output_data_dir=Path(env.get("SM_OUTPUT_DATA_DIR", base / "output" / "data")),
        checkpoint_dir=Path(env.get("MEDPIPE_SM_CHECKPOINT_DIR", base / "checkpoints")),
        channels=channels, hosts=sorted(hosts), current_host=current,
        num_gpus=int(env.get("SM_NUM_GPUS", "0") or 0), hyperparameters=hps)


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
        out[key.replace("-", "_")] = _parse_value(val)
    return out


def write_failure(sm: SageMakerEnv, reason: str) -> None:
    try:
        sm.failure_file.parent.mkdir(parents=True, exist_ok=True)
        sm.failure_file.write_text(reason[:1024])
    except OSError:
        pass


def run(argv: list[str] | None = None, environ: dict | None = None) -> int:
    from medpipe.config import make_config
    from medpipe.data.sources import format_report, ingest
    from medpipe.pipeline import run as train
    from medpipe.train.engine import TrainingInterrupted

    sm = load_env(environ)
    hps = {k.replace("-", "_"): v for k, v in sm.hyperparameters.items()}
    hps.update(parse_hyperparameter_args(list(sys.argv[1:] if argv is None else argv)))
    hps = {k: v for k, v in hps.items() if not k.startswith("sagemaker_")}
    ingest_opts = {k: hps.pop(k, default) for k, default in INGEST_KEYS.items()}
    if sm.num_gpus and "device" not in hps:
        hps["device"] = "cuda"
    cfg = make_config(hps)
    if not sm.channels:
        raise FileNotFoundError(f"no input channel under {sm.base / 'input' / 'data'}; give the estimator a 'train' channel")
    channel = ingest_opts["channel"] or ("train" if "train" in sm.channels else sorted(sm.channels)[0])
    if channel not in sm.channels:
        raise FileNotFoundError(f"channel {channel!r} not among {sorted(sm.channels)}")
    source = sm.channels[channel]
    entries = [p for p in source.iterdir() if not p.name.startswith(".")] if source.is_dir() else []
    if len(entries) == 1 and entries[0].is_file():  # a single zip or manifest in the channel
        source = entries[0]
    work = Path(ingest_opts["work_dir"] or os.environ.get("MEDPIPE_SM_WORK", "/tmp/medpipe-sagemaker"))
    data_dir, run_dir = work / "data", work / "run"
    done = work / "ingest.done"
    if int(os.environ.get("LOCAL_RANK", "0") or 0) == 0:  # once per host, also under torchrun
        report = ingest(source, data_dir, fmt=ingest_opts["data_format"], s3_root=ingest_opts["s3_root"],
                        label_attribute=ingest_opts["label_attribute"])
        done.write_text(json.dumps(report))
    else:
        deadline = time.time() + 3600
        while not done.is_file():
            if time.time() > deadline:
                raise TimeoutError(f"local rank 0 did not finish ingesting into {data_dir}")
            time.sleep(1)
        report = json.loads(done.read_text())
    print(format_report(report), flush=True)
    sm.output_data_dir.mkdir(parents=True, exist_ok=True)
    (sm.output_data_dir / "ingest_report.json").write_text(json.dumps(report, indent=2))
    resume = (sm.checkpoint_dir / "last.pt").is_file()
    if resume:
        print(f"found {sm.checkpoint_dir / 'last.pt'}: resuming (Spot restart)", flush=True)
    write_model = sm.is_primary
    try:
        summary = train(data_dir, run_dir, cfg, resume=resume, force=not resume, checkpoint_dir=sm.checkpoint_dir,
                        model_dir=sm.model_dir if write_model else run_dir / "model",
                        report_dir=sm.output_data_dir / "report")
    except TrainingInterrupted as exc:
        print(str(exc), flush=True)
        return TrainingInterrupted.exit_code
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
    sys.exit(main())
