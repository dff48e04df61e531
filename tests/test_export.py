"""Exports: ONNX (self-describing, run by onnxruntime alone), TorchScript, the model registry, where an
export may write, and the backends built on the ONNX export. The MONAI bundle run is in test_bundle.py."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medpipe.cli import main

pytestmark = pytest.mark.slow
ONNX_CLIENT = Path(__file__).resolve().parents[1] / "docs" / "examples" / "onnx_client.py"


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> list[Path]:
    """Five 600x450 JPEGs (HAM10000's size: the JPEG draft decode matters at this size) and one PNG."""
    from medpipe.data.synthetic import SynthSpec, write_synthetic

    out = tmp_path_factory.mktemp("jpegs")
    write_synthetic(out / "ham", SynthSpec(count=7, width=600, height=450, seed=11), workers=1)
    paths = sorted((out / "ham").rglob("*.jpg"))[:5]
    Image.open(paths[0]).convert("RGB").save(out / "as.png")
    return [*paths, out / "as.png"]


def _predict_json(model: Path, paths, capsys) -> list[dict]:
    capsys.readouterr()
    assert main(["predict", "--model", str(model), "--json", *map(str, paths)]) == 0
    return [json.loads(x) for x in capsys.readouterr().out.splitlines()]


def test_onnx_backend_matches_eager(trained_run, data_dir):
    from medpipe.infer.predictor import Predictor

    eager = Predictor(trained_run / "model", backend="eager")
    onnx = Predictor(trained_run / "model", backend="onnx")
    pixels = [eager.spec.read(p) for p in pd.read_csv(data_dir / "records.csv")["path"][:5]]
    rng = np.random.default_rng(0)
    pixels += [rng.integers(0, 256, (*eager.size, 3), dtype=np.uint8) for _ in range(3)]
    assert np.abs(eager.logits(pixels).numpy() - onnx.logits(pixels).numpy()).max() < 1e-4
    assert np.abs(eager.probabilities(pixels) - onnx.probabilities(pixels)).max() < 1e-4


def test_onnx_and_torchscript_exports(trained_run, tmp_path):
    import onnxruntime as ort

    from medpipe.package import load_package

    model, meta = load_package(trained_run / "model")
    size = meta.preprocessing.image_size
    x = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(x).numpy()
    out = tmp_path / "new" / "folder" / "m.onnx"  # the parent folder is created
    assert main(["export", "--model", str(trained_run / "model"), "--format", "onnx", "--out", str(out)]) == 0
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[0] == "batch"  # dynamic batch axis
    assert np.abs(sess.run(None, {"image": x.numpy()})[0] - ref).max() < 1e-4
    # self-describing: everything needed to use the file is inside it
    props = sess.get_modelmeta().custom_metadata_map
    assert json.loads(props["classes"]) == list(meta.classes)
    assert props["weights_sha256"] == meta.weights_sha256
    assert float(props["temperature"]) == pytest.approx(meta.temperature)
    spec = json.loads(props["preprocessing"])
    assert spec["image_size"] == size and spec["interpolation"] == meta.preprocessing.interpolation
    assert "draft" in spec["decode"] and props["medpipe_version"]
    # the sidecar cannot collide with a package's model.json
    assert json.loads((out.parent / "m.onnx.medpipe.json").read_text())["classes"] == list(meta.classes)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx", "m.onnx.medpipe.json"]
    assert main(["export", "--model", str(trained_run / "model"), "--format", "torchscript", "--out",
                 str(tmp_path / "m.ts")]) == 0
    extra = {"medpipe_model.json": ""}
    ts = torch.jit.load(str(tmp_path / "m.ts"), _extra_files=extra)
    assert np.abs(ts(x).detach().numpy() - ref).max() < 1e-4
    assert json.loads(extra["medpipe_model.json"])["classes"] == list(meta.classes)


def _readme_snippet() -> str:
    """The documented client (docs/guides/exports.md includes this file)."""
    return ONNX_CLIENT.read_text()


def test_readme_onnx_client_reproduces_predict_without_medpipe(trained_run, jpegs, tmp_path, capsys):
    """The documented onnxruntime + Pillow + numpy client (docs/examples/onnx_client.py), run in a process
    where medpipe cannot be imported, gives `medpipe predict`'s probabilities within 1e-4 (JPEGs, via the
    documented draft decode, and a PNG)."""
    snippet = _readme_snippet()
    code_lines = [ln for ln in snippet.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(code_lines) <= 12, f"the documented client should stay about ten lines, has {len(code_lines)}"
    assert not any("medpipe" in ln.split("#")[0] for ln in code_lines)  # code only; comments may name it
    onnx = tmp_path / "model.onnx"
    assert main(["export", "--model", str(trained_run / "model"), "--format", "onnx", "--out", str(onnx)]) == 0
    expected = _predict_json(trained_run / "model", jpegs, capsys)
    client = tmp_path / "client.py"
    client.write_text(snippet)
    block = ("import runpy, sys; sys.modules['medpipe'] = None; sys.argv = sys.argv[1:]; "  # medpipe: not importable
             "runpy.run_path(sys.argv[0], run_name='__main__'); "
             "assert not [m for m in sys.modules if m.startswith('medpipe') and sys.modules[m]]")
    r = subprocess.run([sys.executable, "-c", block, str(client), str(onnx), *map(str, jpegs)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    got = {row["image"]: row for row in map(json.loads, r.stdout.strip().splitlines())}
    assert len(got) == len(expected)
    for e in expected:
        g = got[e["image"]]
        diff = max(abs(g["probabilities"][c] - p) for c, p in e["probabilities"].items())
        assert diff < 1e-4 and g["label"] == e["label"], (e["image"], diff)


def test_onnx_with_preprocessing_takes_resized_uint8_pixels(trained_run, jpegs, tmp_path):
    """--with-preprocessing: the graph takes the decoded, resized uint8 pixels and does the rest itself."""
    import onnxruntime as ort

    from medpipe.infer.predictor import Predictor

    out = tmp_path / "px.onnx"
    assert main(["export", "--model", str(trained_run / "model"), "--format", "onnx", "--out", str(out),
                 "--with-preprocessing"]) == 0
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    props = sess.get_modelmeta().custom_metadata_map
    assert "uint8" in props["input"] and sess.get_inputs()[0].type == "tensor(uint8)"
    p = Predictor(trained_run / "model", backend="eager")
    pixels = np.stack([p.spec.read(j) for j in jpegs])
    z = sess.run(None, {"image": pixels})[0] / float(props["temperature"])
    probs = np.exp(z - z.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    assert np.abs(probs - p.probabilities(list(pixels))).max() < 1e-4
    assert main(["export", "--model", str(trained_run / "model"), "--format", "bundle", "--out",
                 str(tmp_path / "b"), "--with-preprocessing"]) == 2


def test_registry_feeds_create_model_and_bundle_network_def():
    """One registry: every name builds through create_model and through the bundle's network_def, and the
    two networks have the same tensors (one representative per family; every target resolves)."""
    import importlib

    from monai.bundle import ConfigParser

    from medpipe.models import REGISTRY, bundle_target, create_model

    for name, d in REGISTRY.items():
        module, _, cls = d.target.rpartition(".")
        assert callable(getattr(importlib.import_module(module), cls)), name
    for name in ("densenet121", "resnet18", "efficientnet-b0", "seresnet50"):
        a = create_model(name, 5)
        b = ConfigParser({"net": bundle_target(name, 5)}).get_parsed_content("net")
        assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def _package(tmp_path: Path, interpolation: str = "bicubic", classes=None) -> Path:
    """A small untrained package (fast; no training needed to test an export's plumbing)."""
    from medpipe.models import create_model
    from medpipe.package import save_package
    from medpipe.preprocess import PreprocessSpec

    classes = classes or ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    torch.manual_seed(0)
    model = create_model("densenet121", len(classes)).eval()
    out = tmp_path / "pkg"
    save_package(out, model, name="derm", arch="densenet121", classes=classes,
                 spec=PreprocessSpec(image_size=32, interpolation=interpolation), temperature=1.7)
    return out


def test_exports_never_damage_a_package_or_overwrite_without_force(tmp_path, capsys):
    pkg = _package(tmp_path)
    before = {p.name: p.read_bytes() for p in pkg.iterdir()}
    # into the package folder: refused (the old sidecar model.json destroyed the package)
    assert main(["export", "--model", str(pkg), "--format", "onnx", "--out", str(pkg / "model.onnx")]) == 2
    assert "inside the model package" in capsys.readouterr().err
    assert main(["export", "--model", str(pkg), "--format", "torchscript", "--out", str(pkg / "model.json"),
                 "--force"]) == 2
    assert "would overwrite the model package" in capsys.readouterr().err
    assert main(["export", "--model", str(pkg), "--format", "bundle", "--out", str(pkg)]) == 2
    assert {p.name: p.read_bytes() for p in pkg.iterdir()} == before
    # an existing directory as --out for a file export: a clear error, not "internal error"
    (tmp_path / "adir").mkdir()
    assert main(["export", "--model", str(pkg), "--format", "onnx", "--out", str(tmp_path / "adir")]) == 2
    assert "is a directory" in capsys.readouterr().err
    # over an existing file: refused, then allowed with --force
    target = tmp_path / "out" / "m.onnx"
    target.parent.mkdir()
    target.write_bytes(b"keep me")
    assert main(["export", "--model", str(pkg), "--format", "onnx", "--out", str(target)]) == 2
    assert "exists" in capsys.readouterr().err and target.read_bytes() == b"keep me"
    assert main(["export", "--model", str(pkg), "--format", "onnx", "--out", str(target), "--force"]) == 0
    assert target.read_bytes() != b"keep me" and (tmp_path / "out" / "m.onnx.medpipe.json").is_file()
    # a non-empty bundle folder is not overwritten without --force
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    assert main(["export", "--model", str(pkg), "--format", "bundle", "--out", str(tmp_path / "b")]) == 2
    assert "exists" in capsys.readouterr().err


def test_bundle_preprocessing_follows_the_package_interpolation(tmp_path, jpegs):
    """Bug: the bundle hard-coded bicubic. A model trained with bilinear gets bilinear pixels, identical to
    medpipe's eval preset on the same file."""
    from monai.bundle import ConfigParser

    from medpipe.package import package_spec, read_meta
    from medpipe.preprocess import eval_batch

    pkg = _package(tmp_path, interpolation="bilinear")
    out = tmp_path / "bundle"
    assert main(["export", "--model", str(pkg), "--format", "bundle", "--out", str(out)]) == 0
    parser = ConfigParser()
    parser.read_config(str(out / "configs" / "inference.json"))
    pre = parser.get_parsed_content("preprocessing")
    spec = package_spec(read_meta(pkg))
    assert spec.interpolation == "bilinear"
    for path in jpegs[:3]:
        got = pre({"image": str(path)})["image"]
        want = eval_batch([spec.read(path)], spec)[0]
        assert torch.equal(torch.as_tensor(got), want), path
        other = eval_batch([spec.__class__(32, "bicubic").read(path)], spec)[0]
        assert not torch.equal(torch.as_tensor(got), other)  # the interpolation really matters here


def test_sagemaker_export_is_the_package_layout(trained_run, tmp_path):
    import tarfile

    assert main(["export", "--model", str(trained_run / "model"), "--format", "sagemaker", "--out",
                 str(tmp_path / "model.tar.gz")]) == 0
    with tarfile.open(tmp_path / "model.tar.gz") as tf:
        assert {"weights.safetensors", "model.json", "code/inference.py", "code/requirements.txt",
                "code/medpipe/infer/protocol.py"} <= set(tf.getnames())
    # `medpipe package` writes the same bytes (the tarball is reproducible)
    assert main(["package", "--model", str(trained_run / "model"), "--out", str(tmp_path / "p.tar.gz")]) == 0
    assert (tmp_path / "p.tar.gz").read_bytes() == (tmp_path / "model.tar.gz").read_bytes()


def test_gpu_only_backends_fail_clearly_on_cpu(trained_run, capsys):
    from medpipe.errors import MedpipeError
    from medpipe.infer.predictor import Predictor

    with pytest.raises(MedpipeError, match="cudagraph backend needs --device cuda"):
        Predictor(trained_run / "model", device="cpu", backend="cudagraph")
    if not torch.cuda.is_available():
        image = next(trained_run.rglob("*.png"))  # an input that exists: inputs are checked first
        assert main(["predict", "--model", str(trained_run / "model"), "--device", "cuda", str(image)]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_auto_backend_falls_back_to_eager_when_the_fast_one_cannot_start(trained_run, monkeypatch, caplog):
    """`auto` must never stop a server that eager could run; an explicit backend fails loudly instead."""
    import medpipe.infer.predictor
    from medpipe.errors import MedpipeError
    from medpipe.export import ExportError
    from medpipe.infer.predictor import Predictor

    def broken(*a, **k):
        raise ExportError("simulated exporter failure")

    monkeypatch.setattr(medpipe.infer.predictor, "onnx_bytes", broken)
    p = Predictor(trained_run / "model", device="cpu", backend="auto")
    assert p.backend == "eager" and "simulated exporter failure" in caplog.text
    assert p.probabilities([p.prepare_array(np.zeros((40, 40, 3), np.uint8))]).shape == (1, len(p.classes))
    with pytest.raises(MedpipeError, match="onnx backend could not start.*simulated"):
        Predictor(trained_run / "model", device="cpu", backend="onnx")
