"""The coordinator that runs inside Flower's ServerApp: rounds, checks, aggregation, checkpoints.

Each round, top to bottom:
 1. wait until at least ``min_sites`` sites are connected; sample ``max(min_sites, fraction * connected)``;
 2. send them the global weights (a TRAIN message); collect replies until every sampled site has
    answered, or a site is reported offline, or ``straggler_wait`` seconds have passed since enough
    sites answered, or ``round_timeout`` passed; every site that did not answer is logged by name as
    dropped (it may rejoin in a later round);
 3. check each reply (``medpipe.fl.aggregate``: the global model's tensors, dtypes and shapes,
    finite values, an update norm within ``max_update_ratio`` of the global model's, ``num-examples``
    within the site's registered count or ``max_examples``); a bad one is excluded with its reason,
    logged by site name and kept in the round record, and never reaches the aggregate;
 4. aggregate the valid updates by ``aggregation``: ``mean`` (FedAvg/FedProx, weighted by sample
    counts), ``median`` or ``trimmed-mean`` (robust, unweighted), then the server optimiser's step
    (``server_optimizer``: fedavg, fedavgm, fedadam, fedyogi; ``medpipe.fl.strategy``); fewer than ``min_sites`` valid
    updates (every site excluded, say) keep the previous global model, log it, and repeat the round
    (at most 3 tries, then the run fails with the reason);
 5. every connected site evaluates the new global model on its own validation split (an EVALUATE
    message); each reply is schema-checked, a malformed one is excluded from the pooled figures with
    its reason; per-site metrics and pooled ones (summed score histograms) are logged;
 6. checkpoint: ``checkpoints/global.safetensors`` then ``fl_state.json`` (round, history, best),
    both written atomically; ``best.safetensors`` when the pooled macro AUC improved; one line in
    ``metrics.jsonl``; the round callbacks are called with the round record.
A restarted server finds ``fl_state.json`` and continues after its round. At the end the best
round's weights become the usual model package, with the federated provenance in ``model.json``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np

from medpipe.config import make_config
from medpipe.decision import prior_from_counts
from medpipe.errors import MedpipeError
from medpipe.fl.aggregate import (METHODS, TRIM_FRACTION, Guard, Verdict, check_train_reply, check_update, combine,
                                  restore_scalars)
from medpipe.fl.bnstats import statistics_round
from medpipe.fl.records import arrays_to_record, record_to_arrays
from medpipe.fl.site import to_numpy, to_torch
from medpipe.fl.strategy import (class_prior_from_counts, evaluation_round, from_config as server_optimizer, improves,
                                 round_config)
from medpipe.models import create_model
from medpipe.package import IntendedUse, save_package
from medpipe.utils import atomic_write_bytes, atomic_write_text, to_json

CONFIG_FILE, STATE_FILE, SITES_FILE, LOG_FILE = "fl_config.json", "fl_state.json", "sites.json", "fl_server.log"
OWNER_FILE = ".fl_owner"
RESUME_KEYS = ("classes", "strategy", "mu", "local_epochs", "train_config", "lr_schedule", "local_optimizer",
               "batchnorm", "server_optimizer", "server_lr", "server_momentum", "label_skew")
ALGORITHM_KEYS = ("lr_schedule", "local_optimizer", "batchnorm", "label_skew")  # resume hints name these options
log = logging.getLogger("medpipe.fl.server")


BN_DESCRIPTION = {  # model.json["federated"]["batchnorm"] per batchnorm policy
    "recompute": "recomputed: after each server step the sites measured the global model's running statistics on "
                 "their training images and the server pooled them (one model for every site)",
    "global": "aggregated: running statistics averaged like the weights (one model for every site)",
    "local": "local at the sites during training (SiloBN); this package carries the sites' averaged running "
             "statistics, the global fallback for any site"}


def config_digest(cfg: dict) -> str:
    return hashlib.sha256(json.dumps({k: cfg.get(k) for k in RESUME_KEYS}, sort_keys=True).encode()).hexdigest()


def resume_refusal(state: dict, cfg: dict) -> str | None:
    """Why a run folder's saved state cannot be resumed with ``cfg`` (None: it can): the options that differ,
    with the run's value and the new one, where the state recorded them (``resume_config``)."""
    if state.get("config_digest") == config_digest(cfg):
        return None
    saved = state.get("resume_config")
    if not isinstance(saved, dict):
        return f"this run folder was started with a different configuration ({', '.join(RESUME_KEYS)} must match)"
    diffs = []
    for key in RESUME_KEYS:
        if saved.get(key) != cfg.get(key):
            was, now = (str(v)[:60] for v in (saved.get(key), cfg.get(key)))
            diffs.append(f"{key} was {was}, now {now}" + (f" (pass --{key.replace('_', '-')} {was} to resume)"
                                                          if key in ALGORITHM_KEYS else ""))
    return "this run folder was started with a different configuration: " + "; ".join(diffs)


def save_arrays(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> str:
    from safetensors.numpy import save

    data = save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata={k: str(v) for k, v in meta.items()})
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_arrays(path: Path, sha256: str | None = None) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    data = path.read_bytes()
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise MedpipeError(f"{path}: sha256 does not match {STATE_FILE}; the checkpoint was changed or truncated")
    return load(data)


class Coordinator:
    def __init__(self, run_dir: Path, grid, callbacks=()):
        from flwr.app import Message, MessageType  # noqa: F401  (Flower must be importable here)

        self.run_dir, self.grid = Path(run_dir), grid
        self.cfg = json.loads((self.run_dir / CONFIG_FILE).read_text())
        sites_path = self.run_dir / SITES_FILE
        self.names = {int(k): v for k, v in json.loads(sites_path.read_text()).items()} if sites_path.is_file() else {}
        self.guard = Guard.from_config(self.cfg)
        self.method, self.trim = str(self.cfg.get("aggregation", "mean")), float(self.cfg.get("trim", TRIM_FRACTION))
        if self.method not in METHODS:
            raise MedpipeError(f"{CONFIG_FILE}: aggregation {self.method!r} is not one of {', '.join(METHODS)}")
        self.callbacks = list(callbacks) + [self._load_callback(c) for c in self.cfg.get("round_callbacks", [])]
        self.owner = f"{os.getpid()}-{time.time_ns()}"
        atomic_write_text(self.run_dir / OWNER_FILE, self.owner)  # a newer server for this folder takes over
        handler = logging.FileHandler(self.run_dir / LOG_FILE)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)

    @staticmethod
    def _load_callback(ref: str):
        module, _, name = ref.partition(":")
        return getattr(importlib.import_module(module), name)

    def name(self, node_id: int) -> str:
        return self.names.get(int(node_id), f"node-{node_id}")

    # ------------------------------------------------------------------------------------ messaging

    def _wait_for_sites(self, need: int) -> list[int]:
        """At least ``need`` connected sites (else an error after ``wait_for_sites``); then up to
        ``straggler_wait`` more seconds for the other registered sites to connect."""
        deadline = time.time() + float(self.cfg["wait_for_sites"])
        enough_at = None
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= need:
                enough_at = enough_at or time.time()
                if len(nodes) >= len(self.names) or time.time() - enough_at > float(self.cfg["straggler_wait"]):
                    return nodes
            elif time.time() > deadline:
                raise MedpipeError(f"only {len(nodes)} site(s) connected after {self.cfg['wait_for_sites']}s; "
                                   f"--min-sites is {need}")
            time.sleep(1.0)

    def _exchange(self, content_for, nodes: list[int], message_type: str, rnd: int, quorum: int, valid=None):
        """Send one message per node, gather replies; returns (replies {node: Message}, dropped {node: reason}).
        ``quorum`` counts the replies for which ``valid(node, message)`` is true (all, by default)."""
        from flwr.app import Message
        from flwr.common.constant import ErrorCode

        msgs = [Message(content_for(n), dst_node_id=n, message_type=message_type) for n in nodes]
        ids = list(self.grid.push_messages(msgs))
        pending = {mid: n for mid, n in zip(ids, nodes) if mid}
        dropped = {n: "the message could not be delivered" for mid, n in zip(ids, nodes) if not mid}
        replies, start, quorum_at, n_valid = {}, time.time(), None, 0
        wait, timeout = float(self.cfg["straggler_wait"]), float(self.cfg["round_timeout"])
        while pending:
            for m in self.grid.pull_messages(list(pending)):
                n = pending.pop(m.metadata.reply_to_message_id, None)
                if n is not None and m.has_error() and m.error.code == ErrorCode.NODE_UNAVAILABLE:
                    # the SuperLink's own reply for a node that stopped sending heartbeats: the site went away
                    dropped[n] = "disconnected (the SuperLink reports no heartbeat from it)"
                elif n is not None:
                    replies[n] = m
                    n_valid += 1 if valid is None or valid(n, m) else 0
            if not pending:
                break
            now = time.time()
            online = set(self.grid.get_node_ids())
            for mid, n in list(pending.items()):
                if n not in online:
                    dropped[n] = "disconnected (the SuperLink reports it offline)"
                    del pending[mid]
            if quorum_at is None and n_valid >= quorum:
                quorum_at = now
            if quorum_at is not None and now - quorum_at > wait:
                reason = f"no reply {wait:g}s after {n_valid} site(s) had sent a valid answer"
            elif now - start > timeout:
                reason = f"no reply within the round timeout ({timeout:g}s)"
            else:
                time.sleep(0.5)
                continue
            dropped.update({n: reason for n in pending.values()})
            pending.clear()
        for n, reason in dropped.items():
            log.warning("round %d %s: site %s dropped: %s", rnd, message_type, self.name(n), reason)
        return replies, dropped

    # ------------------------------------------------------------------------------------ state

    def _state(self) -> dict | None:
        path = self.run_dir / STATE_FILE
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        refusal = resume_refusal(state, self.cfg)
        if refusal:
            raise MedpipeError(f"{path}: {refusal}; or use a new --out")
        return state

    def _checkpoint(self, state: dict, arrays: dict, improved: bool) -> None:
        if (self.run_dir / OWNER_FILE).read_text() != self.owner:  # e.g. a ServerApp orphaned by a killed server
            raise MedpipeError(f"another server has taken over {self.run_dir}; this one stops without writing")
        ck = self.run_dir / "checkpoints"
        ck.mkdir(exist_ok=True)
        state["global_sha256"] = save_arrays(ck / "global.safetensors", arrays, {"round": state["round"]})
        if self.opt.name != "fedavg":  # the server optimiser's moments, for a resumed server
            state["server_optimizer_sha256"] = save_arrays(ck / "server_optimizer.safetensors",
                                                           self.opt.state_arrays(), {"round": state["round"]})
        if improved or not (ck / "best.safetensors").is_file():
            state["best_sha256"] = save_arrays(ck / "best.safetensors", arrays, {"round": state["round"]})
        atomic_write_text(self.run_dir / STATE_FILE, to_json(state, indent=2))

    # ------------------------------------------------------------------------------------ the run

    def run(self) -> dict:
        import torch

        cfg = self.cfg
        classes, rounds, min_sites = list(cfg["classes"]), int(cfg["rounds"]), int(cfg["min_sites"])
        tc = make_config(cfg["train_config"]).validate()
        torch.manual_seed(tc.seed)
        model = create_model(tc.model, len(classes), init_weights=tc.init_weights)
        reference = to_numpy(model.state_dict())
        self.opt = server_optimizer(cfg, [n for n, _ in model.named_parameters()])
        state, arrays = self._begin(reference, classes, rounds, min_sites)
        train_cfg = json.dumps(tc.to_dict())
        rng = random.Random(tc.seed)

        def config(rnd: int):
            from flwr.app import ConfigRecord

            counts = state.get("class_counts", {})  # accepted counts only: one per class (check_class_counts)
            return ConfigRecord({**round_config(cfg, rnd, tc.lr, tc.warmup_epochs, class_prior_from_counts(counts)),
                                 "classes": classes, "train-config": train_cfg})

        rnd, tries = state["round"] + 1, 0
        while rnd <= rounds:
            result, dropped = self._train_round(rnd, arrays, config, min_sites, rng)
            if result.kept:
                tries += 1
                log.error("round %d: %s (--min-sites %d; try %d of 3)", rnd, result.note, min_sites, tries)
                if tries >= 3:
                    state["status"] = "failed"
                    atomic_write_text(self.run_dir / STATE_FILE, to_json(state, indent=2))
                    raise MedpipeError(f"round {rnd} failed 3 times: {result.note}")
                continue
            arrays = self.opt.apply(arrays, result.arrays, [v["n_train"] for v in result.used.values()])
            # each site's latest training class counts: the federation's class frequencies (label_skew: calibrate)
            state.setdefault("class_counts", {}).update(
                {name: u["class_counts"] for name, u in result.used.items() if u.get("class_counts")})
            log.info("round %d: %s (%s, server optimiser %s); samples %s", rnd, result.note, cfg["strategy"],
                     self.opt.describe(), {k: v["n_train"] for k, v in result.used.items()})
            bn = None
            if cfg.get("batchnorm", "global") == "recompute":
                arrays, bn = self._statistics_round(rnd, arrays, config, min_sites)
            per_site, pooled, ev_dropped, ev_excluded = self._evaluate_round(rnd, arrays, config, min_sites, classes)
            rec = {"round": rnd, "strategy": cfg["strategy"], "aggregation": self.method,
                   "server_optimizer": self.opt.name, "trained": result.used,
                   "excluded": result.excluded, "num_examples": result.num_examples, "eval_excluded": ev_excluded,
                   "dropped": {self.name(n): r for n, r in {**dropped, **ev_dropped}.items()},
                   **({"bn_statistics": bn} if bn is not None else {}),
                   "val_sites": per_site, "val_pooled": pooled,
                   "bytes_per_site": int(sum(v.nbytes for v in arrays.values()))}
            self._record_round(state, rec, arrays)
            rnd, tries = rnd + 1, 0

        summary = self._package(state, classes, tc)
        state["status"] = "finished"
        atomic_write_text(self.run_dir / STATE_FILE, to_json(state, indent=2))
        log.info("finished: best round %d (pooled val auc %s); package %s", state["best_round"],
                 state["best_pooled_auc"], summary["model_dir"])
        return summary

    def _begin(self, reference: dict, classes: list[str], rounds: int, min_sites: int) -> tuple[dict, dict]:
        """A fresh run's state and starting weights, or the saved state and global checkpoint to resume."""
        state = self._state()
        if state is None:
            state = {"config_digest": config_digest(self.cfg), "resume_config": {k: self.cfg.get(k) for k in RESUME_KEYS},
                     "round": 0, "status": "running", "history": [],
                     "best_round": 0, "best_pooled_auc": None, "sites": {}}
            log.info("federated run: %d rounds, strategy %s, aggregation %s, at least %d sites, classes %s; updates "
                     "limited to %g times the global norm, num-examples to %s", rounds, self.cfg["strategy"],
                     self.method, min_sites, classes, self.guard.max_update_ratio,
                     self.guard.site_examples or f"{self.guard.max_examples} per site")
            return state, reference
        arrays = restore_scalars(load_arrays(self.run_dir / "checkpoints" / "global.safetensors",
                                             state.get("global_sha256")), reference)
        wrong = check_update(arrays, reference)
        if wrong:
            raise MedpipeError(f"{self.run_dir / 'checkpoints' / 'global.safetensors'} does not fit this run's model: "
                               f"{wrong}")
        opt_path = self.run_dir / "checkpoints" / "server_optimizer.safetensors"
        if self.opt.name != "fedavg" and state.get("server_optimizer_sha256"):
            self.opt.load_state_arrays(load_arrays(opt_path, state["server_optimizer_sha256"]))
        state["status"] = "running"
        log.info("resuming from the round %d checkpoint (%s)", state["round"],
                 self.run_dir / "checkpoints" / "global.safetensors")
        return state, arrays

    def _train_round(self, rnd: int, arrays: dict, config, min_sites: int, rng):
        """Send the global weights to a sample of connected sites; returns the round's aggregation
        (:class:`~medpipe.fl.aggregate.RoundResult`: the new global, or the previous one when too few
        updates passed the checks) and the dropped sites."""
        from flwr.app import MessageType, RecordDict

        nodes = self._wait_for_sites(min_sites)
        k = max(min_sites, int(math.ceil(float(self.cfg["fraction"]) * len(nodes))))
        chosen = sorted(rng.sample(nodes, min(k, len(nodes))))
        log.info("round %d: training on %d of %d connected sites: %s", rnd, len(chosen), len(nodes),
                 ", ".join(self.name(n) for n in chosen))
        record = arrays_to_record(arrays)
        verdicts: dict[int, Verdict] = {}

        def check(n, msg) -> bool:
            site = self.name(n)
            if msg.has_error():
                verdicts[n] = Verdict(site, reason=f"the site reported an error: {msg.error.reason}")
                return False
            try:
                metrics = dict(msg.content["metrics"])
                upd = restore_scalars(record_to_arrays(msg.content["arrays"]), arrays)
            except (KeyError, ValueError, TypeError) as exc:
                verdicts[n] = Verdict(site, reason=f"malformed reply ({exc.__class__.__name__}: {exc})")
                return False
            verdicts[n] = check_train_reply(site, upd, metrics, arrays, self.guard)
            return verdicts[n].reason is None

        replies, dropped = self._exchange(lambda n: RecordDict({"arrays": record, "config": config(rnd)}),
                                          chosen, MessageType.TRAIN, rnd, min_sites, check)
        result = combine(arrays, {self.name(n): verdicts[n] for n in sorted(replies)}, self.method, self.trim,
                         min_sites)
        for name, reason in result.excluded.items():
            log.warning("round %d: update from site %s excluded: %s", rnd, name, reason)
        return result, dropped

    def _broadcast(self, rnd: int, arrays: dict, config, min_sites: int, message_type: str, what: tuple[str, str],
                   parse):
        """Send the global model to every connected site as ``message_type`` and read each reply with
        ``parse(message)``; ``what``: (verb, noun) for the reasons. Returns ({site: parsed reply}, {site: why its
        reply failed}, {node: why it dropped})."""
        from flwr.app import RecordDict

        record = arrays_to_record(arrays)
        nodes = sorted(self.grid.get_node_ids())
        got, dropped = self._exchange(lambda n: RecordDict({"arrays": record, "config": config(rnd)}),
                                      nodes, message_type, rnd, min(min_sites, len(nodes)))
        parsed, failed = {}, {}
        for n, msg in sorted(got.items()):
            if msg.has_error():
                failed[self.name(n)] = f"the site could not {what[0]}: {msg.error.reason}"
                continue
            try:
                parsed[self.name(n)] = parse(msg)
            except (KeyError, TypeError, ValueError) as exc:
                failed[self.name(n)] = f"malformed {what[1]} reply ({exc.__class__.__name__}: {exc})"
        return parsed, failed, dropped

    def _statistics_round(self, rnd: int, arrays: dict, config, min_sites: int) -> tuple[dict, dict]:
        """``batchnorm: recompute``: every connected site measures the new global model's BatchNorm statistics on
        its training images (a query message); the checked replies are pooled into the model
        (:func:`medpipe.fl.bnstats.statistics_round`). Returns the model and the round's record of it."""
        from flwr.app import MessageType

        replies, failed, bn_dropped = self._broadcast(
            rnd, arrays, config, min_sites, MessageType.QUERY, ("measure", "statistics"),
            lambda msg: (restore_scalars(record_to_arrays(msg.content["arrays"]), arrays),
                         dict(msg.content["metrics"])))
        arrays, used, excluded = statistics_round(arrays, replies, self.guard, self.method, self.trim)
        excluded = {**failed, **excluded}
        for name, reason in sorted(excluded.items()):
            log.warning("round %d: BatchNorm statistics from site %s excluded: %s", rnd, name, reason)
        if used:
            log.info("round %d: BatchNorm statistics of the global model from %d site(s): %s", rnd, len(used),
                     {k: v for k, v in used.items()})
        else:
            log.warning("round %d: no BatchNorm statistics arrived; the global model keeps the aggregated ones", rnd)
        return arrays, {"sites": used, "excluded": excluded,
                        "dropped": {self.name(n): r for n, r in bn_dropped.items()}}

    def _evaluate_round(self, rnd: int, arrays: dict, config, min_sites: int, classes: list[str]):
        """Federated evaluation of the new global model on every connected site's validation split:
        per-site figures, the pooled figures, the sites that dropped out and the replies excluded."""
        from flwr.app import MessageType

        metrics, failed, ev_dropped = self._broadcast(rnd, arrays, config, min_sites, MessageType.EVALUATE,
                                                      ("evaluate", "evaluation"),
                                                      lambda msg: dict(msg.content["metrics"]))
        per_site, pooled, excluded = evaluation_round(metrics, classes, self.guard, failed)
        for name, reason in sorted(excluded.items()):
            log.warning("round %d: evaluation from site %s excluded: %s", rnd, name, reason)
        for name, m in per_site.items():
            log.info("round %d: site %s val n=%d auc=%.4f bacc=%.4f", rnd, name, m["n_val"], m["macro_auc"],
                     m["balanced_accuracy"])
        log.info("round %d: pooled val n=%d auc=%.4f bacc=%.4f", rnd, pooled["n"], pooled["macro_auc"],
                 pooled["balanced_accuracy"])
        return per_site, pooled, ev_dropped, excluded

    def _record_round(self, state: dict, rec: dict, arrays: dict) -> None:
        """Update the run state with a finished round, checkpoint, append metrics.jsonl, call the callbacks."""
        rnd, pooled = rec["round"], rec["val_pooled"]
        improved = improves(state["best_pooled_auc"], pooled["macro_auc"])
        if improved:
            state["best_round"], state["best_pooled_auc"] = rnd, pooled["macro_auc"]
        for name, u in rec["trained"].items():
            s = state["sites"].setdefault(name, {"rounds": 0})
            s.update(train_samples=u["n_train"], rounds=s["rounds"] + 1)
        for name, m in rec["val_sites"].items():
            state["sites"].setdefault(name, {"rounds": 0})["val_samples"] = m["n_val"]
        state["round"] = rnd
        state["history"].append(rec)
        self._checkpoint(state, arrays, improved)
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(to_json(rec) + "\n")
        log.info("round %d: checkpoint written%s", rnd, " (best so far)" if improved else "")
        for cb in self.callbacks:
            try:
                cb(rec)
            except Exception as exc:  # a tracking callback must not end the run
                log.warning("round callback %r failed: %s", cb, exc)

    def _package(self, state: dict, classes: list[str], tc) -> dict:
        import flwr
        import torch

        best = load_arrays(self.run_dir / "checkpoints" / "best.safetensors", state.get("best_sha256"))
        model = create_model(tc.model, len(classes))
        model.load_state_dict(to_torch(best))
        hist = {h["round"]: h for h in state["history"]}
        pooled = hist.get(state["best_round"], {}).get("val_pooled", {})
        model_dir = self.run_dir / "model"
        metrics = {"best_round": state["best_round"], "val": pooled,
                   "val_sites": hist.get(state["best_round"], {}).get("val_sites", {})}
        decision = None
        if pooled.get("support") and sum(pooled["support"]) > 0:
            # labels under the run's rule where it can be had without the sites' images: `prior` from the pooled
            # validation class counts, tau 1 for natural-frequency training (the default recipe), 0 after
            # balancing; class_bias needs per-image validation predictions and falls back to prior
            decision = prior_from_counts(pooled["support"], classes, tc.decision_rule,
                                         tau=1.0 if tc.imbalance == "none" else 0.0)
        cfg = self.cfg
        federated = {
            "engine": "flower", "engine_version": flwr.__version__, "strategy": cfg["strategy"], "aggregation": self.method,
            "mu": float(cfg["mu"]) if cfg["strategy"] == "fedprox" else 0.0, "rounds": int(cfg["rounds"]),
            "local_epochs": int(cfg["local_epochs"]), "min_sites": int(cfg["min_sites"]),
            "fraction": float(cfg["fraction"]), "best_round": state["best_round"],
            "lr_schedule": cfg.get("lr_schedule", "local"), "local_optimizer": cfg.get("local_optimizer", "reset"),
            "label_skew": ("calibrate: each site's training loss saw its logits plus log(site / federation class "
                           "frequencies); the model predicts at the federation's frequencies"
                           if cfg.get("label_skew") == "calibrate" else "none"),
            "server_optimizer": server_optimizer(cfg, ()).describe(),
            "batchnorm": BN_DESCRIPTION[cfg.get("batchnorm", "global")],
            "pooled_auc": "summed per-site histograms of predicted probabilities (1000 bins); no images moved",
            "calibration": "none (temperature 1.0): validation images stay at the sites",
            "decision": ("prior from the pooled validation class counts (no per-image fit)" if decision
                         else "argmax (no pooled class counts)"),
            "sites": state["sites"], "torch": torch.__version__,
        }
        save_package(model_dir, model.eval(), name=f"{tc.model}-federated", arch=tc.model, classes=classes,
                     spec=tc.preprocess(), temperature=1.0, metrics=metrics, config=tc.to_dict(),
                     decision=decision, federated=federated, intended_use=IntendedUse(figures_from=(
                         f"validation splits of the {len(state['sites'])} federated sites, pooled as per-site "
                         "histograms (no image left its site); figures on other sites, populations, devices or "
                         "image types are unknown")))
        return {"model_dir": str(model_dir), "best_round": state["best_round"]}
