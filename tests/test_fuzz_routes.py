"""A seeded fuzzer against the real `medpipe serve` process: requests to /invocations, /explain and every
/v2 route, built by mutating valid requests (field values swapped for other JSON types, NaN/Inf/3e38,
booleans in shapes, wrong counts, lying lengths, truncated and bit-flipped images, binary tails), must
never be answered 500 and never leave a traceback in the log.

``MEDPIPE_FUZZ_REQUESTS`` (default 1500) and ``MEDPIPE_FUZZ_SEED`` (default 0) set the run; the run also
stops after ``MEDPIPE_FUZZ_SECONDS`` (default 30) so the suite stays bounded on a loaded machine.
"""

import base64
import copy
import http.client
import io
import json
import os
import random
import struct
import time

import numpy as np
import pytest

from tests._server import Server

pytestmark = pytest.mark.slow

ALLOWED = {200, 400, 404, 405, 406, 408, 413, 415, 422}
JSON_VALUES = [None, True, False, 0, 1, -1, 3, 2**31, 2**64, 10**400, 1.5, -0.0, 1e308, 3e38, float("nan"),
               float("inf"), "", "x", "NaN", "image", "image_bytes", "BYTES", "FP32", "UINT8", [], {}, [1, 2],
               [True], [[1]], {"a": 1}, ["AAAA"], [None], "A" * 300]
CTYPES = ["application/json", "image/jpeg", "image/png", "application/x-npy", "application/octet-stream",
          "application/dicom", "text/plain", "", "multipart/form-data", "image/jpeg; q=1", "APPLICATION/JSON"]
ACCEPTS = [None, "*/*", "text/csv", "application/json;q=0", "image/png", "text/*", ",,;q=x"]


def _images() -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for fmt, mode, size in (("JPEG", "RGB", (40, 30)), ("PNG", "L", (17, 5)), ("PNG", "RGBA", (1, 1)),
                            ("BMP", "RGB", (8, 8)), ("GIF", "P", (4, 4))):
        buf = io.BytesIO()
        arr = rng.integers(0, 255, (size[1], size[0], len(mode) if mode != "P" else 1), dtype=np.uint8)
        Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).convert(mode).save(buf, fmt)
        out.append(buf.getvalue())
    return out


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


class Fuzzer:
    """Seeded request generator: (method, path, body, headers)."""

    def __init__(self, seed: int, name: str, version: str, size: int):
        self.rng, self.name, self.version, self.size = random.Random(seed), name, version, size
        self.images = _images()

    def image(self) -> bytes:
        r, img = self.rng, self.rng.choice(self.images)
        kind = r.randrange(5)
        if kind == 0:
            return img
        if kind == 1:
            return img[:r.randrange(len(img) + 1)]
        if kind == 2:
            b = bytearray(img)
            for _ in range(r.randrange(1, 8)):
                b[r.randrange(len(b))] = r.randrange(256)
            return bytes(b)
        if kind == 3:
            return r.randbytes(r.randrange(64))
        return b""

    def value(self):
        r = self.rng
        return copy.deepcopy(r.choice(JSON_VALUES)) if r.random() < 0.8 else self.image().decode("latin-1")

    def mutate(self, obj, depth: int = 0):
        """Replace, delete or add one field somewhere in a JSON-like object."""
        r = self.rng
        if isinstance(obj, dict) and obj and (depth > 3 or r.random() < 0.4):
            key = r.choice(list(obj))
            op = r.randrange(3)
            if op == 0:
                obj[key] = self.value()
            elif op == 1:
                del obj[key]
            else:
                obj[r.choice(["parameters", "id", "outputs", "extra", "binary_data_size"])] = self.value()
            return obj
        if isinstance(obj, list) and obj and (depth > 3 or r.random() < 0.4):
            obj[r.randrange(len(obj))] = self.value()
            return obj
        children = list(obj) if isinstance(obj, dict) else range(len(obj)) if isinstance(obj, list) else []
        if not children:
            return self.value()
        k = r.choice(list(children))
        obj[k] = self.mutate(obj[k], depth + 1)
        return obj

    def v2_request(self) -> tuple[bytes, dict]:
        r, s = self.rng, self.size
        n = r.choice([1, 1, 2, 3, 0, 5, 17])
        binary = r.random() < 0.5
        if r.random() < 0.5:
            items = [self.image() for _ in range(max(0, n + r.choice([0, 0, 0, -1, 1])))]
            tail = b"".join(struct.pack("<I", len(b)) + b for b in items)
            inp = {"name": "image_bytes", "datatype": "BYTES", "shape": [n]}
            data = [base64.b64encode(b).decode() for b in items]
        else:
            special = r.choice([0.0, 1.0, -2.0, float("nan"), float("inf"), 3e38, -3e38, 1e-45, 263.9, 265.0])
            x = np.random.default_rng(r.randrange(1 << 30)).normal(0, 1, (max(n, 1), 3, s, s)).astype(np.float32)
            if r.random() < 0.5:
                x.flat[r.randrange(x.size)] = special
            tail = x.tobytes()[: r.choice([len(x.tobytes()), len(x.tobytes()), r.randrange(len(x.tobytes()) + 1)])]
            inp = {"name": "image", "datatype": "FP32", "shape": [n, 3, s, s]}
            data = [float(v) for v in x.ravel()]
        if binary:
            inp["parameters"] = {"binary_data_size": len(tail)}
        else:
            inp["data"], tail = data, b""
        req = {"id": "fuzz", "inputs": [inp]}
        if r.random() < 0.3:
            req["outputs"] = [{"name": r.choice(["probabilities", "label", "nope"]),
                               "parameters": {"binary_data": r.random() < 0.5}}]
        for _ in range(r.choice([0, 0, 1, 1, 2, 3])):
            req = self.mutate(req)
        head = json.dumps(req).encode()
        if r.random() < 0.1:
            head = head[:r.randrange(len(head) + 1)]
        headers = {"Content-Type": r.choice(["application/json", "application/octet-stream"])}
        if binary or r.random() < 0.1:
            headers["Inference-Header-Content-Length"] = r.choice(
                [str(len(head))] * 6 + [str(len(head) + r.randrange(-5, 6)), "-1", "0", "x", "99999999", "1e3"])
        return head + tail, headers

    def invocations_body(self) -> tuple[bytes, str]:
        r = self.rng
        kind = r.randrange(4)
        if kind == 0:
            return self.image(), r.choice(["image/jpeg", "image/png", "application/x-image", r.choice(CTYPES)])
        if kind == 1:
            arrays = [np.zeros((4, 4, 3), np.uint8), np.ones((2, 3, 8, 8), np.float32), np.zeros((0, 0)),
                      np.array(["a"]), np.array([{}], dtype=object), np.full((5, 5), np.nan), np.zeros((9, 4, 4, 3))]
            body = _npy(r.choice(arrays))
            return (body[:r.randrange(len(body))] if r.random() < 0.2 else body), "application/x-npy"
        obj = {"images": [base64.b64encode(self.image()).decode() for _ in range(r.choice([0, 1, 2, 5]))]}
        for _ in range(r.choice([0, 1, 2])):
            obj = self.mutate(obj)
        return json.dumps(obj).encode(), r.choice(["application/json"] * 3 + CTYPES)

    def request(self) -> tuple[str, str, bytes | None, dict]:
        r, name = self.rng, self.name
        route = r.randrange(10)
        if route < 3:
            body, ctype = self.invocations_body()
            headers = {"Content-Type": ctype}
            accept = r.choice(ACCEPTS)
            if accept is not None:
                headers["Accept"] = accept
            return "POST", "/invocations", body, headers
        if route == 3:
            return "POST", "/explain", self.image(), {"Content-Type": r.choice(["image/png", "image/jpeg",
                                                                               r.choice(CTYPES)])}
        if route < 9:
            body, headers = self.v2_request()
            path = r.choice([f"/v2/models/{name}/infer"] * 4 + [f"/v2/models/{name}/versions/{self.version}/infer",
                            f"/v2/models/{name}/versions/9/infer", "/v2/models/nope/infer"])
            return "POST", path, body, headers
        path = r.choice(["/v2", "/v2/health/live", "/v2/health/ready", f"/v2/models/{name}", f"/v2/models/{name}/ready",
                         f"/v2/models/{name}/versions/{self.version}", "/v2/models/x%00y", "/v2/models/" + "a" * 500])
        return r.choice(["GET", "GET", "GET", "POST", "PUT"]), path, None, {}


@pytest.fixture(scope="module")
def fuzz_server(trained_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz") / "serve.log"
    srv = Server(trained_run / "model", "--backend", "eager", "--max-images", "4", log=log)
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def test_fuzz_routes_never_500(fuzz_server, trained_run):
    srv = fuzz_server
    meta = json.loads((trained_run / "model" / "model.json").read_text())
    total = int(os.environ.get("MEDPIPE_FUZZ_REQUESTS", "1500"))
    budget = float(os.environ.get("MEDPIPE_FUZZ_SECONDS", "30"))
    fuzz = Fuzzer(int(os.environ.get("MEDPIPE_FUZZ_SEED", "0")), meta["name"], str(meta.get("version", "1")),
                  meta["preprocessing"]["image_size"])
    conn, seen, t0, done = None, {}, time.monotonic(), 0
    while done < total and time.monotonic() - t0 < budget:
        method, path, body, headers = fuzz.request()
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
        done += 1
        seen[resp.status] = seen.get(resp.status, 0) + 1
        assert resp.status in ALLOWED, (resp.status, method, path, headers, (body or b"")[:300], payload[:500])
        if resp.status != 200:
            assert "error" in json.loads(payload), payload[:300]
        if resp.getheader("connection", "").lower() == "close":
            conn.close()
            conn = None
    if conn is not None:
        conn.close()
    elapsed = time.monotonic() - t0
    print(f"fuzz: {done} requests in {elapsed:.1f} s, statuses {dict(sorted(seen.items()))}")
    assert done >= min(total, 200), f"only {done} requests in {budget} s"
    assert seen.get(200, 0) > 0 and len(seen) >= 4  # the generator reaches answers and several refusals
    assert srv.request("GET", "/ping")[0] == 200
    text = srv.log_text()
    assert "Traceback" not in text and "internal_error" not in text and " failed: " not in text, text[-3000:]
