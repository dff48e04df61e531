"""Every SageMaker environment variable and ``/opt/ml`` path medpipe reads, in one place.

The base is ``/opt/ml``; ``SAGEMAKER_BASE_DIR`` moves it (the variable the training and inference
toolkits honour, used for local emulation and tests); ``MEDPIPE_SM_BASE`` is an alias of it. Under
the base: ``input/config/{hyperparameters,resourceconfig}.json``, ``input/data/<channel>/``,
``model/`` (tarred by SageMaker after the job: the deployable layout), ``output/data/``,
``output/failure`` and ``checkpoints/`` (the estimator's ``checkpoint_local_path``; SageMaker does
not tell the container a custom one, so pass the same path as the ``checkpoint-local-path``
hyperparameter). ``SM_*`` variables, when set, win over the files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BASE = "/opt/ml"
BASE_ENV = "SAGEMAKER_BASE_DIR"
BASE_ALIAS_ENV = "MEDPIPE_SM_BASE"
CHECKPOINT_HP = "checkpoint_local_path"


def base_dir(environ=None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env.get(BASE_ENV) or env.get(BASE_ALIAS_ENV) or DEFAULT_BASE)


def parse_value(v):
    """Hyperparameter values arrive as strings (the SDK JSON-encodes each); JSON where it parses, else the string."""
    if not isinstance(v, str):
        return v
    try:
        return json.loads(v)
    except ValueError:
        return v


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
        """Only one host writes SM_MODEL_DIR: SageMaker merges every host's model folder."""
        return not self.hosts or self.current_host == self.hosts[0]


def _json_file(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def load_env(environ=None) -> SageMakerEnv:
    env = dict(os.environ if environ is None else environ)
    base = base_dir(env)
    config_dir = Path(env.get("SM_INPUT_CONFIG_DIR", base / "input" / "config"))
    hps = {k: parse_value(v) for k, v in _json_file(config_dir / "hyperparameters.json").items()}
    if env.get("SM_HPS"):
        hps.update({k: parse_value(v) for k, v in json.loads(env["SM_HPS"]).items()})
    resource = _json_file(config_dir / "resourceconfig.json")
    hosts = json.loads(env["SM_HOSTS"]) if env.get("SM_HOSTS") else resource.get("hosts", [])
    current = env.get("SM_CURRENT_HOST") or resource.get("current_host", "algo-1")
    data_root = Path(env.get("SM_INPUT_DIR", base / "input")) / "data"
    if env.get("SM_CHANNELS"):
        names = json.loads(env["SM_CHANNELS"])
    else:
        names = sorted(p.name for p in data_root.iterdir() if p.is_dir()) if data_root.is_dir() else []
    channels = {n: Path(env.get(f"SM_CHANNEL_{n.upper()}", data_root / n)) for n in names}
    ckpt = hps.get(CHECKPOINT_HP) or hps.get(CHECKPOINT_HP.replace("_", "-")) or base / "checkpoints"
    return SageMakerEnv(
        base=base, model_dir=Path(env.get("SM_MODEL_DIR", base / "model")),
        output_data_dir=Path(env.get("SM_OUTPUT_DATA_DIR", base / "output" / "data")),
        checkpoint_dir=Path(ckpt), channels=channels, hosts=sorted(hosts), current_host=current,
        num_gpus=int(env.get("SM_NUM_GPUS", "0") or 0), hyperparameters=hps)


def host_rank_env(environ=None) -> dict | None:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for a job SageMaker started once per host
    (several SM_HOSTS, no torchrun): rank = index of SM_CURRENT_HOST in the sorted list. None otherwise."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env or "SM_HOSTS" not in env:
        return None
    try:
        hosts = sorted(json.loads(env["SM_HOSTS"]))
    except ValueError:
        return None
    current = env.get("SM_CURRENT_HOST", "")
    if len(hosts) < 2 or current not in hosts:
        return None
    return {"RANK": str(hosts.index(current)), "WORLD_SIZE": str(len(hosts)), "LOCAL_RANK": "0",
            "MASTER_ADDR": env.get("MASTER_ADDR", hosts[0]), "MASTER_PORT": env.get("MASTER_PORT", "29500")}


def model_server_dir(environ=None) -> Path:
    """Where the hosting container extracted model.tar.gz (``SM_MODEL_DIR`` or ``<base>/model``)."""
    env = os.environ if environ is None else environ
    return Path(env.get("SM_MODEL_DIR") or base_dir(env) / "model")


def serve_port(environ=None, default: int = 8080) -> int:
    env = os.environ if environ is None else environ
    return int(env.get("SAGEMAKER_BIND_TO_PORT") or env.get("MEDPIPE_PORT") or default)
