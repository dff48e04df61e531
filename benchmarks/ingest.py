"""Ingest throughput with the full decode check versus a plain single-process Pillow loop.

    python benchmarks/ingest.py [--count 2000]

Both sides read every file, hash it with sha256 and fully decode it. The naive side is a plain
loop (Image.open + load + hashlib); medpipe's is ``medpipe.data.sources.ingest`` (metadata, the
defect checks, parallel decode on all cores, record table written). Same files, same run.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import synth_dataset, write_result  # noqa: E402


def naive(folder: Path) -> int:
    n = 0
    for p in sorted(folder.rglob("*.jpg")):
        data = p.read_bytes()
        hashlib.sha256(data).hexdigest()
        with Image.open(p) as im:
            im.load()
            im.convert("RGB")
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    from medpipe.data.sources import ingest

    folder = synth_dataset(args.count)
    naive(folder)  # warm the page cache for both sides
    t_naive, t_mp = [], []
    for _ in range(args.repeat):
        t = time.perf_counter()
        n = naive(folder)
        t_naive.append(time.perf_counter() - t)
        with tempfile.TemporaryDirectory() as out:
            t = time.perf_counter()
            rep = ingest(folder, out)
            t_mp.append(time.perf_counter() - t)
        assert rep["records"] == n == args.count, (rep["records"], n)
    naive_ips, mp_ips = n / min(t_naive), n / min(t_mp)
    ratio = mp_ips / naive_ips
    print(f"{'method':<32}{'images/s':>10}")
    print(f"{'naive loop (open+decode+hash)':<32}{naive_ips:>10.1f}")
    print(f"{'medpipe ingest':<32}{mp_ips:>10.1f}")
    print(f"ratio medpipe/naive = {ratio:.2f}x  (target >= 1.5x)  on {n} 600x450 JPEGs")
    path = write_result("ingest", {"images": n, "naive_images_per_s": naive_ips, "medpipe_images_per_s": mp_ips,
                                   "ratio": ratio, "target": 1.5})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
