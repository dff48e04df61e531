"""Small shared helpers: atomic writes, hashing, seeding, versions."""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from pathlib import Path

import numpy as np


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Temp file in the same folder, flush + fsync, ``os.replace`` (readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def versions() -> dict:
    import monai
    import torch

    import medpipe

    return {"medpipe": medpipe.__version__, "monai": monai.__version__, "torch": torch.__version__,
            "numpy": np.__version__}


def resolve_device(name: str):
    """``auto``: CUDA when available, else CPU; ``cuda`` without a device is a clear error."""
    import torch

    from medpipe.errors import MedpipeError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MedpipeError(f"--device {name} was asked for but no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise MedpipeError(f"unknown device {name!r}; use auto, cpu or cuda") from None
