"""A team's MLflow: a real `mlflow server` on a real PostgreSQL backend (tests/pgserver.py) with an S3 API
server as its artifact store (tests/s3server.py; a local folder where moto or s3fs is missing), three
`medpipe train --track http://...` processes logging at once, two of them registering versions of one model;
a registered version loads back from the object store and predicts as `medpipe predict` does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY
from tests.mlflowserver import MlflowServer
from tests.pgserver import pg_server  # noqa: F401 (fixture)

try:
    from tests.s3server import s3_server  # noqa: F401 (fixture)
except ImportError:  # the S3 test server is not in this checkout: artifacts go to a local folder
    s3_server = None

mlflow = pytest.importorskip("mlflow", reason="the track extra (mlflow) is not installed")
QUICK = [*TINY, "--max-steps-per-epoch", "2", "--bootstrap", "0"]


@pytest.fixture()
def artifact_store(request, tmp_path):
    """(the server's --artifacts-destination, the S3 server or None, the server's environment)."""
    if s3_server is not None:
        try:
            s3 = request.getfixturevalue("s3_server")
        except pytest.skip.Exception:  # moto or s3fs missing: the rest of the test still runs on a local folder
            s3 = None
        if s3 is not None:
            return f"s3://{s3.bucket('mlflow')}/mlartifacts", s3, s3.env
    return str(tmp_path / "mlartifacts"), None, {}


def test_team_server_on_postgresql_and_s3_concurrent_runs_and_registry(data_dir, tmp_path, pg_server, artifact_store):
    import pandas as pd

    from medpipe.infer.predictor import Predictor

    destination, s3, server_env = artifact_store
    server = MlflowServer(pg_server.create_db("mlflow_team"), destination, env=server_env,
                          log=tmp_path / "mlflow-server.log").start()
    try:
        # the clients know the server only: no AWS settings (the server proxies the artifacts)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
        env["OMP_NUM_THREADS"] = "1"
        procs = {}
        for name, register in (("r1", True), ("r2", True), ("r3", False)):
            cmd = [sys.executable, "-m", "medpipe", "train", "--data", str(data_dir), "--out", str(tmp_path / name),
                   *QUICK, "--track", server.uri, "--experiment", "team", *(["--register", "ham-team"] if register else [])]
            procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        outs = {name: p.communicate(timeout=600)[0] for name, p in procs.items()}
        for name, p in procs.items():
            assert p.returncode == 0, outs[name][-3000:]
            assert "tracking records are kept" not in outs[name], outs[name][-3000:]  # every call went through at once

        client = mlflow.MlflowClient(tracking_uri=server.uri)
        exp = client.get_experiment_by_name("team")
        runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
        assert sorted(runs) == ["r1", "r2", "r3"] and {r.info.status for r in runs.values()} == {"FINISHED"}
        for r in runs.values():
            assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_auc")) == [1, 2]
            assert "report/report.json" in {a.path for a in client.list_artifacts(r.info.run_id, "report")}
        versions = client.search_model_versions("name='ham-team'")
        assert sorted(int(v.version) for v in versions) == [1, 2]  # two concurrent registrations, two versions
        assert {v.run_id for v in versions} == {runs["r1"].info.run_id, runs["r2"].info.run_id}
        if s3 is not None:  # the artifacts are in the object store, written by the server
            stored = s3.ls(destination)
            assert sum(u.endswith("/package/weights.safetensors") for u in stored) == 3, stored[:20]
            assert sum(u.endswith("report/report.json") for u in stored) == 3
        else:
            assert len(list(Path(destination).rglob("package/weights.safetensors"))) == 3

        # a registered version loads back (through the server, from the store) and predicts as medpipe predict
        version = next(v for v in versions if v.version in (2, "2"))
        name = next(n for n, r in runs.items() if r.info.run_id == version.run_id)
        mlflow.set_tracking_uri(server.uri)
        model = mlflow.pyfunc.load_model("models:/ham-team/2")
        paths = list(pd.read_csv(data_dir / "records.csv")["path"][:4])
        out = model.predict(pd.DataFrame({"image": [Path(p).read_bytes() for p in paths]}))
        ref = Predictor(tmp_path / name / "model").predict_files(paths)
        for i, p in enumerate(ref):
            assert out["label"][i] == p.label
            assert np.allclose([out[c][i] for c in p.probabilities], list(p.probabilities.values()), atol=1e-6, rtol=0)
    finally:
        mlflow.set_tracking_uri(None)
        server.kill()
