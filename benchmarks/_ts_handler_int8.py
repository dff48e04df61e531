"""The TorchServe handler of serve_load.py's fair peer: the package's gated INT8 model on OpenVINO, as medpipe's
``openvino`` backend runs it.

Each worker opens a medpipe Predictor with ``backend="openvino"`` (the same ONNX INT8 graph, OpenVINO
runtime, precision, gate temperature and static-shape buckets as ``medpipe serve --backend openvino``) and
decodes each request with the package's own decoder (JPEG draft mode, the same resize); TorchServe batches
requests (``batch_size``/``max_batch_delay`` at registration). The answer is medpipe's per-image JSON. The
model archive carries ``weights.safetensors``, ``model.json``, the INT8 files and ``_ts_common.py`` (the entry
point both handlers share); OpenVINO comes from the folder serve_load.py puts on the workers' PYTHONPATH (the
toolkit venv has none of its own).
"""

import json
import logging
import os

from _ts_common import Handler, entry, request_bodies

log = logging.getLogger(__name__)


class Int8Handler(Handler):
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

    def handle(self, data, context):
        pixels = [self.predictor.decode(body) for body in request_bodies(data)]
        probs = self.predictor.probabilities(pixels)
        return [json.dumps(p.as_dict()) for p in self.predictor.to_predictions(probs)]


handle = entry(Int8Handler())
