"""Experiment tracking with a real MLflow: the embedded SQLite store, a real `mlflow server` process killed
mid-run, the pyfunc model against medpipe predict, and the missing-extra error. (torchrun: test_dist.py.)"""

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from medpipe.cli import main
from tests._server import free_port
from tests.conftest import TINY
from tests.mlflowserver import MlflowServer

mlflow = pytest.importorskip("mlflow", reason="the track extra (mlflow) is not installed")
ROOT = Path(__file__).resolve().parents[1]
QUICK = [*TINY, "--max-steps-per-epoch", "2", "--bootstrap", "0"]


def _runs(uri: str):
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("medpipe")
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


def test_embedded_store_run_params_metrics_artifacts_model(data_dir, tmp_path, capsys, monkeypatch):
    import pandas as pd

    from medpipe.infer.predictor import Predictor
    from medpipe.track import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    process_uri = mlflow.get_tracking_uri()
    run = tmp_path / "runs" / "r1"
    assert main(["train", "--data", str(data_dir), "--out", str(run), *QUICK, "--track", "--register", "ham"]) == 0
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    # logging the model used the run's store for that call only: the process's tracking URI is as it was
    assert "MLFLOW_TRACKING_URI" not in os.environ and mlflow.get_tracking_uri() == process_uri
    client, runs = _runs(uri)
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED" and r.info.run_name == "r1"
    assert r.data.params["lr"] == "0.002" and len(r.data.params["data.records_sha256"]) == 64
    assert r.data.params["data.split_seed"] == "0" and "akiec" in r.data.params["data.class_counts_train"]
    history = client.get_metric_history(r.info.run_id, "val_auc")
    assert sorted(m.step for m in history) == [1, 2]  # one step per epoch
    assert {"train_loss", "val_bacc", "lr", "images_per_s", "best_epoch", "test_macro_auc"} <= set(r.data.metrics)
    # the epoch's resource figures under the names metrics.jsonl gives them (gpu_memory_gb on CUDA), once each
    assert {"data_wait_share", "disk_free_gb"} <= set(r.data.metrics) and "gpu_max_memory_gb" not in r.data.metrics
    files = {a.path for a in client.list_artifacts(r.info.run_id, "report")}
    assert {"report/report.md", "report/report.json", "report/roc.png"} <= files
    assert "run/metrics.jsonl" in {a.path for a in client.list_artifacts(r.info.run_id, "run")}
    assert (tmp_path / "runs" / "mlartifacts").is_dir()  # artifacts beside the store, not in the cwd
    assert [m.name for m in client.search_registered_models()] == ["ham"]

    # the pyfunc model equals medpipe predict, on raw image bytes
    records = pd.read_csv(data_dir / "records.csv")
    paths = list(records["path"][:4])
    with tracking_uri(uri):  # runs:/ resolves against the process's tracking URI
        model = mlflow.pyfunc.load_model(f"runs:/{r.info.run_id}/model")
    assert mlflow.get_tracking_uri() == process_uri
    out = model.predict(pd.DataFrame({"image": [Path(p).read_bytes() for p in paths]}))
    ref = Predictor(run / "model").predict_files(paths)
    for i, p in enumerate(ref):
        assert out["label"][i] == p.label
        assert np.allclose([out[c][i] for c in p.probabilities], list(p.probabilities.values()), atol=1e-6, rtol=0)

    # `mlflow models serve` answers with the same probabilities (JSON: base64 in the binary image column)
    with tracking_uri(uri):
        local = Path(mlflow.artifacts.download_artifacts(f"runs:/{r.info.run_id}/model", dst_path=str(tmp_path / "dl")))
    _served_equals(local, paths[:2], ref[:2])

    # the package inside the MLflow model is hash-checked: a changed model.json is refused on load
    meta = next(local.rglob("package/model.json"))
    meta.write_text(meta.read_text().replace('"temperature"', '"temperature" ', 1))
    with pytest.raises(Exception, match="differs from the one logged"):
        mlflow.pyfunc.load_model(str(local))

    # a failed run is recorded as FAILED with its reason (a NaN loss at the first step)
    assert main(["train", "--data", str(data_dir), "--out", str(tmp_path / "runs" / "r2"), *QUICK, "--track",
                 "--handler", "tests.faults:NanAtStep:1"]) != 0
    failed = [x for x in _runs(uri)[1] if x.info.run_name == "r2"]
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
    assert "non-finite" in failed[0].data.tags["failure_reason"]

    capsys.readouterr()
    assert main(["runs", "--track", uri, "--plot", str(tmp_path / "auc.png")]) == 0
    out = capsys.readouterr().out
    assert r.info.run_id in out and "FINISHED" in out and (tmp_path / "auc.png").read_bytes()[:4] == b"\x89PNG"


def test_track_leaves_the_process_tracking_uri_and_environment_alone(data_dir, tmp_path, monkeypatch):
    """`train --track URI` in a process whose $MLFLOW_TRACKING_URI names another store: the run and its model go
    to URI; afterwards the variable and mlflow.get_tracking_uri() still name the process's own store."""
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    assert mlflow.get_tracking_uri() == elsewhere
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["train", "--data", str(data_dir), "--out", str(tmp_path / "r1"), *QUICK, "--epochs", "1",
                 "--track", uri]) == 0
    assert os.environ["MLFLOW_TRACKING_URI"] == elsewhere and mlflow.get_tracking_uri() == elsewhere
    client, runs = _runs(uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert client.search_logged_models([runs[0].info.experiment_id])  # the model was logged, to URI
    assert not (tmp_path / "elsewhere.db").exists()  # nothing went to the process's store


def _served_equals(model_dir: Path, paths: list, ref: list) -> None:
    import base64
    import json

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_dir), "--env-manager",
                             "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    try:  # (MLflow starts the venv's uvicorn by name: the venv's bin folder on PATH)
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [
            [base64.b64encode(Path(p).read_bytes()).decode()] for p in paths]}}).encode()
        deadline, answer = time.monotonic() + 180, None
        while answer is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=30) as resp:
                    answer = json.loads(resp.read())["predictions"]
            except OSError:
                time.sleep(0.5)
        assert answer is not None, "mlflow models serve did not answer"
        for got, p in zip(answer, ref):
            assert got["label"] == p.label
            assert np.allclose([got[c] for c in p.probabilities], list(p.probabilities.values()), atol=1e-6, rtol=0)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the scoring server and its workers (our process group)
        proc.wait(timeout=30)


def test_track_without_mlflow_names_the_extra(data_dir, tmp_path):
    script = ("import sys; sys.modules['mlflow'] = None\n"  # as if the extra were not installed
              "from medpipe.cli import main\n"
              f"sys.exit(main(['train', '--data', {str(data_dir)!r}, '--out', {str(tmp_path / 'run')!r}, '--track']))")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"})
    assert r.returncode == 2 and "pip install 'medpipe-imaging[track]'" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run").exists() and "Traceback" not in r.stderr


class _KillThenRevive:
    """Kill the tracking server after epoch 1 is logged; bring it back once training has completed."""

    def __init__(self, server: MlflowServer):
        self.server = server

    def attach(self, engine):
        from medpipe.train.engine import Events

        engine.on(Events.VALIDATION_COMPLETED, lambda e: self.server.kill() if e.state.epoch == 1 else None)
        engine.on(Events.COMPLETED, lambda e: self.server.start())


def test_server_killed_mid_run_training_finishes_and_run_completes(data_dir, tmp_path, caplog):
    from medpipe.config import make_config
    from medpipe.pipeline import run

    server = MlflowServer(tmp_path / "mlflow.db", tmp_path / "artifacts").start()
    try:
        cfg = make_config({"image_size": 32, "batch_size": 8, "epochs": 3, "bootstrap": 0, "threads": 1,
                           "max_steps_per_epoch": 2, "track": server.uri})
        with caplog.at_level(logging.WARNING, logger="medpipe.track"):
            result = run(data_dir, tmp_path / "run", cfg, handlers=[_KillThenRevive(server)])
        assert result["model_dir"] and (tmp_path / "run" / "model" / "model.json").is_file()
        warnings = [x for x in caplog.records if x.name == "medpipe.track"]
        assert len(warnings) == 1 and "not answering" in warnings[0].getMessage()  # warned once
        client, runs = _runs(server.uri)
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "val_auc"))
        assert steps == [1, 2, 3]  # epochs 2 and 3 were kept while the server was away, then sent
        assert client.list_artifacts(runs[0].info.run_id, "report")
    finally:
        server.kill()


def test_a_resumed_run_continues_its_mlflow_run(tmp_path):
    """What --resume does with tracking (medpipe.track.MLflowHandler keeps RUN/mlflow_run.json): the same MLflow
    run goes on and ends FINISHED, without the earlier failure's reason."""
    from medpipe.track import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = Tracker(uri, "medpipe")
    first.start("r1")
    first.metrics({"val_auc": 0.5}, step=1)
    first.end("KILLED", "TrainingInterrupted: stopped by SIGINT")
    assert first.flush(seconds=5)
    again = Tracker(uri, "medpipe")
    again.start("r1", run_id=first.run_id)
    again.metrics({"val_auc": 0.6}, step=2)
    again.end("FINISHED")
    assert again.flush(seconds=5)
    client, runs = _runs(uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and "failure_reason" not in runs[0].data.tags
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "val_auc")) == [1, 2]


def test_default_store_honours_mlflow_tracking_uri(tmp_path, monkeypatch):
    from medpipe.track import resolve_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri("auto", tmp_path / "runs" / "r1") == f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_uri("auto", tmp_path / "runs" / "r1") == "http://127.0.0.1:5000"
    assert resolve_uri("sqlite:///elsewhere.db", tmp_path / "r") == "sqlite:///elsewhere.db"  # given wins


def test_processes_racing_to_create_the_experiment_both_log_to_it(tmp_path, monkeypatch, caplog):
    """Two `medpipe train` processes starting together on a shared server both find no experiment; the one whose
    create comes second (RESOURCE_ALREADY_EXISTS) uses the other's, at once (no deferred records, no warning)."""
    from medpipe.track import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    other, ours = Tracker(uri, "team"), Tracker(uri, "team")
    look_up = ours.client.get_experiment_by_name
    raced = []

    def racing(name):  # the other process creates it between our look-up and our create
        if not raced:
            raced.append(other.client.create_experiment(name))
            return None
        return look_up(name)

    monkeypatch.setattr(ours.client, "get_experiment_by_name", racing)
    with caplog.at_level(logging.WARNING, logger="medpipe.track"):
        ours.start("r1")
    assert ours.run_id and not ours.pending and not [r for r in caplog.records if r.name == "medpipe.track"]
    assert ours.client.get_run(ours.run_id).info.experiment_id == raced[0]
