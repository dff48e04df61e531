"""Federated training on Flower: the pure parts in-process, then real deployments on loopback.

The deployments run the real Flower processes from ``.venv-fl`` (``make fl``; Flower's pins conflict
with the dev venv): ``medpipe fl server`` (flower-superlink + the ServerApp it spawns) and three
``medpipe fl site`` processes (flower-supernode + the ClientApps), with TLS from ``medpipe fl certs`` and
SuperNode authentication. Without ``.venv-fl`` those tests skip with the reason.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from medpipe.fl.aggregate import check_update, pooled_metrics, site_statistics, weighted_average

ROOT = Path(__file__).resolve().parents[1]
FL_BIN = Path(os.environ.get("MEDPIPE_FL_VENV", ROOT / ".venv-fl")) / "bin"
HAM = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
TRAIN = ["--model", "efficientnet-b0", "--image-size", "32", "--batch-size", "16", "--threads", "1", "--workers", "0",
         "--lr", "0.002"]

# what Flower 1.42's SuperNode logs each time the SuperLink refuses its key (exit code 305); a registered site
# may log it once while the server is still registering keys, the unregistered one never gets further
ROGUE_REFUSED = "Failed to activate SuperNode"

# ----------------------------------------------------------------------------------------- pure parts


def spy_local_fit(monkeypatch, event, fn, on_call=None) -> None:
    """Wrap ``medpipe.fl.site.local_fit`` for the test: each local training run gets one more engine handler that
    calls ``fn(engine)`` on ``event``; ``on_call(kw)``, when given, first sees the run's keyword arguments."""
    import medpipe.fl.site as site_mod

    real = site_mod.local_fit

    class Spy:
        def attach(self, engine):
            engine.on(event, fn)

    def spy(cfg, source, **kw):
        if on_call is not None:
            on_call(dict(kw))
        kw["handlers"] = [*kw["handlers"], Spy()]
        return real(cfg, source, **kw)

    monkeypatch.setattr(site_mod, "local_fit", spy)


def test_check_update_names_the_problem():
    ref = {"w": np.zeros((2, 3), np.float32), "n": np.zeros((), np.int64)}
    assert check_update({"w": np.ones((2, 3), np.float32), "n": np.ones((), np.int64)}, ref) is None
    assert "is float64, expected float32" in check_update({"w": np.ones((2, 3)), "n": ref["n"]}, ref)
    one = {"w": np.ones((2, 3), np.float32), "n": ref["n"]}
    assert check_update({"w": np.full((2, 3), 2.5, np.float32), "n": ref["n"]}, one, max_ratio=2.0) is None
    assert "moves the model by 3 times" in check_update({"w": np.full((2, 3), 4, np.float32), "n": ref["n"]}, one, 2.0)
    bad = np.ones((2, 3), np.float32)
    bad[0, 1] = np.nan
    assert "non-finite" in check_update({"w": bad, "n": ref["n"]}, ref) and "w" in check_update({"w": bad, "n": ref["n"]}, ref)
    assert "shape (3, 2)" in check_update({"w": np.ones((3, 2), np.float32), "n": ref["n"]}, ref)
    assert "missing 1 tensors" in check_update({"w": ref["w"]}, ref)
    assert "unknown" in check_update({**ref, "x": ref["w"]}, ref)


def test_weighted_average_by_sample_counts():
    a = {"w": np.full(3, 1.0, np.float32), "n": np.array(5)}
    b = {"w": np.full(3, 4.0, np.float32), "n": np.array(9)}
    out = weighted_average([(a, 2), (b, 1)])
    np.testing.assert_allclose(out["w"], 2.0)
    assert out["w"].dtype == np.float32 and isinstance(out["n"], np.ndarray) and int(out["n"]) == 9


def test_pooled_metrics_from_site_histograms_match_pooled_predictions():
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    rng = np.random.default_rng(0)
    ys, ps, stats = [], [], []
    for site in range(3):  # different class mixes per site
        y = rng.choice(4, size=80, p=np.roll([0.55, 0.25, 0.15, 0.05], site))
        logits = rng.normal(size=(80, 4)) + 1.5 * np.eye(4)[y]
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        ys.append(y), ps.append(p), stats.append(site_statistics(y, p, 4))
    y, p = np.concatenate(ys), np.concatenate(ps)
    pooled = pooled_metrics(stats, ["a", "b", "c", "d"])
    exact = roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert abs(pooled["macro_auc"] - exact) < 2e-3
    assert pooled["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p.argmax(1)))
    assert pooled["n"] == len(y)
    assert pooled["support"] == np.bincount(y, minlength=4).tolist()  # counts only, no image leaves a site

    from medpipe.decision import apply_offsets, prior_from_counts

    d = prior_from_counts(pooled["support"], ["a", "b", "c", "d"], "prior", tau=1.0)
    assert d["default"] == "prior" and d["rules"]["prior"]["tau"] == 1.0
    log_prior = np.log((np.bincount(y, minlength=4) + 1.0) / (len(y) + 4))
    assert np.allclose(d["rules"]["prior"]["offsets"], -log_prior)  # what the validation fit gives at tau 1
    pred = apply_offsets(p, d["rules"]["prior"]["offsets"])
    assert (pred == (np.log(p) - log_prior).argmax(1)).all()
    assert prior_from_counts(pooled["support"], ["a", "b", "c", "d"], "class_bias", tau=0.0)["default"] == "prior"
    assert np.allclose(prior_from_counts(pooled["support"], list("abcd"), "prior", 0.0)["rules"]["prior"]["offsets"], 0)


def test_partition_keeps_lesions_whole(data_dir, tmp_path):
    import pandas as pd

    from medpipe.errors import MedpipeError
    from medpipe.fl.partition import partition

    s = partition(data_dir, tmp_path / "d", sites=3, dirichlet=0.5, seed=1, min_images=1)
    tables = {n: pd.read_csv(Path(v["dir"]) / "records.csv", dtype=str) for n, v in s["sites"].items()}
    groups = [set(t["group_id"]) for t in tables.values()]
    assert sum(map(len, groups)) == len(set().union(*groups))  # no lesion at two sites
    assert sum(len(t) for t in tables.values()) == len(pd.read_csv(data_dir / "records.csv"))
    for v in s["sites"].values():  # the run's vocabulary everywhere, even for absent classes
        assert json.loads((Path(v["dir"]) / "classes.json").read_text()) == HAM
    s2 = partition(data_dir, tmp_path / "b", by="localization", sites=3, min_images=1)
    assert 2 <= len(s2["sites"]) + len(s2["skipped"]) <= 3
    with pytest.raises(MedpipeError, match="no column 'hospital'"):
        partition(data_dir, tmp_path / "c", by="hospital")


def test_site_local_training_mixes_batches_like_train(data_dir, monkeypatch):
    """A site's local epochs use the recipe's batch mixing (the default mixup, soft targets on every step) with
    new draws each round, and hand back raw weights (no weight average); mixup_alpha 0 turns it off."""
    import torch

    import medpipe.fl.site as site_mod
    from medpipe.recipe import MixBatches
    from medpipe.train.engine import Events

    seen: list = []
    mixers: list = []  # per local run: how many batch mixers it was given
    spy_local_fit(monkeypatch, Events.ITERATION_STARTED,
                  lambda e: seen.append((mixers[-1], e.state.batch[1].ndim, e.state.batch[0].clone())),
                  on_call=lambda kw: mixers.append(sum(isinstance(h, MixBatches) for h in kw["handlers"])))
    tc = {"model": "densenet-test", "image_size": 32, "batch_size": 8, "threads": 1, "workers": 0,
          "max_steps_per_epoch": 2, "deterministic": True}
    site = site_mod.Site(data_dir, "a", tc, HAM)
    start = site.reference  # the initial weights, as arrays
    w1, m1 = site.fit(start, server_round=1, epochs=1)
    assert seen and all(n == 1 and ndim == 2 for n, ndim, _ in seen)  # one mixer, (N, C) soft targets
    assert m1["n_train"] == site.n_train and all(np.isfinite(v).all() for v in w1.values())
    first = [x for _, _, x in seen]
    seen.clear()
    site.fit(start, server_round=2, epochs=1)
    assert not all(torch.equal(a, b) for a, b in zip(first, (x for _, _, x in seen)))  # new draws (and orders)
    seen.clear()
    other = site_mod.Site(data_dir, "c", tc, HAM)  # same data, seed and round: only the site's own draws differ
    other.fit(start, server_round=1, epochs=1)
    assert not all(torch.equal(a, b) for a, b in zip(first, (x for _, _, x in seen)))
    seen.clear()
    plain = site_mod.Site(data_dir, "b", {**tc, "mixup_alpha": 0}, HAM)
    plain.fit(start, server_round=1, epochs=1)
    assert seen and all(n == 0 and ndim == 1 for n, ndim, _ in seen)


def test_site_follows_the_round_rates_and_keeps_its_optimiser_and_batchnorm_when_asked(data_dir, monkeypatch):
    """The server's schedule across rounds reaches the site's steps (a linear ramp, no warm-up restart);
    local_optimizer keep carries AdamW's state from round to round (reset never stores it); batchnorm local
    trains from the site's own running statistics of its previous round, not the global ones."""
    import torch

    import medpipe.fl.site as site_mod
    from medpipe.fl.strategy import fit_kwargs, round_config
    from medpipe.train.engine import Events

    lrs: list = []
    starts: list = []
    spy_local_fit(monkeypatch, Events.ITERATION_STARTED, lambda e: lrs.append(e.optimizer.param_groups[0]["lr"]),
                  on_call=lambda kw: starts.append({k: v.clone() for k, v in kw["weights"].items()}))
    tc = {"model": "densenet-test", "image_size": 32, "batch_size": 8, "threads": 1, "workers": 0,
          "max_steps_per_epoch": 2, "deterministic": True, "mixup_alpha": 0}
    site = site_mod.Site(data_dir, "a", tc, HAM)
    run = {"rounds": 4, "local_epochs": 1, "strategy": "fedavg", "lr_schedule": "rounds", "local_optimizer": "keep",
           "batchnorm": "local"}
    kw = fit_kwargs(round_config(run, 2, 1e-3, 1.0))  # round 2 of 4: cosine from the peak rate
    assert kw["lr_range"][0] == pytest.approx(1e-3) and 1e-5 < kw["lr_range"][1] < 1e-3
    w1, _ = site.fit(site.reference, 2, **kw)
    assert lrs == pytest.approx([kw["lr_range"][0], (kw["lr_range"][0] + kw["lr_range"][1]) / 2])
    assert site.optimizer_state["optimizer"]["state"][0]["step"].item() == 2
    bn = {k for k in w1 if k.endswith(("running_mean", "running_var"))}
    assert bn and set(site.bn_state) == bn
    site.fit(site.reference, 3, **fit_kwargs(round_config(run, 3, 1e-3, 1.0)))  # from the initial global weights
    assert site.optimizer_state["optimizer"]["state"][0]["step"].item() == 4  # the moments were carried on
    for k in bn:  # round 3 started from the site's own statistics of round 2
        np.testing.assert_array_equal(starts[1][k].numpy(), w1[k])
        assert not np.array_equal(w1[k], site.reference[k])
    saved, groups = site.state_arrays()  # what a new ClientApp process gets back from Flower's Context.state
    saved = {k: v.reshape(1) if k.endswith("/step") else v for k, v in saved.items()}  # Flower's 0-d as (1,)
    before = site.optimizer_state["optimizer"]
    site.optimizer_state, site.bn_state = {}, {}
    site.load_state_arrays(saved, groups)
    after = site.optimizer_state["optimizer"]
    assert after["param_groups"] == json.loads(json.dumps(before["param_groups"])) and set(site.bn_state) == bn
    for idx, st in before["state"].items():
        for k, v in st.items():
            assert after["state"][idx][k].shape == v.shape and torch.equal(after["state"][idx][k], v)
    kept = site.bn_state
    site.fit(site.reference, 1, **fit_kwargs({"server-round": 1, "local-epochs": 1, "mu": 0.0}))  # an older server
    assert site.optimizer_state["optimizer"]["state"][0]["step"].item() == 4 and site.bn_state is kept  # reset, global
    for k in bn:
        np.testing.assert_array_equal(starts[2][k].numpy(), site.reference[k])


def test_simulated_rounds_pick_the_round_the_server_packages(data_dir):
    """simulate_rounds with ``best``: every round each site's evaluation reply (the ClientApp's metrics) passes the
    server's checks and is pooled; the kept round is the highest pooled validation macro AUC (strictly; NaN never),
    with that round's global model, as the ServerApp packages."""
    from medpipe.fl.aggregate import pool_evaluations
    from medpipe.fl.site import Site
    from medpipe.fl.strategy import DEFAULTS, BestRound, improves, simulate_rounds

    tc = {"model": "densenet-test", "image_size": 32, "batch_size": 8, "threads": 1, "workers": 0,
          "max_steps_per_epoch": 2, "deterministic": True}
    sites = [Site(data_dir, name, tc, HAM) for name in ("a", "b")]
    seen: list = []
    cfg = {"rounds": 3, "local_epochs": 1, "strategy": "fedavg", "mu": 0.0, "aggregation": "mean", **DEFAULTS}
    best = BestRound()
    last = simulate_rounds(sites, sites[0].reference, cfg, [n for n in sites[0].reference if "running" not in n
                                                              and "num_batches" not in n], 1e-3, 1.0, best=best,
                           on_round=lambda rnd, arrays, result: seen.append(arrays))
    assert len(best.pooled) == 3 and all(0.0 <= a <= 1.0 for a in best.pooled)
    assert best.round == 1 + int(np.argmax(best.pooled)) and best.auc == max(best.pooled)
    chosen = seen[best.round - 1]
    assert all(np.array_equal(best.arrays[k], chosen[k]) for k in chosen)
    assert all(np.array_equal(last[k], seen[-1][k]) for k in last)
    reply = sites[0].evaluation_reply(chosen)
    per_site, pooled, excluded = pool_evaluations({"a": reply}, HAM)
    assert not excluded and per_site["a"]["n_val"] == reply["num-examples"]
    assert improves(None, 0.5) and improves(0.5, 0.6) and not improves(0.6, 0.6) and not improves(0.5, float("nan"))


def test_site_training_loss_sees_the_calibration_offset(data_dir, monkeypatch):
    """Site.fit passes the offset from the round's class prior to the training engine, and the engine adds it to
    the logits inside the loss only (the model's outputs are untouched)."""
    import torch

    import medpipe.fl.site as site_mod
    from medpipe.train.engine import Events

    seen: dict = {}
    spy_local_fit(monkeypatch, Events.ITERATION_COMPLETED, lambda e: seen.setdefault("engine", e.logit_offset),
                  on_call=lambda kw: seen.__setitem__("offset", kw["logit_offset"]))
    tc = {"model": "densenet-test", "image_size": 32, "batch_size": 8, "threads": 1, "workers": 0,
          "max_steps_per_epoch": 1, "deterministic": True, "mixup_alpha": 0}
    site = site_mod.Site(data_dir, "a", tc, HAM)
    prior = [1 / len(HAM)] * len(HAM)
    _, m = site.fit(site.reference, 1, 1, class_prior=prior)
    assert m["class_counts"] == [int(c) for c in site.source.class_counts] and sum(m["class_counts"]) == m["n_train"]
    assert seen["offset"] == pytest.approx(site_mod.site_logit_offset(site.source.class_counts, prior))
    assert torch.allclose(seen["engine"], torch.tensor(seen["offset"], dtype=torch.float32))
    seen.clear()
    site.fit(site.reference, 1, 1)
    assert seen["offset"] is None and seen["engine"] is None
    from medpipe.train.engine import Engine

    logits, y = torch.zeros(2, 3), torch.tensor([0, 1])
    eng = Engine.__new__(Engine)
    eng._base_loss, eng.loss_terms, eng.logit_offset, eng.device = (
        lambda lg, t: torch.nn.functional.cross_entropy(lg, t)), [], None, torch.device("cpu")
    plain = eng.loss_fn(logits, y)
    eng.set_logit_offset([0.0, 0.0, 5.0])
    assert eng.loss_fn(logits, y) > plain + 1.0  # class 2 raised inside the loss: the true classes lose mass


def test_schedule_across_rounds_is_the_training_recipes_schedule():
    """Round by round, the rates chain without restarts and follow make_schedule's warm-up + cosine over the
    whole run (rounds x local epochs) at every round boundary."""
    import torch

    from medpipe.config import make_config
    from medpipe.train.factories import make_schedule
    from medpipe.fl.strategy import round_lr

    cfg = make_config({"epochs": 12, "lr": 1e-3, "warmup_epochs": 2}).validate()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched, steps, torch_lr = make_schedule(opt, cfg, 50), 50, {}
    for step in range(12 * steps + 1):
        if step % steps == 0:
            torch_lr[step // steps] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    rates = [round_lr(r, 6, 2, cfg.lr, cfg.warmup_epochs) for r in range(1, 7)]  # 6 rounds of 2 local epochs
    assert rates[0][0] == pytest.approx(1e-3 / 20) and rates[0][1] == pytest.approx(1e-3)
    for r, (start, end) in enumerate(rates, start=1):
        assert end == pytest.approx(torch_lr[2 * r], rel=2e-2, abs=1e-7)
        if r > 1:
            assert start == rates[r - 2][1]
    assert rates[-1][1] == pytest.approx(1e-5)


# ----------------------------------------------------------------------------------------- deployments

def _flower_missing() -> str | None:
    failed = FL_BIN.parent / "FAILED"
    if failed.is_file():
        return f"installing Flower into {FL_BIN.parent} failed (make fl): {failed.read_text().strip()[-300:]}"
    if not (FL_BIN / "flower-superlink").is_file():
        return f"Flower is not installed in {FL_BIN.parent} (make fl)"
    return None


needs_flower = pytest.mark.skipif(_flower_missing() is not None, reason=str(_flower_missing()))


def _port() -> int:
    from tests._server import free_port

    return free_port()


def _spawn(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """A real process in its own process group (so SIGKILL reaches everything it started)."""
    fh = open(log, "ab")
    return subprocess.Popen([str(FL_BIN / "medpipe"), *args], stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(30)


def _kill_orphans(port: int) -> None:
    """Flower starts its SuperExec/ServerApp detached (own session): after SIGKILL of a server's process
    group they outlive it; end the ones of this test's SuperLink (found by its port)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(FL_BIN) in cmd and f"127.0.0.1:{port}" in cmd and ("flwr-serverapp" in cmd or "superexec" in cmd):
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _wait(cond, timeout: float, what: str, procs=()):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Ingested synthetic data cut into three non-IID sites, and the federation's credentials."""
    if _flower_missing():
        pytest.skip(_flower_missing())
    from medpipe.cli import main
    from medpipe.fl.partition import partition

    root = tmp_path_factory.mktemp("fl")
    assert main(["synth", str(root / "raw"), "--count", "180", "--width", "48", "--height", "36",
                 "--workers", "2"]) == 0
    assert main(["ingest", str(root / "raw"), "--out", str(root / "data"), "--workers", "2"]) == 0
    summary = partition(root / "data", root / "sites", sites=3, dirichlet=1.0, seed=4)
    assert len(summary["sites"]) == 3
    sites = sorted(summary["sites"])
    subprocess.run([str(FL_BIN / "medpipe"), "fl", "certs", "--out", str(root / "certs"), "--sites", ",".join(sites)],
                   check=True, capture_output=True)
    return {"root": root, "sites": sites, "certs": root / "certs"}


def _server_args(fed, run: Path, port: int, *extra: str) -> list[str]:
    c = fed["certs"]
    return ["fl", "server", "--out", str(run), "--certs", str(c), "--port", str(port),
            "--site-keys", *[str(c / "sites" / f"{s}.pub") for s in fed["sites"]], "--rounds", "2",
            "--straggler-wait", "5", "--round-timeout", "240", "--wait-for-sites", "240", *TRAIN, *extra]


def _site(fed, name: str, port: int, log: Path, *extra: str) -> subprocess.Popen:
    c = fed["certs"]
    # the ClientApp runs in Flower's own process: tests/faults.py must be importable there
    return _spawn(["fl", "site", "--data", str(fed["root"] / "sites" / name), "--server", f"127.0.0.1:{port}",
                   "--ca", str(c / "ca.crt"), "--key", str(c / "sites" / name), "--runtime-port", str(_port()),
                   "--threads", "1", *extra], log, {"PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"})


@pytest.fixture(scope="module")
def deployment(federation):
    """One server and three sites with TLS and site authentication, two FedProx rounds aggregated by the
    coordinate-wise median; the third site is malicious: a float16 update for float32 tensors in round 1, NaN
    weights in round 2."""
    fed, run = federation, federation["root"] / "run_tls"
    port = _port()
    server = _spawn(_server_args(fed, run, port, "--strategy", "fedprox", "--aggregation", "median", "--min-sites", "2",
                                 "--straggler-wait", "60", "--label-skew", "calibrate"),
                    fed["root"] / "server.log")
    bad = fed["sites"][2]
    # the third site's updates are malicious: test handlers on its local training (one local epoch per round)
    attacks = ["--handler", "tests.faults:BadWeightsAtEpoch:1,half", "--handler", "tests.faults:NanWeightsAtEpoch:2"]
    sites = [_site(fed, s, port, fed["root"] / f"site_{s}.log", *(attacks if s == bad else [])) for s in fed["sites"]]
    # a fourth site with the federation's CA but a key pair the server never registered
    rogue_certs = fed["root"] / "rogue_certs"
    subprocess.run([str(FL_BIN / "medpipe"), "fl", "certs", "--out", str(rogue_certs), "--sites", "rogue"],
                   check=True, capture_output=True)
    rogue = _spawn(["fl", "site", "--data", str(fed["root"] / "sites" / fed["sites"][0]), "--server",
                    f"127.0.0.1:{port}", "--ca", str(fed["certs"] / "ca.crt"), "--key", str(rogue_certs / "sites" / "rogue"),
                    "--runtime-port", str(_port()), "--threads", "1"], fed["root"] / "site_rogue.log")
    try:
        server.wait(600)
    finally:
        for p in [server, *sites, rogue]:
            _kill(p)
        _kill_orphans(port)
    return {"run": run, "rc": server.returncode, "bad": bad, "log": fed["root"] / "server.log",
            "rogue_log": fed["root"] / "site_rogue.log", **fed}


@needs_flower
def test_deployment_with_tls_writes_a_package_that_predicts(deployment, capsys):
    from medpipe.cli import main

    run = deployment["run"]
    assert deployment["rc"] == 0, deployment["log"].read_text()[-3000:]
    assert "https://127.0.0.1" in (run / "superlink.log").read_text()  # TLS on the SuperLink
    meta = json.loads((run / "model" / "model.json").read_text())
    fed = meta["federated"]
    assert fed["engine"] == "flower" and fed["strategy"] == "fedprox" and fed["rounds"] == 2
    assert fed["aggregation"] == "median"
    assert set(fed["sites"]) == set(deployment["sites"])  # the malicious one validated but never got into a round
    assert all(v["train_samples"] > 0 for s, v in fed["sites"].items() if s != deployment["bad"])
    assert fed["sites"][deployment["bad"]]["rounds"] == 0 and "train_samples" not in fed["sites"][deployment["bad"]]
    # label skew: the honest sites' training class counts reached the server (for round 2's class prior)
    assert fed["label_skew"].startswith("calibrate")
    counts = json.loads((run / "fl_state.json").read_text())["class_counts"]
    assert set(counts) == set(deployment["sites"]) - {deployment["bad"]}
    assert all(len(c) == len(HAM) and sum(c) == fed["sites"][s]["train_samples"] for s, c in counts.items())
    # the run's rule (prior, the default) from the pooled validation class counts of the best round
    best = meta["metrics"]["val"]
    assert meta["decision"]["default"] == "prior" and meta["decision"]["n_val"] == sum(best["support"]) > 0
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    # batchnorm recompute (the default): every site measured each round's global model's statistics (a query
    # message; the malicious site's attacks are on its training), and the package says so
    assert fed["batchnorm"].startswith("recomputed")
    assert all(set(r["bn_statistics"]["sites"]) == set(deployment["sites"]) and not r["bn_statistics"]["excluded"]
               for r in rounds)
    assert all(set(r["val_sites"]) == set(deployment["sites"]) and 0 <= r["val_pooled"]["macro_auc"] <= 1
               for r in rounds)
    image = next((deployment["root"] / "raw").rglob("*.jpg"))
    capsys.readouterr()
    assert main(["predict", "--model", str(run / "model"), str(image), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert any(c in out for c in HAM)
    assert main(["predict", "--model", str(run / "model"), str(image), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["decision_rule"] == "prior"


@needs_flower
def test_unregistered_site_key_is_refused(deployment):
    """A site with the federation's CA certificate but an unregistered key never joins: the run's sites are
    the three registered ones, and the refused site's own log says it was refused."""
    run = deployment["run"]
    fed = json.loads((run / "model" / "model.json").read_text())["federated"]
    assert "rogue" not in fed["sites"] and set(fed["sites"]) == set(deployment["sites"])
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("rogue" not in json.dumps(r) for r in rounds)
    log = deployment["rogue_log"].read_text()
    assert ROGUE_REFUSED in log and "local training started" not in log, log[-3000:]
    for s in deployment["sites"]:  # the registered ones did train
        assert "local training started" in (deployment["root"] / f"site_{s}.log").read_text()


@needs_flower
def test_nan_update_is_excluded_with_a_reason(deployment):
    run, bad = deployment["run"], deployment["bad"]
    log = (run / "fl_server.log").read_text()
    assert f"round 2: update from site {bad} excluded: tensor" in log and "non-finite values" in log
    r2 = json.loads((run / "metrics.jsonl").read_text().splitlines()[1])
    assert bad in r2["excluded"] and bad not in r2["trained"] and len(r2["trained"]) == 2


@needs_flower
def test_float16_update_is_excluded_and_leaves_the_global_model_to_the_honest_sites(deployment):
    """Through the real SuperLink/ServerApp: a float16 update for float32 tensors is refused (never cast),
    named in the round's log and record; the round aggregates (median) the two honest sites, every tensor of the
    global checkpoint keeps its float32/int64 dtype, and the honest sites' update ratios (recorded) are
    within the default limit."""
    from safetensors.numpy import load_file

    from medpipe.fl.aggregate import MAX_UPDATE_RATIO

    run, bad = deployment["run"], deployment["bad"]
    log = (run / "fl_server.log").read_text()
    assert f"round 1: update from site {bad} excluded: tensor" in log and "is float16, expected float32" in log
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    r1 = rounds[0]
    assert set(r1["excluded"]) == {bad} and set(r1["trained"]) == set(deployment["sites"]) - {bad}
    assert r1["aggregation"] == "median" and set(r1["num_examples"]) == set(deployment["sites"])
    for r in rounds:
        for figures in r["trained"].values():
            assert 0 < figures["update_ratio"] <= MAX_UPDATE_RATIO and figures["examples_bound"] > 0
    arrays = load_file(str(run / "checkpoints" / "global.safetensors"))
    assert {str(a.dtype) for a in arrays.values()} <= {"float32", "int64"}
    assert all(np.isfinite(a).all() for a in arrays.values() if a.dtype == np.float32)


@needs_flower
def test_killed_site_and_killed_server(federation):
    """Min 2 of 3 sites: a site SIGKILLed mid-round 1 does not stop the round and is named as dropped;
    the server SIGKILLed after round 1 resumes from its checkpoint; the killed site rejoins."""
    fed, run = federation, federation["root"] / "run_faults"
    port = _port()
    root = fed["root"]
    server = _spawn(_server_args(fed, run, port, "--min-sites", "2"), root / "f_server.log")
    victim = fed["sites"][0]
    sites = {s: _site(fed, s, port, root / f"f_site_{s}.log") for s in fed["sites"]}
    procs = [server, *sites.values()]
    try:
        vlog = root / f"f_site_{victim}.log"
        _wait(lambda: vlog.is_file() and "round 1 local training started" in vlog.read_text(), 240,
              "the site to start round 1")
        _kill(sites[victim])
        state = run / "fl_state.json"
        _wait(lambda: state.is_file() and json.loads(state.read_text())["round"] >= 1, 240, "round 1's checkpoint")
        _kill(server)
        _kill_orphans(port)
        log = (run / "fl_server.log").read_text()
        assert f"round 1 train: site {victim} dropped" in log, log
        r1 = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        assert victim in r1["dropped"] and len(r1["trained"]) == 2
        # restart the server (all three sites now required) and the killed site: it rejoins
        server = _spawn(_server_args(fed, run, port, "--min-sites", "3"), root / "f_server2.log")
        sites[victim] = _site(fed, victim, port, root / f"f_site_{victim}_2.log")
        procs += [server, sites[victim]]
        server.wait(420)
        assert server.returncode == 0, (root / "f_server2.log").read_text()[-3000:]
    finally:
        for p in procs:
            _kill(p)
        _kill_orphans(port)
    log = (run / "fl_server.log").read_text()
    assert "resuming from the round 1 checkpoint" in log
    rounds = [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2]
    r2 = json.loads((run / "metrics.jsonl").read_text().splitlines()[1])
    assert victim in r2["trained"]
    assert json.loads((run / "fl_state.json").read_text())["status"] == "finished"
    assert (run / "model" / "weights.safetensors").is_file()
