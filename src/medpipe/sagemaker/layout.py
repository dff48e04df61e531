"""The deployable layout: what SageMaker's PyTorch inference container needs in ``/opt/ml/model``.

::

    weights.safetensors, model.json     the model package
    code/inference.py                   the toolkit's entry (re-exports medpipe.sagemaker.inference)
    code/requirements.txt               the one dependency list (never torch; see requirements.txt here)
    code/medpipe/                       medpipe's source, so the handlers import it without an index
    code/wheels/                        (offline form) every wheel the list needs; requirements.txt then
                                        installs with --no-index from it

A SageMaker training job writes this layout into ``SM_MODEL_DIR`` (SageMaker tars that folder into
the job's ``model.tar.gz``); ``medpipe package`` / ``medpipe export --format sagemaker`` write the
same files locally, as a folder or as ``model.tar.gz``.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import medpipe
from medpipe.infer.quantize import INT8_FILE, INT8_META
from medpipe.package import META, WEIGHTS, PackageError
from medpipe.utils import atomic_write_bytes

REQUIREMENTS = Path(__file__).with_name("requirements.txt")
ENTRY = b'"""SageMaker inference toolkit entry: the handlers live in medpipe.sagemaker.inference (code/medpipe)."""\n' \
        b"from medpipe.sagemaker.inference import model_fn, transform_fn  # noqa: F401\n"
SOURCE_SUFFIXES = (".py", ".html", ".js", ".css", ".typed", ".txt")


def requirements_text(offline: bool = False) -> str:
    text = REQUIREMENTS.read_text()
    if offline:
        text = ("# offline form: every wheel is in ./wheels (a network-isolated endpoint cannot download)\n"
                "--no-index\n--find-links ./wheels\n" + text)
    return text


def layout_files(pkg_dir: str | Path, wheels: str | Path | None = None) -> dict[str, Path | bytes]:
    """Relative path -> file or bytes, for every file of the deployable layout (sorted)."""

    pkg_dir = Path(pkg_dir)
    for name in (WEIGHTS, META):
        if not (pkg_dir / name).is_file():
            raise PackageError(f"{pkg_dir}: {name} is missing; not a medpipe model package")
    files: dict[str, Path | bytes] = {WEIGHTS: pkg_dir / WEIGHTS, META: pkg_dir / META,
                                      "code/inference.py": ENTRY,
                                      "code/requirements.txt": requirements_text(wheels is not None).encode()}

    for name in (INT8_FILE, INT8_META):  # the optional gated INT8 model (medpipe quantize); `auto` verifies it
        if (pkg_dir / name).is_file():
            files[name] = pkg_dir / name
    src_root = Path(medpipe.__file__).resolve().parent
    for f in sorted(src_root.rglob("*")):
        if f.is_file() and "__pycache__" not in f.parts and f.suffix in SOURCE_SUFFIXES:
            files[f"code/medpipe/{f.relative_to(src_root).as_posix()}"] = f
    if wheels is not None:
        for f in sorted(Path(wheels).glob("*.whl")):
            files[f"code/wheels/{f.name}"] = f
    return dict(sorted(files.items()))


def _bytes(v: Path | bytes) -> bytes:
    return v if isinstance(v, bytes) else v.read_bytes()


def write_layout(pkg_dir: str | Path, dest: str | Path | None = None, wheels: str | Path | None = None) -> Path:
    """Write the layout into ``dest`` (default: ``pkg_dir`` itself, as in SM_MODEL_DIR). Returns ``dest``."""
    pkg_dir = Path(pkg_dir)
    dest = Path(dest) if dest is not None else pkg_dir
    files = layout_files(pkg_dir, wheels)
    if (dest / "code").exists() and dest.resolve() == pkg_dir.resolve():
        shutil.rmtree(dest / "code")  # a stale code/ from an earlier medpipe would mix two versions
    for rel, v in files.items():
        target = dest / rel
        if isinstance(v, Path) and target.exists() and target.resolve() == v.resolve():
            continue
        atomic_write_bytes(target, _bytes(v))
    return dest


def build_tarball(pkg_dir: str | Path, dest: str | Path, wheels: str | Path | None = None) -> Path:
    """``model.tar.gz`` holding the layout at its top level (no folder prefix), reproducible byte for byte."""
    import gzip

    dest = Path(dest)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel, v in layout_files(pkg_dir, wheels).items():
            data = _bytes(v)
            info = tarfile.TarInfo(rel)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    atomic_write_bytes(dest, buf.getvalue())
    return dest


def package(pkg_dir: str | Path, out: str | Path, wheels: str | Path | None = None) -> Path:
    """``out`` ending in .tar.gz: the tarball; otherwise a folder with the layout."""
    out = Path(out)
    if out.name.endswith((".tar.gz", ".tgz")):
        return build_tarball(pkg_dir, out, wheels)
    return write_layout(pkg_dir, out, wheels)


def download_wheels(dest: str | Path, python_version: str = "3.11", platform: str = "manylinux2014_x86_64") -> Path:
    """Vendor the wheels of the dependency list (not torch nor what only torch needs: the container has
    them) for a network-isolated endpoint. Resolves with pip's report, then downloads each wheel."""
    import json
    import tempfile

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    target = ["--only-binary=:all:", "--python-version", python_version, "--platform", platform,
              "--implementation", "cp"]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(report), "--target", tmp + "/t", *target, "-r", str(REQUIREMENTS)],
                       check=True)
        items = json.loads(report.read_text())["install"]
    pins = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in not_torch_closure(items)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest), *target,
                    *pins], check=True)
    return dest


def not_torch_closure(items: list[dict]) -> list[dict]:
    """The resolved packages reachable from the requested ones without passing through torch."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    by_name = {canonicalize_name(i["metadata"]["name"]): i for i in items}
    todo = [canonicalize_name(n) for n, i in by_name.items() if i.get("requested")]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name == "torch" or name not in by_name:
            continue
        seen.add(name)
        for r in by_name[name]["metadata"].get("requires_dist", []):
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return [by_name[n] for n in sorted(seen)]
