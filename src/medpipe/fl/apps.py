"""The Flower ServerApp and ClientApp (Message API). Flower runs them: the SuperLink starts the
ServerApp for a run, each SuperNode starts the ClientApp for each message it receives.

Wire format (medpipe.fl.records): model weights travel as a Flower ``ArrayRecord`` holding one
safetensors blob; configuration and metrics as ``ConfigRecord``/``MetricRecord`` (protobuf scalars
and lists). Nothing is pickled.
"""

from __future__ import annotations

import json
import logging
import sys

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from medpipe.fl.records import arrays_to_record, record_to_arrays
from medpipe.fl.server import Coordinator
from medpipe.fl.site import Site
from medpipe.fl.strategy import fit_kwargs

server_app = ServerApp()
client_app = ClientApp()
_SITES: dict = {}  # one Site per (data dir, config) for the life of this ClientApp process
SITE_STATE = "medpipe-site-state"  # Context.state key: a site's optimiser / BatchNorm state between rounds


def _logging() -> None:
    if not logging.getLogger("medpipe").handlers:
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("medpipe").addHandler(h)
        logging.getLogger("medpipe").setLevel(logging.INFO)


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    from pathlib import Path

    _logging()
    Coordinator(Path(str(context.run_config["run-dir"])), grid).run()


def _site(message: Message, context: Context):
    cfg = message.content["config"]
    node = context.node_config
    data_dir, name = str(node["data-dir"]), str(node.get("site", "site"))
    overrides = json.loads(str(node.get("overrides", "{}")))
    handlers = json.loads(str(node.get("handlers", "[]")))
    key = (data_dir, str(cfg["train-config"]), str(cfg["classes"]))
    if key not in _SITES:
        _SITES[key] = Site(data_dir, name, json.loads(str(cfg["train-config"])), list(cfg["classes"]),
                           overrides=overrides, handlers=handlers)
    return _SITES[key], cfg


@client_app.train()
def client_train(message: Message, context: Context) -> Message:
    _logging()
    log = logging.getLogger("medpipe.fl")
    site, cfg = _site(message, context)
    rnd = int(cfg["server-round"])
    log.info("site %s: round %d local training started (%d epochs, mu=%g)", site.name, rnd,
             int(cfg["local-epochs"]), float(cfg["mu"]))
    kw = fit_kwargs(cfg)
    stateful = kw["local_optimizer"] == "keep" or kw["batchnorm"] == "local"
    if stateful and not (site.optimizer_state or site.bn_state) and SITE_STATE in context.state:
        # a new ClientApp process: the site's own state from its previous round, kept by its SuperNode
        site.load_state_arrays(record_to_arrays(context.state[SITE_STATE]),
                               str(context.state[SITE_STATE + "-groups"]["param-groups"]))
    arrays, m = site.fit(record_to_arrays(message.content["arrays"]), rnd, **kw)
    if stateful:
        state, groups = site.state_arrays()
        context.state[SITE_STATE] = arrays_to_record(state)
        context.state[SITE_STATE + "-groups"] = ConfigRecord({"param-groups": groups})
    log.info("site %s: round %d local training done (train_loss %.4f)", site.name, rnd, m["train_loss"])
    content = RecordDict({"arrays": arrays_to_record(arrays),
                          "metrics": MetricRecord({"num-examples": m["n_train"], "train_loss": m["train_loss"],
                                                   "class-counts": m["class_counts"]}),
                          "site": ConfigRecord({"name": site.name})})
    return Message(content, reply_to=message)


@client_app.evaluate()
def client_evaluate(message: Message, context: Context) -> Message:
    _logging()
    site, cfg = _site(message, context)
    metrics = site.evaluation_reply(record_to_arrays(message.content["arrays"]))
    nan_classes = metrics.pop("nan_classes")
    content = RecordDict({"metrics": MetricRecord(metrics),
                          "site": ConfigRecord({"name": site.name, "nan_classes": nan_classes or [""]})})
    return Message(content, reply_to=message)


@client_app.query()
def client_statistics(message: Message, context: Context) -> Message:
    """``batchnorm: recompute``: the global model's BatchNorm statistics on this site's training images."""
    _logging()
    site, cfg = _site(message, context)
    stats, n = site.bn_statistics(record_to_arrays(message.content["arrays"]))
    logging.getLogger("medpipe.fl").info("site %s: round %d BatchNorm statistics measured on %d images", site.name,
                                         int(cfg["server-round"]), n)
    content = RecordDict({"arrays": arrays_to_record(stats), "metrics": MetricRecord({"num-examples": n}),
                          "site": ConfigRecord({"name": site.name})})
    return Message(content, reply_to=message)
