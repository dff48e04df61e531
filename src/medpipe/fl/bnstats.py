"""BatchNorm statistics of the federated global model (``batchnorm: recompute``, the default).

After the server's step the global weights are no model that any site trained: running statistics averaged
like the weights describe the sites' local models, not the global one, and a server step larger than the
plain average (FedAvgM with server lr 2) moves the weights further still. In a deep network the mismatch
compounds layer by layer: on the synthetic default the DenseNet121 global model scored macro AUC 0.50 in
eval mode after rounds 2 and 3 while the same weights with statistics measured for them scored 0.84 and 0.91
(docs/guides/federated.md). So after each server step every site measures the new global model's statistics
on its own training images (:func:`measure`: forward passes with only the BatchNorm layers in training mode,
no gradients, each batch weighted alike, as ``torch.optim.swa_utils.update_bn`` but with dropout off) and
sends them back with its image count; the server checks each reply (:func:`check_statistics`) and pools them
(:func:`pool_statistics`): for the ``mean`` aggregation the pooled mean and variance of all the sites' images
(``sum n_k mu_k / N`` and ``sum n_k (var_k + mu_k^2) / N - mu^2``), for ``median`` / ``trimmed-mean`` the same
robust rule as the weights, per element. Only the statistics travel back (DenseNet121: 0.3 MB per site).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from medpipe.fl.aggregate import TRIM_FRACTION, Guard, aggregate, check_count

BN_BUFFERS = ("running_mean", "running_var")


def is_bn_buffer(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in BN_BUFFERS


def statistic_names(arrays: Iterable[str]) -> list[str]:
    """The BatchNorm running means and variances among a model's tensor names, in order."""
    return sorted(n for n in arrays if is_bn_buffer(n))


def measure(model, batches: Iterable) -> dict[str, np.ndarray]:
    """The running statistics of ``model``'s BatchNorm layers over ``batches`` (input tensors): each layer's
    statistics reset, then one forward pass per batch with only the BatchNorm layers in training mode and a
    cumulative average (momentum None), no gradients; the model is left in eval mode, its momenta restored."""
    import torch  # deferred: the server and its checks run without torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    state = model.state_dict()
    return {n: state[n].detach().cpu().numpy().copy() for n in statistic_names(state)}


def check_statistics(stats: Mapping[str, np.ndarray], metrics: Mapping, global_arrays: Mapping[str, np.ndarray],
                     bound: tuple[int, str]) -> tuple[int | None, str | None]:
    """One site's statistics reply: exactly the global model's BatchNorm means and variances, each of its dtype and
    shape, finite, variances non-negative, and ``num-examples`` a positive integer within ``bound``; returns
    (the image count, None) or (None, the reason)."""
    if not isinstance(metrics, Mapping) or "num-examples" not in metrics:
        return None, "malformed reply: metrics need num-examples"
    n, reason = check_count(metrics["num-examples"], bound)
    if reason:
        return None, reason
    want, got = set(statistic_names(global_arrays)), set(stats)
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        return None, (f"statistics tensors differ from the model's: missing {missing[:3]}" if missing else
                      f"statistics tensors differ from the model's: unexpected {extra[:3]}")
    for name in sorted(want):
        ref, arr = np.asarray(global_arrays[name]), np.asarray(stats[name])
        if arr.dtype != ref.dtype or arr.shape != ref.shape:
            return None, f"tensor {name} is {arr.dtype}{list(arr.shape)}, the model's is {ref.dtype}{list(ref.shape)}"
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        if bad:
            return None, f"tensor {name} has {bad} non-finite values"
        if name.endswith("running_var") and (arr < 0).any():
            return None, f"tensor {name} has negative variances"
    return n, None


def pool_statistics(replies: list[tuple[Mapping[str, np.ndarray], int]], method: str = "mean",
                    trim: float = TRIM_FRACTION) -> dict[str, np.ndarray]:
    """The global model's statistics from checked ``(statistics, images)`` replies (see the module docstring)."""
    if not replies:
        raise ValueError("no statistics to pool")
    if method != "mean":
        return aggregate([(dict(s), n) for s, n in replies], method, trim)
    total = float(sum(n for _, n in replies))
    out = {}
    for name in statistic_names(replies[0][0]):
        if not name.endswith("running_mean"):
            continue
        base, var_name = name[: -len("running_mean")], name[: -len("running_mean")] + "running_var"
        mean = sum(np.asarray(s[name], np.float64) * (n / total) for s, n in replies)
        second = sum((np.asarray(s[var_name], np.float64) + np.asarray(s[name], np.float64) ** 2) * (n / total)
                     for s, n in replies)
        dtype = np.asarray(replies[0][0][name]).dtype
        out[name], out[base + "running_var"] = mean.astype(dtype), np.maximum(second - mean * mean, 0.0).astype(dtype)
    return out


def statistics_round(global_arrays: Mapping[str, np.ndarray], replies: Mapping[str, tuple[Mapping, Mapping]],
                     guard: Guard | None = None, method: str = "mean",
                     trim: float = TRIM_FRACTION) -> tuple[dict[str, np.ndarray], dict[str, int], dict[str, str]]:
    """The global model with its BatchNorm statistics pooled from ``{site: (statistics, metrics)}``: returns the
    new arrays, the sites used (name -> images) and the replies excluded (name -> reason). With no usable reply
    the model is returned as it was (its statistics the aggregate's)."""
    guard = guard or Guard()
    used, excluded, good = {}, {}, []
    for site, (stats, metrics) in sorted(replies.items()):
        n, reason = check_statistics(stats, metrics, global_arrays, guard.bound(site))
        if reason:
            excluded[site] = reason
        else:
            used[site] = n
            good.append((stats, n))
    out = dict(global_arrays)
    if good:
        out.update(pool_statistics(good, method, trim))
    return out, used, excluded
