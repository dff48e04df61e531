"""The TorchServe handler of serve_load.py's fair peer: the package's gated INT8 model on OpenVINO, as medpipe's
``openvino`` backend runs it.

Each worker opens a medpipe Predictor with ``backend="openvino"`` (the same ONNX INT8 graph, OpenVINO
runtime, precision, gate temperature and static-shape buckets as ``medpipe serve --backend openvino``) and
decodes each request with the package's own decoder (JPEG draft mode, the same resize); TorchServe batches
requests (``batch_size``/``max_batch_delay`` at registration). The answer is medpipe's per-image JSON. The
model archive carries ``weights.safetensors``, ``model.json`` and the INT8 files; OpenVINO comes from the
folder serve_load.py puts on the workers' PYTHONPATH (the toolkit venv has none of its own).
"""

import json
import logging
import os

log = logging.getLogger(__name__)


class Int8Handler:
    def __init__(self):
        self.initialized = False

    def initialize(self, context):
        import torch

        from medpipe.infer.predictor import Predictor

        # as medpipe serve does for a runtime that is not torch: torch only normalises the batch, and its idle
        # intra-op threads would spin on the cores OpenVINO needs (measured: 10x slower with torch's default)
        torch.set_num_threads(1)
        props = context.system_properties
        threads = int(os.environ.get("MEDPIPE_TS_THREADS", "0")) or None  # serve_load.py: cores / workers
        self.predictor = Predictor(props["model_dir"], device="cpu", backend="openvino", threads=threads,
                                   max_batch=int(os.environ.get("MEDPIPE_TS_MAX_BATCH", "16")))
        self.predictor.warm()  # every batch bucket compiled before the first request
        log.info("medpipe INT8 handler: backend %s, OpenVINO threads %s", self.predictor.backend, threads or "all")
        self.initialized = True

    def handle(self, data, context):
        pixels = [self.predictor.decode(bytes(row.get("data") or row.get("body"))) for row in data]
        probs = self.predictor.probabilities(pixels)
        return [json.dumps(p.as_dict()) for p in self.predictor.to_predictions(probs)]


_service = Int8Handler()


def handle(data, context):
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
