"""Camera-size images: draft decoding, the pixel cap on the decoded size, spooled bodies, --profile async."""

import io
import json
import os
import stat
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageDraw

from medpipe.data import imageio
from tests._server import Server
from tests.conftest import untrained_package


def camera_jpeg(w: int = 6000, h: int = 4000, seed: int = 0, quality: int = 90, noise: int = 24) -> bytes:
    """A camera-like JPEG: smooth shading, a few dark ellipses (lesions), uniform sensor noise of +-``noise``
    (a 509x511 tile repeated: JPEG cannot tell, and it is 20x faster than drawing 72 M values). At
    6000x4000, quality 90: ~9.8 MB, like the 9.6 MB ISIC image of issue 30."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(70, 200, (max(2, h // 100), max(2, w // 100), 3), dtype=np.uint8))
    img = small.resize((w, h), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(min(w, h) // 20, min(w, h) // 5)
        draw.ellipse((cx - r, cy - r * 0.8, cx + r, cy + r * 0.8), fill=tuple(int(v) for v in rng.integers(40, 140, 3)))
    arr = np.asarray(img).copy()  # values 40..200: +-noise stays inside 0..255 in uint8
    tile = rng.integers(0, 2 * noise + 1, (509, 511, 3), dtype=np.uint8)
    arr += np.tile(tile, (h // 509 + 1, w // 511 + 1, 1))[:h, :w]
    arr -= noise
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def jpeg_declaring(data: bytes, w: int, h: int) -> bytes:
    """The same JPEG bytes with the frame header (SOF0) declaring ``w`` x ``h``: a bomb of the same size."""
    at = data.index(b"\xff\xc0")
    return data[:at + 5] + h.to_bytes(2, "big") + w.to_bytes(2, "big") + data[at + 9:]


def png_bomb(w: int, h: int, total: int) -> bytes:
    """A PNG declaring ``w`` x ``h`` whose image data is ``total`` bytes long: a bomb of that byte size."""
    import struct
    import zlib

    from tests.test_imageio import _png_header_only

    head = _png_header_only(w, h)
    data = np.random.default_rng(0).integers(0, 256, max(0, total - len(head) - 12), dtype=np.uint8).tobytes()
    chunk = struct.pack(">I", len(data)) + b"IDAT" + data + struct.pack(">I", zlib.crc32(b"IDAT" + data) & 0xFFFFFFFF)
    return head[:-12] + chunk + head[-12:]  # before IEND


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    return camera_jpeg()


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """densenet-test (the suite's tiny DenseNet) at the default 64 px input, random weights (seeded)."""
    return untrained_package(tmp_path_factory.mktemp("large") / "pkg", name="large", image_size=64)


@pytest.fixture(scope="module")
def predictor(package):
    from medpipe.infer.predictor import Predictor

    return Predictor(package)


def _old_decode(data: bytes, side: int) -> np.ndarray:
    """decode_image before the pixel cap moved to the draft size: draft after the checks, then the same steps."""
    from PIL import ImageOps

    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (side, side))
    img.load()
    img = ImageOps.exif_transpose(img).convert("RGB")
    if img.size != (side, side):
        img = img.resize((side, side), resample=Image.Resampling.BICUBIC, reducing_gap=None)
    return np.asarray(img, dtype=np.uint8)


def test_normal_image_pixels_and_predictions_unchanged(predictor, tmp_path):
    """A 600x450 JPEG (the demo size): the same pixels as before, from bytes and from a spooled file alike,
    hence the same probabilities (bit for bit)."""
    data = camera_jpeg(600, 450, seed=1)
    before = _old_decode(data, 64)
    now = imageio.decode_image(data, size=(64, 64))
    (tmp_path / "body").write_bytes(data)
    from_file = imageio.decode_file(tmp_path / "body", size=(64, 64))
    np.testing.assert_array_equal(now, before)
    np.testing.assert_array_equal(from_file, before)
    np.testing.assert_array_equal(predictor.probabilities([now]), predictor.probabilities([before]))


def test_draft_decode_of_a_24mp_jpeg_matches_full_decode(predictor, big_jpeg):
    """6000x4000 -> 64x64: libjpeg's 1/8 DCT scaling (750x500) then bicubic, against the full 24 MP decode then
    bicubic over its whole support. Both are low-pass area averages of the same image, so the pixels differ
    by the filters' shapes only: mean |diff| < 2 grey levels (of 255). Through the model the probabilities move
    less than 0.02 and less than a fifth of what a different camera image moves them; the label is the same."""
    draft = imageio.decode_image(big_jpeg, size=(64, 64))
    full = imageio.decode_image(big_jpeg, size=(64, 64), draft=False)
    other = imageio.decode_image(camera_jpeg(6000, 4000, seed=7), size=(64, 64))
    pixel_diff = np.abs(draft.astype(int) - full.astype(int)).mean()
    assert pixel_diff < 2.0, pixel_diff
    pd, pf, po = predictor.probabilities([draft, full, other])
    assert np.abs(pd - pf).max() < 0.02, (pd, pf)
    assert np.abs(pd - pf).max() < np.abs(po - pf).max() / 5, (pd, pf, po)
    assert pd.argmax() == pf.argmax()


def test_pixel_cap_counts_a_jpeg_at_its_decoded_size(big_jpeg):
    """Under a 1 MP cap a 24 MP camera JPEG is decoded (at 750x500 for a 64 px model) while a 2 MP PNG and the
    same JPEG decoded at full size are refused; a header declaring 65000x65000 in the same bytes is refused
    before any pixel is decoded."""
    assert imageio.decode_image(big_jpeg, size=(64, 64), max_pixels=1_000_000).shape == (64, 64, 3)
    with pytest.raises(imageio.ImageTooLargeError, match="pixels exceeds the cap"):
        imageio.decode_image(big_jpeg, size=(64, 64), max_pixels=1_000_000, draft=False)
    png = io.BytesIO()
    Image.new("RGB", (2000, 1000), (90, 60, 40)).save(png, "PNG")
    with pytest.raises(imageio.ImageTooLargeError):
        imageio.decode_image(png.getvalue(), size=(64, 64), max_pixels=1_000_000)
    # a model input so large that the draft stays above the cap: refused by the decoded size
    with pytest.raises(imageio.ImageTooLargeError, match="decodes at 3000x2000"):
        imageio.decode_image(big_jpeg, size=(2000, 2000), max_pixels=1_000_000)


def test_jpeg_bomb_of_the_same_byte_size_is_refused_from_the_header(big_jpeg, monkeypatch):
    bomb = jpeg_declaring(big_jpeg, 65000, 65000)
    with monkeypatch.context() as m:
        m.setattr(Image, "MAX_IMAGE_PIXELS", None)
        assert len(bomb) == len(big_jpeg) and Image.open(io.BytesIO(bomb)).size == (65000, 65000)

    def no_decoding(*a, **k):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
    with pytest.raises(imageio.ImageTooLargeError):
        imageio.decode_image(bomb, size=(64, 64))
    with pytest.raises(imageio.ImageTooLargeError):
        imageio.decode_image(png_bomb(30000, 30000, len(big_jpeg)), size=(64, 64))


def test_spooled_body_goes_to_a_private_file_and_is_removed(tmp_path):
    from medpipe.serve.spool import SpooledBody

    small = SpooledBody(100, directory=str(tmp_path))
    small.write(b"x" * 60)
    assert not small.spooled and small.finish().read() == b"x" * 60
    with SpooledBody(100, directory=str(tmp_path)) as big:
        for _ in range(5):
            big.write(b"y" * 60)
        big.finish()
        assert big.spooled and big.size == 300 and big.read() == b"y" * 300
        assert stat.S_IMODE(os.stat(big.path).st_mode) == 0o600
    assert not any(tmp_path.iterdir())


def _declare_only(server: Server, n: int) -> tuple[int, bytes]:
    """Send the headers of an n-byte JPEG body and read the answer (refused before the body is read: sending it
    would meet a closed connection)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.putrequest("POST", "/invocations")
        for k, v in {"Content-Type": "image/jpeg", "Accept": "application/json", "Content-Length": str(n)}.items():
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_async_profile_serves_a_24mp_jpeg_and_realtime_names_the_option(package, predictor, big_jpeg, tmp_path):
    """The same 9.8 MB camera JPEG: 413 under the default (real-time) profile, with a message that names
    --max-body-mb and --profile async; answered under --profile async (spooled to a temporary file, decoded
    from it, the file removed), with the probabilities of an in-process decode; bombs of the same byte size
    are still 413 image_too_large."""
    spool = tmp_path / "spool"
    spool.mkdir()
    servers = [Server(package, "--backend", "eager", "--decode-workers", "1", log=tmp_path / "rt.log"),
               Server(package, "--backend", "eager", "--profile", "async", log=tmp_path / "async.log",
                      env={"TMPDIR": str(spool)})]
    try:
        with ThreadPoolExecutor(2) as ex:
            realtime, asyn = ex.map(lambda s: s.wait_ready(), servers)
        st, body = _declare_only(realtime, len(big_jpeg))
        err = json.loads(body)
        assert st == 413 and err["error"] == "body_too_large", (st, body)
        assert "--max-body-mb 6" in err["message"] and "--profile async" in err["message"]

        st, _, body = asyn.invoke(big_jpeg, timeout=120)
        assert st == 200, body
        got = json.loads(body)["predictions"][0]
        want = predictor.probabilities([predictor.decode(big_jpeg)])[0]
        np.testing.assert_allclose([got["probabilities"][c] for c in predictor.classes], want, atol=1e-5)
        assert not any(spool.iterdir())  # the spooled body is gone

        for bomb in (jpeg_declaring(big_jpeg, 65000, 65000), png_bomb(30000, 30000, len(big_jpeg))):
            st, _, body = asyn.invoke(bomb, ctype="image/png" if bomb.startswith(b"\x89PNG") else "image/jpeg")
            assert st == 413 and json.loads(body)["error"] == "image_too_large", (st, body)
        assert not any(spool.iterdir())
        assert asyn.request("GET", "/ping")[0] == 200
    finally:
        for s in servers:
            s.stop()
    for s in servers:
        assert "Traceback" not in s.log_text()


def test_profiles_fill_only_what_is_not_given():
    from medpipe.errors import ConfigError
    from medpipe.serve.config import ServeConfig
    from medpipe.serve.profiles import ASYNC_MAX_PAYLOAD_MB, apply_profile

    cfg = ServeConfig(**apply_profile({"profile": "async", "deadline_s": 600.0}))
    assert cfg.max_body_mb == ASYNC_MAX_PAYLOAD_MB and cfg.deadline_s == 600.0
    assert ServeConfig(**apply_profile({})).max_body_mb == ServeConfig.max_body_mb
    with pytest.raises(ConfigError, match="--profile"):
        apply_profile({"profile": "batch"})


def test_serve_command_takes_the_profile_from_the_option_or_the_container_env(monkeypatch, tmp_path):
    """`medpipe serve --profile async` and, in a container, MEDPIPE_SERVE_PROFILE=async: the async limits under
    the options given (the server itself is replaced by a recorder)."""
    import medpipe.cli as cli
    from medpipe.serve.profiles import ASYNC_MAX_CONCURRENT_INVOCATIONS, ASYNC_MAX_PROCESSING_S

    seen = []
    monkeypatch.setattr(cli, "serve", lambda cfg: seen.append(cfg) or 0)
    assert cli.main(["serve", "--model", str(tmp_path), "--profile", "async", "--max-body-mb", "64"]) == 0
    monkeypatch.setenv("MEDPIPE_SERVE_PROFILE", "async")
    assert cli.main(["serve", "--model", str(tmp_path)]) == 0
    monkeypatch.delenv("MEDPIPE_SERVE_PROFILE")
    assert cli.main(["serve", "--model", str(tmp_path)]) == 0
    given, from_env, default = seen
    assert (given.profile, given.max_body_mb, given.deadline_s) == ("async", 64.0, ASYNC_MAX_PROCESSING_S)
    assert (from_env.max_body_mb, from_env.max_requests) == (1024.0, ASYNC_MAX_CONCURRENT_INVOCATIONS)
    assert (default.profile, default.max_body_mb) == ("realtime", 6.0)
