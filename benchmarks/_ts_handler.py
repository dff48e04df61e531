"""The TorchServe handler serve_load.py runs TorchServe with: the same preprocessing and model as medpipe.

A good TorchServe deployment of the package, not a straw man: TorchServe batches requests
(``batch_size``/``max_batch_delay`` at registration), the handler decodes each image with the
package's own decoder (JPEG draft mode, the same resize), runs the eval preset on the whole batch
and one eager forward (channels_last, ``inference_mode``), applies the temperature and returns one
JSON object per request. The model archive carries ``weights.safetensors``, ``model.json`` and
``_ts_common.py`` (the entry point both handlers share).
"""

import json
import logging

import torch
from _ts_common import Handler, entry, request_bodies

log = logging.getLogger(__name__)


class MedpipeHandler(Handler):
    def initialize(self, context):
        from medpipe.package import load_package, package_spec

        props = context.system_properties
        gpu = props.get("gpu_id")
        self.device = torch.device(f"cuda:{gpu}" if gpu is not None and torch.cuda.is_available() else "cpu")
        model, self.meta = load_package(props["model_dir"], self.device)
        self.model = model.to(memory_format=torch.channels_last)
        self.spec = package_spec(self.meta)
        self.classes = list(self.meta.classes)
        self.temperature = self.meta.temperature
        log.info("medpipe handler on %s, torch threads %d", self.device, torch.get_num_threads())

    def handle(self, data, context):
        from medpipe.preprocess import eval_batch

        pixels = [self.spec.decode(body) for body in request_bodies(data)]
        x = eval_batch(pixels, self.spec).to(self.device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            probs = torch.softmax(self.model(x).float() / self.temperature, dim=1).cpu().numpy()
        out = []
        for row in probs:
            k = int(row.argmax())
            out.append(json.dumps({"label": self.classes[k], "class_index": k,
                                   "probabilities": dict(zip(self.classes, map(float, row)))}))
        return out


handle = entry(MedpipeHandler())
