"""The one door to a trained model: load a package once; bytes or arrays in, labelled probabilities out.

Used by ``medpipe predict``, ``medpipe evaluate``, the SageMaker handlers (and the server and batch
jobs), so every path applies the same preprocessing — built from the package's spec — and the same
calibration. Inference is deterministic (eval preset, ``inference_mode``, no shared random state).
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
from medpipe.errors import MedpipeError, PredictionError
from medpipe.infer.backends import BACKENDS
from medpipe.package import load_package, package_spec
from medpipe.preprocess import eval_batch, flip_averaged, use_plain_tensors
from medpipe.utils import resolve_device

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


def resolve_backend(backend: str, device: torch.device, meta: dict | None = None, fp32=None,
                    threads: int | None = None) -> tuple[str, str]:
    """The backend to run and why. ``auto``: on CPU the package's gated INT8 model where the CPU has
    VNNI/AMX and INT8 was measured at least 1.1x as fast as FP32 ONNX on this CPU model (at quantize
    time, else a start-up check timing ``fp32()``'s graph against it with ``threads``; infer/quantize.py),
    on OpenVINO where its own gate passed and it measured faster than ONNX Runtime's INT8, else ONNX
    Runtime FP32 when installed, else eager; CUDA graphs on a GPU (each the fastest measured in
    benchmarks/serve_load.py)."""
    if backend not in BACKENDS:
        raise MedpipeError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend in ("onnx", "int8", "openvino") and device.type != "cpu":
        raise MedpipeError(f"the {backend} backend runs on CPU; use --backend eager or cudagraph with --device cuda")
    if backend == "cudagraph" and device.type != "cuda":
        raise MedpipeError("the cudagraph backend needs --device cuda (and a GPU)")
    if backend != "auto":
        return backend, "asked for"
    if device.type == "cuda":
        return "cudagraph", "auto on a CUDA device"
    if device.type != "cpu":
        return "eager", f"auto on {device.type}"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "eager", "auto: onnxruntime is not installed"
    if meta is not None:
        from medpipe.infer.quantize import auto_quantized_backend

        chosen, why = auto_quantized_backend(meta, fp32, threads)
        if chosen:
            return chosen, f"auto: {why}"
        return "onnx", f"auto: ONNX Runtime FP32, not INT8 because {why}"
    return "onnx", "auto: ONNX Runtime FP32"


class CudaGraphRunner:
    """The eval-mode model captured as one CUDA graph per batch-size bucket (1, 2, 4, ..., max_batch).

    A replay launches the whole network at once, where eager PyTorch launches several hundred kernels
    one after another from Python; DenseNet121 at small batches is launch-bound on a GPU. A batch is
    padded up to its bucket (rows are independent in eval mode); larger batches run in chunks. All
    graphs share one memory pool; inputs are copied into static buffers, outputs copied out.
    """

    def __init__(self, model: torch.nn.Module, image_size: int, device: torch.device, max_batch: int = 16):
        self.buckets = sorted({min(2 ** k, max_batch) for k in range(max_batch.bit_length() + 1)})
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple] = {}
        side = torch.cuda.Stream(device)
        for bs in reversed(self.buckets):  # largest first: the shared pool is sized once
            inp = torch.zeros(bs, 3, image_size, image_size, device=device).contiguous(
                memory_format=torch.channels_last)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(2):  # warm-up outside capture (cuDNN handles, workspaces)
                    model(inp)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(graph, pool=self.pool):
                out = model(inp)
            self.graphs[bs] = (graph, inp, out)
        torch.cuda.synchronize(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        outs, top = [], self.buckets[-1]
        for i in range(0, len(x), top):
            chunk = x[i:i + top]
            n = len(chunk)
            graph, inp, out = self.graphs[next(b for b in self.buckets if b >= n)]
            inp[:n].copy_(chunk)
            if n < len(inp):
                inp[n:].zero_()
            graph.replay()
            outs.append(out[:n].float().cpu())
        return torch.cat(outs)


class Predictor:
    """Load once, predict many times. ``backend``: eager PyTorch, ONNX Runtime FP32 or INT8 (CPU),
    OpenVINO running the gated INT8 graph (CPU), or CUDA graphs of the eager model (CUDA), see BACKENDS. ``decision_rule``: the rule that picks each label
    (medpipe.decision; None: the package's default); the probabilities are the same under every rule.
    ``tta``: by default average the logits over the image and its horizontal, vertical and double flips
    (four forward passes per image; a call may still ask for or against it)."""

    def __init__(self, package: str | Path, device: str = "auto", max_pixels: int = imageio.DEFAULT_MAX_PIXELS,
                 backend: str = "eager", threads: int | None = None, max_batch: int = 16,
                 decision_rule: str | None = None, tta: bool = False):
        use_plain_tensors()
        self.device = resolve_device(device)
        self.tta = bool(tta)
        self.model, self.meta = load_package(package, self.device)
        self.model = self.model.to(memory_format=torch.channels_last)
        self._fp32_onnx: bytes | None = None
        self.spec = package_spec(self.meta)
        self.backend, self.backend_reason = resolve_backend(backend, self.device, self.meta, self._onnx_fp32,
                                                            threads)
        self._session = None
        self._graphs = None
        self._explainer = None
        self.int8 = None  # the INT8 record (gate figures, temperature) when that backend runs
        try:
            self._start_backend(threads, max_batch)
        except (RuntimeError, MedpipeError) as exc:
            if backend != "auto":
                other = {"openvino": "int8", "int8": "onnx"}.get(self.backend, "eager")
                raise MedpipeError(f"the {self.backend} backend could not start ({exc}); --backend {other} is "
                                   "the next choice") from None
            log.warning("the %s backend could not start (%s); using the eager backend", self.backend, exc)
            self.backend, self._session, self._graphs = "eager", None, None
            self.backend_reason = f"auto: fell back because the faster backend could not start ({exc})"
        self._fp32_onnx = None  # only needed to start a backend
        log.info("backend %s (%s)", self.backend, self.backend_reason)
        self.classes: list[str] = list(self.meta["classes"])
        self.temperature = float(self.int8["temperature"] if self.int8 else
                                 self.meta.get("calibration", {}).get("temperature", 1.0))
        self.decision_rule, self._offsets = decision.resolve(self.meta.get("decision"), decision_rule,
                                                             len(self.classes))
        # flip TTA's own calibration (temperature and decision offsets fitted on TTA validation logits), where the
        # package has it (trained with tta) and the backend is the FP32 model's; otherwise the plain one
        cal_tta = None if self.int8 else self.meta.get("calibration", {}).get("tta")
        self._tta_temperature, self._tta_offsets = self.temperature, self._offsets
        if cal_tta:
            self._tta_temperature = float(cal_tta["temperature"])
            if cal_tta.get("decision") is not None:
                self._tta_offsets = decision.resolve(cal_tta["decision"], self.decision_rule, len(self.classes))[1]
        self.max_pixels = max_pixels
        self.name = self.meta.get("name", "medpipe")
        self.version = str(self.meta.get("version", "1"))
        self._lock = threading.Lock()

    def _start_backend(self, threads: int | None, max_batch: int) -> None:
        size = self.spec.image_size
        if self.backend == "cudagraph":
            self._graphs = CudaGraphRunner(self.model, size, self.device, max(1, int(max_batch)))
        elif self.backend == "onnx":
            from medpipe.export import onnx_session

            self._session = onnx_session(self._onnx_fp32(), threads=threads)
        elif self.backend == "int8":
            from medpipe.export import onnx_session
            from medpipe.infer.quantize import load_int8

            data, info = load_int8(self.meta)
            if not info["gate"].get("passed"):
                log.warning("the INT8 model FAILED its accuracy gate (written with --force): %s",
                            "; ".join(info["gate"].get("failures", [])))
            self._session = onnx_session(data, threads=threads)
            self.int8 = info
        elif self.backend == "openvino":
            self._start_openvino(threads, max_batch)

    def _start_openvino(self, threads: int | None, max_batch: int) -> None:
        """OpenVINO on the gated INT8 graph, in the precision its own gate was run in, with its temperature.
        Asked for explicitly, a model whose OpenVINO gate failed still runs (with a warning), as a forced INT8
        model does; anything else that makes the record unusable here is refused."""
        from medpipe.infer.openvino_runtime import OpenVinoSession
        from medpipe.infer.quantize import load_int8, openvino_record, openvino_status

        data, info = load_int8(self.meta)
        rec, why = openvino_record(info)
        if rec is None:
            raise MedpipeError(f"the openvino backend cannot run this model: {why}")
        ok, why = openvino_status(info)
        if not ok:
            log.warning("the OpenVINO run of the INT8 model FAILED its accuracy gate: %s", why)
        self._session = OpenVinoSession(data, threads=threads, precision=rec["precision"], max_batch=max_batch)
        self._session.warm(buckets=1)  # compile now: a model OpenVINO cannot compile fails here, not mid-request
        # the record the report and responses cite is OpenVINO's own gate and temperature
        self.int8 = {**info, "gate": rec["gate"], "temperature": rec["temperature"], "runtime": "openvino"}

    def warm(self) -> None:
        """Prepare every batch size the server will meet (OpenVINO compiles one model per batch bucket)."""
        if hasattr(self._session, "warm"):
            self._session.warm()

    def _onnx_fp32(self) -> bytes:
        """The package's FP32 ONNX graph, exported once (auto's start-up check and the onnx backend share it)."""
        if self._fp32_onnx is None:
            from medpipe.export import onnx_bytes

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

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._session is not None:
            from medpipe.export import INPUT_NAME

            return torch.from_numpy(self._session.run(None, {INPUT_NAME: x.contiguous().numpy()})[0])
        if self._graphs is not None:
            return self._graphs(x)
        return self.model(x.to(self.device).contiguous(memory_format=torch.channels_last)).float().cpu()

    @torch.inference_mode()
    def logits(self, pixels: list[np.ndarray] | np.ndarray, tta: bool | None = None) -> torch.Tensor:
        return self._logits(eval_batch(list(pixels), self.spec), self.tta if tta is None else tta)

    @torch.inference_mode()
    def _logits(self, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
        with self._lock:
            return flip_averaged(self._forward, x) if tta else self._forward(x)

    def probabilities(self, pixels: list[np.ndarray] | np.ndarray, tta: bool | None = None) -> np.ndarray:
        """Calibrated class probabilities, shape (N, C). Raises PredictionError on NaN/Inf."""
        if len(pixels) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        tta = self.tta if tta is None else bool(tta)
        logits = self.logits(pixels, tta=tta)
        if not torch.isfinite(logits).all():
            raise PredictionError("the model produced non-finite outputs")
        return torch.softmax(logits / self.temperature_for(tta), dim=1).numpy()

    def temperature_for(self, tta: bool) -> float:
        """The temperature this predictor applies with (``tta``) or without flip TTA."""
        return self._tta_temperature if tta else self.temperature

    def probabilities_preprocessed(self, x: np.ndarray) -> np.ndarray:
        """Calibrated probabilities for a batch already through the eval preset (float32 N x 3 x S x S)."""
        x = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, *self.size):
            raise PredictionError(f"preprocessed input must be N x 3 x {self.size[0]} x {self.size[1]}, "
                                  f"got {tuple(x.shape)}")
        logits = self._logits(x, self.tta)
        if not torch.isfinite(logits).all():
            raise PredictionError("the model produced non-finite outputs")
        return torch.softmax(logits / self.temperature_for(self.tta), dim=1).numpy()

    def explain(self, pixels: np.ndarray) -> tuple[Prediction, np.ndarray]:
        """Prediction and Grad-CAM map (HxW in [0, 1], model input size) for one image, eager model."""
        from medpipe.infer.explain import GradCamExplainer

        x = eval_batch([pixels], self.spec).to(self.device)
        with self._lock:
            if self._explainer is None:
                self._explainer = GradCamExplainer(self.model, x)
            logits, cam = self._explainer(x)
        if not torch.isfinite(logits).all():
            raise PredictionError("the model produced non-finite outputs")
        if self.tta:  # the same answer as /invocations; the map explains the unflipped image
            return self.to_predictions(self.probabilities([pixels]))[0], cam
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
                      tta: bool | None = None) -> list[Prediction]:
        names = names or [None] * len(items)
        pixels = [self.decode(d, n) for d, n in zip(items, names)]
        return self.to_predictions(self.probabilities(pixels, tta=tta), tta)

    def predict_files(self, paths: list[str | Path], tta: bool | None = None) -> list[Prediction]:
        pixels = [self.spec.read(p, max_pixels=self.max_pixels) for p in paths]
        return self.to_predictions(self.probabilities(pixels, tta=tta), tta)
