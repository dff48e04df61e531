"""Peak memory of `medpipe serve --profile async` answering a 24 MP camera JPEG: a stated bound, measured.

The bound (docs/guides/serving.md): answering a 9.8 MB 6000x4000 JPEG raises the peak resident size of
the server and its decode process together by less than ``BOUND_MB`` over their peak after warm-up. The
body is spooled to a file past ``--spool-mb`` and the JPEG decoded at a reduced DCT scale, so the rise is a
few MB; decoding every pixel would hold a 72 MB RGB array alone (6000 x 4000 x 3), so a regression of
either (the body held in memory and copied, or a full decode) breaks the bound.
"""

import re
from pathlib import Path

import pytest

from tests._server import Server
from tests.conftest import untrained_package
from tests.test_large_images import camera_jpeg

BOUND_MB = 48  # below the 72 MB a full decode of the pixels alone would take


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the decode processes), from /proc."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def _peaks_mb(pid: int) -> dict[int, float]:
    """VmHWM (peak resident size, MB) of the server and each of its descendants."""
    peaks = {}
    for p in _tree(pid):
        try:
            m = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{p}/status").read_text())
        except OSError:
            continue
        if m:
            peaks[p] = int(m.group(1)) / 1024
    return peaks


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc to read peak RSS")
def test_async_profile_answers_24mp_jpeg_within_the_stated_peak_rss(tmp_path):
    package = untrained_package(tmp_path / "pkg", name="large-rss", image_size=64)
    big, small = camera_jpeg(), camera_jpeg(640, 480, seed=1)
    assert len(big) > 6 * 2**20  # over the real-time cap: only the async profile takes it
    spool = tmp_path / "spool"
    spool.mkdir()
    server = Server(package, "--backend", "eager", "--profile", "async", "--decode-workers", "1",
                    log=tmp_path / "serve.log", env={"TMPDIR": str(spool)})
    try:
        server.wait_ready()
        for _ in range(2):  # warm-up: model, decode process, allocator pools
            assert server.invoke(small)[0] == 200
        before = _peaks_mb(server.proc.pid)
        assert len(before) >= 2, before  # the server and its decode process
        st, _, body = server.invoke(big, timeout=120)
        assert st == 200, body[:300]
        after = _peaks_mb(server.proc.pid)
    finally:
        server.stop()
    assert "Traceback" not in server.log_text()
    grew = sum(after[p] - before.get(p, 0.0) for p in after)
    print(f"peak RSS {sum(before.values()):.0f} -> {sum(after.values()):.0f} MB (+{grew:.1f}; per process "
          f"{ {p: round(after[p] - before.get(p, 0.0), 1) for p in after} }) for a {len(big) / 1e6:.1f} MB JPEG")
    assert grew < BOUND_MB, (before, after)
