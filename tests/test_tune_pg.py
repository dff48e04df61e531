"""`medpipe tune --storage postgresql://...` on a real PostgreSQL server (tests/pgserver.py): three worker
processes in separate folders share nothing but the database; one is SIGKILLed mid-trial and its trial is
retried by another, exactly once; every worker reads the same best trial. And clear errors for a storage
that cannot be opened or goes away mid-study."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests._server import free_port
from tests.pgserver import pg_server  # noqa: F401 (fixture)

optuna = pytest.importorskip("optuna", reason="the tune extra (optuna) is not installed")

TINY = {"model": "densenet-test", "image_size": 32, "batch_size": 8, "epochs": 3, "bootstrap": 0, "threads": 1,
        "workers": 0, "max_steps_per_epoch": 2, "warmup_epochs": 0.5, "patience": 100}


def _space(tmp_path: Path, trials: int) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({
        "objective": "val_auc", "trials": trials, "base": TINY,
        "params": {"lr": {"low": 1.0e-3, "high": 3.0e-3, "log": True}, "label_smoothing": {"low": 0.0, "high": 0.2}},
        "pruner": {"type": "none"}, "sampler": {"type": "random", "seed": 0}}))
    return path


def _cmd(data_dir, out: Path, space: Path, url: str) -> list[str]:
    return [sys.executable, "-m", "medpipe", "tune", "--data", str(data_dir), "--out", str(out), "--space", str(space),
            "--storage", url, "--heartbeat", "1", "--grace", "3"]


def _first_checkpoint(folders: list[Path], procs: list[subprocess.Popen], timeout: float = 300) -> int:
    """The index of the first worker whose folder holds a trial's checkpoints/last.pt (that trial runs on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for i, f in enumerate(folders):
            if any(f.glob("trials/trial-*/checkpoints/last.pt")):
                return i
        assert all(p.poll() is None for p in procs), [p.poll() for p in procs]
        time.sleep(0.1)
    raise AssertionError("no trial saved a checkpoint in time")


def test_three_workers_share_a_postgresql_study_and_a_killed_trial_is_retried_once(data_dir, tmp_path, pg_server,
                                                                                   capsys):
    url = pg_server.create_db("tune_three")
    space = _space(tmp_path, trials=4)
    folders = [tmp_path / f"machine-{i}" for i in range(3)]  # nothing shared but the database
    logs = [tmp_path / f"worker-{i}.log" for i in range(3)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for f, log in zip(folders, logs):
        with open(log, "wb") as fh:
            procs.append(subprocess.Popen(_cmd(data_dir, f, space, url), stdout=fh, stderr=subprocess.STDOUT, env=env))
    try:
        victim = _first_checkpoint(folders, procs)
        procs[victim].send_signal(signal.SIGKILL)  # no handler runs: its trial stays RUNNING, its heartbeat stops
        procs[victim].wait(timeout=30)
        study = optuna.load_study(study_name="medpipe", storage=url)
        killed = [t for t in study.get_trials() if t.user_attrs.get("pid") == procs[victim].pid
                  and t.state == optuna.trial.TrialState.RUNNING]
        assert len(killed) == 1, [(t.number, t.state) for t in study.get_trials()]
        killed = killed[0]
        for i, p in enumerate(procs):
            if i != victim:
                assert p.wait(timeout=400) == 0, logs[i].read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    trials = optuna.load_study(study_name="medpipe", storage=url).get_trials()
    states = {s: [t for t in trials if t.state == s] for s in optuna.trial.TrialState}
    text = "\n".join(log.read_text() for log in logs)
    assert not states[optuna.trial.TrialState.RUNNING] and not states[optuna.trial.TrialState.WAITING], text[-3000:]
    assert [t.number for t in states[optuna.trial.TrialState.FAIL]] == [killed.number]  # only the killed attempt
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1, text[-3000:]  # retried by exactly one of the two other processes
    retry = retries[0]
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == killed.params
    assert retry.user_attrs["pid"] in {p.pid for i, p in enumerate(procs) if i != victim}
    assert retry.user_attrs["run_dir"].endswith(f"trial-{killed.number}")  # keyed by the original trial
    complete = states[optuna.trial.TrialState.COMPLETE]
    assert len(complete) >= 4 and len(trials) == len(complete) + 1
    # every trial started once, in one process: its number printed once over all the workers' logs
    started = sorted(int(n) for n in re.findall(r"^trial (\d+): ", text, flags=re.M))
    assert started == sorted(t.number for t in trials), text[-3000:]
    # each complete trial trained once: its own run folder, every epoch once
    dirs = [Path(t.user_attrs["run_dir"]) for t in complete]
    assert len(set(dirs)) == len(dirs)
    for d in dirs:
        epochs = [int(x) for x in re.findall(r'"epoch": (\d+)', (d / "metrics.jsonl").read_text())]
        assert epochs == [1, 2, 3], d

    # the best trial: each surviving worker waited for the study to finish before writing it
    written = {(f / "best_config.yaml").read_text() for i, f in enumerate(folders) if i != victim}
    assert len(written) == 1
    # and from each machine's folder, the killed one's included (the same command again: nothing to train)
    from medpipe.cli import main

    for f in folders:
        assert main(_cmd(data_dir, f, space, url)[3:]) == 0
    assert "trial " not in capsys.readouterr().out.replace("best: trial", "")  # no trial started
    assert len(optuna.load_study(study_name="medpipe", storage=url).get_trials()) == len(trials)
    best = max(complete, key=lambda t: t.value)
    configs = [(f / "best_config.yaml").read_text() for f in folders]
    assert configs[0] == configs[1] == configs[2] == written.pop()
    assert f"# trial {best.number}: val_auc" in configs[0] and "127.0.0.1" in configs[0]


def test_storage_that_cannot_be_opened_is_a_clear_error(tmp_path, pg_server, capsys):
    from medpipe.cli import main
    from medpipe.errors import ConfigError, TuneError
    from medpipe.tune import _study, load_space

    space = load_space(_space(tmp_path, trials=1))

    def opened(url: str):
        return _study(tmp_path, space, 1, 3, "medpipe", storage=url)

    with pytest.raises(TuneError, match=r"--storage postgresql://postgres:\*\*\*@127.0.0.1:\d+/postgres: cannot open "
                                        r"the study storage: .*(refused|could not connect)"):
        opened(f"postgresql://postgres:s3cret@127.0.0.1:{free_port()}/postgres")  # nothing listens there
    with pytest.raises(TuneError, match='database "no_such_db" does not exist'):
        opened(pg_server.url("no_such_db"))
    with pytest.raises(ConfigError, match="not a database URL"):
        opened("db-host:5432/ham")
    with pytest.raises(ConfigError, match="cannot load its database driver"):
        opened("nosuchdialect://db-host/ham")
    # the command: the reason on one line, exit status of a tune failure, no traceback, no password
    code = main(["tune", "--data", str(tmp_path), "--out", str(tmp_path / "s"), "--space", str(tmp_path / "space.yaml"),
                 "--storage", f"postgresql://postgres:s3cret@127.0.0.1:{pg_server.port}/no_such_db"])
    err = capsys.readouterr().err
    assert code != 0 and "does not exist" in err and "Traceback" not in err and "s3cret" not in err, err
    assert not (tmp_path / "s" / "study.db").exists()


def test_database_lost_mid_study_is_a_clear_error(tmp_path, data_dir):
    """The study's server goes away: the command stops with the storage named and what to do, no traceback."""
    from medpipe.errors import TuneError
    from medpipe.tune import _optimize, _study, load_space
    from tests.pgserver import PgServer, find_bin

    pytest.importorskip("psycopg", reason="psycopg (the PostgreSQL driver: the tune extra) is not installed")
    if find_bin() is None:
        pytest.skip("PostgreSQL server binaries not found: apt-get install postgresql (.ci/apt.d/postgresql.txt)")
    server = PgServer(find_bin()).start()  # its own server: this test stops it
    try:
        url = server.create_db("lost")
        space = load_space(_space(tmp_path, trials=1))
        study = _study(tmp_path, space, 1, 3, "medpipe", storage=url)
        server.stop()
        with pytest.raises(TuneError, match=r"lost the study storage postgresql://postgres@127.0.0.1:\d+/lost \(.*\); "
                                            r"once it is back, run the same command"):
            _optimize(study, space, data_dir, tmp_path, url)
    finally:
        server.stop()
