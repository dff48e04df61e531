"""The penultimate-layer embedding on every CPU backend: the ONNX graph's second output (FP32, INT8 on ONNX
Runtime and on OpenVINO) equals the eager model's, capture uses it, and an INT8 graph made before that output
existed still serves, with no embedding and a reason."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medpipe.cli import main

pytest.importorskip("onnxruntime.quantization")

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "tests" / "data" / "densenet-test"
# measured: FP32 ONNX Runtime within 2e-6 of eager on DenseNet121's features (benchmarks/results/onnx_embedding.json)
# and 5e-7 on this tiny model's projected embedding; INT8 (ONNX Runtime, OpenVINO f32/bf16) cosine similarity per
# image >= 0.9997 on DenseNet121, >= 0.9997 here
FP32_ATOL = 1e-4
INT8_MIN_COSINE = 0.995


@pytest.fixture(scope="module")
def pkg(tmp_path_factory) -> dict:
    """A copy of the tiny DenseNet package with its INT8 model (quantized and gated by `medpipe quantize`
    on a synthetic dataset; --force: the gate's figures do not matter here), and decoded images."""
    from medpipe.data.sources import ingest
    from medpipe.data.synthetic import SynthSpec, write_synthetic

    root = tmp_path_factory.mktemp("emb")
    write_synthetic(root / "raw", SynthSpec(count=60, width=64, height=48, seed=5), fmt="folders", workers=1)
    ingest(root / "raw", root / "data", workers=1)
    assert main(["split", "--data", str(root / "data")]) == 0
    model = root / "model"
    shutil.copytree(PKG, model)
    assert main(["quantize", "--model", str(model), "--data", str(root / "data"), "--force"]) == 0
    paths = pd.read_csv(root / "data" / "records.csv")["path"][:12]
    return {"root": root, "model": model, "images": [Path(p).read_bytes() for p in paths]}


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_every_cpu_backend_gives_the_eager_embedding(pkg):
    from medpipe.infer import openvino_runtime as ovr
    from medpipe.infer.predictor import Predictor
    from medpipe.monitor.embedding import DIM, Embedder

    eager = Predictor(pkg["model"], device="cpu", backend="eager")
    pixels = [eager.decode(b) for b in pkg["images"]]
    ref_probs, ref = Embedder(eager).probabilities(pixels)
    assert ref.shape == (len(pixels), DIM)
    backends = ["onnx", "int8", *(["openvino"] if ovr.available() else [])]
    for name in backends:
        pred = Predictor(pkg["model"], device="cpu", backend=name)
        emb = Embedder(pred)
        assert emb.live and pred.runtime.embedding_size() == emb.features, (name, emb.why)
        probs, got = emb.probabilities(pixels)  # the answering pass's own output, no second pass
        assert got.shape == ref.shape, name
        if name == "onnx":
            np.testing.assert_allclose(got, ref, atol=FP32_ATOL)
            np.testing.assert_allclose(probs, ref_probs, atol=FP32_ATOL)
        else:
            assert _cosine(got, ref).min() >= INT8_MIN_COSINE, (name, _cosine(got, ref))
        rows = emb.rows(pixels[:3])  # the service's rows: probabilities, then the embedding
        assert rows.shape == (3, len(pred.classes) + DIM)

    tta = Predictor(pkg["model"], device="cpu", backend="onnx", tta=True)  # flip TTA: the mean of the four passes
    np.testing.assert_allclose(Embedder(tta).probabilities(pixels)[1],
                               Embedder(Predictor(pkg["model"], device="cpu", tta=True)).embed(pixels), atol=FP32_ATOL)


def test_openvino_session_returns_only_the_outputs_asked_for(pkg):
    """As ONNX Runtime's ``run(names, feed)``: the logits alone unless the embedding is asked for too."""
    from medpipe.errors import MedpipeError
    from medpipe.infer import openvino_runtime as ovr
    from medpipe.infer.onnx_runtime import EMBEDDING_NAME, INPUT_NAME
    from medpipe.infer.quantize import load_int8
    from medpipe.package import read_meta

    if not ovr.available():
        pytest.skip("OpenVINO is not installed")
    data, _ = load_int8(read_meta(pkg["model"]))
    s = ovr.OpenVinoSession(data, threads=1, precision="f32", max_batch=2)
    logits_name = s.get_outputs()[0].name
    feed = {INPUT_NAME: np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)}
    every = s.run(None, feed)
    assert len(every) == 2
    only = s.run([logits_name], feed)
    assert len(only) == 1 and np.array_equal(only[0], every[0])
    swapped = s.run([EMBEDDING_NAME, logits_name], feed)
    assert np.array_equal(swapped[0], every[1]) and np.array_equal(swapped[1], every[0])
    with pytest.raises(MedpipeError, match="no output 'nope'"):
        s.run(["nope"], feed)


def test_int8_graph_keeps_the_logits_first_and_the_embedding_second(pkg):
    import onnx

    from medpipe.infer.quantize import load_int8
    from medpipe.package import read_meta

    data, info = load_int8(read_meta(pkg["model"]))
    m = onnx.load_from_string(data)
    assert [o.name for o in m.graph.output] == ["logits", "embedding"]
    props = {p.key: p.value for p in m.metadata_props}
    assert json.loads(props["embedding"]) == {"output": "embedding", "index": 1, "features": 32,
                                              "layer": "input of the classifier head (pooled penultimate features)"}
    assert "embedding (second output)" in props["output"] and "int8_gate" in props
    assert info["gate"]["n"] > 0  # the gate ran on the logits


def test_export_has_the_embedding_output_after_the_logits(pkg, tmp_path):
    import onnxruntime as ort

    from medpipe.export import export_model

    for pre in (False, True):
        out = tmp_path / f"m{int(pre)}.onnx"
        res = export_model(str(pkg["model"]), "onnx", str(out), with_preprocessing=pre)
        assert 0 <= res["embedding_max_abs_diff"] < FP32_ATOL
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        assert [o.name for o in sess.get_outputs()] == ["logits", "embedding"]
        assert "embedding" in sess.get_modelmeta().custom_metadata_map


def _strip_embedding(model: Path) -> None:
    """Make the package's INT8 model look like one quantized before the embedding output existed."""
    import onnx

    from medpipe.infer.quantize import int8_paths

    onnx_path, info_path = int8_paths(model)
    m = onnx.load(str(onnx_path))
    keep = [o for o in m.graph.output if o.name != "embedding"]
    del m.graph.output[:]
    m.graph.output.extend(keep)
    data = m.SerializeToString()
    onnx_path.write_bytes(data)
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "sha256": hashlib.sha256(data).hexdigest()}))


def test_an_int8_model_made_before_embeddings_serves_without_them(pkg, tmp_path, caplog):
    from medpipe.infer import openvino_runtime as ovr
    from medpipe.infer.predictor import Predictor
    from medpipe.monitor.embedding import Embedder, open_embedder

    old = tmp_path / "model"
    shutil.copytree(pkg["model"], old)
    _strip_embedding(old)
    for name in ["int8", *(["openvino"] if ovr.available() else [])]:
        pred = Predictor(old, device="cpu", backend=name)
        pixels = [pred.decode(b) for b in pkg["images"][:4]]
        emb = Embedder(pred)
        assert not emb.live and "run 'medpipe quantize' again" in emb.why
        probs, got = emb.probabilities(pixels)
        assert got is None and probs.shape == (4, len(pred.classes))
        assert emb.rows(pixels).shape == probs.shape  # no embedding columns: capture records none
        with pytest.raises(ValueError, match="gives no embedding"):
            pred.runtime.add_feature_sink(lambda f: None)

    class Cfg:
        capture, monitor_baseline = "somewhere", None

    with caplog.at_level(logging.INFO, logger="medpipe.monitor"):
        open_embedder(Cfg, Predictor(old, device="cpu", backend="int8"))
    assert "no embeddings (the int8 backend gives none: its INT8 graph was quantized before" in caplog.text


def test_capture_with_the_int8_backend_records_the_answering_pass_embedding(pkg, tmp_path):
    """The service's path in-process (app.py: open_embedder -> rows -> split_rows -> the capture writer), read
    back by monitor check's reader: the record carries the INT8 graph's embedding."""
    from medpipe.infer.predictor import Predictor
    from medpipe.monitor.capture import CaptureWriter
    from medpipe.monitor.embedding import decode, open_embedder, split_rows
    from medpipe.monitor.reader import ReadLog, read_capture

    class Cfg:
        capture, monitor_baseline = str(tmp_path / "c"), None

    pred = Predictor(pkg["model"], device="cpu", backend="int8")
    emb = open_embedder(Cfg, pred)
    decoded = [pred.decode(b) for b in pkg["images"][:3]]
    probs, encoded = split_rows(emb.rows(decoded), len(pred.classes), decoded)
    sha = pred.meta.weights_sha256
    w = CaptureWriter(tmp_path / "c", {"package_sha256": sha, "model": pred.name, "version": pred.version})
    w.projection = emb.id
    answer = json.dumps({"predictions": [p.as_dict() for p in pred.to_predictions(probs)]}).encode()
    w.submit("application/json", b"", [("bytes", b) for b in pkg["images"][:3]], answer, "application/json",
             embeddings=encoded)
    w.close()
    rows = read_capture(next((tmp_path / "c").rglob("*.jsonl")), pred.classes, sha, ReadLog())
    got = np.stack([decode(fp["embedding"]) for fp in rows.inputs])
    assert all(fp["embedding_projection"] == emb.id for fp in rows.inputs)
    assert _cosine(got, emb.embed(decoded)).min() >= INT8_MIN_COSINE  # embed(): the eager model's
