"""DICOM input (``application/dicom``), with the optional ``dicom`` extra (pydicom >= 3.0.2).

Rules: never ``force=True``; the bytes are parsed once; the header (size, frames, samples, bits,
photometric interpretation, transfer syntax) is checked against the pixel cap before any pixel is
decoded; never put a patient tag in an error or a log line.

Bombs: a *deflated* transfer syntax is inflated by medpipe, not by pydicom (which inflates without
limit): the header is inflated first (at most :data:`HEADER_BUDGET` bytes), and the rest only up to
the pixel bytes the header declares (rows x columns x frames x samples x bytes) plus
:data:`HEADER_BUDGET`; more is refused (413) before it is inflated. Native pixel data longer than
declared is refused too, and only the first frame is ever decoded (``index=0``), whatever number
of frames the data holds. Monochrome images are min-max scaled to 8 bits (MONOCHROME1 inverted)
and replicated to RGB; palette colour needs its lookup table (else 400).
"""

from __future__ import annotations

import io
import zlib

import numpy as np

from medpipe.data.imageio import (
    DEFAULT_MAX_PIXELS,
    CorruptImageError,
    DegenerateImageError,
    ImageTooLargeError,
    UnsupportedFormatError,
)

_PHOTOMETRIC = {"MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR"}
HEADER_BUDGET = 1 << 20  # inflated bytes allowed for everything that is not pixel data
_PALETTE_TAGS = ("RedPaletteColorLookupTableDescriptor", "GreenPaletteColorLookupTableDescriptor",
                 "BluePaletteColorLookupTableDescriptor")
_PALETTE_DATA = (("RedPaletteColorLookupTableData", "SegmentedRedPaletteColorLookupTableData"),
                 ("GreenPaletteColorLookupTableData", "SegmentedGreenPaletteColorLookupTableData"),
                 ("BluePaletteColorLookupTableData", "SegmentedBluePaletteColorLookupTableData"))


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


def _header_values(ds) -> tuple[int, int, int, int, int, str]:
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 0) or 0)
        pi = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    except (TypeError, ValueError):
        raise CorruptImageError("DICOM image attributes are not numbers") from None
    return rows, cols, frames, spp, bits, pi


def _check_header(ds, max_pixels: int) -> tuple[int, int, int, int, int, str]:
    rows, cols, frames, spp, bits, pi = _header_values(ds)
    if rows < 1 or cols < 1:
        raise DegenerateImageError(f"DICOM declares {cols}x{rows} pixels")
    if frames < 1:
        raise DegenerateImageError(f"DICOM declares {frames} frames")
    if rows * cols * frames > max_pixels:
        raise ImageTooLargeError(f"DICOM declares {cols}x{rows}x{frames} pixels, over the cap of {max_pixels}")
    if spp not in (1, 3) or bits not in (1, 8, 16, 32) or pi not in _PHOTOMETRIC:
        raise UnsupportedFormatError(f"unsupported DICOM pixel format (samples {spp}, bits {bits}, {pi or 'no'} "
                                     "photometric interpretation)")
    return rows, cols, frames, spp, bits, pi


def _declared_bytes(rows: int, cols: int, frames: int, spp: int, bits: int) -> int:
    return (rows * cols * frames * spp * bits + 7) // 8


def _inflate_deflated(fp: io.BytesIO, max_pixels: int):
    """Deflated Explicit VR Little Endian: inflate within the declared budget, parse once."""
    from pydicom.filereader import read_dataset

    d = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        head = d.decompress(fp.read(), HEADER_BUDGET)
    except zlib.error:
        raise CorruptImageError("deflated DICOM data set does not inflate") from None
    try:
        hdr = read_dataset(io.BytesIO(head), False, True, stop_when=lambda tag, vr, length: tag >= 0x7FE00000)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on malformed headers
        raise CorruptImageError(f"cannot parse deflated DICOM header ({exc.__class__.__name__})") from None
    rows, cols, frames, spp, bits, _ = _check_header(hdr, max_pixels)
    budget = _declared_bytes(rows, cols, frames, spp, bits) + HEADER_BUDGET
    try:
        rest = d.decompress(d.unconsumed_tail, max(0, budget - len(head))) if d.unconsumed_tail else b""
    except zlib.error:
        raise CorruptImageError("deflated DICOM data set does not inflate") from None
    if d.unconsumed_tail or not d.eof:
        raise ImageTooLargeError(f"deflated DICOM inflates past its declared {cols}x{rows}x{frames} pixels "
                                 f"({budget} bytes); refused before inflating more")
    try:
        return read_dataset(io.BytesIO(head + rest), False, True)
    except Exception as exc:  # noqa: BLE001
        raise CorruptImageError(f"cannot parse deflated DICOM data set ({exc.__class__.__name__})") from None


def read_dicom(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Parse DICOM Part 10 bytes once (bounded inflation); returns the dataset. Raises ImageError."""
    if not available():
        raise UnsupportedFormatError("application/dicom needs the dicom extra: pip install 'medpipe-imaging[dicom]'")
    import pydicom
    from pydicom.dataset import FileDataset
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    if not data:
        raise CorruptImageError("empty DICOM body")
    fp = io.BytesIO(data)
    try:
        preamble = read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
    except InvalidDicomError:
        raise CorruptImageError("not a DICOM Part 10 file (no DICM preamble)") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on malformed headers
        raise CorruptImageError(f"cannot parse DICOM header ({exc.__class__.__name__})") from None
    if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        dataset = _inflate_deflated(fp, max_pixels)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian  # what the inflated bytes now are
        ds = FileDataset(None, dataset, preamble, meta, False, True)
        ds.set_original_encoding(False, True, dataset._character_set)
        return ds
    try:
        return pydicom.dcmread(io.BytesIO(data), force=False)
    except InvalidDicomError:
        raise CorruptImageError("not a DICOM Part 10 file (no DICM preamble)") from None
    except Exception as exc:  # noqa: BLE001
        raise CorruptImageError(f"cannot parse DICOM header ({exc.__class__.__name__})") from None


def decode_dicom(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """DICOM bytes -> RGB uint8 (H, W, 3) of the first frame, full resolution (resizing is the caller's)."""
    ds = read_dicom(data, max_pixels)
    rows, cols, frames, spp, bits, pi = _check_header(ds, max_pixels)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise CorruptImageError("DICOM object has no pixel data")
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if "PixelData" in ds and (ts is None or not ts.is_compressed):
        declared = _declared_bytes(rows, cols, frames, spp, bits)
        got = len(ds.PixelData)
        if got > declared + 1:  # one byte of padding to an even length
            raise ImageTooLargeError(f"DICOM pixel data holds {got} bytes; {cols}x{rows}x{frames} pixels "
                                     f"declare {declared}")
    if pi == "PALETTE COLOR" and not (all(t in ds for t in _PALETTE_TAGS)
                                      and all(any(t in ds for t in pair) for pair in _PALETTE_DATA)):
        raise CorruptImageError("palette colour DICOM has no colour lookup table")
    try:
        ds.pixel_array_options(index=0, raw=True)  # the first frame only, however many are present
        arr = ds.pixel_array
        if spp == 3 and pi.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            arr = convert_color_space(arr, pi, "RGB")
        if pi == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            arr = apply_color_lut(arr, ds)
    except (NotImplementedError, RuntimeError) as exc:
        raise UnsupportedFormatError(f"DICOM transfer syntax cannot be decoded here ({exc.__class__.__name__})") from None
    except MemoryError:
        raise ImageTooLargeError("not enough memory to decode the DICOM pixels") from None
    except Exception as exc:  # noqa: BLE001
        raise CorruptImageError(f"cannot decode DICOM pixels ({exc.__class__.__name__})") from None
    arr = _to_uint8(np.asarray(arr))
    if arr.ndim == 2:
        if pi == "MONOCHROME1":
            arr = 255 - arr
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise CorruptImageError(f"unexpected DICOM pixel shape {arr.shape}")
    return np.ascontiguousarray(arr)
