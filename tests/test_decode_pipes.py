"""The decode pool's pipes: a decoded image fits in one write, and the pool decodes through them as before."""

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest

from medpipe.data.decodepool import PIPE_BYTES, DecodePool, DecodeSpec, _WidePipeContext, decode_item, pipe_bytes


def _jpeg(w: int = 600, h: int = 450) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_pool_pipes_hold_a_decoded_image():
    max_size = Path("/proc/sys/fs/pipe-max-size")
    if not max_size.is_file() or int(max_size.read_text()) < PIPE_BYTES:
        pytest.skip("this OS does not let a pipe grow to 1 MB (Linux pipe-max-size)")
    reader, writer = _WidePipeContext().Pipe(duplex=False)
    try:
        assert pipe_bytes(reader.fileno()) == pipe_bytes(writer.fileno()) == PIPE_BYTES
        assert PIPE_BYTES > 224 * 224 * 3 * 4  # several 224 px results, not one partial one
    finally:
        reader.close()
        writer.close()


def test_pool_decodes_through_wide_pipes_like_in_process():
    spec = DecodeSpec((224, 224), "bicubic")
    data = _jpeg()
    pool = DecodePool(spec, workers=1, timeout_s=60, memory_mb=512)
    try:
        pool.warm_up()

        async def both():
            return await asyncio.gather(pool.decode("bytes", data), pool.decode("bytes", b"not an image"))

        pixels, bad = asyncio.run(both())
    finally:
        pool.close()
    assert np.array_equal(pixels, decode_item(spec, "bytes", data)) and pixels.shape == (224, 224, 3)
    assert not isinstance(bad, np.ndarray) and "image" in str(bad).lower()
