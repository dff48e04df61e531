"""Training checkpoints: full state, atomic writes, ``weights_only=True`` loads, compatibility checks.

A checkpoint is written to a temp file in the same folder, flushed, fsynced and ``os.replace``d
over the old one, so a crash mid-write leaves the previous checkpoint loadable; loaders ignore the
temp files. Contents are tensors and plain Python values only (RNG states converted to tensors), so
``torch.load(..., weights_only=True)`` reads them without unpickling any object.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch

from medpipe.config import resume_differences
from medpipe.errors import CheckpointError
from medpipe.utils import atomic_write_bytes

FORMAT = "medpipe-checkpoint-1"
# What must match for a resume to make sense (config key -> human name).
COMPATIBLE_KEYS = {"model": "model", "image_size": "image size", "interpolation": "interpolation"}


def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path.name} cannot be loaded safely ({exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0][:160]}); it is truncated, corrupt, or holds pickled "
                              "objects, which medpipe refuses") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path.name} is not a medpipe checkpoint")
    return state


def check_compatible(state: dict, config: dict, classes: list[str]) -> None:
    """Refuse to resume when classes, model or preprocessing differ; name every difference."""
    diffs = []
    if list(state.get("classes", [])) != list(classes):
        diffs.append(f"classes: checkpoint {state.get('classes')} vs data {classes}")
    old = state.get("config", {})
    for key, human in COMPATIBLE_KEYS.items():
        if old.get(key) != config.get(key):
            diffs.append(f"{human} ('{key}'): checkpoint {old.get(key)!r} vs now {config.get(key)!r}")
    if diffs:
        raise CheckpointError("cannot resume from this checkpoint; it differs in " + "; ".join(diffs))

    # the rest of what is trained: a resume continues the run's own recipe (`medpipe train --resume` takes it from
    # the checkpoint; a caller that builds its config anew, e.g. from today's defaults, is refused, not mixed)
    trained = resume_differences(old, config)
    if trained:
        raise CheckpointError("cannot resume from this checkpoint with another training config; it differs in "
                              + "; ".join(trained) + " (resume with the run's own config, or start a new run)")
