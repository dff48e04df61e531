"""The naive endpoint serve_load.py compares against: the default inference-toolkit behaviour.

Per request: full Pillow decode, resize, the MONAI eval transforms, one eager NCHW forward at batch
1, softmax, JSON. One request at a time, in the process's main thread (as a model-server worker
process runs its handler; on this machine an eager forward in a non-main thread is ~2x slower, which
would flatter medpipe). No batching, no ONNX, no JPEG draft decoding. Not part of medpipe.

    python benchmarks/_naive_server.py MODEL_DIR PORT [DEVICE]
"""

import io
import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import torch
from PIL import Image

from medpipe.package import load_package, package_spec
from medpipe.preprocess import KEY, eval_preset

device = torch.device(sys.argv[3] if len(sys.argv) > 3 else "cpu")
model, meta = load_package(sys.argv[1], device)
spec = package_spec(meta)
preset = eval_preset(spec)


def predict(body: bytes) -> dict:
    img = Image.open(io.BytesIO(body)).convert("RGB").resize((spec.image_size, spec.image_size), Image.BICUBIC)
    x = preset({KEY: np.asarray(img)})[KEY][None].to(device)
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)[0].cpu().tolist()
    k = int(np.argmax(probs))
    return {"predictions": [{"label": meta.classes[k], "class_index": k,
                             "probabilities": dict(zip(meta.classes, probs))}]}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection; queued connections wait in the backlog

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str = "application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200 if self.path == "/ping" else 404)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._send(200, json.dumps(predict(body)).encode())


if __name__ == "__main__":
    server = HTTPServer(("127.0.0.1", int(sys.argv[2])), Handler)
    server.request_queue_size = 64
    server.serve_forever()
