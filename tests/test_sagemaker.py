import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from medpipe.sagemaker import load_env, parse_hyperparameter_args

ROOT = Path(__file__).resolve().parents[1]


def _tree(base: Path, synth_dir: Path | None):
    (base / "input" / "config").mkdir(parents=True)
    (base / "input" / "data" / "train").mkdir(parents=True)
    if synth_dir is not None:
        shutil.copytree(synth_dir, base / "input" / "data" / "train" / "ham", ignore=shutil.ignore_patterns("*.zip"))
    hps = {"epochs": "1", "image-size": "32", "batch-size": "8", "bootstrap": "20",
           "sagemaker_program": "\"sagemaker_entry.py\"", "sagemaker_submit_directory": "\"s3://b/k\""}
    (base / "input" / "config" / "hyperparameters.json").write_text(json.dumps(hps))
    (base / "input" / "config" / "resourceconfig.json").write_text(json.dumps({"current_host": "algo-1",
                                                                               "hosts": ["algo-1"]}))
    env = {**os.environ, "MEDPIPE_SM_BASE": str(base), "SM_MODEL_DIR": str(base / "model"),
           "SM_OUTPUT_DATA_DIR": str(base / "output" / "data"), "SM_CHANNELS": json.dumps(["train"]),
           "SM_CHANNEL_TRAIN": str(base / "input" / "data" / "train"), "SM_HOSTS": json.dumps(["algo-1"]),
           "SM_CURRENT_HOST": "algo-1", "SM_NUM_GPUS": "0", "MEDPIPE_SM_WORK": str(base.parent / "work"),
           "SM_HPS": json.dumps(hps), "OMP_NUM_THREADS": "1"}
    return env


def test_hyperparameter_parsing():
    hp = parse_hyperparameter_args(["--epochs", "3", "--lr", "0.01", "--imbalance", "focal", "--deterministic",
                                    "--image-size=64"])
    assert hp == {"epochs": 3, "lr": 0.01, "imbalance": "focal", "deterministic": True, "image_size": 64}


def test_entry_script_emulated_opt_ml(synth_dir, tmp_path):
    base = tmp_path / "opt_ml"
    env = _tree(base, synth_dir)
    # SageMaker passes hyperparameters as sorted --key value arguments
    args = ["--batch-size", "8", "--bootstrap", "20", "--epochs", "1", "--image-size", "32",
            "--sagemaker_program", "sagemaker_entry.py"]
    r = subprocess.run([sys.executable, str(ROOT / "sagemaker_entry.py"), *args], env=env, capture_output=True,
                       text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "epoch=1 train_loss=" in r.stdout and " val_auc=" in r.stdout
    with tarfile.open(base / "model" / "model.tar.gz") as tf:
        names = set(tf.getnames())
    assert {"weights.safetensors", "model.json", "code/inference.py", "code/requirements.txt"} <= names
    assert (base / "model" / "model.json").is_file()
    assert (base / "output" / "data" / "report" / "report.md").is_file()
    assert (base / "output" / "data" / "ingest_report.json").is_file()
    assert (base / "checkpoints" / "last.pt").is_file()
    assert not (base / "output" / "failure").exists()


def test_entry_script_failure_file(tmp_path):
    base = tmp_path / "opt_ml"
    env = _tree(base, None)  # an empty train channel
    r = subprocess.run([sys.executable, str(ROOT / "sagemaker_entry.py"), "--epochs", "1"], env=env,
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode != 0
    reason = (base / "output" / "failure").read_text()
    assert reason and len(reason) <= 1024 and "train" in reason


def test_bad_hyperparameter_fails_with_reason(synth_dir, tmp_path):
    base = tmp_path / "opt_ml"
    env = _tree(base, synth_dir)
    r = subprocess.run([sys.executable, str(ROOT / "sagemaker_entry.py"), "--epochz", "1"], env=env,
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode != 0
    assert "epochz" in (base / "output" / "failure").read_text()


def test_load_env_reads_files(tmp_path):
    base = tmp_path / "ml"
    env = _tree(base, None)
    env = {k: v for k, v in env.items() if not k.startswith("SM_")}
    sm = load_env(env)
    assert sm.hosts == ["algo-1"] and sm.current_host == "algo-1" and sm.is_primary
    assert sm.hyperparameters["epochs"] == 1 and sm.channels == {"train": base / "input" / "data" / "train"}
