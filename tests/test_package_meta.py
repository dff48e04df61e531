"""The package format as a type: PackageMeta read from a committed package of the previous format
(migrated), one writer that validates every write, every writer of a package (train, FL, quantize,
export) giving a package that validates, and no module but package.py indexing model.json."""

import dataclasses
import json
import re
import shutil
import sys
import tarfile
import types
from pathlib import Path

import pytest

from medpipe.errors import PackageError
from medpipe.package import (META, PACKAGE_FORMAT, WEIGHTS, Calibration, IntendedUse, PackageMeta, load_package,
                             read_meta, write_meta)

ROOT = Path(__file__).resolve().parents[1]
OLD = ROOT / "tests" / "data" / "densenet-test"  # written by medpipe's format 1 (before intended_use), committed


@pytest.fixture()
def old_copy(tmp_path) -> Path:
    dst = tmp_path / "run" / "model"
    shutil.copytree(OLD, dst)
    return dst


def test_committed_format_1_package_loads_through_the_migration(old_copy):
    raw = json.loads((OLD / META).read_text())
    assert raw["format"] == "medpipe-package-1" and "intended_use" not in raw
    model, meta = load_package(old_copy)  # the weights hash and the tensors check out
    assert meta.format == PACKAGE_FORMAT and meta.directory == old_copy
    assert meta.classes == tuple(raw["classes"]) and meta.temperature == raw["calibration"]["temperature"] == 1.25
    assert meta.calibration.tta.temperature == 1.5 and meta.decision == raw["decision"]
    assert meta.preprocessing.image_size == 32 and meta.weights_sha256 == raw["weights_sha256"]
    assert "not a medical device" in meta.intended_use.purpose
    figures_from = meta.intended_use.figures_from
    assert raw["records_sha256"] in figures_from and "data/synthetic" in figures_from
    assert (old_copy / META).read_text() == (OLD / META).read_text()  # reading never rewrites the file
    # the typed form writes back everything format 1 held, plus intended_use, as format 2
    back = meta.to_dict()
    assert {k: v for k, v in back.items() if k not in ("format", "intended_use")} == \
        {k: v for k, v in json.loads(json.dumps(raw)).items() if k != "format"}
    assert write_meta(old_copy, meta) == meta and read_meta(old_copy) == meta
    assert json.loads((old_copy / META).read_text())["format"] == PACKAGE_FORMAT


def test_predictor_runs_the_committed_old_package(old_copy):
    import numpy as np

    from medpipe.infer.predictor import Predictor

    p = Predictor(old_copy)
    pred = p.predict_bytes([_png(np.full((40, 30, 3), 90, np.uint8))])[0]
    assert pred.label in p.classes and abs(sum(pred.probabilities.values()) - 1) < 1e-5
    assert p.temperature == 1.25 and p.temperature_for(True) == 1.5 and p.name == "densenet-test-ham"


def test_unknown_format_and_bad_writes_are_refused(old_copy):
    raw = json.loads((old_copy / META).read_text())
    (old_copy / META).write_text(json.dumps({**raw, "format": "medpipe-package-9"}))
    with pytest.raises(PackageError, match="unsupported package format 'medpipe-package-9'"):
        read_meta(old_copy)
    (old_copy / META).write_text(json.dumps(raw))
    meta = read_meta(old_copy)
    before = (old_copy / META).read_text()
    for bad, says in [(dataclasses.replace(meta, calibration=Calibration(0.0)), "'calibration.temperature' must be"),
                      (dataclasses.replace(meta, classes=("a", "a")), "'classes' must be a list of at least 2"),
                      (dataclasses.replace(meta, architecture="alexnet"), "'architecture' must be one of"),
                      (dataclasses.replace(meta, intended_use=IntendedUse(purpose=" ")), "'intended_use.purpose'")]:
        with pytest.raises(PackageError, match=re.escape(says)):
            write_meta(old_copy, bad)
    assert (old_copy / META).read_text() == before  # nothing written


def test_describe_gives_every_key_a_type_and_a_meaning(old_copy):
    rows = PackageMeta.describe()
    assert all(r["type"] and len(r["meaning"]) > 10 for r in rows), rows
    described = {r["field"] for r in rows}

    def keys(d, prefix=""):
        for k, v in d.items():
            yield prefix + k
            if isinstance(v, dict) and k in ("preprocessing", "calibration", "intended_use", "tta"):
                yield from keys(v, f"{prefix}{k}.")

    written = set(keys(read_meta(old_copy).to_dict())) - {"preprocessing.input"}  # input: a fixed explanation
    assert written <= described, written - described


def _png(arr) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# -- every writer gives a package that validates ---------------------------------------------------------

def test_train_writes_a_valid_package(trained_run):
    meta = read_meta(trained_run / "model")  # written by the pipeline: package, then the test metrics added
    assert meta.format == PACKAGE_FORMAT and "test" in meta.metrics and "val" in meta.metrics
    assert json.loads((trained_run / "model" / META).read_text())["intended_use"]["purpose"]


def test_fl_aggregation_writes_a_valid_package(tmp_path, monkeypatch):
    """The federated server's package write (Coordinator._package) on a real best-round checkpoint; Flower
    itself is only asked for its version there, so a stand-in module serves where it is not installed."""
    import torch

    from medpipe.config import make_config
    from medpipe.fl.server import Coordinator, save_arrays
    from medpipe.fl.site import to_numpy
    from medpipe.models import create_model

    if "flwr" not in sys.modules:
        try:
            import flwr  # noqa: F401
        except ImportError:
            monkeypatch.setitem(sys.modules, "flwr", types.SimpleNamespace(__version__="stand-in"))
    classes = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    tc = make_config({"model": "densenet-test", "image_size": 32}).validate()
    (tmp_path / "checkpoints").mkdir()
    sha = save_arrays(tmp_path / "checkpoints" / "best.safetensors",
                      to_numpy(create_model("densenet-test", len(classes)).state_dict()), {"round": 1})
    coord = Coordinator.__new__(Coordinator)  # only the package write: no Flower grid, the attributes it reads
    coord.run_dir = tmp_path
    coord.cfg = {"strategy": "fedavg", "mu": 0.0, "rounds": 1, "local_epochs": 1, "min_sites": 2, "fraction": 1.0,
                 "aggregation": "mean"}
    coord.method = coord.cfg["aggregation"]
    state = {"best_sha256": sha, "best_round": 1, "sites": {"a": {"rounds": 1}, "b": {"rounds": 1}},
             "history": [{"round": 1, "val_pooled": {"macro_auc": 0.5, "support": [3, 1, 2, 1, 1, 9, 1]},
                          "val_sites": {}}]}
    coord._package(state, classes, tc)
    meta = read_meta(tmp_path / "model")
    assert meta.federated["strategy"] == "fedavg" and meta.federated["aggregation"] == "mean"
    assert meta.decision["default"] in ("prior", "argmax")
    assert "2 federated sites" in meta.intended_use.figures_from and meta.temperature == 1.0


def test_quantize_and_export_write_valid_results(old_copy, data_dir, trained_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from medpipe.export import export_model, sidecar_path
    from medpipe.infer.quantize import install_int8, load_int8, quantize_package

    shutil.copy(trained_run / "splits.csv", old_copy.parent / "splits.csv")
    int8, info = quantize_package(old_copy, data_dir, force=True)  # an untrained model may fail the gate
    install_int8(old_copy, int8, info)
    meta = read_meta(old_copy)
    assert load_int8(meta)[1]["weights_sha256"] == meta.weights_sha256  # the INT8 record verifies against it
    out = tmp_path / "m.onnx"
    export_model(str(old_copy), "onnx", str(out))
    side = json.loads(sidecar_path(out).read_text())
    assert side["classes"] == list(meta.classes) and side["calibration"] == meta.calibration.to_dict()
    assert side["weights_sha256"] == meta.weights_sha256
    tarball = tmp_path / "model.tar.gz"
    export_model(str(old_copy), "sagemaker", str(tarball))
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp_path / "sm", filter="data")
    assert read_meta(tmp_path / "sm") == dataclasses.replace(meta, directory=tmp_path / "sm")
    assert (tmp_path / "sm" / WEIGHTS).is_file()


# -- nobody else reads the raw model.json ----------------------------------------------------------------

# meta[...] / meta.get(...) that are not model.json, each with what it is
NOT_MODEL_JSON = {
    "data/dicom.py": "the DICOM file meta",
    "data/sources.py": "a SageMaker Ground Truth manifest line",
    "batch.py": "the batch job's own state (model name, version, tta)",
}


def test_no_module_but_package_indexes_model_json():
    src = ROOT / "src" / "medpipe"
    # meta[...] / meta.get(...), or reading one of model.json's own keys off any dict (writing a sidecar's is fine)
    pattern = re.compile(r"""\bmeta(\[|\.get\()|\[["'](calibration|_dir|preprocessing)["']\](?!\s*=)""")
    found = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src).as_posix()
        if rel == "package.py" or rel in NOT_MODEL_JSON:
            continue
        found += [f"{rel}:{i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1)
                  if pattern.search(line)]
    assert not found, "model.json read outside package.py:\n" + "\n".join(found)
    for rel in NOT_MODEL_JSON:
        assert (src / rel).is_file(), rel  # the exemption list names files that exist
