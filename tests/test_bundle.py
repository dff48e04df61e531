"""The exported MONAI bundle, run by MONAI itself: the real `python -m monai.bundle run` CLI in a subprocess
and the `ConfigWorkflow` API, against `medpipe predict`; and class names that MONAI's ConfigParser would run."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medpipe.cli import main

pytestmark = pytest.mark.slow
ignite = pytest.importorskip("ignite", reason="the bundle's SupervisedEvaluator needs pytorch-ignite (bundle extra)")
pytest.importorskip("fire", reason="`python -m monai.bundle` needs fire (bundle extra)")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """20 synthetic JPEGs at HAM10000's 600x450 (the JPEG draft decode matters at this size)."""
    from medpipe.data.synthetic import SynthSpec, write_synthetic

    root = tmp_path_factory.mktemp("bundle_imgs")
    write_synthetic(root / "ham", SynthSpec(count=20, width=600, height=450, seed=7), workers=1)
    out = root / "images"
    out.mkdir()
    for p in sorted((root / "ham").rglob("*.jpg")):
        shutil.copy(p, out / p.name)
    assert len(list(out.iterdir())) == 20
    (out / "truncated.jpg").write_bytes((out / p.name).read_bytes()[:400])  # bad files: reported, run goes on
    (out / "empty.png").write_bytes(b"")
    return out


@pytest.fixture(scope="module")
def bundle(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "bundle"
    assert main(["export", "--model", str(trained_run / "model"), "--format", "bundle", "--out", str(out)]) == 0
    return out


def _rows(path: Path) -> dict[str, dict]:
    return {Path(r["image"]).name: r for r in map(json.loads, path.read_text().splitlines())}


def _expected(trained_run, images, capsys) -> dict[str, dict]:
    capsys.readouterr()
    assert main(["predict", "--model", str(trained_run / "model"), "--json", *map(str, sorted(images.iterdir()))]) == 0
    return {Path(r["image"]).name: r for r in map(json.loads, capsys.readouterr().out.splitlines())}


def _assert_same(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    assert sum("error" in e for e in expected.values()) == 2
    for name, e in expected.items():
        g = got[name]
        if "error" in e:
            assert g["error"] == e["error"] and name in g["message"], (g, e)
            continue
        diff = max(abs(g["probabilities"][c] - p) for c, p in e["probabilities"].items())
        assert diff < 1e-4, (name, diff)
        assert g["label"] == e["label"], name


def test_monai_bundle_cli_run_equals_medpipe_predict(trained_run, bundle, images, capsys):
    """The bundle's layout and metadata are what MONAI expects, and MONAI's own CLI runs it on a folder of
    20 images, writing one prediction per image equal to `medpipe predict` within 1e-4 (temperature applied);
    a truncated and an empty file get the same error codes as `medpipe predict` and stop nothing."""
    from medpipe.export import check_bundle_metadata

    for f in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "models/model.ts",
              "docs/README.md", "LICENSE"):
        assert (bundle / f).is_file(), f
    md = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert check_bundle_metadata(md) == [] and "optional_packages_version" not in md
    assert "medpipe-imaging" in md["required_packages_version"]
    card = (bundle / "docs" / "README.md").read_text()
    for heading in ("## What it is", "## Data", "## Metrics", "## Limits"):
        assert heading in card
    assert "95% CI" in card  # the package's metrics come with their intervals
    r = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                        "--dataset_dir", str(images)], cwd=bundle, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same(_rows(bundle / "eval" / "predictions.jsonl"), _expected(trained_run, images, capsys))


def test_config_workflow_api_runs_the_bundle(trained_run, bundle, images, tmp_path, capsys):
    """The Python API (what MONAI Label / Deploy-style hosts use): ConfigWorkflow as an inference workflow
    has every required property and gives the same predictions."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=str(bundle / "configs" / "inference.json"),
                        meta_file=str(bundle / "configs" / "metadata.json"), logging_file=False,
                        workflow_type="infer", bundle_root=str(bundle), dataset_dir=str(images),
                        output_dir=str(tmp_path / "out"))
    wf.initialize()
    assert not wf.check_properties()  # no required inference property is missing
    wf.run()
    wf.finalize()
    _assert_same(_rows(tmp_path / "out" / "predictions.jsonl"), _expected(trained_run, images, capsys))


NASTY = ["$__import__('pathlib').Path('PWNED').touch()", "@network_def", "%configs/metadata.json#version",
         "a::b", "x#y", "mel", "$@x"]


def test_class_names_never_become_config_code(tmp_path, monkeypatch):
    """Class names that ConfigParser would evaluate (`$`), resolve (`@`, `::`, `#`) or expand as macros (`%`,
    which reads files) are written as inert expressions that decode to exactly the same names."""
    from monai.bundle import ConfigParser

    from medpipe.export import _escape_tree, bundle_inference_config, bundle_metadata
    from medpipe.package import Calibration, PackageMeta, Provenance
    from medpipe.preprocess import PreprocessSpec

    monkeypatch.chdir(tmp_path)
    meta = PackageMeta(name="$derm", version="1", architecture="densenet121", classes=tuple(NASTY),
                       preprocessing=PreprocessSpec(image_size=32), calibration=Calibration(1.3),
                       provenance=Provenance("0" * 64))
    config = bundle_inference_config(meta)
    md = _escape_tree(bundle_metadata(meta))
    text = json.dumps(config) + json.dumps(md)
    assert "__import__('pathlib')" not in text and '"@network_def"' not in text and '"%configs' not in text
    parser = ConfigParser(config)
    parser.read_meta(md)
    parser.parse(reset=True)  # resolves macros and relative ids everywhere, as ConfigWorkflow.initialize does
    assert parser.get_parsed_content("class_names") == NASTY
    channel_def = parser.get_parsed_content("_meta_#network_data_format#outputs#pred#channel_def")
    assert list(channel_def.values()) == NASTY
    assert parser.get_parsed_content("_meta_#name") == "$derm"
    assert not (tmp_path / "PWNED").exists()
