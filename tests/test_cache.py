import numpy as np

from medpipe.data import imageio
from medpipe.data.cache import build_cache
from medpipe.data.sources import load_records


def test_cache_equals_direct_decode_and_is_reused(data_dir, tmp_path):
    table, _ = load_records(data_dir)
    c1 = build_cache(table, tmp_path, (32, 32), "bicubic", workers=2)
    assert c1.pixels.shape == (len(table), 32, 32, 3) and c1.pixels.dtype == np.uint8
    for rec in table.head(5).itertuples():
        direct = imageio.read_image(rec.path, size=(32, 32), interpolation="bicubic")
        np.testing.assert_array_equal(c1.get(rec.image_id), direct)
    mtime = (c1.folder / "pixels.npy").stat().st_mtime_ns
    c2 = build_cache(table, tmp_path, (32, 32), "bicubic")
    assert c2.folder == c1.folder and (c2.folder / "pixels.npy").stat().st_mtime_ns == mtime
    # any change in size, interpolation or file content gives a different cache
    assert build_cache(table, tmp_path, (24, 24), "bicubic", workers=1).folder != c1.folder
    assert build_cache(table, tmp_path, (32, 32), "bilinear", workers=1).folder != c1.folder
    changed = table.copy()
    changed.loc[0, "sha256"] = "0" * 64
    assert build_cache(changed, tmp_path, (32, 32), "bicubic", workers=1).folder != c1.folder
    assert not list(tmp_path.glob(".*tmp*"))
