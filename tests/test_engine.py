"""The training engine: events, local training for federated learning, run-folder rules, the time budget."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medpipe.cli import main
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
QUICK = [*TINY, "--max-steps-per-epoch", "2", "--bootstrap", "0"]


def _run(args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "medpipe", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def _metrics(run: Path) -> list[dict]:
    return [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "epoch" in m]  # no events


@pytest.fixture(scope="module")
def source(data_dir):
    from medpipe.config import make_config
    from medpipe.train.data import CachedSource

    cfg = make_config({"image_size": 32, "batch_size": 8, "max_steps_per_epoch": 2, "model": "resnet18",
                       "workers": 0, "epochs": 2, "warmup_epochs": 0.5})
    src = CachedSource(data_dir, cfg)
    yield cfg, src
    src.close()


def test_events_in_order_and_a_third_party_handler(source):
    from medpipe.train.engine import Engine, Events

    cfg, src = source
    engine = Engine.create(cfg, src, torch.device("cpu"))
    seen = []
    for ev in Events:
        engine.on(ev, lambda e, ev=ev: seen.append((ev.name, e.state.epoch)))
    state = engine.fit()
    names = [n for n, _ in seen]
    one_epoch = ["EPOCH_STARTED", "ITERATION_STARTED", "ITERATION_COMPLETED", "ITERATION_STARTED",
                 "ITERATION_COMPLETED", "EPOCH_COMPLETED", "VALIDATION_COMPLETED"]
    assert names[0] == "STARTED" and names[-1] == "COMPLETED"
    assert names[1:8] == one_epoch and names[8] == "BEST_IMPROVED"  # the first validated epoch is the best so far
    assert names.count("EPOCH_COMPLETED") == 2 and "EXCEPTION_RAISED" not in names
    assert state.epoch == 2 and state.iteration == 4 and {"val_auc", "train_loss", "lr"} <= set(state.metrics)


def test_local_fit_from_weights_and_fedprox_term(source):
    """k epochs from given weights on this site's data; a strong proximal term keeps the weights near them."""
    from medpipe.fl.losses import proximal_term
    from medpipe.train.engine import Engine, local_fit

    cfg, src = source
    torch.manual_seed(0)
    start = {k: v.clone() for k, v in Engine.create(cfg, src, torch.device("cpu")).net.state_dict().items()}

    def drift(w):
        return sum(float((w[k].float() - start[k].float()).pow(2).sum()) for k in start if "running" not in k
                   and "num_batches" not in k)

    plain, records = local_fit(cfg, src, epochs=1, weights=start)
    prox, _ = local_fit(cfg, src, epochs=1, weights=start, loss_terms=[proximal_term(start, mu=100.0)])
    assert plain.keys() == start.keys() and all(v.device.type == "cpu" for v in plain.values())
    assert len(records) == 1 and records[0]["n_train"] == len(src.train) and np.isfinite(records[0]["train_loss"])
    assert drift(plain) > 0 and drift(prox) < 0.5 * drift(plain)
    again, _ = local_fit(cfg, src, epochs=1, weights=start)  # same weights, same epoch: the same result
    torch.testing.assert_close(again, plain, rtol=0, atol=0)


def test_failed_start_leaves_no_run_folder(data_dir, synth_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(data_dir), "--out", str(run), *QUICK, "--device", "cuda"]) == 2 \
        or torch.cuda.is_available()
    assert not run.exists()
    assert main(["train", "--data", str(synth_dir), "--out", str(run), *QUICK]) != 0  # a raw dataset as --data
    assert not run.exists() and "Traceback" not in capsys.readouterr().err


def test_run_folder_rules(data_dir, tmp_path, capsys):
    """A second run needs --resume or --force; a refused --resume rewrites nothing; --force starts over."""
    run = tmp_path / "run"
    assert main(["train", "--data", str(data_dir), "--out", str(run), *QUICK]) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["train", "--data", str(data_dir), "--out", str(run), *QUICK]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--data", str(data_dir), "--out", str(run), *QUICK, "--lr", "0.01", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "'lr'" in err and "0.002" in err and "0.01" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing rewritten
    (run / "notes.txt").write_text("mine")
    assert main(["train", "--data", str(data_dir), "--out", str(run), *QUICK, "--force"]) == 2  # not medpipe's file
    assert (run / "notes.txt").read_text() == "mine"
    (run / "notes.txt").unlink()
    assert main(["train", "--data", str(data_dir), "--out", str(run), *QUICK, "--epochs", "1", "--force"]) == 0
    assert [m["epoch"] for m in _metrics(run)] == [1]


def test_sigint_then_failed_checkpoint_write_then_resume(data_dir, tmp_path):
    """Ctrl-C saves a checkpoint and says how to continue; a resume whose checkpoint write fails after the
    epoch's metrics line, resumed again, leaves every epoch in metrics.jsonl exactly once. The resumed
    run takes its own config (only the runtime option --workers is given anew)."""
    from medpipe.train.checkpoint import load_checkpoint

    run = tmp_path / "run"
    args = ["train", "--data", str(data_dir), "--out", str(run), *QUICK, "--epochs", "3"]
    r = _run([*args, "--handler", "tests.faults:SigtermAtStep:3,SIGINT"])
    assert r.returncode == 143, r.stderr[-2000:]
    assert "SIGINT" in r.stderr and "--resume" in r.stderr and "Traceback" not in r.stderr
    assert load_checkpoint(run / "checkpoints" / "last.pt")["global_step"] == 3
    resume = ["train", "--data", str(data_dir), "--out", str(run), "--resume", "--workers", "0"]
    r = _run([*resume, "--handler", "tests.faults:FailCheckpointWrite:1"])  # epoch 2's last.pt write fails
    assert r.returncode != 0 and "No space left" in r.stderr
    assert [m["epoch"] for m in _metrics(run)] == [1, 2]  # the line was written before the checkpoint failed
    r = _run(resume)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [m["epoch"] for m in _metrics(run)] == [1, 2, 3]


def test_time_budget_sets_the_epoch_count(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    # densenet121: slow enough per epoch that 4 s means fewer than 50 epochs
    assert main(["train", "--data", str(data_dir), "--out", str(run), *QUICK, "--epochs", "50", "--budget", "4s",
                 "--model", "densenet121"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("budget"))
    epochs = int(line.split("training ")[1].split()[0])
    m = _metrics(run)
    assert 1 <= epochs < 50 and len(m) == epochs  # the budget, not --epochs, decided
    if epochs >= 2:  # the cosine was stretched to end at the last step of the budgeted epochs
        assert m[-1]["lr"] == pytest.approx(0.002 * 0.01, rel=1e-6)
    from medpipe.config import ConfigError, make_config

    assert make_config({"budget": "2h"}).budget_seconds() == 7200
    assert make_config({"budget": "90"}).budget_seconds() == 90
    with pytest.raises(ConfigError, match="budget"):
        make_config({"budget": "soon"})


@pytest.mark.parametrize("provisional,warmup", [(1, 1.0), (10, 1.0), (10, 0.0), (1, 0.5)])
def test_budget_schedule_equals_a_run_of_that_many_epochs(provisional, warmup):
    """The budget rebuilds the schedule after the first epoch: from then on the learning rate is exactly that of a
    run started with the decided epoch count (also when the provisional schedule was 1 epoch long, whose cosine
    had ended: editing it in place left the rate at the floor)."""
    from medpipe.config import make_config
    from medpipe.train.factories import make_schedule, provisional_epochs, rebuild_schedule

    cfg = make_config({"epochs": provisional, "budget": "1m", "warmup_epochs": warmup, "lr": 1e-3})
    spe, decided = 5, 7

    def optimizer():
        return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.lr)

    opt = optimizer()
    sched = make_schedule(opt, cfg, spe, provisional_epochs(cfg))
    lrs = []
    for _ in range(spe):  # the first epoch, timed
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    sched = rebuild_schedule(opt, cfg, spe, decided, step=spe)
    for _ in range((decided - 1) * spe):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ref_opt = optimizer()
    ref = make_schedule(ref_opt, cfg, spe, decided)
    want = []
    for _ in range(decided * spe):
        want.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    assert lrs[spe:] == pytest.approx(want[spe:], rel=1e-9)
    assert want[-1] < cfg.lr * 0.02 and max(lrs[spe:]) > cfg.lr * 0.5  # the cosine runs its whole course


def test_resume_of_an_early_stopped_run_trains_no_more(source):
    """Early stopping is checked again when a run starts: a resume from the checkpoint of the epoch that stopped
    it (killed while packaging) stops at once instead of training on."""
    from medpipe.train.engine import Engine
    from medpipe.train.handlers import EarlyStopping

    cfg, src = source
    engine = Engine.create(cfg, src, torch.device("cpu"))
    s = engine.state
    s.epoch, s.max_epochs, s.stale, s.resumed = 1, 5, 3, True
    engine.attach(EarlyStopping(patience=3, monitor="val_auc"))
    state = engine.fit()
    assert state.epoch == 1 and state.iteration == 0 and "early stopping" in state.stop_reason


def test_budget_decided_after_a_resume_inside_the_first_epoch(source, capsys):
    """A checkpoint taken inside the first epoch holds no budget decision but the first epoch's time so far: the
    resumed run adds it to the time of the rest of the epoch, decides, and stores the decision in its checkpoints.
    An older checkpoint without that time, stopped after the epoch's last batch, keeps the provisional count (it
    used to divide the budget by the validation time alone: thousands of epochs)."""
    from medpipe.train.engine import Engine, Events
    from medpipe.train.handlers import TimeBudget

    cfg, src = source

    def resumed(batch: int, parts: dict):
        engine = Engine.create(cfg, src, torch.device("cpu"))
        snap = engine.snapshot()
        snap.update(batch_in_epoch=batch, global_step=batch, max_epochs=cfg.epochs, budget_epochs=None, parts=parts)
        engine = Engine.create(cfg, src, torch.device("cpu"))
        engine.restore(snap)
        assert engine.state.resumed and engine.state.budget_epochs is None
        engine.attach(TimeBudget(3600.0))
        engine.on(Events.VALIDATION_COMPLETED, lambda e: e.terminate("enough") if e.state.epoch >= 2 else None)
        return engine, engine.fit()

    engine, state = resumed(1, {"budget": {"first_epoch_seconds": 400.0}})
    assert "(400.0s before the resume at batch 1)" in capsys.readouterr().out
    assert state.budget_epochs == 8  # floor(3600 / (400 + the rest)): the time before the stop counts
    assert engine.snapshot()["budget_epochs"] == 8 and engine.snapshot()["parts"]["budget"] is None

    steps = src.steps_per_epoch
    engine, state = resumed(steps, {})  # an older checkpoint, written after the first epoch's last batch
    assert "holds no first-epoch time" in capsys.readouterr().out and state.budget_epochs == cfg.epochs


def test_resume_refuses_a_checkpoint_of_another_epoch_length(source):
    """A checkpoint's schedule and position count steps per epoch: a resume where an epoch has another number of
    steps (other data, batch size or rank count; or a version that counted shards differently) is refused by name
    instead of failing later with a negative batch count."""
    from medpipe.errors import MedpipeError
    from medpipe.train.engine import Engine

    cfg, src = source
    snap = Engine.create(cfg, src, torch.device("cpu")).snapshot()
    assert snap["steps_per_epoch"] == src.steps_per_epoch
    for bad in ({"steps_per_epoch": src.steps_per_epoch + 3}, {"steps_per_epoch": None, "batch_in_epoch": 9}):
        with pytest.raises(MedpipeError, match="steps per epoch|stopped at batch 9"):
            Engine.create(cfg, src, torch.device("cpu")).restore({**snap, **bad})
