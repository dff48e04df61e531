"""INT8 backend (issue 16): quantization behind its accuracy gate, the backends that use it, `auto`'s choice.

One tiny model is trained here on purpose (not the shared DenseNet run): a ResNet18 at 32x32 on
seven well-separated colour classes, so FP32 scores have margins and the gate's figures (macro AUC
within 0.005, agreement >= 98%) measure quantization, not near-ties between a dozen images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from medpipe.cli import main

pytest.importorskip("onnxruntime.quantization")

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40), (200, 40, 200), (40, 200, 200), (120, 120, 120)]


def _colour_images(root: Path, per_class: int, size: int = 40, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, (name, rgb) in enumerate(zip(CLASSES, COLOURS)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.array(rgb, float) + rng.normal(0, 12, 3)
            img = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{name}_{i:03d}.png")


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory) -> dict:
    """A trained package, its data folder, and its INT8 model made by `medpipe quantize`."""
    root = tmp_path_factory.mktemp("int8")
    _colour_images(root / "src", per_class=12)
    data, run = root / "data", root / "run"
    assert main(["ingest", str(root / "src"), "--out", str(data), "--format", "folders"]) == 0
    assert main(["train", "--data", str(data), "--out", str(run), "--model", "resnet18", "--image-size", "32",
                 "--batch-size", "8", "--epochs", "3", "--lr", "0.003", "--warmup-epochs", "0.5",
                 "--val-fraction", "0.3", "--test-fraction", "0.15", "--bootstrap", "20", "--threads", "1",
                 "--deterministic"]) == 0
    assert main(["quantize", "--model", str(run / "model"), "--data", str(data)]) == 0
    images = sorted((root / "src").rglob("*.png"))
    return {"root": root, "data": data, "run": run, "model": run / "model", "images": images}


def _copy_run(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("checkpoints", "report", "*.tar.gz"))
    return dst / "model"


def test_quantize_passes_the_gate_and_records_it(int8_run, tmp_path, capsys):
    from medpipe.infer.quantize import INT8_FILE, MAX_AUC_DIFF, MIN_AGREEMENT, load_int8
    from medpipe.package import read_meta

    meta = read_meta(int8_run["model"])
    data, info = load_int8(meta)
    g = info["gate"]
    assert g["passed"] and not info["forced"] and g["failures"] == []
    assert g["auc_diff"] <= MAX_AUC_DIFF and g["agreement"] >= MIN_AGREEMENT and 0 <= g["max_prob_diff"] < 1
    assert g["n"] >= 10 and info["weights_sha256"] == meta.weights_sha256 and info["temperature"] > 0
    assert (int8_run["model"] / INT8_FILE).stat().st_size < (int8_run["model"] / "weights.safetensors").stat().st_size / 2
    # the INT8/FP32 speed `auto` decides on, timed at quantize time, with the CPU it was timed on
    from medpipe.infer.quantize import cpu_int8_flags, cpu_model

    speed = info["speed"]
    assert set(speed["batches"]) == {"1", "8"} and speed["cpu"]["model"] == cpu_model()
    assert speed["cpu"]["int8_flags"] == cpu_int8_flags() and speed["min_speedup"] == 1.1
    assert speed["speedup"] == min(b["speedup"] for b in speed["batches"].values()) > 0
    assert all(b["fp32_ms"] > 0 and b["int8_ms"] > 0 for b in speed["batches"].values())

    # export: the same gated model outside the package, its gate and INT8 temperature in the sidecar,
    # and onnxruntime alone runs it
    out = tmp_path / "m.int8.onnx"
    assert main(["export", "--model", str(int8_run["model"]), "--format", "onnx-int8", "--out", str(out)]) == 0
    assert "PASSED" in capsys.readouterr().out and out.read_bytes() == data
    side = json.loads(Path(f"{out}.medpipe.json").read_text())
    assert side["int8"]["gate"] == g and side["calibration"]["temperature"] == info["temperature"]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"image": np.zeros((2, 3, 32, 32), np.float32)})[0].shape == (2, 7)

    # evaluate on the INT8 backend: the report carries the backend and the gate figures
    assert main(["evaluate", "--model", str(int8_run["model"]), "--data", str(int8_run["data"]), "--split", "val",
                 "--backend", "int8", "--bootstrap", "0", "--out", str(tmp_path / "rep")]) == 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["backend"] == "int8" and rep["int8_gate"]["agreement"] == g["agreement"]


def test_int8_answers_like_fp32_through_predict_batch_and_serve(int8_run, tmp_path, capsys):
    from medpipe.infer.quantize import cpu_int8_flags
    from tests._server import Server, as_json

    images = int8_run["images"][::4]  # 21 images, every class
    # batch on the INT8 backend gives the same answers as predict on it
    fp32, int8 = _predict_and_batch(int8_run, images, "int8", tmp_path, capsys, tolerance=1e-4)
    # serve: `auto` picks INT8 on a VNNI/AMX CPU where INT8 was recorded faster on this CPU model (set here:
    # the real figure depends on the machine's load); the log says which and why; answers equal predict's
    served = _copy_run(int8_run["run"], tmp_path / "run")
    _set_speed(served, 1.5)
    srv = Server(served, "--backend", "auto", "--threads", "1", log=tmp_path / "serve.log").wait_ready()
    try:
        for img, ref in zip(images[:6], int8 if cpu_int8_flags() else fp32):
            status, _, body = srv.invoke(img.read_bytes(), ctype="image/png")
            assert status == 200
            got = as_json(body)
            got = got.get("predictions", [got])[0] if isinstance(got, dict) else got[0]
            assert got["label"] == ref["label"]
            assert max(abs(got["probabilities"][c] - ref["probabilities"][c]) for c in CLASSES) < 1e-4
    finally:
        srv.stop()
    log = srv.log_text()
    if cpu_int8_flags():
        assert "backend int8 (auto: gated INT8 model" in log and "INT8 1.50x FP32 ONNX" in log
        assert "measured at quantize time on this CPU model" in log
    else:
        assert "backend onnx (auto: ONNX Runtime FP32, not INT8 because this CPU reports no INT8" in log


def _predict_and_batch(int8_run, images, backend, tmp_path, capsys, tolerance):
    """`predict` on FP32 ONNX and on ``backend`` (labels agree within the gate), then `batch` on ``backend``
    (same labels as its predict, probabilities within ``tolerance``); returns both predict answers."""
    from medpipe.infer.quantize import MIN_AGREEMENT

    model = str(int8_run["model"])

    def predict(b):
        assert main(["predict", "--model", model, "--backend", b, "--json", *map(str, images)]) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    fp32, answers = predict("onnx"), predict(backend)
    assert np.mean([a["label"] == b["label"] for a, b in zip(fp32, answers)]) >= MIN_AGREEMENT
    folder = tmp_path / "in"
    folder.mkdir()
    for p in images:
        shutil.copy(p, folder / p.name)
    assert main(["batch", "--model", model, "--input", str(folder), "--output", str(tmp_path / "out"),
                 "--backend", backend, "--batch-size", "8"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    by_name = {Path(r["image"]).name: r for r in answers}
    assert len(rows) == len(images)
    for row in rows:
        ref = by_name[Path(row["path"]).name]
        assert row["label"] == ref["label"]
        assert max(abs(row["probabilities"][c] - ref["probabilities"][c]) for c in CLASSES) < tolerance
    return fp32, answers


def _set_speed(model: Path, speedup: float | None, cpu: str | None = None, openvino: float | None = None) -> None:
    """Replace the recorded INT8/FP32 speed-up in int8.json (None: no figure), as if measured on ``cpu``;
    ``openvino``: OpenVINO's speed-up over FP32 ONNX in the same figure."""
    from medpipe.infer.quantize import INT8_META, cpu_model

    info = json.loads((model / INT8_META).read_text())
    info.pop("speed", None)
    if speedup is not None:
        info["speed"] = {"batches": {"1": {"fp32_ms": 10.0 * speedup, "int8_ms": 10.0, "speedup": speedup}},
                         "speedup": speedup, "cpu": {"model": cpu or cpu_model()}}
        if openvino is not None:
            info["speed"]["batches"]["1"].update(openvino_ms=10.0 * speedup / openvino, openvino_speedup=openvino)
            info["speed"]["openvino_speedup"] = openvino
    (model / INT8_META).write_text(json.dumps(info))


def test_broken_calibration_is_refused_by_the_gate_and_forced_models_are_never_auto(int8_run, tmp_path, capsys,
                                                                                     monkeypatch):
    from PIL import Image

    import medpipe.infer.quantize as q
    from medpipe.infer.predictor import Predictor

    model = _copy_run(int8_run["run"], tmp_path / "run")
    (model / q.INT8_FILE).unlink()
    (model / q.INT8_META).unlink()
    grey = tmp_path / "grey"
    grey.mkdir()
    for i in range(8):  # every activation range collapses to a point: real images saturate
        Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(grey / f"g{i}.png")
    args = ["quantize", "--model", str(model), "--data", str(int8_run["data"]), "--calibration", str(grey)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "failed the accuracy gate" in err and ("top-1 agreement" in err or "macro AUC" in err)
    assert "Nothing was written" in err and not (model / q.INT8_FILE).exists() and not (model / q.INT8_META).exists()

    # --force writes it, marked failed; auto never picks it, even on a VNNI CPU; asking for it still works
    assert main([*args, "--force"]) == 0
    info = json.loads((model / q.INT8_META).read_text())
    assert info["forced"] and not info["gate"]["passed"] and info["gate"]["failures"]
    monkeypatch.setattr(q, "cpu_int8_flags", lambda *a: ["avx512_vnni"])
    p = Predictor(model, device="cpu", backend="auto")
    assert p.backend == "onnx" and "failed the accuracy gate" in p.backend_reason
    assert Predictor(model, device="cpu", backend="int8").backend == "int8"
    assert main(["export", "--model", str(model), "--format", "onnx-int8", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "failed its accuracy gate" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()


def test_auto_picks_only_a_verified_gated_int8_model_on_a_vnni_cpu(int8_run, tmp_path, monkeypatch):
    import torch

    import medpipe.infer.quantize as q
    from medpipe.errors import MedpipeError
    from medpipe.infer.predictor import Predictor, resolve_backend
    from medpipe.package import read_meta

    model = _copy_run(int8_run["run"], tmp_path / "run")
    cpu = torch.device("cpu")

    def auto():
        return resolve_backend("auto", cpu, read_meta(model))

    monkeypatch.setattr(q, "cpu_int8_flags", lambda *a: ["avx512_vnni"])
    _set_speed(model, 1.5)  # recorded faster on this CPU model (the real figure depends on the machine)
    p = Predictor(model, device="cpu", backend="auto")
    assert p.backend == "int8" and p.temperature == p.int8["temperature"] != read_meta(model).temperature
    monkeypatch.setattr(q, "cpu_int8_flags", lambda *a: [])
    assert auto()[0] == "onnx" and "no INT8 dot-product" in auto()[1]
    monkeypatch.setattr(q, "cpu_int8_flags", lambda *a: ["amx_int8"])
    assert auto()[0] == "int8"
    # altered INT8 file: refused by hash, auto falls back to FP32 ONNX, an explicit request fails clearly
    data = (model / q.INT8_FILE).read_bytes()
    (model / q.INT8_FILE).write_bytes(data[:-10])
    assert auto()[0] == "onnx" and "does not match int8.json" in auto()[1]
    with pytest.raises(MedpipeError, match="does not match int8.json"):
        Predictor(model, device="cpu", backend="int8")
    (model / q.INT8_FILE).write_bytes(data)
    # auto hashes the INT8 file once at start-up (choosing the backend and starting it)...
    time.sleep(1.1)  # a file written in the last second is hashed every time
    hashed = []
    real_sha256 = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: (hashed.append(bool(a) and a[0] == data), real_sha256(*a))[1])
    q._INT8_DIGESTS.clear()
    assert Predictor(model, device="cpu", backend="auto").backend == "int8" and hashed.count(True) == 1
    # ...but a same-size change with its mtime put back is still caught (the ctime moved)
    st = (model / q.INT8_FILE).stat()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    (model / q.INT8_FILE).write_bytes(bytes(flipped))
    os.utime(model / q.INT8_FILE, ns=(st.st_atime_ns, st.st_mtime_ns))
    time.sleep(1.1)
    assert auto()[0] == "onnx" and "does not match int8.json" in auto()[1]
    monkeypatch.setattr(hashlib, "sha256", real_sha256)
    (model / q.INT8_FILE).write_bytes(data)
    # an INT8 model made from other weights (package retrained in place) is stale
    info = json.loads((model / q.INT8_META).read_text())
    (model / q.INT8_META).write_text(json.dumps({**info, "weights_sha256": "0" * 64}))
    assert auto()[0] == "onnx" and "made from other weights" in auto()[1]
    (model / q.INT8_META).unlink()
    assert auto()[0] == "onnx" and "no INT8 model" in auto()[1]
    with pytest.raises(MedpipeError, match="medpipe quantize"):
        Predictor(model, device="cpu", backend="int8")


def test_auto_picks_int8_only_where_it_was_measured_faster(int8_run, tmp_path, monkeypatch):
    """The recorded speed-up on the same CPU model decides; on another CPU model (or none recorded) a
    start-up check decides, once per process. The timing is injected: tests never assert real timings."""
    import torch

    import medpipe.infer.auto as auto_mod
    import medpipe.infer.quantize as q
    from medpipe.infer.predictor import Predictor, resolve_backend
    from medpipe.package import read_meta

    model = _copy_run(int8_run["run"], tmp_path / "run")
    cpu = torch.device("cpu")
    monkeypatch.setattr(q, "cpu_int8_flags", lambda *a: ["avx512_vnni"])
    monkeypatch.setattr(auto_mod, "_SPEED_CHECKS", {})
    calls = []

    def fake_measure(speedup):
        def measure(fp32, int8, size, **kw):
            assert isinstance(fp32, bytes) and fp32 != int8  # the package's FP32 graph vs its INT8 one
            calls.append((size, kw.get("threads")))
            return {"batches": {"1": {"fp32_ms": 10.0 * speedup, "int8_ms": 10.0, "speedup": speedup}},
                    "speedup": speedup}
        return measure

    def auto(fp32=None, threads=None):
        return resolve_backend("auto", cpu, read_meta(model), fp32, threads)

    monkeypatch.setattr(q, "measure_speedup", fake_measure(9.0))  # must not be called while a figure decides
    _set_speed(model, 1.3)
    assert auto()[0] == "int8" and "INT8 1.30x FP32 ONNX" in auto()[1] and "at quantize time" in auto()[1]
    _set_speed(model, 1.05)
    b, why = auto()
    assert b == "onnx" and "not fast enough" in why and "1.05x" in why and "at least 1.1x" in why
    assert calls == []
    # another CPU model: the recorded figure does not count; the start-up check (injected) decides
    _set_speed(model, 3.0, cpu="Some Other CPU 9000")
    assert auto()[0] == "onnx" and "no speed figure for this CPU" in auto()[1]  # no FP32 graph to time against
    monkeypatch.setattr(q, "measure_speedup", fake_measure(0.9))
    p = Predictor(model, device="cpu", backend="auto", threads=1)
    assert p.backend == "onnx" and "start-up check" in p.backend_reason and "Some Other CPU 9000" in p.backend_reason
    assert "0.90x" in p.backend_reason and calls == [(32, 1)]
    assert p.logits([np.zeros((32, 32, 3), np.uint8)]).shape == (1, 7)  # the FP32 graph it timed also runs
    Predictor(model, device="cpu", backend="auto", threads=1)
    assert len(calls) == 1  # cached for the process (same INT8 model, CPU, threads)
    monkeypatch.setattr(auto_mod, "_SPEED_CHECKS", {})
    monkeypatch.setattr(q, "measure_speedup", fake_measure(1.4))
    _set_speed(model, None)
    p = Predictor(model, device="cpu", backend="auto", threads=1)
    assert p.backend == "int8" and "no quantize-time figure" in p.backend_reason and len(calls) == 2

    def broken(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(auto_mod, "_SPEED_CHECKS", {})
    monkeypatch.setattr(q, "measure_speedup", broken)
    p = Predictor(model, device="cpu", backend="auto", threads=1)
    assert p.backend == "onnx" and "speed check" in p.backend_reason and "boom" in p.backend_reason


def test_measure_speedup_times_both_graphs(int8_run):
    """The real timing function on the fixture's tiny graphs: both sessions run at each batch size (the
    figures' size is not asserted; only that they are measured and combined as documented)."""
    from medpipe.export import onnx_bytes
    from medpipe.infer.quantize import load_int8, measure_speedup
    from medpipe.package import load_package

    model, meta = load_package(int8_run["model"])
    int8, _ = load_int8(meta)
    r = measure_speedup(onnx_bytes(model, 32), int8, 32, batches=(1, 2), threads=1, warmup=1, rounds=2)
    assert set(r["batches"]) == {"1", "2"} and r["rounds"] == 2 and r["threads"] == 1
    assert r["speedup"] == min(v["speedup"] for v in r["batches"].values())
    assert all(v["fp32_ms"] > 0 and v["int8_ms"] > 0 and v["speedup"] > 0 for v in r["batches"].values())


def _tiny_graph(size: int = 8) -> bytes:
    """A few-op FP32 ONNX graph (convolution, pooling, linear head: logits and embedding), built in well under
    a second: the timing function's mechanics need no trained model."""
    import torch

    from medpipe.export import onnx_bytes

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 7))
    return onnx_bytes(net, size)


def test_measure_speedup_times_openvino_on_one_stream_and_records_it(monkeypatch):
    """The OpenVINO figure `auto` decides on (and int8.json keeps) is one batch's latency on a one-stream
    session with every thread, as ONNX Runtime's: not the automatic 2 streams a server on >= 2 threads gets,
    where a batch of 1 runs on one stream's share of the threads. The stream count is recorded."""
    pytest.importorskip("openvino")
    from medpipe.infer import openvino_runtime as ovr
    from medpipe.infer import quantize as q

    built = []
    real = ovr.OpenVinoSession

    def spy(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(q, "OpenVinoSession", spy)
    graph = _tiny_graph()
    r = q.measure_speedup(graph, graph, 8, batches=(1, 2), threads=2, warmup=1, rounds=1, openvino="f32")
    assert real(graph, threads=2).streams == ovr.AUTO_STREAMS > 1  # what the server would get here
    assert [s.streams for s in built] == [1] and built[0].config["PERFORMANCE_HINT"] == "LATENCY"
    assert r["openvino_streams"] == 1 and r["openvino_precision"] == "f32"
    assert all(v["openvino_ms"] > 0 for v in r["batches"].values())


def test_openvino_bindings_numpy_api_is_first_used_once_per_process(monkeypatch):
    """The first use of OpenVINO's numpy API (pybind11's one-time initialisation, which deadlocked when two stream
    threads reached it at once) is made once in a process, by the first bucket compiled, whatever the session;
    sessions on two streams then run batches split across the streams."""
    from types import SimpleNamespace

    from medpipe.infer import openvino_runtime as ovr

    touched: list = []

    class Request:
        def get_input_tensor(self, index):
            touched.append(index)
            return SimpleNamespace(data=np.zeros(1, np.float32))

    monkeypatch.setattr(ovr, "_numpy_api_ready", False)
    for _ in range(3):
        ovr._first_numpy_use(Request())
    assert touched == [0] and ovr._numpy_api_ready
    pytest.importorskip("openvino")
    monkeypatch.setattr(ovr, "_numpy_api_ready", False)
    graph = _tiny_graph()
    x = np.random.default_rng(0).normal(size=(3, 3, 8, 8)).astype(np.float32)
    a, b = (ovr.OpenVinoSession(graph, threads=2, streams=2, max_batch=2) for _ in range(2))
    out_a = a.run(None, {"x": x})[0]
    assert ovr._numpy_api_ready and out_a.shape == (3, 7)
    np.testing.assert_allclose(b.run(None, {"x": x})[0], out_a, rtol=1e-5, atol=1e-5)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    from medpipe.infer.quantize import cpu_int8_flags

    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni amx_int8\n")
    assert cpu_int8_flags(f) == ["avx512_vnni", "amx_int8"]
    f.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    assert cpu_int8_flags(f) == [] and cpu_int8_flags(tmp_path / "missing") == []
    from medpipe.infer.quantize import cpu_model

    f.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480C\nflags\t\t: fpu\n")
    assert cpu_model(f) == "Intel(R) Xeon(R) Platinum 8480C" and cpu_model(tmp_path / "missing")


# -- OpenVINO running the same INT8 graph ------------------------------------------------------------

def test_openvino_has_its_own_gate_and_answers_like_fp32_through_predict_batch_serve_evaluate(int8_run, tmp_path,
                                                                                              capsys):
    pytest.importorskip("openvino")
    from medpipe.infer.quantize import MAX_AUC_DIFF, MIN_AGREEMENT, load_int8
    from medpipe.package import read_meta
    from tests._server import Server, as_json

    _, info = load_int8(read_meta(int8_run["model"]))
    rec = info["openvino"]
    g = rec["gate"]
    assert g["passed"] and g["agreement"] >= MIN_AGREEMENT and g["auc_diff"] <= MAX_AUC_DIFF and g["n"] >= 10
    assert rec["precision"] in ("bf16", "f32") and rec["temperature"] > 0 and rec["version"]
    assert info["speed"]["openvino_precision"] == rec["precision"] and info["speed"]["openvino_speedup"] > 0
    assert info["speed"]["openvino_streams"] == 1  # latency on one stream, as ONNX Runtime's figures
    assert all(b["openvino_ms"] > 0 for b in info["speed"]["batches"].values())

    images = int8_run["images"][::4]
    model = str(int8_run["model"])
    # other batch compositions in batch (buckets of 8 and 16): the same labels, near-equal probabilities
    fp32, ov = _predict_and_batch(int8_run, images, "openvino", tmp_path, capsys, tolerance=1e-3)
    srv = Server(int8_run["run"], "--backend", "openvino", "--threads", "1", "--max-batch", "4",
                 log=tmp_path / "serve.log").wait_ready()
    try:
        for img, ref in zip(images[:4], ov):
            status, _, body = srv.invoke(img.read_bytes(), ctype="image/png")
            assert status == 200
            got = as_json(body)
            got = got.get("predictions", [got])[0] if isinstance(got, dict) else got[0]
            assert got["label"] == ref["label"]
    finally:
        srv.stop()
    assert "backend openvino (asked for)" in srv.log_text()
    assert main(["evaluate", "--model", model, "--data", str(int8_run["data"]), "--split", "val",
                 "--backend", "openvino", "--bootstrap", "0", "--out", str(tmp_path / "rep")]) == 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["backend"] == "openvino" and rep["int8_gate"] == g


def test_openvino_session_splits_batches_into_static_buckets(int8_run):
    """One compiled model per bucket (1, 2, 4, ...): a batch of 7 runs as chunks of 4, 2 and 1 (never padded)
    and gives each row what a batch of one gives (rows are independent)."""
    pytest.importorskip("openvino")
    from medpipe.infer.openvino_runtime import OpenVinoSession
    from medpipe.infer.quantize import load_int8
    from medpipe.package import read_meta

    data, _ = load_int8(read_meta(int8_run["model"]))
    s = OpenVinoSession(data, threads=1, precision="f32", max_batch=4)
    assert s.buckets == [1, 2, 4]
    x = np.random.default_rng(0).standard_normal((7, 3, 32, 32)).astype(np.float32)
    out = s.run(None, {"image": x})[0]
    assert out.shape == (7, 7) and set(s._requests) == {1, 2, 4}  # chunks of 4, 2, 1: compiled on first use
    assert s.chunks(7) == [4, 2, 1] and s.chunks(8) == [4, 4] and s.chunks(5) == [4, 1] and s.chunks(1) == [1]
    single = np.concatenate([s.run(None, {"image": x[i:i + 1]})[0] for i in range(7)])
    assert np.allclose(out, single, atol=1e-4)
    s2 = OpenVinoSession(data, threads=1, precision="f32", max_batch=4)
    s2.warm()
    assert set(s2._requests) == {1, 2, 4}


def test_openvino_streams_split_a_batch_and_give_the_one_stream_answer(int8_run):
    """2 streams (the automatic choice with 2 threads) compile for throughput with one request per stream and deals a batch's rows to the streams
    (7 rows: 4 | 2 + 1), run at once; every row equals the one-stream session's. ``names`` picks outputs as
    ONNX Runtime's run does, and an unknown name is a MedpipeError naming it."""
    pytest.importorskip("openvino")
    from medpipe.errors import MedpipeError
    from medpipe.infer.openvino_runtime import OpenVinoSession
    from medpipe.infer.quantize import load_int8
    from medpipe.package import read_meta

    data, _ = load_int8(read_meta(int8_run["model"]))
    one = OpenVinoSession(data, threads=2, precision="f32", max_batch=4, streams=1)
    two = OpenVinoSession(data, threads=2, precision="f32", max_batch=4)  # automatic: 2 streams on 2 threads
    assert one.config["PERFORMANCE_HINT"] == "LATENCY" and OpenVinoSession(data, threads=1).streams == 1
    assert two.config["PERFORMANCE_HINT"] == "THROUGHPUT" and two.config["NUM_STREAMS"] == 2
    assert two.shares(7) == [[(0, 4)], [(4, 2), (6, 1)]] and two.shares(1) == [[(0, 1)]]
    assert two.shares(8) == [[(0, 4)], [(4, 4)]] and one.shares(3) == [[(0, 2), (2, 1)]]
    x = np.random.default_rng(1).standard_normal((7, 3, 32, 32)).astype(np.float32)
    ref, got = one.run(None, {"image": x}), two.run(None, {"image": x})
    assert len(got) == len(ref) and all(np.allclose(a, b, atol=1e-4) for a, b in zip(ref, got))
    assert len(two._requests[4]) == 2  # one infer request per stream
    names = [o.name for o in two.get_outputs()]
    first = two.run(names[:1], {"image": x[:3]})
    assert len(first) == 1 and np.allclose(first[0], ref[0][:3], atol=1e-4)
    with pytest.raises(MedpipeError, match="no output 'nope'"):
        two.run(["nope"], {"image": x[:1]})
    with pytest.raises(MedpipeError, match="streams must be >= 0"):
        OpenVinoSession(data, streams=-1)


def test_openvino_needs_its_own_gate_and_auto_picks_it_only_when_measured_faster(int8_run, tmp_path, monkeypatch,
                                                                                  caplog):
    pytest.importorskip("openvino")
    import torch

    import medpipe.infer.quantize as q
    from medpipe.errors import MedpipeError
    from medpipe.infer.predictor import Predictor, resolve_backend
    from medpipe.package import read_meta

    model = _copy_run(int8_run["run"], tmp_path / "run")
    monkeypatch.setattr(q, "cpu_int8_flags", lambda *a: ["avx512_vnni"])

    def auto():
        return resolve_backend("auto", torch.device("cpu"), read_meta(model))

    _set_speed(model, 1.3, openvino=2.0)
    b, why = auto()
    assert b == "openvino" and "OpenVINO gate passed" in why and "OpenVINO INT8 2.00x FP32 ONNX" in why
    p = Predictor(model, device="cpu", backend="auto", threads=1)
    assert p.backend == "openvino" and p.temperature == p.int8["openvino"]["temperature"]
    assert p.logits([np.zeros((32, 32, 3), np.uint8)]).shape == (1, 7)
    _set_speed(model, 1.3, openvino=1.2)  # gated but slower than ONNX Runtime's INT8 here
    b, why = auto()
    assert b == "int8" and "OpenVINO measured 1.20x" in why
    _set_speed(model, 1.05, openvino=1.08)  # neither reaches 1.1x
    assert auto()[0] == "onnx"
    # OpenVINO's own gate failed: auto never picks it; asking for it runs it with a warning in the log
    _set_speed(model, 1.3, openvino=2.0)
    info = json.loads((model / q.INT8_META).read_text())
    failed = {**info["openvino"], "gate": {**info["openvino"]["gate"], "passed": False, "failures": ["top-1 x"]}}
    (model / q.INT8_META).write_text(json.dumps({**info, "openvino": failed}))
    b, why = auto()
    assert b == "int8" and "OpenVINO's outputs failed the accuracy gate: top-1 x" in why
    with caplog.at_level(logging.WARNING, logger="medpipe.infer.predictor"):
        assert Predictor(model, device="cpu", backend="openvino", threads=1).backend == "openvino"
    assert "FAILED its accuracy gate" in caplog.text and "top-1 x" in caplog.text
    # gated by another OpenVINO release, or in a precision this CPU does not run: not used, and said why
    (model / q.INT8_META).write_text(json.dumps({**info, "openvino": {**info["openvino"], "version": "2020.1.0"}}))
    b, why = auto()
    assert b == "int8" and "OpenVINO 2020.1.0" in why and "never gated" in why
    with pytest.raises(MedpipeError, match="another release"):
        Predictor(model, device="cpu", backend="openvino")
    (model / q.INT8_META).write_text(json.dumps(info))
    import medpipe.infer.openvino_runtime as ovr

    monkeypatch.setattr(ovr, "supported", lambda precision: False)
    b, why = auto()
    assert b == "int8" and "which this CPU does not run" in why
    with pytest.raises(MedpipeError, match="which this CPU does not run"):
        Predictor(model, device="cpu", backend="openvino")
    monkeypatch.undo()
    monkeypatch.setattr(q, "cpu_int8_flags", lambda *a: ["avx512_vnni"])
    # OpenVINO cannot compile the model here: auto falls back (and says so), asked for it is a clear error
    def cannot(self, buckets=None):
        raise MedpipeError("OpenVINO could not compile the INT8 model for batch 1 (simulated)")

    monkeypatch.setattr(ovr.OpenVinoSession, "warm", cannot)
    p = Predictor(model, device="cpu", backend="auto", threads=1)
    assert p.backend != "openvino" and "could not start" in p.backend_reason and "simulated" in p.backend_reason
    with pytest.raises(MedpipeError, match="openvino backend could not start.*simulated.*--backend int8"):
        Predictor(model, device="cpu", backend="openvino")
    monkeypatch.undo()
    monkeypatch.setattr(q, "cpu_int8_flags", lambda *a: ["avx512_vnni"])
    # quantized without OpenVINO: no gate of its own, so the backend refuses and auto keeps ONNX Runtime
    (model / q.INT8_META).write_text(json.dumps({k: v for k, v in info.items() if k != "openvino"}))
    b, why = auto()
    assert b == "int8" and "no OpenVINO gate" in why
    with pytest.raises(MedpipeError, match="no OpenVINO gate"):
        Predictor(model, device="cpu", backend="openvino")
