"""`medpipe tune` (Optuna): a real two-trial study killed with SIGKILL mid-trial and resumed; a study stopped
with SIGTERM and continued; two worker processes on one study with pruning and their thread share; sampler
seeds per process and per resume; the search-space file checked by name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna", reason="the tune extra (optuna) is not installed")

TINY_BASE = {"model": "densenet-test", "image_size": 32, "batch_size": 8, "epochs": 3, "bootstrap": 0, "threads": 1, "workers": 0,
             "max_steps_per_epoch": 3, "warmup_epochs": 0.5}


def _space(tmp_path: Path, **over) -> Path:
    space = {"objective": "val_auc", "trials": 2, "base": TINY_BASE,
             "params": {"lr": {"low": 1.0e-3, "high": 3.0e-3, "log": True}, "label_smoothing": {"choices": [0.0, 0.1]}},
             "pruner": {"type": "none"}, "sampler": {"type": "random", "seed": 0}, **over}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def _cmd(data_dir, study: Path, space: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "medpipe", "tune", "--data", str(data_dir), "--out", str(study), "--space", str(space),
            "--heartbeat", "1", "--grace", "3", *extra]


def _load(study: Path):
    return optuna.load_study(study_name="medpipe", storage=f"sqlite:///{study / 'study.db'}")


def _run_until_first_checkpoint(cmd: list[str], env: dict, study: Path) -> subprocess.Popen:
    """Start `medpipe tune` and return once trial 0 has saved checkpoints/last.pt (the process still running)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = study / "trials" / "trial-0" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 240
    while not first.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.is_file(), proc.communicate()[0] if proc.poll() is not None else "no checkpoint in time"
    return proc


def test_study_killed_mid_trial_resumes_and_writes_a_trainable_config(data_dir, tmp_path):
    from medpipe.config import make_config

    study = tmp_path / "study"
    cmd = _cmd(data_dir, study, _space(tmp_path))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = _run_until_first_checkpoint(cmd, env, study)
    proc.kill()  # SIGKILL mid-trial: no handler runs, the trial is left RUNNING in the study
    proc.communicate()
    states = [t.state for t in _load(study).trials]
    assert states == [optuna.trial.TrialState.RUNNING]

    time.sleep(4)  # past the grace period: the heartbeat has stopped
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "retry of trial 0, resuming" in done.stdout
    trials = _load(study).trials
    by_state = {s: [t for t in trials if t.state == s] for s in optuna.trial.TrialState}
    assert [t.number for t in by_state[optuna.trial.TrialState.FAIL]] == [0]  # the killed attempt
    complete = by_state[optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 2
    retry = next(t for t in complete if t.system_attrs.get("failed_trial") == 0)
    assert retry.params == trials[0].params and retry.user_attrs["run_dir"].endswith("trial-0")
    # the retry continued the killed run: every epoch once in its metrics, 3 epochs in all
    epochs = [json.loads(x)["epoch"] for x in (study / "trials" / "trial-0" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]

    best = study / "best_config.yaml"
    cfg = make_config(yaml_path=best)  # what `medpipe train --config` reads
    s = _load(study)
    assert cfg.lr == pytest.approx(s.best_params["lr"]) and cfg.monitor == "val_auc"
    assert cfg.image_size == 32 and cfg.epochs == 3
    assert (study / "trials.csv").read_text().count("\n") == len(trials) + 1
    # a third run finds the study complete and trains nothing more
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and len(_load(study).trials) == len(trials)


def test_sigterm_stops_the_study_and_a_rerun_continues_the_interrupted_trial(data_dir, tmp_path):
    """SIGTERM mid-trial: the trial saves last.pt, no new trial starts, the command exits 143 like an interrupted
    `medpipe train`; the trial is queued again with its parameters and the rerun continues its run folder."""
    study = tmp_path / "study"
    # 12 epochs: the signal, sent once epoch 1's checkpoint exists, must arrive while the trial still trains (no
    # early stop: a tiny model's validation AUC can stall for the default patience of 10 epochs)
    cmd = _cmd(data_dir, study, _space(tmp_path, trials=1, base={**TINY_BASE, "epochs": 12, "patience": 100}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = _run_until_first_checkpoint(cmd, env, study)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, out
    assert "medpipe tune: stopped by SIGTERM" in out and "trial 0 is queued again" in out, out
    assert "Traceback" not in out, out
    trials = _load(study).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING], out
    assert trials[1].params == trials[0].params and "interrupted" in trials[0].user_attrs
    assert not (study / "trials" / "trial-1").exists()  # no new trial started after the signal

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "retry of trial 0, resuming" in done.stdout
    trials = _load(study).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    assert trials[1].user_attrs["run_dir"].endswith("trial-0") and trials[1].params == trials[0].params
    epochs = [json.loads(x)["epoch"] for x in (study / "trials" / "trial-0" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 13))  # continued, not restarted


def test_sampler_seeds_differ_per_process_and_on_resume(tmp_path):
    """Two processes on one study and a continued study draw new parameters; a fresh study replays its seed."""
    from medpipe.tune import _study, load_space

    space = load_space(_space(tmp_path, sampler={"type": "tpe", "seed": 0}))

    def first_params(out: Path, worker: int) -> dict:
        out.mkdir(exist_ok=True)
        study = _study(out, space, 30, 90, "medpipe", worker=worker)
        study.optimize(lambda t: sum(p.suggest(t) or 0 for p in space.params), n_trials=1)  # a fake objective
        return study.trials[-1].params

    shared = tmp_path / "shared"
    a, b = first_params(shared, 0), first_params(shared, 1)  # two processes, both opened before any trial
    assert a != b
    assert first_params(tmp_path / "fresh", 0) == a  # a fresh single-process study is reproducible
    again = first_params(shared, 0)  # the study continued by the same command: not trial 0's values again
    assert again != a and again != b

    # two separate `medpipe tune` shells started together on a new study: both are "worker 0" of a study
    # with no trial; the one that did not create it salts its seed with its process id
    together = tmp_path / "together"
    together.mkdir()
    first, second = (_study(together, space, 30, 90, "medpipe", standalone=True) for _ in range(2))
    for st in (first, second):
        st.optimize(lambda t: sum(p.suggest(t) or 0 for p in space.params), n_trials=1)
    assert first.trials[0].params == a  # the creator replays the seed
    assert first.trials[0].params != second.trials[-1].params


def test_two_processes_share_one_study_and_prune(data_dir, tmp_path):
    """--processes 2: two worker processes take trials from the same SQLite study; a threshold pruner
    stops every trial after its first epoch (val_auc can never exceed 1.01). The space's threads (4) are
    capped to each process's share of the cores."""
    study = tmp_path / "study"
    space = _space(tmp_path, trials=4, base={**TINY_BASE, "epochs": 2, "max_steps_per_epoch": 2, "threads": 4},
                   pruner={"type": "threshold", "lower": 1.01})
    done = subprocess.run(_cmd(data_dir, study, space, "--processes", "2"), capture_output=True, text=True,
                          timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
    trials = _load(study).trials
    assert {t.state for t in trials} == {optuna.trial.TrialState.PRUNED} and len(trials) >= 2, done.stdout + done.stderr
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # two processes ran trials
    assert all(len(t.intermediate_values) == 1 for t in trials)  # stopped after epoch 1
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    for t in trials:
        cfg = yaml.safe_load((Path(t.user_attrs["run_dir"]) / "config.yaml").read_text())
        assert cfg["threads"] == min(4, share)
    assert f"2 processes with {share} thread(s) each" in done.stderr
    # no trial completed: the command says so and fails instead of writing a best config
    assert done.returncode != 0 and "no trial" in (done.stdout + done.stderr)
    assert not (study / "best_config.yaml").exists()


@pytest.mark.parametrize("body, message", [
    ({"params": {"lrr": {"low": 0.1, "high": 1}}}, "params.lrr: not a training option.*did you mean 'lr'"),
    ({"params": {"lr": {"low": 1, "high": 0.1}}}, "params.lr: low must be below high"),
    ({"params": {"imbalance": {"choices": ["sampler", "nope"]}}}, "params.imbalance = 'nope' is not a valid"),
    ({"params": {"device": {"choices": ["cpu"]}}}, "not searchable"),
    ({"objective": "accuracy", "params": {"lr": {"low": 0.001, "high": 0.01}}}, "objective must be one of"),
    ({"params": {"lr": {"low": 0.001, "high": 0.01}}, "prunner": "median"}, "unknown key 'prunner'.*'pruner'"),
    ({"params": {"lr": {"low": 0.001, "high": 0.01, "log": True, "step": 0.001}}}, "params.lr: give log or step"),
    ({"params": {"split_seed": {"choices": [0, 1]}}}, "params.split_seed: split_seed is not searchable.*validation"),
    ({"params": {"val_fraction": {"low": 0.1, "high": 0.2}}}, "params.val_fraction: val_fraction is not searchable"),
    ({"params": {"test_fraction": {"choices": [0.1, 0.2]}}}, "params.test_fraction: test_fraction is not searchable"),
    ({"params": {"monitor": {"choices": ["val_auc", "val_loss"]}}}, "params.monitor: monitor is not searchable"),
    ({"base": {"monitor": "val_loss"}, "params": {"lr": {"low": 0.001, "high": 0.01}}}, "base.monitor"),
    ({"params": {"lr": {"low": 0.001, "high": 0.01}}, "sampler": {"type": "tpe", "seed": "x"}}, "sampler seed"),
])
def test_search_space_errors_name_the_key(tmp_path, body, message):
    from medpipe.errors import ConfigError
    from medpipe.tune import load_space

    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(ConfigError, match=message):
        load_space(path)


def test_the_training_seed_and_a_fixed_split_are_allowed(tmp_path):
    from medpipe.tune import load_space

    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"base": {"split_seed": 3, "val_fraction": 0.2},
                                    "params": {"seed": {"choices": [0, 1, 2]}, "lr": {"low": 0.001, "high": 0.01}}}))
    space = load_space(path)
    assert space.config({"seed": 2, "lr": 0.002}).split_seed == 3


def test_the_shipped_search_space_is_valid():
    """benchmarks/quality_space.yaml (the recipe search on the dev set) loads: every option and corner is valid."""
    from medpipe.tune import load_space

    space = load_space(Path(__file__).resolve().parent.parent / "benchmarks" / "quality_space.yaml")
    assert space.objective == "val_auc" and space.base["budget"] == "6m" and len(space.params) >= 5
