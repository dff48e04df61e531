"""The federated algorithm across rounds: each round's learning rate, the site policies, and the server's
optimiser step. The Flower ServerApp (:class:`medpipe.fl.server.Coordinator`) and the in-process
simulation (``benchmarks/federated.py``, :func:`simulate_rounds`) both run this code, so they are one
algorithm.

* **Learning rate across rounds** (:func:`round_lr`, ``lr_schedule: rounds``, the default): the central
  recipe's schedule (linear warm-up for ``warmup_epochs``, then cosine down to 1% of ``lr``) laid over
  the whole federated run, ``rounds * local_epochs`` epochs; round ``r`` covers its epochs
  ``[(r-1)E, rE)`` and the server sends the rate at its start and end. The site ramps linearly between
  the two over its steps, with no warm-up restart. ``lr_schedule: local`` is the older behaviour: a
  fresh warm-up + cosine inside every round's local epochs, so the rate never decays across rounds.
* **Local optimiser state** (``local_optimizer``): ``reset`` (a fresh AdamW each round, stateless
  sites) or ``keep`` (each site keeps its AdamW moments between rounds, in its own process).
* **BatchNorm** (``batchnorm``): ``recompute`` (the default: after each server step the sites measure the
  new global model's running statistics on their training images and the server pools them,
  :mod:`medpipe.fl.bnstats`), ``global`` (running statistics averaged like the weights) or ``local``
  (SiloBN-style: a site trains with its own running statistics, kept between rounds; the global model and
  the package carry the averaged statistics, the fallback for sites that never took part). Each gives one
  model for every site.
* **Label skew** (``label_skew``): ``calibrate`` (the default) or ``none``: with ``calibrate`` every site reports its training class counts
  with its update, the server sends the federation's class frequencies with the next round, and each site's
  training loss sees its logits plus ``log(site frequency / federation frequency)`` (:func:`site_logit_offset`,
  logit calibration as in FedLC), so a site with a skewed class mix fits the federation's frequencies, the
  central recipe's objective; the first round, before any counts, trains uncalibrated.
* **Server optimiser** (:class:`ServerOptimizer`, ``server_optimizer``): ``fedavg`` (the new global
  model is the aggregate), or (``fedavgm``, momentum 0.5 and server lr 2, is the default) Flower's server-side optimisers on the pseudo-gradient
  ``aggregate - global`` of the trainable parameters: ``fedavgm`` (server momentum, Hsu et al. 2019),
  ``fedadam`` and ``fedyogi`` (Reddi et al., Adaptive Federated Optimization, 2021). The formulas are
  those of Flower's ``FedAvgM`` / ``FedAdam`` / ``FedYogi`` strategies (tests/test_fl_robust.py checks
  them against Flower's own classes). BatchNorm buffers and integer counters take the aggregate as it
  is (an Adam step on a running variance could make it negative).

Which choices are the defaults, and their measured effect: docs/guides/federated.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np

from medpipe.fl.aggregate import TRIM_FRACTION, Guard, aggregate_round, pool_evaluations
from medpipe.fl.bnstats import statistics_round

SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")
LR_SCHEDULES = ("rounds", "local")
LOCAL_OPTIMIZER = ("reset", "keep")
BATCHNORM = ("recompute", "global", "local")
LABEL_SKEW = ("none", "calibrate")
# Server learning rate, momentum / beta_1, beta_2, tau per server optimiser: Flower's defaults except FedAvgM's, which
# are the best measured (docs/guides/federated.md, 3 seeds on 3 splits): momentum 0.5 (0.9 overshoots; Flower's own
# default is 0, a plain FedAvg) and server lr 2 (Flower's 1: a round of sites moves the model less than a central
# epoch; lr 2 beat lr 1 on every split's 3-seed mean of balanced accuracy and on 2 of 3 in macro AUC, the third equal)
SERVER_DEFAULTS = {"fedavg": (1.0, 0.0, 0.0, 0.0), "fedavgm": (2.0, 0.5, 0.0, 0.0),
                   "fedadam": (0.1, 0.9, 0.99, 1e-9), "fedyogi": (0.01, 0.9, 0.99, 1e-3)}
# images added to every class count before class frequencies are taken (label_skew: calibrate), in the site's offset
# and in the federation's prior alike: a class a site (or every site) lacks keeps a finite, small frequency
COUNT_SMOOTHING = 0.5

# the default federated recipe (the best measured, docs/guides/federated.md)
DEFAULTS = {"lr_schedule": "rounds", "local_optimizer": "reset", "batchnorm": "recompute", "server_optimizer": "fedavgm",
            "label_skew": "calibrate"}


def schedule_lr(epoch: float, total_epochs: float, lr: float, warmup_epochs: float) -> float:
    """The central recipe's learning rate at ``epoch`` (fractional) of a ``total_epochs`` run: linear
    warm-up to ``lr`` over ``warmup_epochs``, then cosine down to ``lr / 100`` at the end (as
    :func:`medpipe.train.factories.make_schedule`, per epoch instead of per step)."""
    warm = min(max(warmup_epochs, 0.0), max(total_epochs - 1e-9, 0.0))
    if epoch < warm:
        return lr * max(epoch, 0.0) / warm
    span = max(total_epochs - warm, 1e-9)
    t = min(max((epoch - warm) / span, 0.0), 1.0)
    floor = lr * 0.01
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def round_lr(rnd: int, rounds: int, local_epochs: int, lr: float, warmup_epochs: float) -> tuple[float, float]:
    """(rate at the start, rate at the end) of round ``rnd`` (1-based) in the schedule across rounds.
    The warm-up's first rate is ``lr / (10 * warm-up epochs)``, never 0 (a round of zero rate would be wasted)."""
    total = float(rounds * local_epochs)
    start = schedule_lr((rnd - 1) * local_epochs, total, lr, warmup_epochs)
    if rnd == 1 and warmup_epochs > 0:
        start = lr / (10.0 * max(warmup_epochs, 1.0))
    return start, schedule_lr(rnd * local_epochs, total, lr, warmup_epochs)


def site_logit_offset(site_counts, class_prior, smoothing: float = COUNT_SMOOTHING) -> list[float]:
    """``log(site frequency / federation frequency)`` per class, the offset a site adds to its logits inside the
    training loss under ``label_skew: calibrate`` (logit calibration for label skew, as FedLC, Zhang et al.
    2022): a site whose images are mostly of one class then fits the federation's class frequencies instead of
    its own, so every site optimises the central recipe's objective. ``smoothing`` images per class keep a
    class the site lacks finite (a large negative offset: the site's loss barely pushes that class down)."""
    n = np.asarray(site_counts, np.float64) + smoothing
    p = np.asarray(class_prior, np.float64)
    if n.shape != p.shape or not (p > 0).all():
        raise ValueError(f"class prior {p.tolist()} must be positive, one value per class of {n.size}")
    return (np.log(n / n.sum()) - np.log(p / p.sum())).tolist()


def class_prior_from_counts(counts: Mapping[str, Iterable[int]], smoothing: float = COUNT_SMOOTHING) -> list[float] | None:
    """The federation's class frequencies from each site's latest training class counts (None: none yet)."""
    if not counts:
        return None
    total = np.sum([np.asarray(list(c), np.float64) for c in counts.values()], axis=0) + smoothing
    return (total / total.sum()).tolist()


@dataclass
class ServerOptimizer:
    """The server's step from the round's aggregate to the new global model (see the module docstring).

    ``params``: the names of the trainable parameters (the only tensors the optimiser steps); everything
    else takes the aggregate. ``state`` (momentum / first and second moments, the step count) is what a
    resumed server needs: :meth:`state_arrays` / :meth:`load_state_arrays`."""

    name: str = "fedavg"
    params: frozenset = field(default_factory=frozenset)
    lr: float | str | None = None  # a number, or "auto": N^2 / sum(n_k^2) of each round's sites (auto_server_lr)
    momentum: float | None = None  # FedAvgM's momentum, FedAdam/FedYogi's beta_1
    beta_2: float | None = None
    tau: float | None = None
    step: int = 0
    m: dict = field(default_factory=dict)
    v: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.name not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimiser {self.name!r}; expected one of {', '.join(SERVER_OPTIMIZERS)}")
        lr, mom, b2, tau = SERVER_DEFAULTS[self.name]
        self.auto = isinstance(self.lr, str) and self.lr == "auto"
        if self.auto and self.name != "fedavgm":
            raise ValueError(f"--server-lr auto is for fedavgm (a step scale on the averaged update), not {self.name}")
        self.lr = lr if self.lr is None else (1.0 if self.auto else float(self.lr))
        self.last_lr = self.lr
        self.momentum = mom if self.momentum is None else float(self.momentum)
        self.beta_2 = b2 if self.beta_2 is None else float(self.beta_2)
        self.tau = tau if self.tau is None else float(self.tau)
        self.params = frozenset(self.params)

    def describe(self) -> str:
        if self.name == "fedavg":
            return "fedavg (the aggregate is the new global model)"
        extra = f", beta_2 {self.beta_2:g}, tau {self.tau:g}" if self.name != "fedavgm" else ""
        lr = f"auto = {self.last_lr:.3g} this round" if self.auto else f"{self.lr:g}"
        return f"{self.name} (server lr {lr}, {'momentum' if self.name == 'fedavgm' else 'beta_1'} " \
               f"{self.momentum:g}{extra})"

    def apply(self, global_arrays: Mapping[str, np.ndarray], aggregate: Mapping[str, np.ndarray],
              examples: Iterable[int] | None = None) -> dict[str, np.ndarray]:
        """The new global model from the previous one and this round's aggregate (float64 arithmetic,
        stored in each tensor's own dtype). ``examples``: the image counts of the sites aggregated this
        round (the weights of the mean), which ``server lr auto`` is set from (:func:`auto_server_lr`)."""
        if self.name == "fedavg":
            return dict(aggregate)
        if self.auto:
            if examples is None:
                raise ValueError("server lr auto needs the round's per-site image counts")
            self.lr = self.last_lr = auto_server_lr(examples)
        self.step += 1
        out = dict(aggregate)
        for name in sorted(self.params & set(aggregate)):
            w = np.asarray(global_arrays[name], np.float64)
            delta = np.asarray(aggregate[name], np.float64) - w  # Flower's delta_t; FedAvgM's pseudo-gradient is -delta
            out[name] = self._step(name, w, delta).astype(aggregate[name].dtype)
        return out

    def _step(self, name: str, w: np.ndarray, delta: np.ndarray) -> np.ndarray:
        if self.name == "fedavgm":
            grad = -delta
            if self.momentum > 0.0:
                grad = self.momentum * self.m[name] + grad if name in self.m else grad
                self.m[name] = grad
            return w - self.lr * grad
        m = self.m.get(name, np.zeros_like(delta))
        v = self.v.get(name, np.zeros_like(delta))
        m = self.momentum * m + (1.0 - self.momentum) * delta
        d2 = delta * delta
        if self.name == "fedadam":
            v = self.beta_2 * v + (1.0 - self.beta_2) * d2
            # Flower's bias-corrected rate; its server_round is 1-based, and it raises beta to round + 1
            eta = self.lr * math.sqrt(1.0 - self.beta_2 ** (self.step + 1.0)) / (1.0 - self.momentum ** (self.step + 1.0))
        else:  # fedyogi
            v = v - (1.0 - self.beta_2) * d2 * np.sign(v - d2)
            eta = self.lr
        self.m[name], self.v[name] = m, v
        return w + eta * m / (np.sqrt(v) + self.tau)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The optimiser's state as named arrays (a safetensors checkpoint beside the global model)."""
        out = {f"m/{k}": v for k, v in self.m.items()} | {f"v/{k}": v for k, v in self.v.items()}
        return {**out, "step": np.array(self.step, np.int64)}

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.step = int(np.asarray(arrays.get("step", 0)).ravel()[0])  # safetensors may give a 0-d value as (1,)
        self.m = {k[2:]: np.asarray(v, np.float64) for k, v in arrays.items() if k.startswith("m/")}
        self.v = {k[2:]: np.asarray(v, np.float64) for k, v in arrays.items() if k.startswith("v/")}


def auto_server_lr(examples: Iterable[int]) -> float:
    """The server step that makes a round of local epochs move the global model about as far as one central
    epoch: ``N^2 / sum(n_k^2)`` for sites of ``n_k`` images (``N`` their sum). A site's epoch takes ``n_k / B``
    steps and the weighted mean takes ``n_k / N`` of it, so when every step moves the weights alike a round
    advances ``sum(n_k^2) / N^2`` of a central epoch's ``N / B`` steps: 1 for a single site, ``K`` for ``K``
    equal sites. Sites whose updates disagree move less than that, which server momentum does not undo."""
    n = np.asarray([int(x) for x in examples], np.float64)
    if n.size == 0 or (n <= 0).any():
        raise ValueError(f"server lr auto needs positive per-site image counts, got {n.tolist()}")
    return float(n.sum() ** 2 / (n * n).sum())


def from_config(cfg: Mapping, params: Iterable[str]) -> ServerOptimizer:
    """The run configuration's server optimiser (``server_optimizer``, ``server_lr``, ``server_momentum``;
    None takes Flower's default for that optimiser)."""
    return ServerOptimizer(str(cfg.get("server_optimizer") or "fedavg"), frozenset(params),
                           lr=cfg.get("server_lr"), momentum=cfg.get("server_momentum"))


def round_config(cfg: Mapping, rnd: int, train_lr: float, warmup_epochs: float,
                 class_prior: list[float] | None = None) -> dict:
    """What a round tells the sites beyond the weights: the local epochs, FedProx's mu, the round's rate
    (``lr-start``/``lr-end``; 0 and 0 for ``lr_schedule: local``: the site's own warm-up + cosine) and
    the site policies."""
    mu = float(cfg.get("mu", 0.0)) if cfg.get("strategy") == "fedprox" else 0.0
    epochs = int(cfg["local_epochs"])
    if str(cfg.get("lr_schedule", "local")) == "rounds":  # a run configuration from before the key: as it ran
        start, end = round_lr(rnd, int(cfg["rounds"]), epochs, train_lr, warmup_epochs)
    else:
        start = end = 0.0
    out = {"server-round": rnd, "local-epochs": epochs, "mu": mu, "lr-start": float(start), "lr-end": float(end),
           "local-optimizer": str(cfg.get("local_optimizer", "reset")), "batchnorm": str(cfg.get("batchnorm", "global"))}
    if str(cfg.get("label_skew", "none")) == "calibrate" and class_prior is not None:
        out["class-prior"] = [float(x) for x in class_prior]
    return out


def algorithm_config(lr_schedule: str | None = None, local_optimizer: str | None = None, batchnorm: str | None = None,
                     server_optimizer: str | None = None, server_lr: float | None = None,
                     server_momentum: float | None = None, label_skew: str | None = None) -> dict:
    """The run configuration's algorithm keys, checked (None: the default of :data:`DEFAULTS`, or Flower's
    default rate and momentum for the server optimiser). Raises ValueError naming the option."""
    if isinstance(server_lr, str) and server_lr.strip().lower() == "auto":
        server_lr = "auto"
    elif server_lr is not None:
        try:
            server_lr = float(server_lr)
        except (TypeError, ValueError):
            raise ValueError(f"--server-lr must be a positive number or auto, got {server_lr!r}") from None
    out = {"lr_schedule": lr_schedule or DEFAULTS["lr_schedule"],
           "local_optimizer": local_optimizer or DEFAULTS["local_optimizer"],
           "batchnorm": batchnorm or DEFAULTS["batchnorm"],
           "server_optimizer": server_optimizer or DEFAULTS["server_optimizer"],
           "server_lr": server_lr,
           "server_momentum": None if server_momentum is None else float(server_momentum),
           "label_skew": label_skew or DEFAULTS["label_skew"]}
    for key, allowed in (("lr_schedule", LR_SCHEDULES), ("local_optimizer", LOCAL_OPTIMIZER), ("batchnorm", BATCHNORM),
                         ("server_optimizer", SERVER_OPTIMIZERS), ("label_skew", LABEL_SKEW)):
        if out[key] not in allowed:
            raise ValueError(f"--{key.replace('_', '-')} must be one of {', '.join(allowed)}, got {out[key]!r}")
    if out["server_lr"] == "auto":
        if out["server_optimizer"] != "fedavgm":
            raise ValueError(f"--server-lr auto is for --server-optimizer fedavgm, not {out['server_optimizer']}")
    elif out["server_lr"] is not None and not (math.isfinite(out["server_lr"]) and out["server_lr"] > 0):
        raise ValueError(f"--server-lr must be a positive number or auto, got {server_lr}")
    if out["server_momentum"] is not None and not 0.0 <= out["server_momentum"] < 1.0:
        raise ValueError(f"--server-momentum must be in [0, 1), got {server_momentum}")
    return out


def fit_kwargs(rc: Mapping) -> dict:
    """A site's :meth:`medpipe.fl.site.Site.fit` arguments from a round's configuration (the ClientApp and
    :func:`simulate_rounds` both use this). ``lr-end`` 0 or absent (an older server): the site's own schedule."""
    lr_end = float(rc.get("lr-end", 0.0))
    return {"epochs": int(rc["local-epochs"]), "mu": float(rc.get("mu", 0.0)),
            "lr_range": (float(rc["lr-start"]), lr_end) if lr_end > 0 else None,
            "local_optimizer": str(rc.get("local-optimizer", "reset")), "batchnorm": str(rc.get("batchnorm", "global")),
            "class_prior": [float(x) for x in rc["class-prior"]] if rc.get("class-prior") else None}


def improves(best_auc: float | None, auc: float) -> bool:
    """The rule for the round a federated run packages: its pooled validation macro AUC is strictly higher
    than the best so far (NaN never is)."""
    return not math.isnan(auc) and (best_auc is None or auc > best_auc)


class EvaluationRound(NamedTuple):
    """One round's federated evaluation as the server takes it (:func:`evaluation_round`)."""

    per_site: dict  # site -> its figures (n_val, macro_auc, balanced_accuracy, val_loss), well-formed replies only
    pooled: dict  # the pooled figures over those sites' summed statistics (macro_auc: the round the run packages)
    excluded: dict  # site -> why its reply was left out


def evaluation_round(replies: Mapping[str, Mapping], classes: list[str], guard: Guard,
                     failed: Mapping[str, str] | None = None) -> EvaluationRound:
    """The server's evaluation round from the sites' replies ``{site: evaluation metrics}``: each reply checked and
    the well-formed ones pooled (:func:`medpipe.fl.aggregate.pool_evaluations`); ``failed`` names the sites whose
    reply could not be read (an error, a malformed message) with the reason, excluded beside the checks' own.
    The ServerApp (``Coordinator._evaluate_round``) and :func:`simulate_rounds` both take their figures from here."""
    per_site, pooled, excluded = pool_evaluations(replies, classes, guard)
    return EvaluationRound(per_site, pooled, {**(failed or {}), **excluded})


@dataclass
class BestRound:
    """The round the ServerApp packages (:func:`improves` on the pooled validation macro AUC), its figures and
    its global model, as :func:`simulate_rounds` tracks it."""

    round: int = 0
    auc: float | None = None
    arrays: dict | None = None
    pooled: list = field(default_factory=list)  # each round's pooled validation macro AUC

    def update(self, rnd: int, arrays: dict[str, np.ndarray], auc: float) -> bool:
        self.pooled.append(auc)
        if not improves(self.auc, auc):
            return False
        self.round, self.auc, self.arrays = rnd, auc, dict(arrays)
        return True


def simulate_rounds(sites: list, init: dict[str, np.ndarray], cfg: Mapping, params: Iterable[str], train_lr: float,
                    warmup_epochs: float, on_round=None, guard=None, best: BestRound | None = None) -> dict[str, np.ndarray]:
    """The federated run in one process, with the Coordinator's steps: each round's configuration
    (:func:`round_config`), every site's local training (``site.fit``), the server's checks and
    aggregation (:func:`medpipe.fl.aggregate.aggregate_round`, each site registered with its own image
    count), the server optimiser's step and (``batchnorm: recompute``) the global model's BatchNorm statistics
    from every site (``site.bn_statistics``, :func:`medpipe.fl.bnstats.statistics_round`); with ``best``, also
    the ServerApp's evaluation round: every site's evaluation reply (``site.evaluation_reply``) pooled as the
    server pools them (:func:`evaluation_round`), and the round it would
    package tracked in ``best``. ``cfg`` holds the run configuration's keys (``rounds``,
    ``local_epochs``, ``strategy``, ``mu``, ``aggregation``, the algorithm keys); ``on_round(rnd, arrays,
    result)`` is called after each round; ``guard`` replaces the server's limits (a
    :class:`medpipe.fl.aggregate.Guard`; default: each site's own image count). Returns the last global model."""
    opt = from_config(cfg, params)
    guard = guard or Guard(site_examples={s.name: s.n_train for s in sites}, local_epochs=int(cfg["local_epochs"]))
    guard = guard if guard.n_classes is not None else replace(guard, n_classes=len(sites[0].classes))
    arrays, counts = dict(init), {}
    method, trim = str(cfg.get("aggregation", "mean")), float(cfg.get("trim", TRIM_FRACTION))
    for rnd in range(1, int(cfg["rounds"]) + 1):
        kw = fit_kwargs(round_config(cfg, rnd, train_lr, warmup_epochs, class_prior_from_counts(counts)))
        replies = {}
        for site in sites:
            upd, m = site.fit(arrays, rnd, **kw)
            replies[site.name] = (upd, {"num-examples": m["n_train"], "train_loss": m["train_loss"],
                                        "class-counts": m["class_counts"]})
        result = aggregate_round(arrays, replies, guard, method, trim)
        counts.update({name: u["class_counts"] for name, u in result.used.items() if u.get("class_counts")})
        if not result.kept:
            arrays = opt.apply(arrays, result.arrays, [v["n_train"] for v in result.used.values()])
            if str(cfg.get("batchnorm", "global")) == "recompute":
                measured = {s.name: s.bn_statistics(arrays) for s in sites}
                replies_bn = {k: (st, {"num-examples": n}) for k, (st, n) in measured.items()}
                arrays = statistics_round(arrays, replies_bn, guard, method, trim)[0]
            if best is not None:
                ev = evaluation_round({s.name: s.evaluation_reply(arrays) for s in sites}, sites[0].classes, guard)
                best.update(rnd, arrays, ev.pooled["macro_auc"])
        if on_round:
            on_round(rnd, arrays, result)
    return arrays
