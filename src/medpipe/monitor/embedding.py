"""The model's penultimate-layer embedding, compressed, for the capture fingerprint and the embedding-drift test.

Where it comes from: the pooled feature vector the model's classifier head (its last ``nn.Linear``)
receives (1024 values for DenseNet121), taken from the forward pass that answers the request; no second
pass. On the eager PyTorch backend a forward pre-hook on the head reads it. The ONNX Runtime (FP32 and
INT8) and OpenVINO backends run a graph exported with a second output, ``embedding``, holding the same
vector (:mod:`medpipe.infer.onnx_runtime`), and hand it over after each run
(:meth:`medpipe.infer.backends.Backend.add_feature_sink`). An INT8 graph quantized before that output
existed, and CUDA graphs, give none: their records carry no embedding (a log line at start says why);
``medpipe quantize`` again, or ``--backend eager``, gives them. With flip TTA the embedding is the mean
over the four passes.

Compression: a fixed Gaussian random projection to :data:`DIM` dimensions (entries N(0, 1/DIM) drawn
from :data:`SEED`; by Johnson-Lindenstrauss, distances between embeddings are kept up to a small
factor, so a kernel two-sample test on the projections sees what it would see on the full vectors),
stored as float16, base64: 64 bytes, 88 characters per image. The projection's name
(:func:`projection_id`: seed, input and output size) travels with every embedding, so a check never
compares embeddings of different projections or models with different feature sizes.
"""

from __future__ import annotations

import base64
import logging
import threading

import numpy as np

log = logging.getLogger("medpipe.monitor")

SEED = 20261206
DIM = 32


def projection(features: int) -> np.ndarray:
    """The fixed (features, DIM) projection matrix, float32."""
    rng = np.random.default_rng(SEED)
    return (rng.standard_normal((features, DIM)) / np.sqrt(DIM)).astype(np.float32)


def projection_id(features: int) -> str:
    return f"gaussian-{SEED}-{features}x{DIM}"


def encode(vec: np.ndarray) -> str:
    """One projected embedding -> base64 of its float16 values."""
    return base64.b64encode(np.asarray(vec, np.float16).tobytes()).decode("ascii")


def decode(text: str) -> np.ndarray | None:
    """base64 float16 -> float32 vector of :data:`DIM` values (None when it is not one)."""
    try:
        vec = np.frombuffer(base64.b64decode(text, validate=True), np.float16).astype(np.float32)
    except (ValueError, TypeError):
        return None
    return vec if vec.shape == (DIM,) and np.isfinite(vec).all() else None


def stack(prints: list[dict], proj: str) -> np.ndarray:
    """The (n, DIM) embeddings of the fingerprints that carry one made with projection ``proj``."""
    vecs = [decode(p["embedding"]) for p in prints
            if isinstance(p.get("embedding"), str) and p.get("embedding_projection") == proj]
    vecs = [v for v in vecs if v is not None]
    return np.stack(vecs) if vecs else np.zeros((0, DIM), np.float32)


class Embedder:
    """A Predictor's probabilities together with each image's projected embedding (see the module docstring)."""

    def __init__(self, predictor):
        import torch

        linears = [m for m in predictor.model.modules() if isinstance(m, torch.nn.Linear)]
        if not linears:
            raise ValueError("the model has no linear classifier head to read an embedding from")
        self.predictor = predictor
        self.features = linears[-1].in_features
        self.id = projection_id(self.features)
        self._proj = torch.from_numpy(projection(self.features))
        self._local = threading.local()
        linears[-1].register_forward_pre_hook(self._hook)  # the eager model: live, and the baseline's embed()
        self.live, self.why = self._attach(predictor)

    def _attach(self, predictor) -> tuple[bool, str]:
        """Whether the serving pass gives embeddings (and why not): eager runs the hooked module; another
        backend hands over its graph's ``embedding`` output where the graph has one of this model's size."""
        if predictor.backend == "eager":
            return True, ""
        runtime = predictor.runtime
        size = runtime.embedding_size()
        if size is None:
            hint = ("its INT8 graph was quantized before medpipe exported embeddings; run 'medpipe quantize' again"
                    if predictor.backend in ("int8", "openvino") else "its graph has no embedding output")
            return False, f"the {predictor.backend} backend gives none: {hint}"
        if size not in (-1, self.features):
            return False, f"the {predictor.backend} graph's embedding has {size} values, the model's head {self.features}"
        runtime.add_feature_sink(self._sink)
        return True, ""

    def _hook(self, _module, args) -> None:
        self._sink(args[0])

    def _sink(self, features) -> None:
        feats = getattr(self._local, "feats", None)
        if feats is not None:
            feats.append(features.detach().float().reshape(features.shape[0], -1).cpu())

    def _collect(self, run, n: int) -> tuple[object, np.ndarray | None]:
        """``run()`` with the hook recording; its result and the (n, DIM) projected mean of what it saw."""
        self._local.feats = []
        try:
            out = run()
            feats = self._local.feats
        finally:
            self._local.feats = None
        if not feats or any(f.shape != (n, self.features) for f in feats):
            return out, None
        import torch

        return out, (torch.stack(feats).mean(0) @ self._proj).numpy()

    def probabilities(self, pixels: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """The predictor's probabilities and the embeddings of the same forward pass (None where the backend
        gives none, see the module docstring)."""
        if not self.live:
            return self.predictor.probabilities(pixels), None
        return self._collect(lambda: self.predictor.probabilities(pixels), len(pixels))

    def rows(self, pixels: list[np.ndarray]) -> np.ndarray:
        """One row per image: the probabilities, then (where the backend gives them) the DIM embedding values."""
        probs, emb = self.probabilities(pixels)
        return probs if emb is None else np.hstack([probs, emb.astype(probs.dtype)])

    def embed(self, pixels: list[np.ndarray]) -> np.ndarray:
        """Embeddings from the package's eager model, whatever backend serves (the baseline's path)."""
        import torch

        from medpipe.preprocess import eval_batch, flip_averaged  # deferred: torch-side preprocessing

        p = self.predictor
        x = eval_batch(list(pixels), p.spec).to(p.device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            _, emb = self._collect(lambda: flip_averaged(p.model, x) if p.tta else p.model(x), len(pixels))
        if emb is None:
            raise ValueError("the classifier head saw no features of the expected shape")
        return emb


def split_rows(rows: np.ndarray, classes: int, decoded: list) -> tuple[np.ndarray, list[str | None]]:
    """Rows of :meth:`Embedder.rows` for the decodable items of ``decoded`` -> the probabilities and, per item
    of ``decoded``, its encoded embedding (None for an item that did not decode or without embeddings)."""
    probs, emb = rows[:, :classes], rows[:, classes:]
    encoded = iter([encode(e) for e in emb] if emb.shape[1] == DIM else [None] * len(rows))
    return probs, [next(encoded) if isinstance(d, np.ndarray) else None for d in decoded]


def open_embedder(cfg, predictor) -> Embedder | None:
    """The service's embedder when capture or the live monitor is on (``ServeConfig``), else None."""
    if not (getattr(cfg, "capture", None) or getattr(cfg, "monitor_baseline", None)):
        return None
    embedder = Embedder(predictor)
    if not embedder.live:
        log.info("monitoring: no embeddings (%s; --backend eager gives them)", embedder.why)
    return embedder
