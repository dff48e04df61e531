"""The distribution as a user gets it: the wheel and sdist that ``python -m build`` makes from a clean copy
of the checkout, installed into a fresh venv (pinned torch first) and run; and every install hint naming
the distribution by its own name (``medpipe`` on the package index is an unrelated project)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import medpipe

ROOT = Path(__file__).resolve().parent.parent
DIST = "medpipe-imaging"
TORCH = "torch==2.13.0"  # the pin of the Makefile; pip takes it from its find-links / cache, not a CUDA build
# An install hint or requirement naming the old distribution: `pip install medpipe`, `medpipe[serve]`, "medpipe>=1"
OLD_HINT = re.compile(r"pip3? install\s+(?:-[-\w]+\s+)*['\"]?medpipe(?![-\w.\[/])|(?<![-\w/.])medpipe\[[\w,\s-]*\]")


def _source_files() -> list[Path]:
    """The checkout's files as a clean clone would hold them (tracked, plus new files git does not ignore)."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the clean-copy build needs `git ls-files`")
    return [Path(p) for p in out.split("\0") if p and (ROOT / p).is_file()]


def test_no_install_hint_names_the_old_distribution():
    roots = [ROOT / "README.md", ROOT / "pyproject.toml", ROOT / "Makefile", ROOT / "src", ROOT / "docs"]
    files = [f for r in roots if r.exists() for f in ([r] if r.is_file() else r.rglob("*"))
             if f.is_file() and f.suffix in ("", ".md", ".py", ".toml", ".txt", ".html", ".yml", ".yaml", ".ipynb")]
    assert any(f.name == "cli.py" for f in files)  # the scan did reach the sources
    hits = [f"{f.relative_to(ROOT)}:{n}: {line.strip()[:120]}" for f in files
            for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1) if OLD_HINT.search(line)]
    assert not hits, f"install hints naming the unrelated `medpipe` distribution (use {DIST}):\n" + "\n".join(hits)


def test_old_hint_pattern():
    for bad in ("pip install 'medpipe[track]'", 'pip install "medpipe[bundle]"', "pip install medpipe pytorch-ignite",
                'pip install -U medpipe', '"medpipe[serve,onnx]"', "extra `medpipe[openvino]`"):
        assert OLD_HINT.search(bad), bad
    for good in (f"pip install '{DIST}[track]'", f'"{DIST}[serve,onnx]"', "pip install -e '.[serve]'",
                 "pip install medpipe-imaging", "python -m medpipe.cli", "pip install medpipe/dist/x.whl"):
        assert not OLD_HINT.search(good), good


def _build(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "checkout"
    for rel in _source_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    dist = tmp_path / "dist"
    # --no-isolation: the running venv's setuptools (>= 77, pyproject [build-system]) builds, nothing is fetched;
    # the default build makes the sdist and then the wheel from the sdist, so a file the sdist lacks fails here
    r = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wheels, sdists = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, os.listdir(dist)
    return wheels[0], sdists[0]


def _check_archives(wheel: Path, sdist: Path) -> None:
    version = medpipe.__version__
    assert wheel.name == f"medpipe_imaging-{version}-py3-none-any.whl"
    names = set(zipfile.ZipFile(wheel).namelist())
    package = ROOT / "src" / "medpipe"
    expected = {f"medpipe/{p.relative_to(package).as_posix()}" for p in package.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    assert expected - names == set(), "files of src/medpipe missing from the wheel (package-data?)"
    info = f"medpipe_imaging-{version}.dist-info"
    meta = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert f"Name: {DIST}\n" in meta and f"Version: {version}\n" in meta and "License-Expression: Apache-2.0" in meta
    assert f"{info}/licenses/LICENSE" in names
    entry = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    assert "medpipe = medpipe.cli:main" in entry
    with tarfile.open(sdist) as t:
        members = {m.split("/", 1)[1] for m in t.getnames() if "/" in m}
    assert {"LICENSE", "pyproject.toml", "README.md", "src/medpipe/serve/static/index.html"} <= members


@pytest.fixture
def venv_dir(tmp_path):
    """Where the throwaway venv goes: RAM (/dev/shm) when it has room, as writing and deleting its ~1.4 GB of
    torch on a busy disk takes minutes; else tmp_path. Removed afterwards either way."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 4 * 2**30:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="medpipe-wheel-venv-", dir=shm))
        yield folder / "venv"
        shutil.rmtree(folder, ignore_errors=True)
    else:
        yield tmp_path / "venv"


@pytest.mark.slow
def test_wheel_installs_into_a_clean_venv_and_runs_the_smoke_job(tmp_path, venv_dir):
    wheel, sdist = _build(tmp_path)
    _check_archives(wheel, sdist)

    venv = venv_dir
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    py, exe = str(venv / "bin" / "python"), str(venv / "bin" / "medpipe")

    def run(*cmd: str, timeout: float = 300) -> str:
        r = subprocess.run(list(cmd), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"{' '.join(cmd)} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r.stdout

    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile"]  # .pyc on import only
    run(*pip, TORCH)  # first, so that resolving the wheel's torch>= requirement keeps this one
    run(*pip, str(wheel))
    where = run(py, "-c", "import medpipe, torch; print(medpipe.__file__); print(torch.__version__)").split()
    assert where[0].startswith(str(venv)) and where[1].startswith("2.13.0"), where  # the installed copy, pinned torch

    assert "usage: medpipe" in run(exe, "--help")
    assert run(exe, "--version").strip() == f"medpipe {medpipe.__version__}"
    run(exe, "synth", "ham", "--count", "40", "--width", "64", "--height", "48", "--workers", "1")
    run(exe, "ingest", "ham", "--out", "data", "--workers", "1")
    run(exe, "train", "--data", "data", "--out", "run", "--model", "densenet-test", "--image-size", "32",
        "--epochs", "1", "--batch-size", "8", "--bootstrap", "0", "--threads", "1", "--workers", "0")
    images = sorted((tmp_path / "ham").rglob("*.jpg"))[:2]
    out = run(exe, "predict", "--model", "run/model", "--json", *map(str, images))
    import json

    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == 2 and all({"label", "most_likely", "probabilities"} <= set(r) for r in rows), out
    # the web page is served from the installed package data
    page = run(py, "-c", "from importlib import resources; "
                         "print(len(resources.files('medpipe.serve').joinpath('static/index.html').read_text()))")
    assert int(page) > 1000
