"""The inference runtimes behind one interface, and a registry of them by name.

A backend loads a package's model once (:meth:`Backend.load`), runs a batch of preprocessed images
(:meth:`Backend.run`: float32 N x 3 x S x S in, float32 logits on the CPU out) and says what it runs
(:meth:`Backend.describe`). The built-in ones live one runtime per file and are imported only when
asked for, so this module (which the command line reads for ``--backend``) loads neither torch nor a
runtime::

    eager      medpipe.infer.torch_backend     the PyTorch model as it is (any device)
    cudagraph  medpipe.infer.torch_backend     the model captured as CUDA graphs per batch bucket (CUDA)
    onnx       medpipe.infer.onnx_backend      ONNX Runtime on the package's FP32 graph (CPU)
    int8       medpipe.infer.onnx_backend      ONNX Runtime on the package's gated INT8 graph (CPU)
    openvino   medpipe.infer.openvino_backend  OpenVINO on the gated INT8 graph, its own gate (CPU)

Adding a runtime (e.g. TensorRT on a GPU machine) is one file with a :class:`Backend` subclass and one
:func:`register` call; the Predictor needs no change. ``auto``'s choice among them is
:mod:`medpipe.infer.auto`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from medpipe.errors import MedpipeError

if TYPE_CHECKING:  # annotations only: the command line imports this module without torch
    import torch

    from medpipe.package import PackageMeta


@dataclass
class LoadContext:
    """What a backend may load from: the package's eager model (eval mode, channels-last, on ``device``),
    its description, and the Predictor's settings. ``fp32_onnx()`` exports the FP32 ONNX graph once and
    shares it (auto's start-up speed check and the onnx backend)."""

    model: Any
    meta: "PackageMeta"
    device: Any
    threads: int | None = None
    max_batch: int = 16
    fp32_onnx: Callable[[], bytes] | None = None
    streams: int = 0  # the openvino backend's parallel infer streams (OpenVinoSession; 0: automatic)


class Backend:
    """One inference runtime. Subclasses set ``name`` and implement :meth:`load` and :meth:`run`.

    ``record``: the INT8 record (gate figures, temperature) when the backend runs the gated INT8 model;
    the Predictor then applies that record's temperature and cites its gate.

    Embeddings (:mod:`medpipe.monitor.embedding`): a backend whose graph also returns the penultimate-layer
    features says how many per image in :meth:`embedding_size` and hands each :meth:`run`'s features
    (float32 N x F, CPU) to every callable in ``feature_sinks``; the eager model is read by a hook instead."""

    name: ClassVar[str] = ""
    runs_on_torch: ClassVar[bool] = True  # its forward pass uses torch's threads (False: another runtime's)
    record: dict | None = None

    @classmethod
    def load(cls, ctx: LoadContext) -> "Backend":
        raise NotImplementedError

    def run(self, x: "torch.Tensor") -> "torch.Tensor":
        """Logits (float32, CPU) for a batch of preprocessed images."""
        raise NotImplementedError

    def embedding_size(self) -> int | None:
        """Features per image this backend hands to ``feature_sinks`` (None: it gives none)."""
        return None

    def add_feature_sink(self, sink: Callable[["torch.Tensor"], None]) -> None:
        """Call ``sink(features)`` after every :meth:`run` (ValueError where :meth:`embedding_size` is None)."""
        if self.embedding_size() is None:
            raise ValueError(f"the {self.name} backend gives no embedding")
        self.__dict__.setdefault("feature_sinks", []).append(sink)

    def describe(self) -> dict:
        """What runs: at least ``backend`` and ``runtime``."""
        return {"backend": self.name, "runtime": type(self).__name__}

    def warm(self) -> None:
        """Prepare every batch size the server will meet (a no-op unless the runtime compiles per size)."""


@dataclass(frozen=True)
class BackendDef:
    """A registry entry: the class (or ``"module:Class"``, imported when first used), where it runs
    (``cpu``, ``cuda`` or ``any``) and the backend to suggest when it cannot start."""

    target: Any
    device: str = "any"
    next_choice: str = "eager"


REGISTRY: dict[str, BackendDef] = {
    "eager": BackendDef("medpipe.infer.torch_backend:EagerBackend", "any", "eager"),
    "onnx": BackendDef("medpipe.infer.onnx_backend:OnnxBackend", "cpu", "eager"),
    "int8": BackendDef("medpipe.infer.onnx_backend:Int8Backend", "cpu", "onnx"),
    "openvino": BackendDef("medpipe.infer.openvino_backend:OpenVinoBackend", "cpu", "int8"),
    "cudagraph": BackendDef("medpipe.infer.torch_backend:CudaGraphBackend", "cuda", "eager"),
}
BACKENDS = ("auto", *REGISTRY)  # the built-in names ``--backend`` offers


def register(name: str, target, *, device: str = "any", next_choice: str = "eager") -> None:
    """Add (or replace) a backend: ``target`` is a :class:`Backend` subclass or ``"module:Class"``."""
    if device not in ("cpu", "cuda", "any"):
        raise ValueError(f"device must be cpu, cuda or any, got {device!r}")
    if name == "auto":
        raise ValueError("'auto' is the choice among backends, not a backend")
    REGISTRY[name] = BackendDef(target, device, next_choice)


def definition(name: str) -> BackendDef:
    """The registry entry for ``name`` (KeyError for an unknown name; :func:`check_name` says it clearly)."""
    return REGISTRY[name]


def backend_class(name: str) -> type[Backend]:
    """The registered class for ``name``, imported on first use."""
    target = REGISTRY[name].target
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    return target


def check_name(backend: str, device_type: str) -> None:
    """MedpipeError for an unknown backend or one asked for on a device it does not run on."""
    if backend != "auto" and backend not in REGISTRY:
        raise MedpipeError(f"unknown backend {backend!r}; choose one of {', '.join(('auto', *REGISTRY))}")
    where = REGISTRY[backend].device if backend != "auto" else "any"
    if where == "cpu" and device_type != "cpu":
        raise MedpipeError(f"the {backend} backend runs on CPU; use --backend eager or cudagraph with --device cuda")
    if where == "cuda" and device_type != "cuda":
        raise MedpipeError(f"the {backend} backend needs --device cuda (and a GPU)")
