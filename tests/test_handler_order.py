"""The engine's handlers act in their declared order (``Order``), never in the order they were attached."""

import itertools
import shutil
from pathlib import Path

import pytest
import torch

ORDERS = list(itertools.permutations(["mix", "ema", "checkpoint", "signal"]))


@pytest.fixture(scope="module")
def source(data_dir):
    from medpipe.config import make_config
    from medpipe.train.data import CachedSource

    cfg = make_config({"model": "densenet-test", "image_size": 32, "batch_size": 8, "max_steps_per_epoch": 2,
                       "workers": 0, "epochs": 2, "warmup_epochs": 0.5, "lr": 0.002, "deterministic": True,
                       "mixup_alpha": 0.4, "ema_decay": 0.9, "precision": "fp32"})
    src = CachedSource(data_dir, cfg)
    yield cfg, src
    src.close()


class _SignalAt:
    """What SIGTERM does to ``GracefulStop``, at global step ``step``, without a real signal."""

    def __init__(self, stop, step: int):
        self.stop, self.step = stop, step

    def attach(self, engine):
        from medpipe.train.engine import Events

        engine.on(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine):
        if engine.state.iteration == self.step:
            self.stop.received = "SIGTERM"


def _keep_epoch1(engine):
    path = Path(engine.state.checkpoint)
    if engine.state.epoch == 1 and path.name == "last.pt":
        shutil.copyfile(path, path.with_name("epoch1.pt"))


def _train(cfg, src, folder, order, start=None, stop_at=None):
    """Train to the end of epoch 2 with the recipe and standard handlers attached in ``order``, from the
    checkpoint ``start`` (or from scratch); with ``stop_at``: stopped by a signal at that global step first,
    then resumed from its last.pt (handlers attached in the same order). Returns the final weights."""
    from medpipe.recipe import MixBatches, WeightEMA
    from medpipe.train.checkpoint import load_checkpoint
    from medpipe.train.engine import Engine, Events, TrainingInterrupted
    from medpipe.train.handlers import Checkpointer, GracefulStop
    from medpipe.utils import seed_everything

    def engine(snap, signal_at=None):
        seed_everything(cfg.seed)
        e = Engine.create(cfg, src, torch.device("cpu"))
        if snap is not None:
            e.restore(snap)
        ckpt = Checkpointer(folder)
        made = {"mix": MixBatches(len(src.classes), cfg.mixup_alpha, seed=cfg.seed),
                "ema": WeightEMA(cfg.ema_decay, folder), "checkpoint": ckpt, "signal": GracefulStop(ckpt)}
        if signal_at is not None:  # attached first: in attach order, too, the signal comes before the stop's check
            e.attach(_SignalAt(made["signal"], signal_at))
        e.attach(*(made[name] for name in order))
        return e

    folder.mkdir(parents=True)
    if stop_at is not None:
        first = engine(start, stop_at)
        with pytest.raises(TrainingInterrupted, match=f"batch {stop_at - src.steps_per_epoch}"):
            first.fit()
        start = load_checkpoint(folder / "last.pt")
    e = engine(start)
    e.on(Events.CHECKPOINT_SAVED, _keep_epoch1)
    state = e.fit()
    assert state.epoch == 2 and state.iteration == 2 * src.steps_per_epoch
    return {k: v.clone() for k, v in e.net.state_dict().items()}


@pytest.fixture()
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a loaded machine
    yield
    torch.set_num_threads(threads)


def test_any_attach_order_gives_bit_identical_weights(source, tmp_path, one_thread):
    """Mixup, the weight average, the checkpoint and the signal stop attached in each of the 24 orders: from
    the checkpoint of epoch 1, a run stopped by a signal after epoch 2's first step (its checkpoint must hold
    the average of that step) and resumed ends with exactly the weights of a straight run. Attached in the
    order they used to run in, the signal stop before the average saved an average one step behind."""
    from medpipe.train.checkpoint import load_checkpoint

    cfg, src = source
    assert src.steps_per_epoch == 2
    straight = _train(cfg, src, tmp_path / "straight", ORDERS[0])
    epoch1 = load_checkpoint(tmp_path / "straight" / "epoch1.pt")
    assert epoch1["epoch"] == 1 and epoch1["parts"]["ema"]["raw"] is not None
    for i, order in enumerate(ORDERS):
        start = load_checkpoint(tmp_path / "straight" / "epoch1.pt")  # a fresh copy: the average updates in place
        got = _train(cfg, src, tmp_path / f"order{i}", order, start=start, stop_at=3)
        for name, want in straight.items():
            torch.testing.assert_close(got[name], want, rtol=0, atol=0, msg=f"attach order {order}: {name}")


def test_budget_decision_is_in_the_checkpoint_whatever_the_attach_order(source, tmp_path, one_thread):
    """The time budget decides the epoch count before the checkpoint stores it, also attached after it."""
    from medpipe.train.checkpoint import load_checkpoint
    from medpipe.train.engine import Engine
    from medpipe.train.handlers import Checkpointer, TimeBudget

    cfg, src = source
    for i, handlers in enumerate(([Checkpointer(tmp_path / "a"), TimeBudget(1e-6)],
                                  [TimeBudget(1e-6), Checkpointer(tmp_path / "b")])):
        engine = Engine.create(cfg, src, torch.device("cpu")).attach(*handlers)
        state = engine.fit()  # a budget far shorter than an epoch: one epoch
        assert state.epoch == state.max_epochs == state.budget_epochs == 1
        assert load_checkpoint(tmp_path / "ab"[i] / "last.pt")["budget_epochs"] == 1


def test_handlers_of_one_event_run_by_order_then_attach_order(source):
    from medpipe.train.engine import Engine, Events, Order

    cfg, src = source
    engine = Engine.create(cfg, src, torch.device("cpu"))
    seen = []
    for name, order in [("react1", Order.REACT), ("stop", Order.STOP), ("model", Order.MODEL),
                        ("react2", Order.REACT), ("save", Order.SAVE), ("default", None)]:
        args = () if order is None else (order,)
        engine.on(Events.STARTED, lambda e, name=name: seen.append(name), *args)
    engine.fire(Events.STARTED)
    assert seen == ["model", "save", "react1", "react2", "default", "stop"]
