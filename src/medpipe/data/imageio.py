"""The only place medpipe decodes untrusted image bytes.

Rules (see RELIABILITY.md):
- an allow-list of Pillow decoders (JPEG, PNG, BMP, WebP); nothing else is ever tried;
- the size is checked against a pixel cap *before* any pixel is allocated (decompression bombs
  are refused from the header). The cap bounds the *decoded* size: for a JPEG decoded for a model
  input (``decode_image(size=...)``), that is its draft size (libjpeg's DCT scaling by 1/2, 1/4 or
  1/8, chosen from the header), so a 24 MP camera JPEG decoded at 750x500 passes a cap that a 24 MP
  PNG would not; its declared size is bounded separately by ``MAX_DECLARED_PIXELS`` (the
  entropy-decoding work grows with it). Every other format, and a JPEG decoded at full size,
  is capped by its declared size;
- a JPEG with more scans than ``max_jpeg_scans`` is refused before decoding (a progressive JPEG
  with thousands of tiny scans takes minutes to decode under the pixel cap); the service also
  decodes in worker processes with a hard time and memory budget (medpipe/data/decodepool.py);
- the full image is decoded (a truncated file is an error, never a half-grey image);
- bytes or a file (:func:`decode_file`: a large body spooled to disk is decoded from there, never
  read into memory whole);
- EXIF orientation is applied and every mode (L, LA, P, RGBA, CMYK, I;16, I, F) becomes 8-bit RGB.

Errors are typed: :class:`ImageError` subclasses carry a short machine ``code`` and a message
that names the reason (and the file, when the caller gave a name) but never the bytes.
"""

from __future__ import annotations

import io
import mmap
import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "BMP", "WEBP")
DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: far above any dermatoscope, far below a bomb
# libjpeg's standard progressive script writes 10 scans (6 for greyscale); an EXIF thumbnail adds a
# few more. 100 is far above any real camera or encoder and far below a scan bomb (thousands).
DEFAULT_MAX_JPEG_SCANS = 100
MIN_SIDE = 1
# The largest declared size of any image (the JPEG bound; every other format has max_pixels): above
# the largest camera sensors (151 MP medium format), far below a JPEG bomb's 65535 x 65535.
MAX_DECLARED_PIXELS = 160_000_000


def keep_pillow_bomb_guard() -> None:
    """Pillow's own decompression-bomb guard (``PIL.Image.MAX_IMAGE_PIXELS``) stays on as a second line
    behind medpipe's checks, which run first and raise medpipe's error: if it is off or below
    ``MAX_DECLARED_PIXELS`` (the largest declared size medpipe lets through, a camera JPEG decoded at
    draft scale) it is set to that. Idempotent; run by :func:`_open` (every decode goes through it),
    not at import, so importing medpipe leaves Pillow's setting alone."""
    if (Image.MAX_IMAGE_PIXELS or 0) < MAX_DECLARED_PIXELS:
        Image.MAX_IMAGE_PIXELS = MAX_DECLARED_PIXELS

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "area": Image.Resampling.BOX,
}


RESAMPLE_NAMES = frozenset(_RESAMPLE)


from medpipe.errors import (  # noqa: E402,F401  (re-exported; medpipe/errors.py maps each to its HTTP status)
    CorruptImageError,
    DecodeBudgetError,
    DegenerateImageError,
    EmptyImageError,
    ImageError,
    ImageTooLargeError,
    UnsupportedFormatError,
)


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int
    mode: str


def resample_filter(name: str) -> Image.Resampling:
    try:
        return _RESAMPLE[name]
    except KeyError:
        raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {name!r}") from None


def count_jpeg_scans(data: bytes | mmap.mmap, stop_after: int | None = None) -> int:
    """Start-of-scan markers in a JPEG stream: an upper bound on its scans, found without decoding.

    Inside entropy-coded data a 0xFF byte is always followed by 0x00 or a restart marker, so every
    FF DA is a real SOS marker (or one inside an embedded thumbnail, which is counted too).
    ``data`` may be a memory map of a file; ``stop_after``: stop counting once past it.
    """
    if isinstance(data, bytes) and stop_after is None:
        return data.count(b"\xff\xda")
    n, at = 0, data.find(b"\xff\xda")
    while at >= 0 and (stop_after is None or n <= stop_after):
        n, at = n + 1, data.find(b"\xff\xda", at + 2)
    return n


def _jpeg_scans(source: bytes | str, limit: int) -> int:
    if isinstance(source, bytes):
        return count_jpeg_scans(source)
    with open(source, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        return count_jpeg_scans(mm, stop_after=limit)


def _check_size(img: Image.Image, name: str | None, max_pixels: int, draft_side: int | None) -> None:
    """The pixel cap on the decoded size: for a JPEG with ``draft_side``, its draft (set here, from the
    header) must fit ``max_pixels`` and its declared size ``MAX_DECLARED_PIXELS``; else the declared size
    must fit ``max_pixels``."""
    w, h = img.size
    if img.format == "JPEG" and draft_side:
        if w * h > max(max_pixels, MAX_DECLARED_PIXELS):
            raise ImageTooLargeError(f"declared {w}x{h} = {w * h} pixels exceeds the cap of "
                                     f"{max(max_pixels, MAX_DECLARED_PIXELS)} for a JPEG", name)
        img.draft("RGB", (draft_side, draft_side))  # header only: sets the DCT scale and the decoded size
        dw, dh = img.size
        if dw * dh > max_pixels:
            raise ImageTooLargeError(f"{w}x{h} decodes at {dw}x{dh} = {dw * dh} pixels, over the cap of "
                                     f"{max_pixels}", name)
    elif w * h > max_pixels:
        raise ImageTooLargeError(f"{w}x{h} = {w * h} pixels exceeds the cap of {max_pixels}", name)


def _open(data: bytes | str, name: str | None, max_pixels: int,
          max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS, draft_side: int | None = None) -> Image.Image:
    """Header checks of bytes or a file path; ``draft_side``: JPEG only, decode at the smallest DCT scale
    keeping both sides >= it (the pixel cap then applies to that decoded size)."""
    if isinstance(data, bytes):
        empty, source = not data, io.BytesIO(data)
    else:
        try:
            empty, source = os.path.getsize(data) == 0, data
        except OSError as exc:
            raise CorruptImageError(f"cannot read file ({exc.strerror or exc.__class__.__name__})", name) from None
    if empty:
        raise EmptyImageError("zero-byte file", name)
    keep_pillow_bomb_guard()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source, formats=list(ALLOWED_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"declared size exceeds the pixel cap ({exc.__class__.__name__})", name) from None
    except Image.UnidentifiedImageError:
        raise UnsupportedFormatError(
            f"not a recognised image; allowed formats are {', '.join(ALLOWED_FORMATS)}", name
        ) from None
    except Exception as exc:  # any parser failure in the header
        raise CorruptImageError(f"unreadable header ({exc.__class__.__name__})", name) from None
    try:
        _check_size(img, name, max_pixels, draft_side)
        w, h = img.size
        if w < MIN_SIDE or h < MIN_SIDE:
            raise DegenerateImageError(f"size {w}x{h} has an empty side", name)
        if img.format == "JPEG" and max_jpeg_scans and (scans := _jpeg_scans(data, max_jpeg_scans)) > max_jpeg_scans:
            raise DecodeBudgetError(f"JPEG has {scans} scans or more, over the limit of {max_jpeg_scans} "
                                    "(a progressive-JPEG scan bomb takes minutes to decode)", name)
    except ImageError:
        img.close()  # a file opened by path is closed now, not when the object is collected
        raise
    return img


def probe(data: bytes, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Header-only check: format, size and mode, without decoding pixels."""
    img = _open(data, name, max_pixels)
    return ImageInfo(img.format or "?", img.size[0], img.size[1], img.mode)


def verify_image(data: bytes, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Full decode of every pixel (truncation and corrupt streams are errors) without converting.

    This is ingest's check: the same allow-list and pixel cap as :func:`decode_image`, but no RGB
    conversion or array copy, which would double its cost.
    """
    img = _open(data, name, max_pixels)
    info = ImageInfo(img.format or "?", img.size[0], img.size[1], img.mode)
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        msg = str(exc).split("\n")[0][:120] or exc.__class__.__name__
        raise CorruptImageError(f"cannot decode: {msg}", name) from None
    except MemoryError:
        raise ImageTooLargeError("not enough memory to decode", name) from None
    orientation = img.getexif().get(0x0112, 1)
    if orientation in (5, 6, 7, 8):  # displayed size is transposed
        info = ImageInfo(info.format, info.height, info.width, info.mode)
    return info


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(
    data: bytes | str,
    name: str | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    size: tuple[int, int] | None = None,
    interpolation: str = "bicubic",
    draft: bool = True,
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS,
) -> np.ndarray:
    """Decode ``data`` to an RGB ``uint8`` array of shape (H, W, 3).

    ``size`` is (height, width). When given, the image is resized to exactly that size; for JPEG,
    ``draft`` lets libjpeg decode at a reduced DCT scale first (still reading the whole stream, so
    truncation is still detected), which is several times faster for 600x450 -> 64x64 and far more
    for a 24 MP camera JPEG (benchmarks/large_images.py). The scale is the strongest reduction of 1/8,
    1/4, 1/2 that keeps both sides >= max(size) (orientation may swap axes); 1/1 (no draft) when none does.
    ``data``: the encoded bytes, or a file path (str) to decode from the file without reading it whole.
    """
    # orientation may swap axes, so ask for a draft big enough for either orientation
    draft_side = max(size) if size is not None and draft else None
    img = opened = _open(data, name, max_pixels, max_jpeg_scans, draft_side)
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
        if size is not None:
            h, w = size
            if img.size != (w, h):
                img = img.resize((w, h), resample=resample_filter(interpolation), reducing_gap=None)
        arr = np.asarray(img, dtype=np.uint8)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        msg = str(exc).split("\n")[0][:120] or exc.__class__.__name__
        raise CorruptImageError(f"cannot decode: {msg}", name) from None
    except MemoryError:
        raise ImageTooLargeError("not enough memory to decode", name) from None
    finally:
        opened.close()  # a file opened by path is closed now
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise CorruptImageError(f"unexpected decoded shape {arr.shape}", name)
    return arr


def prepare_array(arr: np.ndarray, size: tuple[int, int], interpolation: str = "bicubic",
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An in-memory image (HW, HWC or CHW; uint8, or float in [0,1] or [0,255]) -> RGB uint8 of ``size``.

    ``size`` is (height, width). An array with an empty side is refused (never a prediction for an
    empty image).
    """
    a = np.asarray(arr)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3:
        raise CorruptImageError(f"array must be HxW, HxWxC or CxHxW, got shape {a.shape}")
    if a.size == 0:
        raise DegenerateImageError(f"array of shape {a.shape} holds no pixels")
    if a.shape[0] in (1, 3, 4) and a.shape[2] not in (1, 3, 4):
        a = np.moveaxis(a, 0, 2)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    if a.shape[2] == 4:
        a = a[..., :3]
    if a.shape[2] != 3:
        raise CorruptImageError(f"array must have 1, 3 or 4 channels, got shape {a.shape}")
    if a.shape[0] * a.shape[1] > max_pixels:
        raise ImageTooLargeError(f"{a.shape[1]}x{a.shape[0]} exceeds the pixel cap of {max_pixels}")
    if a.dtype != np.uint8:
        f = a.astype(np.float64)
        if not np.isfinite(f).all():
            raise CorruptImageError("array holds NaN or Inf")
        if f.max(initial=0) <= 1.0:
            f = f * 255.0
        a = np.clip(f + 0.5, 0, 255).astype(np.uint8)
    return resize_rgb(np.ascontiguousarray(a), size, interpolation)


def resize_rgb(arr: np.ndarray, size: tuple[int, int], interpolation: str = "bicubic") -> np.ndarray:
    """RGB uint8 HWC -> (height, width) = ``size`` with the same Pillow call :func:`decode_image` uses."""
    img = Image.fromarray(arr)
    h, w = size
    if img.size != (w, h):
        img = img.resize((w, h), resample=resample_filter(interpolation), reducing_gap=None)
    return np.asarray(img, dtype=np.uint8)


def decode_file(path: str | os.PathLike, name: str | None = None, **kwargs) -> np.ndarray:
    """:func:`decode_image` of a file, streamed from disk (a spooled request body): the file is never
    read into memory whole. ``name`` is what errors call it (default: nothing, the path is private)."""
    return decode_image(os.fspath(path), name, **kwargs)


def read_image(path: str | os.PathLike, **kwargs) -> np.ndarray:
    """Read and decode a file; errors name the file."""
    name = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise CorruptImageError(f"cannot read file ({exc.strerror or exc.__class__.__name__})", name) from None
    return decode_image(data, name, **kwargs)
