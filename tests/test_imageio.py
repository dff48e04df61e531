import io
import struct
import subprocess
import sys
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


# -- hostile files (issue 12): bombs that are small on the wire and costly to decode ------------------

def jpeg_scan_bomb(width: int, height: int, scans: int) -> bytes:
    """A greyscale progressive JPEG of ``scans`` tiny AC scans (a few bytes of EOB runs over every
    block each). libjpeg only warns about the bogus progression and decodes every scan over the
    whole coefficient buffer: minutes for 20,000 scans at 40 MP, from about 1 MB."""
    def seg(marker: int, payload: bytes) -> bytes:
        return b"\xff" + bytes([marker]) + struct.pack(">H", len(payload) + 2) + payload

    out = [b"\xff\xd8", seg(0xDB, b"\x00" + bytes([1] * 64)),
           seg(0xC2, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00"),
           seg(0xC4, b"\x10" + bytes([1] + [0] * 15) + b"\xe0")]  # AC table: one symbol (EOB run class 14)
    bits, left = "", ((width + 7) // 8) * ((height + 7) // 8)
    while left > 0:
        run = max(min(left, 32767), 16384)
        bits += "0" + format(run - 16384, "014b")
        left -= run
    bits += "1" * (-len(bits) % 8)
    data = int(bits, 2).to_bytes(len(bits) // 8, "big").replace(b"\xff", b"\xff\x00")
    out += [seg(0xDA, b"\x01\x01\x00\x01\x3f\x00") + data] * scans + [b"\xff\xd9"]
    return b"".join(out)


def test_jpeg_scan_bomb_refused_before_decoding():
    import time

    bomb = jpeg_scan_bomb(6000, 6000, 20000)
    assert len(bomb) < 1_500_000 and Image.open(io.BytesIO(bomb)).size == (6000, 6000)
    t = time.perf_counter()
    with pytest.raises(imageio.DecodeBudgetError, match="20000 scans"):
        imageio.decode_image(bomb, size=(32, 32))
    assert time.perf_counter() - t < 1
    from medpipe.errors import http_status

    assert http_status(imageio.DecodeBudgetError("x")) == 422  # the status comes from errors.TABLE
    # a real progressive JPEG (Pillow/libjpeg's standard script) is far under the limit and decodes
    prog = _encode(Image.fromarray(_golden(64, 48)), "JPEG", progressive=True, quality=90)
    assert 1 < imageio.count_jpeg_scans(prog) <= 12
    assert imageio.decode_image(prog).shape == (48, 64, 3)
    # under the limit the bomb is a valid (slow) image: the service's decode budget handles that
    assert imageio.decode_image(jpeg_scan_bomb(64, 64, 50), size=(8, 8)).shape == (8, 8, 3)


@pytest.mark.parametrize("shape", [(0, 0), (5, 0, 3), (0, 4, 3), (3, 0, 5)])
def test_zero_size_arrays_are_refused(shape):
    with pytest.raises(imageio.DegenerateImageError, match="no pixels"):
        imageio.prepare_array(np.zeros(shape, np.uint8), (8, 8))


# -- DICOM -----------------------------------------------------------------------------------------

def _dicom_dataset(rows=16, cols=16, pi="MONOCHROME2", spp=1, frames=None, pixels: bytes | None = None):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Secret^Patient"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = spp, pi
    if spp == 3:
        ds.PlanarConfiguration = 0
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels if pixels is not None else (np.arange(rows * cols * spp) % 251).astype(np.uint8).tobytes()
    return ds


def _dicom_bytes(ds, deflated: bool = False) -> bytes:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    if deflated:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dicom_deflate_bomb(pixel_bytes: int = 1 << 30) -> bytes:
    """A deflated-transfer-syntax DICOM declaring 16x16 pixels whose pixel element is ``pixel_bytes``
    of zeros: about 1 MB on the wire per GiB inflated."""
    ds = _dicom_dataset()
    del ds.PixelData
    head = _dicom_bytes(ds, deflated=True)  # preamble + meta + the deflated header elements
    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = io.BytesIO(head)
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    meta_end = fp.tell()
    header = zlib.decompress(head[meta_end:], -zlib.MAX_WBITS)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    first = comp.compress(header + b"\xe0\x7f\x10\x00OB\x00\x00" + struct.pack("<I", pixel_bytes))
    first += comp.flush(zlib.Z_FULL_FLUSH)
    zeros = bytes(1 << 22)
    # After a full flush the compressor starts afresh, so every 4 MiB of zeros deflates to the same
    # bytes: compress two, check, repeat the second (a GiB bomb in milliseconds).
    c1 = comp.compress(zeros) + comp.flush(zlib.Z_FULL_FLUSH)
    c2 = comp.compress(zeros) + comp.flush(zlib.Z_FULL_FLUSH)
    assert c1 == c2 and pixel_bytes % len(zeros) == 0
    return head[:meta_end] + first + c2 * (pixel_bytes // len(zeros)) + comp.flush()


def test_dicom_deflate_bomb_refused_within_budget():
    import time
    import tracemalloc

    from medpipe.data import dicom

    bomb = dicom_deflate_bomb(1 << 30)  # 1 GiB of pixel data behind a 16x16 header
    assert len(bomb) < 1_500_000
    tracemalloc.start()
    t = time.perf_counter()
    try:
        with pytest.raises(imageio.ImageTooLargeError, match="inflates past its declared"):
            dicom.decode_dicom(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, peak  # never inflated more than the header budget + the declared pixels
    assert time.perf_counter() - t < 5


def test_dicom_deflated_ok_and_read_once():
    from medpipe.data import dicom

    ds = _dicom_dataset(20, 12)
    native = dicom.decode_dicom(_dicom_bytes(ds))
    assert native.shape == (20, 12, 3)
    np.testing.assert_array_equal(dicom.decode_dicom(_dicom_bytes(_dicom_dataset(20, 12), deflated=True)), native)


def test_dicom_pixel_data_past_declared_frames_is_refused():
    from medpipe.data import dicom

    one = (np.arange(16 * 16) % 200).astype(np.uint8).tobytes()
    ok = dicom.decode_dicom(_dicom_bytes(_dicom_dataset(frames=2, pixels=one * 2)))
    assert ok.shape == (16, 16, 3)  # the first frame only
    with pytest.raises(imageio.ImageTooLargeError, match="declare"):
        dicom.decode_dicom(_dicom_bytes(_dicom_dataset(frames=1, pixels=one * 50)))


def test_palette_dicom_without_lut_is_a_clear_error():
    from medpipe.data import dicom

    with pytest.raises(imageio.CorruptImageError, match="lookup table") as e:
        dicom.decode_dicom(_dicom_bytes(_dicom_dataset(pi="PALETTE COLOR")))
    from medpipe.errors import http_status

    assert http_status(e.value) == 400 and "Secret" not in str(e.value)


def test_importing_medpipe_changes_no_library_setting():
    """Pillow's pixel cap, MONAI's metadata tracking and prometheus_client's *_created series stay at their
    defaults after importing medpipe (MONAI is not even imported, so its flag cannot have changed)."""
    code = """
import sys
import prometheus_client
from PIL import Image
def created():
    registry = prometheus_client.CollectorRegistry()
    prometheus_client.Counter('c', 'c', registry=registry)
    return b'c_created' in prometheus_client.generate_latest(registry)
Image.MAX_IMAGE_PIXELS = 12345  # a value importing medpipe would have to leave alone (the old code raised it)
before = (Image.MAX_IMAGE_PIXELS, created())
import medpipe.preprocess, medpipe.data.imageio, medpipe.serve.metrics, medpipe.serve.app
metrics = medpipe.serve.metrics.Metrics()
metrics.rejected.inc()
print(before == (Image.MAX_IMAGE_PIXELS, created()), before[1], 'monai' in sys.modules, b'_created' in metrics.render()[0])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "False", "False"], done.stdout


def test_the_decoder_keeps_pillows_bomb_guard_on(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a program switched Pillow's guard off
    imageio.decode_image(_encode(Image.fromarray(_golden()), "PNG"))
    assert Image.MAX_IMAGE_PIXELS == imageio.MAX_DECLARED_PIXELS  # the JPEG bound (others: max_pixels first)
