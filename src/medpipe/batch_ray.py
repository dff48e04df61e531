"""Batch transform on a Ray cluster: the same job as :mod:`medpipe.batch`, its shards answered by Ray Data.

    medpipe batch --engine ray --model RUN/model --input IMAGES/ --output OUT/ [--ray-address auto|HOST:PORT]

The listing, the resume rule, the output files and the rows are :func:`medpipe.batch.run_batch`'s; only the
shards are answered elsewhere. A Ray Dataset holds one row per shard still to do (one block each); a Ray task
reads and decodes a shard's images (the same :func:`medpipe.batch.decode_item` as the local engine, with the
package's preprocessing spec and no model), and an actor pool holding one Predictor per actor (the same
backends; ``auto`` decided once per actor, on its own node) turns the pixels into rows. The driver writes each
answered shard atomically as it arrives, so a rerun skips finished shards and no row is written twice. A row's
patient metadata (manifest columns) travels with its item to the actor, which encodes it as the local engine
does (an error row naming the field for a value the model cannot take). Ray
retries the tasks and restarts the actors of a node that dies, so a job that loses a worker node still
answers every item exactly once.

The package travels to the actors through Ray's object store (the driver reads it once); the input must be
readable by every node at the path the driver lists (a shared file system, or ``s3://``).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from medpipe.batch import Item, LocalEngine, decode_item, run_batch
from medpipe.data import imageio
from medpipe.errors import BatchError, ImageError, StorageError
from medpipe.package import read_meta
from medpipe.utils import to_json

log = logging.getLogger(__name__)

# Ray's CPU shares (scheduling tokens; the actor's torch threads are set apart): a decoding task and a predictor
# actor differ, so Ray Data keeps decoding in its own tasks instead of fusing it into the actors, and a node
# that takes over the actor of a lost node still has room to decode
DECODE_CPUS = 0.5
ACTOR_CPUS = 0.25


def import_ray():
    """Ray and Ray Data, or a clear error naming the extra that brings them."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise BatchError("--engine ray needs Ray Data: pip install 'medpipe-imaging[ray]'") from None
    return ray


# -- what travels: items as JSON, pixels as arrays ------------------------------------------------

def _item_json(it: Item) -> list:
    return [it.index, it.id, it.path, None if it.file is None else str(it.file),
            None if it.error is None else list(it.error), it.url, it.metadata]


def _item(x: list) -> Item:
    index, iid, path, file, error, url, metadata = x
    return Item(index, iid, path, None if file is None else Path(file), None if error is None else tuple(error),
                url=url, metadata=metadata)


def _error_json(exc: Exception) -> list:
    """[code, reason, transient] of what :func:`medpipe.batch.decode_item` returned instead of pixels."""
    if isinstance(exc, ImageError):
        return [exc.code, exc.reason, False]
    return [getattr(exc, "code", "unreadable_file"), str(exc), bool(getattr(exc, "transient", False))]


def _error(x: list) -> Exception:
    code, reason, transient = x
    if transient:  # an s3:// object that could not be reached: a transient row, asked again by a rerun
        return StorageError(reason, transient=True)
    exc = ImageError(reason)
    exc.code = code
    return exc


class SpecDecoder:
    """What :func:`medpipe.batch.decode_item` needs of a Predictor, from the package's preprocessing spec alone
    (no model, no torch): a decoding task runs on any node."""

    def __init__(self, spec, max_pixels: int = imageio.DEFAULT_MAX_PIXELS):
        self.spec = spec
        self.max_pixels = max_pixels

    def decode(self, data: bytes, name: str | None = None):
        return self.spec.decode(data, name, max_pixels=self.max_pixels)

    def prepare_array(self, arr):
        return self.spec.prepare_array(arr, max_pixels=self.max_pixels)


def decode_shard(row: dict, spec) -> dict:
    """A Ray task: one shard's items -> its pixels (N_ok x H x W x 3 uint8) and, per item, why not (or None)."""
    import numpy as np

    decoder = SpecDecoder(spec)
    pixels, errors = [], []
    for it in map(_item, json.loads(row["items"])):
        d = None if it.error else decode_item(decoder, it)
        if isinstance(d, Exception):
            errors.append(_error_json(d))
        else:
            errors.append(None)
            if d is not None:
                pixels.append(d)
    stack = np.stack(pixels) if pixels else np.zeros((0, *spec.size, 3), np.uint8)
    return {"shard": row["shard"], "items": row["items"], "errors": to_json(errors), "pixels": stack}


class ShardPredictor:
    """A Ray actor: the package (from the object store) in a Predictor, turning decoded shards into rows."""

    def __init__(self, package_ref, backend: str, device: str, batch_size: int, decision_rule: str | None,
                 tta: bool, threads: int):
        import ray
        import torch

        torch.set_num_threads(max(1, threads))
        self.folder = Path(tempfile.mkdtemp(prefix="medpipe-ray-model-"))
        for rel, data in ray.get(package_ref).items():
            dest = self.folder / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        self.engine = LocalEngine(str(self.folder), backend, device, batch_size, 1, decision_rule, tta)
        log.info("ray actor: backend %s (%s)", self.engine.predictor.backend, self.engine.predictor.backend_reason)

    def __call__(self, row: dict) -> dict:
        items = [_item(x) for x in json.loads(row["items"])]
        pixels = iter(row["pixels"])
        decoded = []
        for it, err in zip(items, json.loads(row["errors"])):  # pixels, with the item's metadata for such a model
            decoded.append(None if it.error else _error(err) if err else self.engine.with_metadata(it, next(pixels)))
        rows = self.engine.rows(items, decoded)
        return {"shard": row["shard"], "rows": to_json(rows), "backend": self.engine.predictor.backend}

    def __del__(self):
        shutil.rmtree(getattr(self, "folder", ""), ignore_errors=True)


def package_files(folder: Path) -> dict[str, bytes]:
    """Every regular file of a package folder, by relative path (links are not followed)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


# Ray's driver replaces the Python SIGTERM handler (ray.init) and its shutdown resets the process's SIGTERM
# disposition to the default in C, leaving Python's table naming Ray's handler: code that saves and restores
# SIGTERM afterwards (a training run's GracefulStop) would put Ray's handler back. The engine that starts Ray
# puts back what it found.
KEPT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def python_signal_handlers() -> dict:
    """The Python handlers of :data:`KEPT_SIGNALS` now (none off the main thread, where none can be set)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: h for sig in KEPT_SIGNALS if (h := signal.getsignal(sig)) is not None}


def restore_signal_handlers(handlers: dict) -> None:
    """Install ``handlers`` again (Python's table and the process's disposition agree afterwards)."""
    if threading.current_thread() is threading.main_thread():
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


# -- the engine ----------------------------------------------------------------------------------

class RayEngine:
    """The shards of a batch job answered on a Ray cluster (``address``: ``auto``, ``HOST:PORT``, ``ray://...``,
    or None: a Ray instance started here for this job, or the one this process is already connected to).
    ``actors``: predictor actors (default: one per alive node)."""

    def __init__(self, model: str, *, address: str | None = None, backend: str = "auto", device: str = "auto",
                 batch_size: int = 32, decision_rule: str | None = None, tta: bool = False, actors: int | None = None):
        self.ray = import_ray()
        pkg = read_meta(model)
        self.spec = pkg.preprocessing
        self.files = package_files(pkg.dir)
        self.options = {"backend": backend, "device": device, "batch_size": max(1, batch_size),
                        "decision_rule": decision_rule, "tta": bool(tta)}
        self.actors = actors
        self.address = address
        self._handlers: dict = {}  # the signal handlers found before this engine started Ray
        self.meta = {"model": pkg.name, "version": pkg.version, "classes": list(pkg.classes), "backend": backend,
                     "tta": bool(tta), "engine": "ray"}

    def _connect(self) -> bool:
        """Connect (or start a local instance); True when this engine did, and so disconnects at the end."""
        if self.ray.is_initialized():
            return False
        self._handlers = python_signal_handlers()
        try:
            self.ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=True,
                          include_dashboard=False if self.address is None else None)
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception when its own node times out starting
            restore_signal_handlers(self._handlers)
            where = self.address or "a local instance"
            raise BatchError(f"--ray-address {where}: cannot connect to Ray ({str(exc).splitlines()[0][:200]})") from None
        return True

    def _disconnect(self) -> None:
        self.ray.shutdown()
        restore_signal_handlers(self._handlers)

    def _plan(self) -> tuple[int, int, float]:
        """(actors, torch threads per actor, GPUs per actor) from the cluster's alive nodes."""
        nodes = [n for n in self.ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
        cpus = sum(n["Resources"]["CPU"] for n in nodes)
        gpus = self.ray.cluster_resources().get("GPU", 0)
        actors = self.actors or max(1, len(nodes), int(gpus) if self.options["device"] != "cpu" else 0)
        threads = max(1, math.floor(cpus / actors))
        use_gpu = self.options["device"] != "cpu" and gpus >= actors
        return actors, threads, 1.0 if use_gpu else 0.0

    def results(self, todo: list[tuple[int, list[Item]]]):
        """(shard number, rows) for each shard of ``todo``, in the order they finish."""
        if not todo:
            return
        started = self._connect()
        ray = self.ray
        try:
            logging.getLogger("ray.data").setLevel(max(logging.WARNING, logging.getLogger().getEffectiveLevel()))
            actors, threads, gpus = self._plan()
            self.meta.update(ray_actors=actors, ray_threads_per_actor=threads)
            log.info("ray: %d shards on %d actors (%d threads each, %g GPU)", len(todo), actors, threads, gpus)
            ds = ray.data.from_items([{"shard": k, "items": to_json([_item_json(it) for it in g])} for k, g in todo],
                                     override_num_blocks=len(todo))
            ds = ds.map(decode_shard, fn_kwargs={"spec": self.spec}, num_cpus=DECODE_CPUS)
            package_ref = ray.put(self.files)  # held here until the job ends: a restarted actor reads it again
            ds = ds.map(ShardPredictor, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=ACTOR_CPUS,
                        num_gpus=gpus, fn_constructor_kwargs={"package_ref": package_ref, **self.options,
                                                              "threads": threads})
            backends = set()
            for r in ds.iter_rows():
                backends.add(r["backend"])
                self.meta.update(backend=",".join(sorted(backends)))
                yield int(r["shard"]), json.loads(r["rows"])
        finally:
            if started:
                self._disconnect()


def run_batch_ray(model: str, input_path: str, output: str, *, address: str | None = None, actors: int | None = None,
                  backend: str = "auto", device: str = "auto", batch_size: int = 32, decision_rule: str | None = None,
                  tta: bool = False, **kwargs) -> dict:
    """:func:`medpipe.batch.run_batch` with its shards answered on Ray (keyword arguments: run_batch's)."""
    if kwargs.get("url"):
        raise BatchError("--engine ray runs a local --model on the cluster; --url sends files to one server")
    return run_batch(model, input_path, output, backend=backend, device=device, batch_size=batch_size,
                     decision_rule=decision_rule, tta=tta,
                     engine_factory=lambda: RayEngine(model, address=address, backend=backend, device=device,
                                                      batch_size=batch_size, decision_rule=decision_rule, tta=tta,
                                                      actors=actors),
                     **kwargs)
