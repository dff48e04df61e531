"""Small shared helpers: atomic writes (with the umask's permissions), strict JSON, hashing, seeding, versions,
the device name, and the end of a command-line process."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import medpipe
from medpipe.errors import MedpipeError


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only be read by setting it, which
    would briefly change the permissions of files other threads create)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Temp file in the same folder, flush + fsync, ``os.replace`` (readers never see half a file).

    The file gets the permissions an ordinary ``open(path, "w")`` would give (0666 minus the umask):
    ``mkstemp`` alone makes every file 0600, unreadable to a serving user other than the writer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
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


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# Cells holding any of these are quoted: C0 and C1 controls (CR, LF, NUL, ESC, ...), DEL, and the Unicode line
# and paragraph separators (str.splitlines and some editors break lines there).
_NEEDS_QUOTES = re.compile(r'[",\x00-\x1f\x7f-\x9f\u2028\u2029]')


def csv_cell(value, neutralise: bool = True) -> str:
    """One cell as CSV text (RFC 4180 quoting). ``neutralise``: a text cell a spreadsheet would run as a
    formula (starting with = + - @ tab or CR) gets a leading apostrophe (OWASP's CSV-injection rule), and
    so does one that starts with an apostrophe, so :func:`read_csv_table` can take exactly one off again."""
    if value is None:
        return ""
    if isinstance(value, str):
        if neutralise and value.startswith((*FORMULA_START, "'")):
            value = "'" + value
    else:
        value = str(value)  # numbers as Python writes them; never neutralised (-1 is not a formula)
    if _NEEDS_QUOTES.search(value):
        return '"' + value.replace('"', '""') + '"'
    return value


def shown_name(name: str) -> str:
    """A file name as text every writer can store: ``name`` itself, or, when the file system gave bytes
    that are not UTF-8 (Python's surrogate escapes), those bytes as ``\\xNN``. A name that changes here
    cannot be written to a CSV or JSON and read back as the same path."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def csv_text(header: list, rows, *, neutralise: bool = True) -> str:
    """The one CSV writer: every CSV medpipe writes goes through here. A cell holding a comma, a quote or
    any control character (CR, LF, NUL, ESC ... DEL, C1) is quoted, so no value can end or split a row
    and a reader gets it back exactly; ``neutralise`` (files people open: predictions, trials) adds the
    formula guard of :func:`csv_cell`. Machine tables medpipe reads back (records.csv, splits.csv) are
    written with ``neutralise=False``: lossless for any CSV reader. Rows end with ``\n``."""
    lines = [",".join(csv_cell(v, neutralise) for v in header)]
    lines.extend(",".join(csv_cell(v, neutralise) for v in r) for r in rows)
    return "\n".join(lines) + "\n"


def frame_csv(frame, *, neutralise: bool = False) -> str:
    """A pandas DataFrame through :func:`csv_text` (missing values as empty cells, as pandas writes them)."""
    import pandas as pd

    rows = ([None if not isinstance(v, str) and pd.api.types.is_scalar(v) and pd.isna(v) else v for v in r]
            for r in frame.itertuples(index=False, name=None))
    return csv_text(list(frame.columns), rows, neutralise=neutralise)


def read_csv_table(source, *, guarded: bool = False, dtype=str, **kwargs):
    """The matching reader: a CSV written by :func:`csv_text` -> DataFrame with every cell exactly as written
    (text by default; no "NA"/"null" turned into NaN; quoted CR, LF and NUL kept). ``guarded``: the file was
    written with the formula guard, whose leading apostrophe is taken off again."""
    import pandas as pd

    table = pd.read_csv(source, dtype=dtype, keep_default_na=False, na_filter=False, encoding="utf-8", **kwargs)
    if guarded:
        def unguard(v):
            return v[1:] if isinstance(v, str) and v.startswith("'") else v

        table = table.rename(columns=unguard)
        table = table.apply(lambda col: col.map(unguard)) if len(table) else table
    return table


def json_safe(obj):
    """``obj`` with every NaN/Infinity float replaced by None (JSON has no such numbers: strict parsers,
    JavaScript's among them, refuse the ``NaN`` Python would write); numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) or (hasattr(obj, "dtype") and getattr(obj, "shape", None) == ()):
        value = obj.item() if hasattr(obj, "item") else obj
        return value if not isinstance(value, float) or math.isfinite(value) else None
    return obj


def to_json(obj, **kwargs) -> str:
    """Strict JSON: non-finite numbers written as null (``allow_nan=False`` guards the rule)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    atomic_write_text(path, to_json(obj, indent=indent))


def sha256_file(path: str | os.PathLike, max_bytes: int | None = None) -> str:
    """Streamed sha256 (1 MiB at a time: memory does not grow with the file). With ``max_bytes``, a
    file longer than that raises ValueError as soon as the cap is passed (a sparse 3 GB file is not read)."""
    h = hashlib.sha256()
    seen = 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            seen += len(chunk)
            if max_bytes is not None and seen > max_bytes:
                raise ValueError(f"file is over the {max_bytes}-byte limit")
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

    return {"medpipe": medpipe.__version__, "monai": monai.__version__, "torch": torch.__version__,
            "numpy": np.__version__}


def resolve_device(name: str):
    """``auto``: CUDA when available, else CPU; ``cuda`` without a device is a clear error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MedpipeError(f"--device {name} was asked for but no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise MedpipeError(f"unknown device {name!r}; use auto, cpu or cuda") from None


def exit_process(rc: int):
    """End a command-line process with ``rc``. Inside a multi-process launch (WORLD_SIZE > 1) every
    output is written (atomically, fsynced) by now, so the interpreter's teardown is skipped: a
    communication library's destructor that blocks on a peer which has already exited must not turn
    a finished job into a hung one (seen once: rank 0 of a gloo job stuck at exit after writing
    everything)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The bf16 matrix instructions this CPU reports (oneDNN uses them under autocast); empty where unknown.

    Args:
        cpuinfo: the file to read (Linux's ``/proc/cpuinfo``).

    Returns:
        The subset of ``avx512_bf16``, ``amx_bf16`` in the first ``flags`` line; ``[]`` if unreadable."""
    try:
        with open(cpuinfo, errors="replace") as fh:
            flags = set(next((ln for ln in fh if ln.startswith("flags")), ":").split(":", 1)[1].split())
    except OSError:
        return []
    return [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
