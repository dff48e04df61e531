"""The container dependency list never installs or upgrades torch, for each supported container torch.

For each version a fresh environment holds a torch distribution of that version (metadata only: the
dry run never imports it, and downloading four CUDA builds of torch is not an option here), and
``pip install --dry-run --report`` over ``src/medpipe/sagemaker/requirements.txt`` (what the training
toolkit and, as ``code/requirements.txt``, the inference toolkit install) must not list torch. The
control case shows the check bites: the old ``monai>=1.5.2`` line would replace torch 2.5.1.
Needs PyPI (metadata of the listed packages); skips with the reason when it cannot be reached.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "src" / "medpipe" / "sagemaker" / "requirements.txt"
# Newest two SageMaker PyTorch framework versions SDK 2.x offers for training (2.7.1, 2.8.0) and for
# hosting (2.5.1, 2.6.0); the README's examples use 2.8.0 (training) and 2.6.0 (hosting).
SUPPORTED_TORCH = ("2.5.1", "2.6.0", "2.7.1", "2.8.0")


def _container(tmp_path: Path, torch_version: str) -> Path:
    venv = tmp_path / f"torch-{torch_version}"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next(venv.glob("lib/python*/site-packages"))
    dist = site / f"torch-{torch_version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {torch_version}\n")
    (dist / "INSTALLER").write_text("pip\n")
    (dist / "RECORD").write_text("")
    return venv / "bin" / "python"


def _dry_run(python: Path, requirements: Path, report: Path) -> dict[str, str]:
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--quiet",
                        "--report", str(report), "-r", str(requirements)], capture_output=True, text=True,
                       timeout=900)
    if r.returncode != 0:
        if any(s in r.stderr for s in ("Could not find a version", "NewConnectionError", "Max retries",
                                        "Temporary failure in name resolution")):
            pytest.skip(f"PyPI could not be reached for the dry run: {r.stderr.strip()[-200:]}")
        raise AssertionError(r.stderr[-3000:])
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}


@pytest.mark.slow
@pytest.mark.parametrize("torch_version", SUPPORTED_TORCH)
def test_container_requirements_keep_the_container_torch(torch_version, tmp_path):
    lines = [ln.split("#")[0].strip().lower() for ln in REQUIREMENTS.read_text().splitlines()]
    assert not [ln for ln in lines if ln.startswith("torch")]
    plan = _dry_run(_container(tmp_path, torch_version), REQUIREMENTS, tmp_path / "report.json")
    assert "torch" not in plan, f"pip would install torch {plan.get('torch')} over {torch_version}"
    assert "monai" in plan and tuple(int(x) for x in plan["monai"].split(".")[:2]) < (1, 6)
    assert "onnxruntime" in plan  # CPU endpoints serve through ONNX Runtime


@pytest.mark.slow
def test_control_unpinned_monai_would_replace_torch(tmp_path):
    control = tmp_path / "requirements.txt"
    control.write_text("monai>=1.5.2\n")
    plan = _dry_run(_container(tmp_path, "2.5.1"), control, tmp_path / "report.json")
    assert "torch" in plan and plan["torch"] != "2.5.1"
