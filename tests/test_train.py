import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medpipe.cli import main
from medpipe.config import make_config
from medpipe.errors import ConfigError
from tests.conftest import TINY


ROOT = Path(__file__).resolve().parents[1]


def _run(args, env_extra=None, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "medpipe", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def test_config_typo_rejected_naming_key(tmp_path):
    with pytest.raises(ConfigError, match="'epohcs'.*did you mean 'epochs'"):
        make_config({"epohcs": 3})
    y = tmp_path / "c.yaml"
    y.write_text("batch_size: 16\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        make_config(yaml_path=y)
    with pytest.raises(ConfigError, match="imbalance"):
        make_config({"imbalance": "magic"})
    y.write_text("batch_size: 16\nepochs: 5\n")
    cfg = make_config({"epochs": "3"}, y)
    assert cfg.epochs == 3 and cfg.batch_size == 16


def test_run_dir_contents(trained_run):
    for name in ("config.yaml", "splits.csv", "splits.json", "metrics.jsonl", "checkpoints/last.pt",
                 "checkpoints/best.pt", "model/weights.safetensors", "model/model.json",
                 "report/report.md", "report/report.json", "report/roc.png", "report/confusion_matrix.png",
                 "report/reliability.png"):
        assert (trained_run / name).is_file(), name
    meta = json.loads((trained_run / "model" / "model.json").read_text())
    assert meta["classes"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert meta["preprocessing"]["image_size"] == 32 and meta["architecture"] == "densenet121"
    assert {"val", "test"} <= set(meta["metrics"]) and np.isfinite(meta["metrics"]["test"]["macro_auc"])
    assert set(meta["versions"]) >= {"medpipe", "monai", "torch"} and len(meta["records_sha256"]) == 64
    lines = (trained_run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and {"val_auc", "val_bacc", "train_loss", "lr"} <= set(json.loads(lines[0]))
    report = json.loads((trained_run / "report" / "report.json").read_text())
    assert {"macro_auc_ci95", "mel_sensitivity_at_spec80", "ece", "confusion_matrix"} <= set(report)
    with open(trained_run / "report" / "roc.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_sigterm_resume_equals_straight_run(data_dir, tmp_path):
    """2 epochs straight == SIGTERM mid-epoch + --resume, in deterministic CPU mode (real processes, real
    signal), with a loader thread, inline and worker processes in the three runs."""
    straight, resumed = tmp_path / "a", tmp_path / "b"
    common = ["train", "--data", str(data_dir), *TINY, "--workers", "1"]
    r = _run([*common, "--out", str(straight)])
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run([*common, "--out", str(resumed), "--workers", "0", "--handler", "tests.faults:SigtermAtStep:3"])
    assert r.returncode == 143, r.stderr[-2000:]
    assert "SIGTERM" in r.stderr and "Traceback" not in r.stderr
    state = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)
    assert state["global_step"] == 3 and state["batch_in_epoch"] > 0  # really mid-epoch
    assert not (resumed / "model").exists()
    # resumed with worker processes that live across the rest of epoch 1 and all of epoch 2
    r = _run([*common, "--out", str(resumed), "--resume", "--workers", "2"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout
    wa = load_file(straight / "model" / "weights.safetensors")
    wb = load_file(resumed / "model" / "weights.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)
    ma = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [m["val_auc"] for m in ma] == [m["val_auc"] for m in mb]
    assert [m["train_loss"] for m in ma][-1] == [m["train_loss"] for m in mb][-1]


def test_resume_refuses_different_config(trained_run, data_dir, capsys):
    rc = main(["train", "--data", str(data_dir), "--out", str(trained_run), *TINY, "--image-size", "48", "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "image size" in err and "32" in err and "48" in err
    rc = main(["train", "--data", str(data_dir), "--out", str(trained_run), *TINY, "--model", "resnet18", "--resume"])
    assert rc == 2 and "model" in capsys.readouterr().err


def test_checkpoint_write_crash_keeps_previous(tmp_path, monkeypatch):
    from medpipe.train import checkpoint

    path = tmp_path / "last.pt"
    checkpoint.save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        checkpoint.save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(path)["epoch"] == 1
    assert not list(tmp_path.glob(".*tmp"))  # the temp file was cleaned up


def test_truncated_checkpoint_refused(tmp_path):
    from medpipe.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    p = tmp_path / "c.pt"
    save_checkpoint(p, {"epoch": 1, "w": torch.ones(100)})
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(p)


def test_absent_class_gives_nan_with_warning():
    from medpipe.evaluate import compute_metrics

    y = np.array([0, 0, 1, 1, 0, 1])
    probs = np.random.default_rng(0).dirichlet([1, 1, 1], size=6)
    with pytest.warns(RuntimeWarning, match="c2"):
        m = compute_metrics(y, probs, ["c0", "c1", "c2"], bootstrap=20)
    assert np.isnan(m["per_class"]["c2"]["auc"]) and np.isfinite(m["macro_auc"])


def test_pretrained_offline_message(monkeypatch):
    import monai.networks.nets.densenet as dn

    def blocked(*a, **k):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(dn, "load_state_dict_from_url", blocked, raising=False)
    from medpipe.models import create_model

    with pytest.raises(ConfigError, match="--init-weights"):
        create_model("densenet121", 7, pretrained=True)


def test_init_weights_safetensors_and_pickle_refusal(tmp_path):
    from safetensors.torch import save_file

    from medpipe.models import create_model

    src = create_model("resnet18", 7)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "w.safetensors")
    dst = create_model("resnet18", 7, init_weights=str(tmp_path / "w.safetensors"))
    torch.testing.assert_close(dst.state_dict()["conv1.weight"], src.state_dict()["conv1.weight"])
    pkg = tmp_path / "pkg"  # a model package folder: its weights.safetensors
    pkg.mkdir()
    (tmp_path / "w.safetensors").rename(pkg / "weights.safetensors")
    dst = create_model("resnet18", 7, init_weights=str(pkg))
    torch.testing.assert_close(dst.state_dict()["conv1.weight"], src.state_dict()["conv1.weight"])
    with pytest.raises(ConfigError, match="not a model package"):
        create_model("resnet18", 7, init_weights=str(tmp_path))
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    _write_evil_pickle(evil, marker)
    with pytest.raises(ConfigError, match="refused"):
        create_model("resnet18", 7, init_weights=str(evil))
    assert not marker.exists()


def _write_evil_pickle(path: Path, marker: Path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path.write_bytes(pickle.dumps({"x": Evil()}))


def test_package_refuses_pickle_and_tampering(trained_run, tmp_path):
    import shutil

    from medpipe.package import PackageError, load_package
    from medpipe.utils import sha256_file

    pkg = tmp_path / "pkg"
    shutil.copytree(trained_run / "model", pkg)
    load_package(pkg)  # the genuine package loads
    marker = tmp_path / "pwned"
    _write_evil_pickle(pkg / "weights.safetensors", marker)
    with pytest.raises(PackageError, match="does not match"):
        load_package(pkg)
    meta = json.loads((pkg / "model.json").read_text())
    meta["weights_sha256"] = sha256_file(pkg / "weights.safetensors")  # even with a matching hash...
    (pkg / "model.json").write_text(json.dumps(meta))
    with pytest.raises(PackageError, match="never unpickles"):
        load_package(pkg)
    assert not marker.exists()
    (pkg / "weights.safetensors").unlink()
    with pytest.raises(PackageError, match="missing"):
        load_package(pkg)
    with pytest.raises(PackageError, match="not a medpipe model package"):
        load_package(tmp_path)


def test_predict_cli_and_golden_parity(trained_run, data_dir, capsys):
    import pandas as pd

    from medpipe.infer.predictor import Predictor

    preds = pd.read_csv(trained_run / "report" / "predictions.csv")
    records = pd.read_csv(data_dir / "records.csv")
    row = preds.iloc[0]
    path = records.set_index("image_id").loc[row["image_id"], "path"]
    p = Predictor(trained_run / "model")
    served = p.predict_bytes([Path(path).read_bytes()])[0]
    for c in p.classes:  # evaluate (cache path) == predict (raw bytes path)
        assert abs(served.probabilities[c] - row[c]) < 1e-5
    bad = Path(str(data_dir)) / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0garbage")
    rc = main(["predict", "--model", str(trained_run / "model"), path, str(bad)])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"{path}: {served.label}" in out and "bad.jpg: error:" in out and "Traceback" not in out
    assert all(c + "=" in out for c in p.classes)


def test_nan_batch_skips_step_and_leaves_weights():
    from medpipe.config import make_config
    from medpipe.models import create_model
    from medpipe.train.engine import train_step
    from medpipe.train.factories import make_loss, make_schedule

    cfg = make_config({"image_size": 32})
    model = create_model("resnet18", 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = make_schedule(opt, cfg, 10)
    loss_fn = make_loss(cfg, np.array([5, 5, 5]), torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}
    x = torch.randn(4, 3, 32, 32)
    x[1, 0, 0, 0] = float("nan")  # one poisoned image
    assert train_step(model, x, torch.tensor([0, 1, 2, 0]), loss_fn, opt, sched, 1.0, torch.device("cpu")) is None
    after = model.state_dict()
    for k, v in before.items():
        if "running" not in k and "num_batches" not in k:  # BatchNorm stats move in forward; weights must not
            torch.testing.assert_close(after[k], v, rtol=0, atol=0, msg=k)
    assert sched.last_epoch == 0  # the schedule did not advance either


def test_nan_batch_in_a_real_run_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    """A NaN batch injected at step 8 (epoch 2): the run stops naming the batch and its images; last.pt is
    still the end of epoch 1, loads, and holds finite weights."""
    from medpipe.train.checkpoint import load_checkpoint

    run = tmp_path / "run"
    r = _run(["train", "--data", str(data_dir), "--out", str(run), *TINY, "--handler", "tests.faults:NanAtStep:8"])
    assert r.returncode == 2, r.stderr[-2000:]
    assert "loss became non-finite at epoch 2" in r.stderr and "ISIC_" in r.stderr and "Traceback" not in r.stderr
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["epoch"] == 1 and state["batch_in_epoch"] == 0
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    epoch, event = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert epoch["epoch"] == 1 and "rss_mb" in epoch and 0 <= epoch["data_wait_share"] <= 1
    assert event["event"] == "failed" and event["error"] == "NonFiniteLoss" and event["at_epoch"] == 2
    assert "loss became non-finite" in event["reason"] and "epoch" not in event
    assert not (run / "model").exists()


def test_every_loader_mode_yields_the_same_batches():
    """Inline, one thread and worker processes (the CUDA default, kept across epochs) give identical
    augmented batches, also when resuming mid-epoch."""
    from medpipe.preprocess import PreprocessSpec
    from medpipe.train.data import BatchLoader, BatchSource, auto_workers
    from medpipe.preprocess import train_batch_preset

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 24)
    source = BatchSource(pixels, np.arange(24), labels, train_batch_preset(PreprocessSpec(image_size=32)), 7)
    epochs = {e: [rng.permutation(24)[i:i + 6] for i in range(0, 24, 6)] for e in (0, 1)}
    ref = {e: list(BatchLoader(source, 0, pin=False).epoch(e, bs)) for e, bs in epochs.items()}
    assert not torch.equal(ref[0][0][0], ref[1][0][0])
    for workers in (1, 2):
        others = set(multiprocessing.active_children())  # e.g. a session fixture's server
        loader = BatchLoader(source, workers, pin=False)
        try:
            for e, bs in epochs.items():
                got = list(loader.epoch(e, bs, skip=1))
                assert len(got) == len(ref[e]) - 1
                for (x, y), (rx, ry) in zip(got, ref[e][1:]):
                    assert torch.equal(x, rx) and torch.equal(y, ry)
            started = [p for p in multiprocessing.active_children() if p not in others]
        finally:
            loader.close()
        if workers == 2:  # the worker processes were kept across epochs and stop at close()
            assert len(started) >= 2
            deadline = time.monotonic() + 30
            while any(p.is_alive() for p in started) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not any(p.is_alive() for p in started), [p.pid for p in started if p.is_alive()]
    assert auto_workers(cuda=False) == 1 and auto_workers(cuda=True) >= 1


def test_training_source_survives_pickling_for_spawned_workers():
    """Worker processes started by spawn or forkserver (the default from Python 3.14, and in any process
    that was itself spawned, e.g. one of several runs started by a process pool) receive the training
    source pickled. Every recipe option's preset must pickle and give the same batch afterwards
    (found on a GPU machine: a lambda in the preset stopped such workers from starting)."""
    import pickle

    from medpipe.preprocess import Augmentation, PreprocessSpec, train_batch_preset
    from medpipe.train.data import BatchSource

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    spec = PreprocessSpec(image_size=32, color_constancy="shades_of_gray")
    preset = train_batch_preset(spec, Augmentation(crop_scale=0.35, color_jitter=1.5))
    source = BatchSource(pixels, np.arange(8), rng.integers(0, 3, 8), preset, 7)
    clone = pickle.loads(pickle.dumps(source))
    key = (0, 0, np.arange(4))
    (x, y), (cx, cy) = source[key], clone[key]
    assert torch.equal(x, cx) and torch.equal(y, cy)


def test_batch_presets_equal_the_per_image_presets():
    """Head and tail run once on the batch; the result is the per-image MONAI preset, bit for bit."""
    from medpipe.preprocess import PreprocessSpec
    from medpipe.preprocess import KEY, eval_batch, eval_preset, train_batch_preset, train_preset

    spec = PreprocessSpec(image_size=40)
    imgs = np.random.default_rng(2).integers(0, 256, (12, 40, 40, 3), dtype=np.uint8)
    per_image = train_preset(spec)
    per_image.set_random_state(seed=11)
    ref = torch.stack([per_image({KEY: np.array(im)})[KEY] for im in imgs])
    got = train_batch_preset(spec).set_random_state(11)(imgs)
    assert torch.equal(got, ref)
    assert float(got.abs().max()) > 0.5 and not torch.equal(got, eval_batch(imgs, spec))  # it did augment
    ev = eval_preset(spec)
    assert torch.equal(eval_batch(list(imgs), spec), torch.stack([ev({KEY: np.array(im)})[KEY] for im in imgs]))


def test_presets_switch_off_monai_metadata_when_they_are_built():
    from monai.data import get_track_meta, set_track_meta

    from medpipe.preprocess import PreprocessSpec, eval_batch

    was = get_track_meta()
    set_track_meta(True)  # MONAI's default
    try:
        eval_batch(np.zeros((1, 16, 16, 3), np.uint8), PreprocessSpec(image_size=16))
        assert get_track_meta() is False
    finally:
        set_track_meta(was)


def test_resume_keeps_the_runs_own_recipe(data_dir, tmp_path):
    """A resume continues the recipe the run started with: a checkpoint written before the recipe keys existed
    resumes with the old behaviour (not today's defaults), and a caller that builds another config (e.g. from
    today's defaults) is refused with the differences named, not resumed with a changed recipe."""
    from medpipe.config import make_config, resume_config
    from medpipe.errors import CheckpointError
    from medpipe.pipeline import run, saved_config

    legacy = make_config({}).to_dict()
    for key in ("mixup_alpha", "ema_decay", "decision_rule"):  # keys added after this checkpoint was written
        legacy.pop(key)
    legacy.update(imbalance="sampler", weight_decay=1e-4)
    cfg = resume_config(legacy, {"threads": 1})
    assert (cfg.mixup_alpha, cfg.ema_decay, cfg.decision_rule, cfg.imbalance) == (0.0, 0.0, "argmax", "sampler")
    assert cfg.threads == 1  # runtime keys may be given anew

    tiny = {"model": "densenet-test", "image_size": 32, "batch_size": 8, "epochs": 2, "max_steps_per_epoch": 2,
            "bootstrap": 0, "threads": 1, "workers": 0, "deterministic": True}
    run(data_dir, tmp_path / "run", make_config({**tiny, "epochs": 1}), evaluate_test=False)
    with pytest.raises(CheckpointError, match=r"epochs \('epochs'\): checkpoint 1 vs now 2; "
                                              r"weight decay \('weight_decay'\): checkpoint 0.05 vs now 0.1"):
        run(data_dir, tmp_path / "run", make_config({**tiny, "weight_decay": 0.1}), resume=True, evaluate_test=False)
    same = resume_config(saved_config(tmp_path / "run"), {"threads": 1})
    out = run(data_dir, tmp_path / "run", same, resume=True, evaluate_test=False)
    assert out["epochs"] == 1  # the run's own config: nothing left to train, resumed without complaint
