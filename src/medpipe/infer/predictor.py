"""The one door to a trained model: load a package once; bytes or arrays in, labelled probabilities out.

Used by ``medpipe predict``, ``medpipe evaluate``, the SageMaker handlers (and the server and batch
jobs), so every path applies the same preprocessing — built from the package's spec — and the same
calibration. Inference is deterministic (eval preset, ``inference_mode``, no shared random state).

A package that takes patient metadata (``meta.metadata``) is given it per image beside the pixels: a dict
``{"age": 55, "sex": "male", "site": "back"}`` (any field may be left out, or None for none), checked and
encoded by the package's :class:`medpipe.data.metadata.MetadataSpec`; such a package runs on the eager
backend. Metadata sent to an image-only package is refused, never ignored.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medpipe import decision
from medpipe.data import imageio
from medpipe.errors import MedpipeError, MetadataError, MetadataNotTakenError, PredictionError
from medpipe.infer.auto import open_backend, resolve_backend  # noqa: F401  (resolve_backend: the choice alone)
from medpipe.infer.backends import BACKENDS, LoadContext  # noqa: F401  (BACKENDS: the names --backend offers)
from medpipe.package import load_package
from medpipe.preprocess import eval_batch, flip_averaged, use_plain_tensors
from medpipe.utils import resolve_device
from medpipe.infer.onnx_runtime import onnx_bytes
from medpipe.infer.explain import GradCamExplainer

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    label: str
    class_index: int
    probabilities: dict[str, float]
    decision_rule: str = "argmax"  # which rule of medpipe.decision chose the label
    tta: bool = False  # probabilities averaged over the four flips of the image

    def as_dict(self) -> dict:
        return {"label": self.label, "class_index": self.class_index, "probabilities": self.probabilities,
                "decision_rule": self.decision_rule, "tta": self.tta,
                "most_likely": max(self.probabilities, key=self.probabilities.get)}  # label may differ: the rule


class Predictor:
    """Load once, predict many times. ``backend``: a registered backend (medpipe.infer.backends: eager
    PyTorch, ONNX Runtime FP32 or INT8 on CPU, OpenVINO running the gated INT8 graph on CPU, CUDA graphs
    of the eager model on CUDA) or ``auto`` (medpipe.infer.auto); None (the default): eager.
    ``decision_rule``: the rule that picks each label (medpipe.decision; None: the package's default); the
    probabilities are the same under every rule.
    ``streams``: the openvino backend's parallel infer streams, a batch split across them (0: automatic;
    medpipe.infer.openvino_runtime.OpenVinoSession); the other backends ignore it.
    ``tta``: by default average the logits over the image and its horizontal, vertical and double flips
    (four forward passes per image; a call may still ask for or against it)."""

    def __init__(self, package: str | Path, device: str = "auto", max_pixels: int = imageio.DEFAULT_MAX_PIXELS,
                 backend: str | None = None, threads: int | None = None, max_batch: int = 16,
                 decision_rule: str | None = None, tta: bool = False, streams: int = 0):
        use_plain_tensors()
        self.device = resolve_device(device)
        self.tta = bool(tta)
        self.model, self.meta = load_package(package, self.device)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.spec = self.meta.preprocessing
        self.metadata_spec = self.meta.metadata  # None: an image-only package
        if self.metadata_spec is not None and backend not in ("eager", "auto", None):
            raise MedpipeError(f"--backend {backend}: this package takes patient metadata, which only the eager "
                               "backend runs; use --backend eager (or auto)")
        if self.metadata_spec is not None:
            backend = "eager"
        self._fp32_onnx: bytes | None = None
        ctx = LoadContext(self.model, self.meta, self.device, threads, max_batch, self._onnx_fp32, streams)
        self.runtime, self.backend, self.backend_reason = open_backend(backend or "eager", ctx)
        if backend is None:  # nobody asked: say so rather than "asked for"
            self.backend_reason = "the library's default (backend='auto' lets medpipe choose)"
        if self.metadata_spec is not None:
            self.backend_reason = "the package takes patient metadata, which the eager backend runs"
        self._fp32_onnx = None  # only needed to start a backend
        self._explainer = None
        log.info("backend %s (%s)", self.backend, self.backend_reason)
        self.int8 = self.runtime.record  # the INT8 record (gate figures, temperature) when that model runs
        self.classes: list[str] = list(self.meta.classes)
        self.temperature = float(self.int8["temperature"] if self.int8 else self.meta.temperature)
        self.decision_rule, self._offsets = decision.resolve(self.meta.decision, decision_rule, len(self.classes))
        # flip TTA's own calibration (temperature and decision offsets fitted on TTA validation logits), where the
        # package has it (trained with tta) and the backend is the FP32 model's; otherwise the plain one
        cal_tta = None if self.int8 else self.meta.calibration.tta
        self._tta_temperature, self._tta_offsets = self.temperature, self._offsets
        if cal_tta:
            self._tta_temperature = cal_tta.temperature
            if cal_tta.decision is not None:
                self._tta_offsets = decision.resolve(cal_tta.decision, self.decision_rule, len(self.classes))[1]
        self.max_pixels = max_pixels
        self.name = self.meta.name
        self.version = self.meta.version
        self._lock = threading.Lock()

    def warm(self) -> None:
        """Prepare every batch size the server will meet (OpenVINO compiles one model per batch bucket)."""
        self.runtime.warm()

    def _onnx_fp32(self) -> bytes:
        """The package's FP32 ONNX graph, exported once (auto's start-up check and the onnx backend share it)."""
        if self._fp32_onnx is None:
            self._fp32_onnx = onnx_bytes(self.model, self.spec.image_size)
        return self._fp32_onnx

    @property
    def size(self) -> tuple[int, int]:
        return self.spec.size

    def decode(self, data: bytes, name: str | None = None) -> np.ndarray:
        """Bytes -> resized RGB uint8 (the same function fills the training pixel cache)."""
        return self.spec.decode(data, name, max_pixels=self.max_pixels)

    def prepare_array(self, arr: np.ndarray) -> np.ndarray:
        """An in-memory image -> resized RGB uint8 (see :meth:`PreprocessSpec.prepare_array`)."""
        return self.spec.prepare_array(arr, max_pixels=self.max_pixels)

    def _forward(self, x: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
        if m is None:
            return self.runtime.run(x)
        return self.model(x.to(self.device).contiguous(memory_format=torch.channels_last),
                          m.to(self.device)).float().cpu()

    def encode_metadata(self, items, n: int, names: list[str] | None = None) -> torch.Tensor | None:
        """``items`` (one dict or None per image, an encoded N x dim array, or None) -> the model's metadata
        tensor (zeros where none given), or None for an image-only package. MetadataError naming the field
        and the image for a bad value, or for metadata sent to an image-only package."""
        if self.metadata_spec is None:
            if items is not None and any(v for v in items):
                raise MetadataNotTakenError("metadata: this model takes the image only (it was trained without "
                                            "patient metadata); send none")
            return None
        if items is None:
            return torch.zeros((n, self.metadata_spec.dim))
        if isinstance(items, torch.Tensor):
            items = items.numpy()
        if isinstance(items, np.ndarray):
            if items.shape != (n, self.metadata_spec.dim):
                raise MetadataError(f"metadata: encoded metadata must be {n} x {self.metadata_spec.dim}, "
                                    f"got {items.shape}")
            return torch.from_numpy(np.ascontiguousarray(items, np.float32))
        items = list(items)
        if len(items) != n:
            raise MetadataError(f"metadata: {len(items)} entries for {n} images")
        return torch.from_numpy(self.metadata_spec.encode_many(items, names))

    @torch.inference_mode()
    def logits(self, pixels: list[np.ndarray] | np.ndarray, tta: bool | None = None, metadata=None) -> torch.Tensor:
        m = self.encode_metadata(metadata, len(pixels))
        return self._logits(eval_batch(list(pixels), self.spec), self.tta if tta is None else tta, m)

    @torch.inference_mode()
    def _logits(self, x: torch.Tensor, tta: bool = False, m: torch.Tensor | None = None) -> torch.Tensor:
        with self._lock:
            return flip_averaged(lambda t: self._forward(t, m), x) if tta else self._forward(x, m)

    def probabilities(self, pixels: list[np.ndarray] | np.ndarray, tta: bool | None = None,
                      metadata=None) -> np.ndarray:
        """Calibrated class probabilities, shape (N, C). Raises PredictionError on NaN/Inf. ``metadata``: one
        dict (or None) per image, or an encoded array (see :meth:`encode_metadata`)."""
        if len(pixels) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        tta = self.tta if tta is None else bool(tta)
        logits = self.logits(pixels, tta=tta, metadata=metadata)
        if not torch.isfinite(logits).all():
            raise PredictionError("the model produced non-finite outputs")
        return torch.softmax(logits / self.temperature_for(tta), dim=1).numpy()

    def temperature_for(self, tta: bool) -> float:
        """The temperature this predictor applies with (``tta``) or without flip TTA."""
        return self._tta_temperature if tta else self.temperature

    def probabilities_preprocessed(self, x: np.ndarray, metadata=None) -> np.ndarray:
        """Calibrated probabilities for a batch already through the eval preset (float32 N x 3 x S x S);
        ``metadata`` as for :meth:`probabilities` (or the tensor :meth:`encode_metadata` made)."""
        x = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, *self.size):
            raise PredictionError(f"preprocessed input must be N x 3 x {self.size[0]} x {self.size[1]}, "
                                  f"got {tuple(x.shape)}")
        m = metadata if isinstance(metadata, torch.Tensor) else self.encode_metadata(metadata, len(x))
        logits = self._logits(x, self.tta, m)
        if not torch.isfinite(logits).all():
            raise PredictionError("the model produced non-finite outputs")
        return torch.softmax(logits / self.temperature_for(self.tta), dim=1).numpy()

    def explain(self, pixels: np.ndarray, metadata: dict | None = None) -> tuple[Prediction, np.ndarray]:
        """Prediction and Grad-CAM map (HxW in [0, 1], model input size) for one image, eager model. With
        ``metadata`` (a model that takes it) the prediction uses it; the map explains the image's part."""

        x = eval_batch([pixels], self.spec).to(self.device)
        with self._lock:
            if self._explainer is None:
                self._explainer = GradCamExplainer(self.model, x)
            logits, cam = self._explainer(x)
        if not torch.isfinite(logits).all():
            raise PredictionError("the model produced non-finite outputs")
        if self.tta or metadata:  # the same answer as /invocations; the map explains the unflipped image
            return self.to_predictions(self.probabilities([pixels], metadata=[metadata] if metadata else None))[0], cam
        probs = torch.softmax(logits.float().cpu() / self.temperature, dim=1).numpy()
        return self.to_predictions(probs, tta=False)[0], cam

    def labels(self, probs: np.ndarray, tta: bool | None = None) -> np.ndarray:
        """Class indices chosen by this predictor's decision rule from calibrated probabilities (``tta``: whether
        they came from flip TTA, which has its own fitted offsets; None: this predictor's default)."""
        tta = self.tta if tta is None else bool(tta)
        return decision.apply_offsets(probs, self._tta_offsets if tta else self._offsets)

    def to_predictions(self, probs: np.ndarray, tta: bool | None = None) -> list[Prediction]:
        """``tta``: whether ``probs`` came from flip TTA (None: this predictor's default)."""
        tta = self.tta if tta is None else bool(tta)
        out = []
        for row, k in zip(probs, self.labels(probs, tta)):
            k = int(k)
            out.append(Prediction(self.classes[k], k, {c: float(p) for c, p in zip(self.classes, row)},
                                  self.decision_rule, tta))
        return out

    def predict_bytes(self, items: list[bytes], names: list[str] | None = None,
                      tta: bool | None = None, metadata=None) -> list[Prediction]:
        names = names or [None] * len(items)
        pixels = [self.decode(d, n) for d, n in zip(items, names)]
        return self.to_predictions(self.probabilities(pixels, tta=tta, metadata=metadata), tta)

    def predict_files(self, paths: list[str | Path], tta: bool | None = None, metadata=None) -> list[Prediction]:
        pixels = [self.spec.read(p, max_pixels=self.max_pixels) for p in paths]
        return self.to_predictions(self.probabilities(pixels, tta=tta, metadata=metadata), tta)
