"""A site's side of a round: local training from the global weights, and evaluation of them.

The site's data folder is an ordinary ingested folder (``medpipe ingest`` + ``medpipe split``): the
lesion-grouped split is the site's own and the pixel cache sits in it, so each round's process only
memory-maps it. Local training is one call of the training engine, "k epochs from these weights on
this site's data" with the run's recipe (imbalance handling and batch mixing over the site's own
labels), with FedProx's proximal term added to the loss when the strategy asks for it, at the rates
the server sets for the round (``lr_range``), and with the run's optimiser-state and BatchNorm policies
(``medpipe.fl.strategy``): a site that keeps its optimiser or its BatchNorm statistics keeps them in
this object, for the life of its process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

from medpipe.config import TrainConfig, make_config
from medpipe.errors import ConfigError, MedpipeError
from medpipe.fl.aggregate import restore_scalars, site_statistics
from medpipe.fl.bnstats import is_bn_buffer, measure
from medpipe.train.data import open_source
from medpipe.fl.losses import proximal_term
from medpipe.fl.strategy import site_logit_offset
from medpipe.train.engine import local_fit, predict_logits
from medpipe.train.predict import eval_batch
from medpipe.data.sources import load_records
from medpipe.metrics import compute_metrics
from medpipe.models import create_model
from medpipe.pipeline import load_handler
from medpipe.recipe import batch_handlers

log = logging.getLogger(__name__)


def to_numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def to_torch(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


class Site:
    """One site's data under the run's configuration and fixed class vocabulary."""

    def __init__(self, data_dir: str | os.PathLike, name: str, train_config: dict, classes: list[str], *,
                 overrides: dict | None = None, handlers: list[str] | None = None):
        self.name, self.data_dir = name, Path(data_dir)
        self.handlers = list(handlers or [])  # MODULE:NAME[:ARG,...] specs, made anew for each round
        cfg = make_config({**train_config, **(overrides or {})}).validate()
        if cfg.metadata.strip() not in ("", "none"):  # the aggregated model is the image network's shape
            raise ConfigError("federated training takes the image only: pass --metadata none (a metadata model is "
                              "trained with medpipe train)")
        self.cfg: TrainConfig = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)

        _, site_classes = load_records(self.data_dir)
        if list(site_classes) != list(classes):
            raise MedpipeError(f"site {name}: {self.data_dir}/classes.json is {site_classes}, but this run's class "
                               f"vocabulary is {classes}; ingest with --classes {','.join(classes)}")
        self.classes = list(classes)
        self.source = open_source(self.data_dir, cfg)

        self.reference = to_numpy(create_model(cfg.model, len(self.classes)).state_dict())
        self.optimizer_state: dict = {}  # AdamW's state between rounds (local_optimizer: keep)
        self.bn_state: dict[str, torch.Tensor] = {}  # own BatchNorm running statistics (batchnorm: local)
        self.n_train = int(np.sum(self.source.class_counts))
        absent = [c for c, n in zip(self.classes, self.source.class_counts) if n == 0]
        if absent:
            log.warning("site %s has no training images of %s; it still trains on the others", name, absent)

    def fit(self, arrays: dict[str, np.ndarray], server_round: int, epochs: int, mu: float = 0.0, *,
            lr_range: tuple[float, float] | None = None, local_optimizer: str = "reset",
            batchnorm: str = "global", extra_handlers: tuple = (),
            class_prior: list[float] | None = None) -> tuple[dict, dict]:
        """Local training from the global weights; returns (weights, metrics incl. ``n_train``).

        ``lr_range``: the round's (start, end) rates from the server (None: a warm-up + cosine of its own);
        ``local_optimizer``: ``reset`` or ``keep`` (AdamW's moments from this site's previous round);
        ``batchnorm``: ``global`` (train from the global running statistics) or ``local`` (from this
        site's own, kept from its previous round; the update still carries them, for the global fallback);
        ``extra_handlers``: engine handler objects attached besides the run's (e.g. a benchmark's);
        ``class_prior``: the federation's class frequencies (``label_skew: calibrate``): the training loss sees
        the logits plus log(this site's frequencies / those), :func:`medpipe.fl.strategy.site_logit_offset`."""
        weights = to_torch(restore_scalars(arrays, self.reference))
        if batchnorm == "local":
            weights.update({k: v.clone() for k, v in self.bn_state.items() if k in weights})
        terms = [proximal_term(weights, mu)] if mu > 0 else []

        cfg = dataclasses.replace(self.cfg, epochs=epochs)
        # the recipe's batch mixing as in `medpipe train`, drawn anew each round and at each site (the sites share
        # the seed); not the weight average: the site returns its raw weights to the aggregation
        mixing = batch_handlers(cfg, len(self.classes), stream=zlib.crc32(self.name.encode()) * 100_003 + server_round)
        new, records = local_fit(cfg, self.source, epochs=epochs, weights=weights, device=self.cfg.device
                                 if self.cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"),
                                 loss_terms=terms, handlers=[*mixing, *(load_handler(h) for h in self.handlers),
                                                                     *extra_handlers],
                                 epoch_offset=(server_round - 1) * epochs, lr_range=lr_range,
                                 optimizer_state=self.optimizer_state if local_optimizer == "keep" else None,
                                 logit_offset=None if class_prior is None else
                                 site_logit_offset(self.source.class_counts, class_prior))
        if batchnorm == "local":
            self.bn_state = {k: v.clone() for k, v in new.items() if is_bn_buffer(k)}
        out = to_numpy(new)
        last = records[-1] if records else {}
        return out, {"n_train": self.n_train, "train_loss": float(last.get("train_loss", float("nan"))),
                     "class_counts": [int(c) for c in self.source.class_counts]}

    def state_arrays(self) -> tuple[dict[str, np.ndarray], str]:
        """What this site keeps between rounds (its AdamW state, its BatchNorm statistics) as named arrays, and
        the optimiser's parameter groups as JSON: for a ClientApp that Flower starts as a new process for each
        message, kept in the run's ``Context.state`` on the site's own machine (:meth:`load_state_arrays`)."""
        arrays = {f"bn/{k}": v.detach().cpu().numpy() for k, v in self.bn_state.items()}
        opt = self.optimizer_state.get("optimizer")
        if not opt:
            return arrays, "[]"
        for idx, st in opt["state"].items():
            for k, v in st.items():
                arrays[f"opt/{idx}/{k}"] = torch.as_tensor(v).detach().cpu().numpy()
        return arrays, json.dumps(opt["param_groups"])

    def load_state_arrays(self, arrays: dict[str, np.ndarray], param_groups: str) -> None:
        """Inverse of :meth:`state_arrays`."""
        self.bn_state = {k[3:]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith("bn/")}
        state: dict[int, dict] = {}
        for k, v in arrays.items():
            if k.startswith("opt/"):
                _, idx, name = k.split("/", 2)
                v = np.array(v).reshape(()) if name == "step" else np.array(v)  # a 0-d step may come back as (1,)
                state.setdefault(int(idx), {})[name] = torch.from_numpy(v)
        self.optimizer_state = {"optimizer": {"state": state, "param_groups": json.loads(param_groups)}} if state else {}

    def bn_statistics(self, arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """The global model's BatchNorm running statistics measured on this site's training images (the eval
        preprocessing, the run's batch size; :func:`medpipe.fl.bnstats.measure`) and the number of images."""
        model = create_model(self.cfg.model, len(self.classes))
        model.load_state_dict(to_torch(restore_scalars(arrays, self.reference)))
        train, spec, size = self.source.train, self.cfg.preprocess(), max(2, int(self.cfg.batch_size))
        rows = train.rows
        # a last batch of one image has no batch variance: it joins the batch before it
        cuts = [i for i in range(0, len(rows), size) if len(rows) - i > 1 or i == 0]
        batches = (eval_batch(train.pixels[rows[a:b]], spec) for a, b in zip(cuts, [*cuts[1:], len(rows)]))
        return measure(model, batches), len(rows)

    def evaluation_reply(self, arrays: dict[str, np.ndarray]) -> dict:
        """The metrics an evaluation reply carries to the server (:meth:`evaluate`'s figures and statistics)."""
        r = self.evaluate(arrays)
        return {"num-examples": r["n_val"], "val_loss": r["val_loss"], "macro_auc": r["macro_auc"],
                "balanced_accuracy": r["balanced_accuracy"], "hist_pos": r["hist_pos"], "hist_neg": r["hist_neg"],
                "confusion": r["confusion"], "nan_classes": r["nan_classes"]}

    def evaluate(self, arrays: dict[str, np.ndarray]) -> dict:
        """The global model on this site's validation split: site metrics and the pooling statistics."""

        val = self.source.val
        model = create_model(self.cfg.model, len(self.classes))
        model.load_state_dict(to_torch(restore_scalars(arrays, self.reference)))
        model = model.to(memory_format=torch.channels_last)
        device = torch.device("cpu")
        logits = predict_logits(model, val.pixels, val.rows, self.cfg.preprocess(), device)
        n = len(val)
        if n == 0:
            raise MedpipeError(f"site {self.name}: the validation split is empty")
        probs = torch.softmax(logits, 1).numpy()
        with warnings.catch_warnings():  # the absent-class warning is logged once below, per site
            warnings.simplefilter("ignore")
            m = compute_metrics(val.labels, probs, self.classes, bootstrap=0)
        absent = [c for c, v in m["per_class"].items() if not np.isfinite(v["auc"])]
        if absent:
            log.warning("site %s: AUC undefined (NaN) for %s (absent from its validation split)", self.name, absent)
        loss = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(val.labels)))
        return {"n_val": n, "val_loss": loss, "macro_auc": float(m["macro_auc"]),
                "balanced_accuracy": float(m["balanced_accuracy"]), "nan_classes": absent,
                **site_statistics(val.labels, probs, len(self.classes))}
