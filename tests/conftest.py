import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("PYTHONFAULTHANDLER", "1")  # a Python child a test starts prints its traceback if it crashes

pytest_plugins = ["tests.crashlog"]  # faulthandler stays armed in this process even after a library resets it


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic HAM10000-layout dataset (shared, read-only: copy before changing)."""
    from medpipe.data.synthetic import SynthSpec, write_synthetic

    out = tmp_path_factory.mktemp("synth") / "ham"
    write_synthetic(out, SynthSpec(count=70, width=96, height=72, seed=3), fmt="dataverse", workers=2)
    return out


@pytest.fixture()
def synth_copy(synth_dir, tmp_path) -> Path:
    dst = tmp_path / "ham"
    shutil.copytree(synth_dir, dst, ignore=shutil.ignore_patterns("*.zip"))
    return dst


@pytest.fixture(scope="session")
def data_dir(synth_dir, tmp_path_factory) -> Path:
    from medpipe.data.sources import ingest

    out = tmp_path_factory.mktemp("data")
    ingest(synth_dir, out, workers=1)
    return out

# densenet-test (0.03M parameters) keeps each run folder near 1 MB; the shared trained_run is the real DenseNet121
TINY = ["--model", "densenet-test", "--image-size", "32", "--batch-size", "8", "--epochs", "2", "--bootstrap", "50", "--threads", "1",
        "--deterministic", "--lr", "0.002", "--warmup-epochs", "0.5"]


@pytest.fixture(scope="session")
def trained_run(data_dir, tmp_path_factory) -> Path:
    """One tiny real training run shared by package/predict/handler tests."""
    from medpipe.cli import main

    run = tmp_path_factory.mktemp("run")
    assert main(["train", "--data", str(data_dir), "--out", str(run), *TINY, "--model", "densenet121"]) == 0
    return run


def untrained_package(out: Path, *, name: str, image_size: int = 32, classes=("a", "b", "c"), seed: int = 0) -> Path:
    """A package of densenet-test (the suite's tiny DenseNet) with seeded random weights: for tests of the
    serving and packaging paths, where what the model predicts does not matter, only that it is the same."""
    import torch

    from medpipe.models import create_model
    from medpipe.package import save_package
    from medpipe.preprocess import PreprocessSpec

    torch.manual_seed(seed)
    save_package(out, create_model("densenet-test", len(classes)), name=name, arch="densenet-test",
                 classes=list(classes), spec=PreprocessSpec(image_size=image_size))
    return out
