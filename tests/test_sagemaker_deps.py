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


def _dry_runs(cases: dict[str, tuple[Path, Path]], tmp_path: Path) -> dict[str, dict[str, str]]:
    """name -> (python, requirements): the pip dry runs run side by side (they wait on the index, not the CPU)."""
    procs = {}
    for name, (python, requirements) in cases.items():
        cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--quiet",
               "--report", str(tmp_path / f"{name}.json"), "-r", str(requirements)]
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    plans = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=900)
        if proc.returncode != 0:
            if any(s in err for s in ("Could not find a version", "NewConnectionError", "Max retries",
                                      "Temporary failure in name resolution")):
                pytest.skip(f"PyPI could not be reached for the dry run: {err.strip()[-200:]}")
            raise AssertionError(f"{name}: {err[-3000:]}")
        report = json.loads((tmp_path / f"{name}.json").read_text())
        plans[name] = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in report["install"]}
    return plans


@pytest.mark.slow
def test_container_requirements_keep_the_container_torch(tmp_path):
    lines = [ln.split("#")[0].strip().lower() for ln in REQUIREMENTS.read_text().splitlines()]
    assert not [ln for ln in lines if ln.startswith("torch")]
    control = tmp_path / "control.txt"
    control.write_text("monai>=1.5.2\n")  # the old line
    cases = {v: (_container(tmp_path, v), REQUIREMENTS) for v in SUPPORTED_TORCH}
    cases["control"] = (_container(tmp_path / "c", "2.5.1"), control)
    plans = _dry_runs(cases, tmp_path)
    for v in SUPPORTED_TORCH:
        plan = plans[v]
        assert "torch" not in plan, f"pip would install torch {plan.get('torch')} over {v}"
        assert "monai" in plan and tuple(int(x) for x in plan["monai"].split(".")[:2]) < (1, 6), (v, plan["monai"])
        assert "onnxruntime" in plan, v  # CPU endpoints serve through ONNX Runtime
    # the check bites: the old unpinned monai line replaces the container's torch 2.5.1
    assert "torch" in plans["control"] and plans["control"]["torch"] != "2.5.1"
