"""The federated global model's BatchNorm statistics (``batchnorm: recompute``): a site's measurement, the
server's checks and pooling, and the in-process rounds that use them (medpipe.fl.bnstats)."""

from __future__ import annotations

import numpy as np
import pytest

from medpipe.fl.aggregate import Guard
from medpipe.fl.bnstats import check_statistics, measure, pool_statistics, statistics_round

HAM = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def _stats(mean, var, dtype=np.float32) -> dict:
    return {"bn.running_mean": np.asarray(mean, dtype), "bn.running_var": np.asarray(var, dtype)}


def test_pooled_statistics_are_those_of_all_the_sites_images():
    """Mean rule: the pooled mean and (population) variance of the sites' images together, from each site's own
    mean, variance and count; robust rules: the element-wise median, like the weights."""
    rng = np.random.default_rng(0)
    parts = [rng.normal(loc, scale, size=(n, 4)) for loc, scale, n in ((0.0, 1.0, 50), (3.0, 0.5, 20), (-1.0, 2.0, 9))]
    replies = [(_stats(p.mean(0), p.var(0), np.float64), len(p)) for p in parts]
    pooled = pool_statistics(replies)
    everything = np.concatenate(parts)
    np.testing.assert_allclose(pooled["bn.running_mean"], everything.mean(0), rtol=1e-10)
    np.testing.assert_allclose(pooled["bn.running_var"], everything.var(0), rtol=1e-10)
    median = pool_statistics(replies, "median")
    np.testing.assert_allclose(median["bn.running_mean"], np.median([p.mean(0) for p in parts], axis=0))


@pytest.mark.parametrize("bad, reason", [
    ({"bn.running_mean": np.zeros(3, np.float32)}, "missing"),
    ({**_stats(np.zeros(3), np.ones(3)), "bn.extra": np.zeros(3, np.float32)}, "unexpected"),
    (_stats(np.zeros(3), np.ones(3), np.float16), "float16"),
    (_stats(np.zeros(4), np.ones(4)), "[4]"),
    (_stats([0.0, np.nan, 0.0], np.ones(3)), "non-finite"),
    (_stats(np.zeros(3), [1.0, -1.0, 1.0]), "negative variances"),
])
def test_a_bad_statistics_reply_is_excluded_with_its_reason(bad, reason):
    model = {**_stats(np.zeros(3), np.ones(3)), "bn.weight": np.ones(3, np.float32)}
    honest = _stats([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    out, used, excluded = statistics_round(model, {"good": (honest, {"num-examples": 10}),
                                                   "bad": (bad, {"num-examples": 10})})
    assert used == {"good": 10} and list(excluded) == ["bad"] and reason in excluded["bad"]
    np.testing.assert_array_equal(out["bn.running_var"], honest["bn.running_var"])
    assert out["bn.weight"] is model["bn.weight"]  # only the statistics change


def test_statistics_counts_are_checked_and_nothing_usable_keeps_the_model():
    model = _stats(np.zeros(3), np.ones(3))
    guard = Guard(site_examples={"s": 5})
    assert "exceeds 5" in check_statistics(model, {"num-examples": 6}, model, guard.bound("s"))[1]
    assert "not an integer" in check_statistics(model, {"num-examples": 2.5}, model, guard.bound("s"))[1]
    assert "malformed" in check_statistics(model, {}, model, guard.bound("s"))[1]
    out, used, excluded = statistics_round(model, {"s": (_stats(np.ones(3), np.ones(3)), {"num-examples": 6})}, guard)
    assert not used and "exceeds" in excluded["s"] and out == model


def test_measure_averages_the_batches_with_dropout_off():
    """Each BatchNorm layer's statistics are the average of the batches' (unbiased variance, as BatchNorm keeps
    them), measured with dropout off (twice the same), the model left in eval mode with its momentum."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(3))
    batches = [torch.randn(8, 3) * 2 + 1, torch.randn(5, 3)]
    first = measure(model, batches)
    assert not model.training and model[1].momentum == 0.1
    np.testing.assert_allclose(first["1.running_mean"], np.mean([b.mean(0).numpy() for b in batches], axis=0),
                               rtol=1e-5)
    np.testing.assert_allclose(first["1.running_var"], np.mean([b.var(0).numpy() for b in batches], axis=0),
                               rtol=1e-5)
    again = measure(model, batches)
    assert all(np.array_equal(first[k], again[k]) for k in first)


def test_simulated_rounds_recompute_only_the_statistics(data_dir):
    """With ``batchnorm: recompute`` the global model after each round carries the statistics its own weights give
    on the sites' training images (pooled), where ``global`` carries the sites' averaged ones; the weights, and so
    the training, are the same either way (the sites train with batch statistics)."""
    from medpipe.fl.site import Site
    from medpipe.fl.strategy import DEFAULTS, simulate_rounds

    tc = {"model": "densenet-test", "image_size": 32, "batch_size": 8, "threads": 1, "workers": 0,
          "max_steps_per_epoch": 2, "deterministic": True}
    sites = [Site(data_dir, name, tc, HAM) for name in ("a", "b")]
    params = [n for n in sites[0].reference if "running" not in n and "num_batches" not in n]
    runs = {}
    for bn in ("recompute", "global"):
        cfg = {"rounds": 1, "local_epochs": 1, "strategy": "fedavg", "mu": 0.0, "aggregation": "mean",
               **DEFAULTS, "batchnorm": bn}
        runs[bn] = simulate_rounds(sites, sites[0].reference, cfg, params, 1e-3, 1.0)
    new, old = runs["recompute"], runs["global"]
    assert DEFAULTS["batchnorm"] == "recompute"
    assert all(np.array_equal(new[k], old[k]) for k in params)
    measured = {s.name: s.bn_statistics(new) for s in sites}
    assert {n for _, n in measured.values()} == {sites[0].n_train}
    want = pool_statistics(list(measured.values()))
    for name, value in want.items():
        np.testing.assert_allclose(new[name], value, rtol=1e-6, atol=1e-7)
    assert max(float(np.abs(old[k] - new[k]).max()) for k in want) > 1e-3


def test_resuming_a_run_names_the_option_that_changed():
    """A run folder started with the former default (averaged statistics) is refused by a server with the new one,
    naming the option, both values and how to resume; a folder from before the record still gets the generic
    reason; an unchanged configuration resumes."""
    from medpipe.fl.server import config_digest, resume_refusal

    old = {"classes": ["a", "b"], "strategy": "fedavg", "mu": 0.0, "local_epochs": 1, "train_config": {"lr": 1e-3},
           "batchnorm": "global", "server_optimizer": "fedavgm"}
    new = {**old, "batchnorm": "recompute"}
    state = {"config_digest": config_digest(old), "resume_config": dict(old)}
    assert resume_refusal(state, old) is None
    why = resume_refusal(state, new)
    assert "batchnorm was global, now recompute (pass --batchnorm global to resume)" in why and "strategy" not in why
    assert "must match" in resume_refusal({"config_digest": config_digest(old)}, new)
