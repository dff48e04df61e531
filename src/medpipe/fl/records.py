"""The federated wire format: a state dict as one Flower ``ArrayRecord`` holding a safetensors blob,
and back. Nothing is pickled. Flower loads only when a record is built, so the coordinator's module
imports without it.
"""

from __future__ import annotations

import numpy as np

WIRE_KEY, WIRE_STYPE = "weights", "safetensors"


def arrays_to_record(arrays: dict):
    """The whole state dict as ONE Flower ``Array`` holding a safetensors blob (names, dtypes, shapes
    and data; no pickle). One object instead of one per tensor: Flower transfers every object of a
    message with its own requests, and a DenseNet's ~600 tensors made each message wave several
    times slower than the same bytes in one object (chunked by Flower at 5 MB)."""
    from flwr.app import Array, ArrayRecord  # Flower is installed where federated training runs only
    from safetensors.numpy import save

    blob = save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
    return ArrayRecord({WIRE_KEY: Array(dtype="uint8", shape=(len(blob),), stype=WIRE_STYPE, data=blob)})


def record_to_arrays(record) -> dict:
    """Inverse of :func:`arrays_to_record`; a record in any other form is a ValueError."""
    from safetensors.numpy import load

    arr = record.get(WIRE_KEY) if hasattr(record, "get") else None
    if arr is None or arr.stype != WIRE_STYPE or len(record) != 1:
        raise ValueError(f"expected one '{WIRE_KEY}' array of stype '{WIRE_STYPE}'")
    try:
        return load(arr.data)
    except Exception as exc:  # safetensors' own errors: the blob is not a valid safetensors file
        raise ValueError(f"the weights are not a valid safetensors blob ({exc.__class__.__name__})") from None
