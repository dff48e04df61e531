"""Shared helpers for benchmarks: the options several take, the package one measures, a reusable synthetic
dataset, timing, and result files."""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
# the shared HAM10000 dev images beside the checkout (a worktree one level deeper finds them too)
DEV_IMAGES = next((p / "shared" / "data" / "ham10000-dev" for p in (ROOT.parents[1], ROOT.parents[2])
                   if (p / "shared" / "data" / "ham10000-dev").is_dir()), ROOT.parents[1] / "shared" / "data" / "ham10000-dev")

# the options several benchmarks take: one spelling and one help text each (name -> type, help)
OPTIONS = {
    "size": (int, "image side in pixels (of the seeded model; a --run package keeps its own)"),
    "batch": (int, "images per batch"),
    "rounds": (int, "interleaved timing rounds"),
    "warmup": (int, "untimed rounds before them"),
    "threads": (int, "intra-op threads (0: ONNX Runtime's default)"),
    "images": (str, "a folder of real HAM10000 dev JPEGs"),
    "run": (str, "a trained run folder (its model/ package) instead of seeded random weights"),
    "count": (int, "synthetic images"),
    "seed": (int, "random seed"),
    "seeds": (int, "seeds to run, 0 to N-1"),
    "epochs": (int, "training epochs per run"),
}


def parser(doc: str | None, **defaults) -> argparse.ArgumentParser:
    """A benchmark's parser: its module docstring as the ``--help`` text and, for each keyword, the shared option
    of that name (:data:`OPTIONS`) with that default; the script adds its own options to it."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in defaults.items():
        kind, text = OPTIONS[name]
        ap.add_argument(f"--{name}", type=kind, default=default, help=text)
    return ap


def bench_package(run: str | None, size: int, prefix: str) -> Path:
    """The model package to measure: ``RUN/model``, else DenseNet121 with seeded random weights (weights do not
    change speed; serve_load.py's ``make_package``) at ``size`` in a new temporary folder."""
    if run:
        return Path(run) / "model"
    from serve_load import make_package

    return make_package(Path(tempfile.mkdtemp(prefix=prefix)) / "pkg", size)


def int8_package(size: int) -> Path:
    """The benchmarks' INT8 package at ``size`` px, one folder for all (.bench/int8_pkg{size}/pkg): serve_load.py's
    ``make_package`` (DenseNet121, seeded random weights) with the INT8 model of its ``add_int8_model`` (quantized
    with force=True on the validation split of a synthetic 200-image dataset). Built once and reused while its
    INT8 record verifies against its weights and, where OpenVINO is installed, holds an OpenVINO gate of this
    OpenVINO release line (the openvino backend refuses another); built in a sibling folder and moved into place,
    so an interrupted build is never taken for a finished one."""
    import shutil

    from serve_load import add_int8_model, make_package

    from medpipe.errors import MedpipeError
    from medpipe.infer import openvino_runtime as ovr
    from medpipe.infer.quantize import load_int8
    from medpipe.package import read_meta

    work = ROOT.parent / ".bench" / f"int8_pkg{size}"
    pkg = work / "pkg"
    try:
        _, info = load_int8(read_meta(pkg))
        ov = info.get("openvino") if isinstance(info.get("openvino"), dict) else {}
        if not ovr.available() or ovr.release(str(ov.get("version", ""))) == ovr.release(ovr.version()):
            return pkg
    except (MedpipeError, OSError):
        pass
    shutil.rmtree(work, ignore_errors=True)
    work.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f"int8_pkg{size}-", dir=work.parent))
    add_int8_model(make_package(build / "pkg", size), build)
    build.rename(work)
    return pkg


def synth_dataset(count: int, seed: int = 0, width: int = 600, height: int = 450) -> Path:
    """Synthesise (once) a HAM10000-layout dataset under .bench/ and return its folder."""
    from medpipe.data.synthetic import SynthSpec, write_synthetic

    folder = ROOT.parent / ".bench" / f"ham_{count}_{width}x{height}_s{seed}"
    if not (folder / "HAM10000_metadata.csv").is_file():
        write_synthetic(folder, SynthSpec(count=count, width=width, height=height, seed=seed), progress=True)
    return folder


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _tracked(path: Path) -> bool:
    import subprocess

    try:
        path = Path(path).resolve()  # git resolves a relative path against cwd, here the file's folder
        return subprocess.run(["git", "ls-files", "--error-unmatch", path.name], cwd=path.parent,
                              capture_output=True, check=False).returncode == 0
    except OSError:
        return True  # without git, assume the README cites it: never overwrite by accident


def write_result(name: str, payload: dict, load_before: tuple[float, ...] | None = None) -> Path:
    """benchmarks/results/NAME.json; a tracked result (one the README cites) is replaced only when
    MEDPIPE_BENCH_OVERWRITE=1, else the run goes to NAME.local.json (ignored by git). ``load_before``: the
    load average (``os.getloadavg()``) when the run began; ``loadavg`` then holds it and the one now."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    if load_before is not None:
        payload = {**payload, "loadavg": {"before": list(load_before), "after": list(os.getloadavg())}}
    payload = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), **payload}
    path = RESULTS / f"{name}.json"
    if path.exists() and _tracked(path) and os.environ.get("MEDPIPE_BENCH_OVERWRITE") != "1":
        print(f"{path.name} is a tracked result: writing {name}.local.json (MEDPIPE_BENCH_OVERWRITE=1 replaces it)")
        path = RESULTS / f"{name}.local.json"
    path.write_text(json.dumps(payload, indent=2))
    return path
