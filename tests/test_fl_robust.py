"""The federated server's distrust of its sites, in-process on the aggregation functions (small tensors).

Each attack a site can make with a training or evaluation reply (10^15 examples, an int64 or float16
update for float32 tensors, a finite 3e38 update, NaN, a malformed evaluation histogram) is excluded by
site name with its reason, and what is aggregated equals the aggregate of the honest sites alone, for
every aggregation method. The same checks through the real Flower server process are in
tests/test_fl.py (the deployment's malicious site). The robust methods are compared with Flower's own
FedMedian / FedTrimmedAvg functions in the Flower venv.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medpipe.fl.aggregate import (BINS, METHODS, Guard, aggregate, aggregate_round, check_evaluation,
                                  pool_evaluations, pooled_metrics, site_statistics, update_ratio)
from medpipe.fl.strategy import ServerOptimizer

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["a", "b", "c"]


def _global(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"conv.weight": rng.normal(size=(4, 3)).astype(np.float32), "bn.bias": rng.normal(size=3).astype(np.float32),
            "bn.num_batches_tracked": np.array(7, np.int64)}


def _honest(g: dict, seed: int, steps: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + seed)
    return {k: (v + 0.05 * rng.normal(size=v.shape)).astype(v.dtype) if v.dtype.kind == "f" else np.asarray(v + steps)
            for k, v in g.items()}


def _attacks(g: dict) -> dict[str, tuple[dict, dict]]:
    """site name -> (update, metrics) for each attack from the hardening review."""
    ok = _honest(g, 9)
    nan = dict(ok, **{"conv.weight": np.where(np.eye(4, 3) > 0, np.nan, ok["conv.weight"]).astype(np.float32)})
    return {
        "many": (ok, {"num-examples": 10**15, "train_loss": 0.1}),
        "int64": (dict(ok, **{"conv.weight": np.round(ok["conv.weight"] * 1000).astype(np.int64)}),
                  {"num-examples": 50, "train_loss": 0.1}),
        "half": (dict(ok, **{"conv.weight": ok["conv.weight"].astype(np.float16)}),
                 {"num-examples": 50, "train_loss": 0.1}),
        "huge": (dict(ok, **{"conv.weight": np.full((4, 3), 3e38, np.float32)}),
                 {"num-examples": 50, "train_loss": 0.1}),
        "nan": (nan, {"num-examples": 50, "train_loss": 0.1}),
    }


REASONS = {"many": "num-examples 1000000000000000 exceeds 1000 (its registered image count)",
           "int64": "tensor conv.weight is int64, expected float32 (updates are never cast)",
           "half": "tensor conv.weight is float16, expected float32 (updates are never cast)",
           "huge": "times the global model's norm (limit 5, --max-update-ratio)",
           "nan": "tensor conv.weight has 3 non-finite values (NaN or inf)"}


@pytest.mark.parametrize("method", METHODS)
def test_each_attack_is_excluded_and_the_aggregate_is_the_honest_sites_alone(method):
    g = _global()
    honest = {f"site{i}": (_honest(g, i), {"num-examples": 40 + 30 * i, "train_loss": 0.5}) for i in range(5)}
    guard = Guard(max_update_ratio=5.0, max_examples=10**6, site_examples={"many": 1000})
    result = aggregate_round(g, {**honest, **_attacks(g)}, guard, method, trim=0.2)
    assert set(result.excluded) == set(REASONS) and set(result.used) == set(honest)
    for site, reason in REASONS.items():
        assert reason in result.excluded[site], (site, result.excluded[site])
    assert result.num_examples["many"] == 10**15 and result.num_examples["site1"] == 70  # recorded as reported
    assert result.used["site0"]["examples_bound"] == 10**6 and 0 < result.used["site0"]["update_ratio"] < 0.2
    expected = aggregate([(u, m["num-examples"]) for u, m in honest.values()], method, 0.2)
    assert set(result.arrays) == set(g) and not result.kept
    for k, v in expected.items():
        assert result.arrays[k].dtype == g[k].dtype and result.arrays[k].shape == g[k].shape
        np.testing.assert_array_equal(result.arrays[k], v)
    alone = aggregate_round(g, honest, guard, method, trim=0.2)  # the same with the attackers absent
    for k in g:
        np.testing.assert_array_equal(result.arrays[k], alone.arrays[k])


def test_every_site_excluded_keeps_the_previous_global_model():
    g = _global()
    result = aggregate_round(g, _attacks(g), Guard(site_examples={"many": 1000}), "mean", min_updates=1)
    assert result.kept and not result.used and len(result.excluded) == 5
    assert "every update was excluded (5); the global model stays the previous round's" == result.note
    for k in g:
        np.testing.assert_array_equal(result.arrays[k], g[k])
    few = aggregate_round(g, {"a": (_honest(g, 1), {"num-examples": 5, "train_loss": 1.0})}, Guard(), min_updates=2)
    assert few.kept and "1 valid update(s), fewer than the 2 needed" in few.note


def test_sample_counts_and_metrics_are_schema_checked():
    g = _global()
    upd = _honest(g, 1)
    cases = {"zero": (0, "not positive"), "float": (12.5, "not an integer"), "bool": (True, "not an integer"),
             "cap": (10**6 + 1, "exceeds 1000000 (the --max-examples cap)"), "text": ("7", "not an integer")}
    replies = {name: (upd, {"num-examples": n, "train_loss": 0.3}) for name, (n, _) in cases.items()}
    replies["noloss"] = (upd, {"num-examples": 5})
    replies["badloss"] = (upd, {"num-examples": 5, "train_loss": [1.0]})
    replies["shape"] = (dict(upd, **{"bn.bias": np.zeros(4, np.float32)}), {"num-examples": 5, "train_loss": 0.3})
    replies["missing"] = ({k: v for k, v in upd.items() if k != "bn.bias"}, {"num-examples": 5, "train_loss": 0.3})
    result = aggregate_round(g, replies, Guard())
    for name, (_, reason) in cases.items():
        assert reason in result.excluded[name]
    assert "train_loss" in result.excluded["noloss"] and "not a number" in result.excluded["badloss"]
    assert "shape (4,)" in result.excluded["shape"] and "missing 1 tensors" in result.excluded["missing"]
    assert result.kept


def test_integer_buffers_may_only_count_the_steps_a_site_can_take():
    g = _global()  # num_batches_tracked 7; a site of 20 images, 2 local epochs: at most 40 steps
    counter = "bn.num_batches_tracked"
    cases = {"honest": 7 + 40, "still": 7, "backwards": 6, "far": 7 + 41, "huge": 2**62, "wrap": -2**63}
    replies = {name: (dict(_honest(g, 1), **{counter: np.array(v, np.int64)}), {"num-examples": 20, "train_loss": 0.3})
               for name, v in cases.items()}
    result = aggregate_round(g, replies, Guard(local_epochs=2))
    assert set(result.used) == {"honest", "still"}
    assert "moved by -1 in one round" in result.excluded["backwards"]
    assert "moved by 41" in result.excluded["far"] and "at most 40 steps" in result.excluded["far"]
    assert f"moved by {2**62 - 7}" in result.excluded["huge"] and "moved by" in result.excluded["wrap"]
    assert int(result.arrays[counter]) == 47  # the honest sites' counters alone
    assert Guard.from_config({"local_epochs": 3}).local_epochs == 3


def test_class_counts_of_another_vocabulary_length_are_excluded_with_the_reason():
    """A training reply's class-counts must hold one count per class of the run (the vocabulary in the run
    configuration): a list of another length is refused where the reply is checked, so the federation's class
    prior is never built from it."""
    g = _global()
    replies = {name: (_honest(g, i), {"num-examples": 20, "train_loss": 0.3, "class-counts": counts})
               for i, (name, counts) in enumerate({"right": [5, 0, 15], "short": [5, 15], "long": [5, 0, 15, 0]}.items())}
    guard = Guard.from_config({"classes": CLASSES})
    assert guard.n_classes == 3 and Guard.from_config({}).n_classes is None
    result = aggregate_round(g, replies, guard)
    assert set(result.used) == {"right"} and result.used["right"]["class_counts"] == [5, 0, 15]
    assert result.excluded["short"] == "class-counts has 2 values, not one per class of the run's 3"
    assert result.excluded["long"] == "class-counts has 4 values, not one per class of the run's 3"


def test_update_ratio_is_computed_without_overflow():
    g = {"w": np.ones(4, np.float32)}
    assert update_ratio({"w": np.full(4, 3.0, np.float32)}, g) == pytest.approx(2.0)
    assert update_ratio({"w": np.full(4, 3e38, np.float32)}, g) == pytest.approx(3e38, rel=1e-6)
    assert update_ratio({"w": np.zeros(4, np.float32)}, {"w": np.zeros(4, np.float32)}) == 0.0


def _eval_reply(seed: int, n: int = 60) -> dict:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3)) + 2 * np.eye(3)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return {"num-examples": n, "val_loss": 0.7, "macro_auc": 0.8, "balanced_accuracy": 0.6,
            **site_statistics(y, p, 3)}


def test_malformed_evaluation_replies_are_excluded_and_pooling_uses_the_honest_ones():
    honest = {f"site{i}": _eval_reply(i) for i in range(3)}
    good = _eval_reply(7)
    bad = {
        "short": dict(good, hist_pos=good["hist_pos"][:-1]),  # the review's case: reshape raised ValueError
        "floats": dict(good, hist_neg=[float(x) for x in good["hist_neg"]]),
        "negative": dict(good, confusion=[-1] + good["confusion"][1:]),
        "inflated": dict(good, hist_pos=[x * 1000 for x in good["hist_pos"]]),
        "many": dict(good, **{"num-examples": 10**15}),
        "noconf": {k: v for k, v in good.items() if k != "confusion"},
        "auc": dict(good, macro_auc=7.0),
        "scalar": dict(good, hist_pos=3),
        "ragged": dict(good, hist_pos=[0, [1]] + good["hist_pos"][2:]),  # np.ndim raised ValueError
    }
    per_site, pooled, excluded = pool_evaluations({**honest, **bad}, CLASSES)
    assert set(excluded) == set(bad) and set(per_site) == set(honest)
    assert "hist_pos must be a list of 3000 integers, got 2999" in excluded["short"]
    assert "integers only" in excluded["floats"] and "negative" in excluded["negative"]
    assert "do not agree" in excluded["inflated"] and "exceeds 1000000" in excluded["many"]
    assert "missing confusion" in excluded["noconf"] and "outside [0, 1]" in excluded["auc"]
    assert "list of 3000 integers" in excluded["scalar"]
    assert "integers only" in excluded["ragged"]
    assert pooled == pooled_metrics(list(honest.values()), CLASSES)
    assert per_site["site0"] == {"n_val": 60, "macro_auc": 0.8, "balanced_accuracy": 0.6, "val_loss": 0.7}
    assert check_evaluation(good, 3, (59, "its registered image count"))[1] == \
        "num-examples 60 exceeds 59 (its registered image count)"
    none_left = pool_evaluations(bad, CLASSES)
    assert none_left[0] == {} and none_left[1]["n"] == 0 and len(none_left[2]) == len(bad)
    assert BINS == 1000


def test_evaluation_round_pools_the_checked_replies_and_names_every_excluded_site():
    """The ServerApp and simulate_rounds take a round's evaluation from one function: the checked replies pooled,
    and beside the checks' reasons the sites whose reply could not be read (``failed``)."""
    from medpipe.fl.strategy import evaluation_round

    honest = {f"site{i}": _eval_reply(i) for i in range(2)}
    replies = {**honest, "auc": dict(_eval_reply(5), macro_auc=7.0)}
    ev = evaluation_round(replies, CLASSES, Guard(), failed={"down": "the site could not evaluate: out of memory"})
    assert set(ev.per_site) == set(honest) and ev.pooled == pooled_metrics(list(honest.values()), CLASSES)
    assert set(ev.excluded) == {"auc", "down"} and "outside [0, 1]" in ev.excluded["auc"]
    assert ev.excluded["down"] == "the site could not evaluate: out of memory"
    per_site, pooled, excluded = evaluation_round(honest, CLASSES, Guard())  # unpacks as the server takes it
    assert per_site == ev.per_site and pooled == ev.pooled and excluded == {}


def test_robust_aggregation_equals_flowers_own_functions():
    """Flower's FedMedian / FedTrimmedAvg maths (flwr.server.strategy.aggregate), run in the Flower venv,
    gives the same tensors as medpipe's aggregate() on the same updates (7 sites: the trim drops one each end)."""
    fl_python = Path(os.environ.get("MEDPIPE_FL_VENV", ROOT / ".venv-fl")) / "bin" / "python"
    if not fl_python.is_file():
        pytest.skip(f"Flower venv {fl_python.parent.parent} not installed (make fl)")
    script = r"""
import json, sys
import numpy as np
from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg
from medpipe.fl.aggregate import aggregate
rng = np.random.default_rng(3)
ups = [({"w": rng.normal(size=(5, 4)).astype(np.float32), "b": rng.normal(size=6).astype(np.float32)}, 10 + i)
       for i in range(7)]
ups[2][0]["w"][0, 0] = 1e6  # an outlier the robust methods ignore
keys = ["w", "b"]
as_lists = [([u[k] for k in keys], n) for u, n in ups]
out = {}
for name, theirs in (("median", aggregate_median(as_lists)), ("trimmed-mean", aggregate_trimmed_avg(as_lists, 0.2))):
    ours = aggregate(ups, name, 0.2)
    out[name] = max(float(np.max(np.abs(ours[k] - np.asarray(t, np.float64)))) for k, t in zip(keys, theirs))
    out[name + "_dtype"] = str(ours["w"].dtype)
print(json.dumps(out))
"""
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    res = subprocess.run([str(fl_python), "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["median"] < 1e-6 and out["trimmed-mean"] < 1e-6, out
    assert out["median_dtype"] == out["trimmed-mean_dtype"] == "float32"


def test_server_optimizers_equal_flowers_own_strategies():
    """Three rounds of FedAvgM / FedAdam / FedYogi: medpipe's ServerOptimizer after the weighted mean gives
    the tensors Flower's own strategies (flwr.server.strategy, in the Flower venv) give for the same
    site updates."""
    fl_python = Path(os.environ.get("MEDPIPE_FL_VENV", ROOT / ".venv-fl")) / "bin" / "python"
    if not fl_python.is_file():
        pytest.skip(f"Flower venv {fl_python.parent.parent} not installed (make fl)")
    script = r"""
import json
import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAdam, FedAvgM, FedYogi
from medpipe.fl.aggregate import weighted_average
from medpipe.fl.strategy import ServerOptimizer
rng = np.random.default_rng(5)
keys = ["w", "b"]
init = {"w": rng.normal(size=(5, 4)).astype(np.float32), "b": rng.normal(size=6).astype(np.float32)}
out = {}
for name, theirs in (("fedavgm", FedAvgM(server_learning_rate=1.0, server_momentum=0.5,
                                         initial_parameters=ndarrays_to_parameters([init[k] for k in keys]))),
                     ("fedadam", FedAdam(eta=0.01, initial_parameters=ndarrays_to_parameters([init[k] for k in keys]))),
                     ("fedyogi", FedYogi(eta=0.01, initial_parameters=ndarrays_to_parameters([init[k] for k in keys])))):
    ours = ServerOptimizer(name, frozenset(keys), lr=1.0 if name == "fedavgm" else 0.01,
                           momentum=0.5 if name == "fedavgm" else None)
    g, worst = dict(init), 0.0
    for rnd in (1, 2, 3):
        ups = [({k: (v + 0.05 * rng.normal(size=v.shape)).astype(np.float32) for k, v in g.items()}, 10 + 7 * i)
               for i in range(3)]
        res = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters([u[k] for k in keys]), n, {})) for u, n in ups]
        params, _ = theirs.aggregate_fit(rnd, res, [])
        t = dict(zip(keys, parameters_to_ndarrays(params)))
        g = ours.apply(g, weighted_average(ups))
        worst = max(worst, max(float(np.max(np.abs(g[k] - np.asarray(t[k], np.float64)))) for k in keys))
        g = {k: np.asarray(t[k], np.float32) for k in keys}  # both continue from the same global model
    out[name] = worst
print(json.dumps(out))
"""
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    res = subprocess.run([str(fl_python), "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(out) == {"fedavgm", "fedadam", "fedyogi"} and max(out.values()) < 1e-5, out


def test_server_optimizer_steps_parameters_only_and_keeps_its_state(tmp_path):
    """Buffers (BatchNorm statistics, counters) take the aggregate; the optimiser's moments survive a restart."""
    g = {"conv.weight": np.ones((2, 2), np.float32), "bn.running_var": np.ones(2, np.float32),
         "bn.num_batches_tracked": np.array(4, np.int64)}
    agg = {"conv.weight": np.full((2, 2), 0.5, np.float32), "bn.running_var": np.full(2, 0.25, np.float32),
           "bn.num_batches_tracked": np.array(9, np.int64)}
    opt = ServerOptimizer("fedavgm", frozenset({"conv.weight"}), lr=1.0, momentum=0.5)
    first = opt.apply(g, agg)
    np.testing.assert_allclose(first["conv.weight"], 0.5)  # the first step is the aggregate itself
    assert first["bn.running_var"] is agg["bn.running_var"] and int(first["bn.num_batches_tracked"]) == 9
    restored = ServerOptimizer("fedavgm", frozenset({"conv.weight"}), lr=1.0, momentum=0.5)
    from medpipe.fl.server import load_arrays, save_arrays  # the server's checkpoint format (safetensors)

    digest = save_arrays(tmp_path / "server_optimizer.safetensors", opt.state_arrays(), {"round": 1})
    restored.load_state_arrays(load_arrays(tmp_path / "server_optimizer.safetensors", digest))
    assert restored.step == 1 and set(restored.m) == {"conv.weight"}
    again = {"conv.weight": np.full((2, 2), 0.25, np.float32)}
    np.testing.assert_allclose(restored.apply(first, dict(agg, **again))["conv.weight"], 0.25 - 0.5 * 0.5)
    np.testing.assert_allclose(opt.apply(first, dict(agg, **again))["conv.weight"], 0.0)  # momentum: 0.5 - (0.25 + 0.25)
    assert ServerOptimizer("fedavg").apply(g, agg) == agg
    with pytest.raises(ValueError, match="unknown server optimiser"):
        ServerOptimizer("fedsgd")


def test_server_options_reach_the_run_configuration(tmp_path):
    """The CLI's robust-aggregation options land in the run configuration the ServerApp reads; bad ones
    are refused before anything starts."""
    from medpipe.cli import main
    from medpipe.errors import MedpipeError
    from medpipe.fl.deploy import guard_config

    with pytest.raises(MedpipeError, match="--trim must be in"):
        guard_config("trimmed-mean", 0.5, 5.0, 10, {}, [])
    with pytest.raises(MedpipeError, match=r"--site-examples names \['zed'\]"):
        guard_config("median", 0.2, 5.0, 10, {"zed": 4}, ["keys/a.pub", "keys/b.pub"])
    with pytest.raises(MedpipeError, match="--max-update-ratio"):
        guard_config("mean", 0.2, float("nan"), 10, {}, [])
    assert guard_config("median", 0.1, 3.0, 10, {"a": 4}, ["keys/a.pub"]) == {
        "aggregation": "median", "trim": 0.1, "max_update_ratio": 3.0, "max_examples": 10, "site_examples": {"a": 4}}
    from medpipe.cli import build_parser
    from medpipe.fl.cli import _server_kwargs

    args = build_parser().parse_args(["fl", "simulate", "--data", "d", "--out", "r", "--aggregation", "trimmed-mean",
                                      "--trim", "0.1", "--max-update-ratio", "2.5", "--max-examples", "99",
                                      "--site-examples", "a=7", "--site-examples", "b=8"])
    kw = _server_kwargs(args)
    assert guard_config(kw["aggregation"], kw["trim"], kw["max_update_ratio"], kw["max_examples"],
                        kw["site_examples"], []) == {"aggregation": "trimmed-mean", "trim": 0.1, "max_update_ratio": 2.5,
                                                     "max_examples": 99, "site_examples": {"a": 7, "b": 8}}
    assert main(["fl", "server", "--out", str(tmp_path / "r"), "--insecure", "--aggregation", "median",
                 "--site-examples", "a=12x"]) == 2
    assert main(["fl", "server", "--out", str(tmp_path / "r"), "--insecure", "--aggregation", "median",
                 "--max-update-ratio", "0"]) == 2
    assert not (tmp_path / "r" / "fl_config.json").exists()


def test_server_lr_auto_scales_each_round_by_the_sites_image_counts():
    """``--server-lr auto``: N^2 / sum(n_k^2) from the round's aggregated sites (1 for one site, K for K equal
    sites), applied as FedAvgM's rate that round; refused for the adaptive optimisers and for bad values."""
    from medpipe.fl.strategy import algorithm_config, auto_server_lr

    assert auto_server_lr([500]) == pytest.approx(1.0)
    assert auto_server_lr([100, 100, 100, 100]) == pytest.approx(4.0)
    assert auto_server_lr([278, 964, 190]) == pytest.approx(1432 ** 2 / (278 ** 2 + 964 ** 2 + 190 ** 2))
    g = {"w": np.zeros(3, np.float32)}
    agg = {"w": np.ones(3, np.float32)}
    opt = ServerOptimizer("fedavgm", frozenset({"w"}), lr="auto", momentum=0.0)
    np.testing.assert_allclose(opt.apply(g, agg, [100, 100, 100])["w"], 3.0)  # delta 1 times lr 3
    np.testing.assert_allclose(opt.apply(g, agg, [300])["w"], 1.0)  # next round, one site left: lr 1
    assert "auto = 1" in opt.describe()
    with pytest.raises(ValueError, match="image counts"):
        opt.apply(g, agg)
    with pytest.raises(ValueError, match="positive"):
        auto_server_lr([10, 0])
    assert algorithm_config(server_lr="AUTO")["server_lr"] == "auto"
    assert algorithm_config(server_lr="1.5")["server_lr"] == 1.5
    with pytest.raises(ValueError, match="fedavgm"):
        algorithm_config(server_optimizer="fedadam", server_lr="auto")
    with pytest.raises(ValueError, match="positive number or auto"):
        algorithm_config(server_lr="fast")
    with pytest.raises(ValueError, match="fedavgm"):
        ServerOptimizer("fedyogi", frozenset({"w"}), lr="auto")


def test_label_skew_calibration_offsets_counts_and_round_configuration():
    """label_skew calibrate: a site's offset is log(its class frequencies / the federation's) (smoothed, finite
    for a class it lacks); sites' class counts are checked (non-negative integers adding up to num-examples);
    the round configuration carries the federation's frequencies only when asked and once counts exist."""
    from medpipe.fl.aggregate import check_class_counts
    from medpipe.fl.strategy import (algorithm_config, class_prior_from_counts, fit_kwargs, round_config,
                                     site_logit_offset)

    prior = class_prior_from_counts({"a": [10, 0, 30], "b": [30, 20, 10]}, smoothing=0.0)
    assert prior == pytest.approx([40 / 100, 20 / 100, 40 / 100])
    assert class_prior_from_counts({}) is None
    alone = [10, 0, 30]  # one site is the federation: the same smoothing on both sides leaves no offset
    assert site_logit_offset(alone, class_prior_from_counts({"a": alone})) == pytest.approx([0.0, 0.0, 0.0], abs=1e-12)
    off = site_logit_offset([10, 0, 30], prior)
    assert off[0] == pytest.approx(np.log(10.5 / 41.5) - np.log(0.4))
    assert np.isfinite(off).all() and off[1] == pytest.approx(np.log(0.5 / 41.5) - np.log(0.2))  # the class the site lacks: strongly negative, finite
    assert site_logit_offset([20, 10, 20], [0.4, 0.2, 0.4]) == pytest.approx([0.0, 0.0, 0.0], abs=0.02)
    with pytest.raises(ValueError, match="one value per class"):
        site_logit_offset([1, 2], [0.5, 0.3, 0.2])
    assert check_class_counts([3, 0, 2], 5, 3) == ([3, 0, 2], None)
    assert "add up to 4" in check_class_counts([2, 2], 5, 2)[1]
    assert "non-negative integers" in check_class_counts([2, -1, 4], 5, 3)[1]
    assert "non-negative integers" in check_class_counts("3,2", 5, 2)[1]
    cfg = {"rounds": 4, "local_epochs": 1, "lr_schedule": "rounds", "label_skew": "calibrate"}
    assert "class-prior" not in round_config(cfg, 1, 1e-3, 1.0, None)  # round 1: no counts yet
    rc = round_config(cfg, 2, 1e-3, 1.0, prior)
    assert rc["class-prior"] == pytest.approx(prior) and fit_kwargs(rc)["class_prior"] == pytest.approx(prior)
    assert "class-prior" not in round_config({**cfg, "label_skew": "none"}, 2, 1e-3, 1.0, prior)
    assert fit_kwargs({"server-round": 1, "local-epochs": 1})["class_prior"] is None  # an older server
    assert algorithm_config()["label_skew"] == "calibrate"
    with pytest.raises(ValueError, match="--label-skew must be one of"):
        algorithm_config(label_skew="balance")

