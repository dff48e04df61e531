"""DICOM input (``application/dicom``), with the optional ``dicom`` extra (pydicom >= 3.0.2).

Rules: never ``force=True``; read and check the header (size, samples, bits, photometric
interpretation, transfer syntax) before any pixel is decoded, against the same pixel cap as other
images; never put a patient tag in an error or a log line. The first frame of a multi-frame object
is used; monochrome images are min-max scaled to 8 bits (MONOCHROME1 inverted) and replicated to RGB.
"""

from __future__ import annotations

import io

import numpy as np

from medpipe.data.imageio import (
    DEFAULT_MAX_PIXELS,
    CorruptImageError,
    DegenerateImageError,
    ImageTooLargeError,
    UnsupportedFormatError,
)

_PHOTOMETRIC = {"MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR"}


def available() -> bool:
    try:
        import pydicom  # noqa: F401
    except ImportError:
        return False
    return True


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    f = a.astype(np.float64)
    if not np.isfinite(f).all():
        raise CorruptImageError("DICOM pixels hold NaN or Inf")
    lo, hi = float(f.min()), float(f.max())
    f = (f - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(f)
    return np.clip(f + 0.5, 0, 255).astype(np.uint8)


def decode_dicom(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """DICOM bytes -> RGB uint8 (H, W, 3), full resolution (resizing is the caller's)."""
    if not available():
        raise UnsupportedFormatError("application/dicom needs the dicom extra: pip install 'medpipe[dicom]'")
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not data:
        raise CorruptImageError("empty DICOM body")
    try:
        hdr = pydicom.dcmread(io.BytesIO(data), force=False, stop_before_pixels=True)
    except InvalidDicomError:
        raise CorruptImageError("not a DICOM Part 10 file (no DICM preamble)") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on malformed headers
        raise CorruptImageError(f"cannot parse DICOM header ({exc.__class__.__name__})") from None
    try:
        rows, cols = int(hdr.get("Rows", 0) or 0), int(hdr.get("Columns", 0) or 0)
        frames = int(hdr.get("NumberOfFrames", 1) or 1)
        spp = int(hdr.get("SamplesPerPixel", 1) or 1)
        bits = int(hdr.get("BitsAllocated", 0) or 0)
        pi = str(hdr.get("PhotometricInterpretation", "")).strip().upper()
    except (TypeError, ValueError):
        raise CorruptImageError("DICOM image attributes are not numbers") from None
    if rows < 1 or cols < 1:
        raise DegenerateImageError(f"DICOM declares {cols}x{rows} pixels")
    if rows * cols * max(frames, 1) > max_pixels:
        raise ImageTooLargeError(f"DICOM declares {cols}x{rows}x{frames} pixels, over the cap of {max_pixels}")
    if spp not in (1, 3) or bits not in (1, 8, 16, 32) or pi not in _PHOTOMETRIC:
        raise UnsupportedFormatError(f"unsupported DICOM pixel format (samples {spp}, bits {bits}, {pi or 'no'} "
                                     "photometric interpretation)")
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
        if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise CorruptImageError("DICOM object has no pixel data")
        arr = ds.pixel_array
    except CorruptImageError:
        raise
    except (NotImplementedError, RuntimeError) as exc:
        raise UnsupportedFormatError(f"DICOM transfer syntax cannot be decoded here ({exc.__class__.__name__})") from None
    except Exception as exc:  # noqa: BLE001
        raise CorruptImageError(f"cannot decode DICOM pixels ({exc.__class__.__name__})") from None
    if frames > 1:
        arr = arr[0]
    if spp == 3 and pi.startswith("YBR"):
        from pydicom.pixels import convert_color_space

        arr = convert_color_space(arr, pi, "RGB")
    if pi == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
    arr = _to_uint8(np.asarray(arr))
    if arr.ndim == 2:
        if pi == "MONOCHROME1":
            arr = 255 - arr
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise CorruptImageError(f"unexpected DICOM pixel shape {arr.shape}")
    return np.ascontiguousarray(arr)
