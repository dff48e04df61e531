import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from medpipe.data import imageio


def _golden(w=40, h=30):
    rng = np.random.default_rng(0)
    base = np.zeros((h, w, 3), np.uint8)
    base[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None]
    base[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    base[..., 2] = rng.integers(0, 255, (h, w))
    return base


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_png_roundtrip_exact():
    arr = _golden()
    out = imageio.decode_image(_encode(Image.fromarray(arr), "PNG"))
    assert out.dtype == np.uint8 and out.shape == (30, 40, 3)
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "CMYK", "I;16", "LA"])
def test_modes_become_rgb(mode):
    arr = _golden()
    img = Image.fromarray(arr)
    if mode == "I;16":
        gray = np.asarray(img.convert("L"), np.uint16) * 257
        variant = Image.fromarray(gray)
        assert variant.mode.startswith("I;16")
        expected = np.repeat(np.asarray(img.convert("L"))[..., None], 3, axis=2)
        fmt = "PNG"
    else:
        variant = img.convert(mode)
        expected = np.asarray(variant.convert("RGB"))
        fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = imageio.decode_image(_encode(variant, fmt))
    assert out.shape == (30, 40, 3) and out.dtype == np.uint8
    tol = 3 if fmt == "JPEG" else 1
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= (60 if fmt == "JPEG" else tol)


def test_exif_orientation_applied():
    arr = _golden()
    img = Image.fromarray(arr).rotate(90, expand=True)  # stored rotated...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...and tagged "rotate 90 CW to view", which undoes it
    data = _encode(img, "PNG", exif=exif.tobytes())
    out = imageio.decode_image(data)
    assert out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_truncated_jpeg_is_corrupt():
    data = _encode(Image.fromarray(_golden(200, 150)), "JPEG", quality=90)
    with pytest.raises(imageio.CorruptImageError) as err:
        imageio.decode_image(data[: len(data) // 2], "x.jpg")
    assert "x.jpg" in str(err.value)


def test_zero_bytes():
    with pytest.raises(imageio.EmptyImageError):
        imageio.decode_image(b"")


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "PDF"])
def test_disallowed_formats(fmt):
    data = _encode(Image.fromarray(_golden()).convert("RGB"), fmt)
    with pytest.raises(imageio.UnsupportedFormatError):
        imageio.decode_image(data)


@pytest.mark.parametrize("data", [b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", b"hello, not an image" * 10])
def test_text_is_unsupported(data):
    with pytest.raises(imageio.UnsupportedFormatError):
        imageio.decode_image(data)


def _png_header_only(w, h):
    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_from_header():
    import time

    data = _png_header_only(30000, 30000)
    t = time.perf_counter()
    with pytest.raises(imageio.ImageTooLargeError):
        imageio.decode_image(data, max_pixels=40_000_000)
    assert len(data) < 200  # the refusal came from the header, not from pixels
    assert time.perf_counter() - t < 5


def test_pixel_cap_configurable():
    data = _encode(Image.fromarray(_golden()), "PNG")
    with pytest.raises(imageio.ImageTooLargeError):
        imageio.decode_image(data, max_pixels=100)


@pytest.mark.parametrize("w,h", [(1, 1), (1, 200), (200, 1)])
def test_degenerate_sizes_resize(w, h):
    data = _encode(Image.new("RGB", (w, h), (10, 20, 30)), "PNG")
    out = imageio.decode_image(data, size=(16, 16))
    assert out.shape == (16, 16, 3)


def test_resize_with_draft_matches_shape_and_content():
    arr = _golden(600, 450)
    data = _encode(Image.fromarray(arr), "JPEG", quality=95)
    a = imageio.decode_image(data, size=(64, 64), draft=True)
    b = imageio.decode_image(data, size=(64, 64), draft=False)
    assert a.shape == b.shape == (64, 64, 3)
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 6


def test_read_image_names_missing_file(tmp_path):
    with pytest.raises(imageio.CorruptImageError) as err:
        imageio.read_image(tmp_path / "nope.jpg")
    assert "nope.jpg" in str(err.value)
