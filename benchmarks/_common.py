"""Shared helpers for benchmarks: a reusable synthetic dataset, timing, and result files."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


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


def write_result(name: str, payload: dict) -> Path:
    """benchmarks/results/NAME.json; a tracked result (one the README cites) is replaced only when
    MEDPIPE_BENCH_OVERWRITE=1, else the run goes to NAME.local.json (ignored by git)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), **payload}
    path = RESULTS / f"{name}.json"
    if path.exists() and _tracked(path) and os.environ.get("MEDPIPE_BENCH_OVERWRITE") != "1":
        print(f"{path.name} is a tracked result: writing {name}.local.json (MEDPIPE_BENCH_OVERWRITE=1 replaces it)")
        path = RESULTS / f"{name}.local.json"
    path.write_text(json.dumps(payload, indent=2))
    return path
