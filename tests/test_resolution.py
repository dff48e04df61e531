"""Resolution within the budget: a training pixel cache larger than the training size (random resized crops from
it), the deterministic eval path at the training size (what serving decodes), and training at 96 px end to end."""

import json

import numpy as np
import pandas as pd
import pytest

from medpipe.cli import main
from medpipe.config import CROP_SCALE_LARGE_CACHE, make_config
from medpipe.errors import ConfigError
from medpipe.preprocess import Augmentation, PreprocessSpec, train_batch_preset


def test_cache_size_config_and_the_crop_it_implies():
    cfg = make_config({"image_size": 64, "cache-size": 96})
    assert cfg.train_cache_size == 96
    assert cfg.augmentation() == Augmentation(crop_scale=CROP_SCALE_LARGE_CACHE, source_size=96)
    # unset: the cache is the training size and there is no crop, as before the key existed
    assert make_config({}).augmentation() == Augmentation(crop_scale=1.0)
    # an explicit crop_scale wins over the implied one
    assert make_config({"cache_size": 96, "crop_scale": 0.35}).augmentation().crop_scale == 0.35
    assert make_config({"cache_size": 96, "crop_scale": 1}).augmentation().crop_scale == 1.0
    for bad in (48, -1):
        with pytest.raises(ConfigError, match="'cache_size' must be >= image_size"):
            make_config({"image_size": 64, "cache_size": bad})
    from medpipe.cli import build_parser
    from medpipe.cli_options import config_overrides

    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--cache-size", "128"])
    assert config_overrides(args)["cache_size"] == 128


def _gradient(n: int, side: int) -> np.ndarray:
    ramp = np.linspace(0, 255, side).round().astype(np.uint8)
    return np.broadcast_to(ramp[None, None, :, None], (n, side, side, 3)).copy()


def test_train_preset_cuts_random_resized_crops_from_the_larger_cache():
    """96 px in, 64 px out; seeded; with crops each image keeps only part of a full-width gradient (a smaller
    value range than the whole image resized), drawn anew per image."""
    spec = PreprocessSpec(image_size=64)
    images = _gradient(48, 96)
    crop = train_batch_preset(spec, Augmentation(crop_scale=0.6, color_jitter=0.0, source_size=96))
    whole = train_batch_preset(spec, Augmentation(crop_scale=1.0, color_jitter=0.0, source_size=96))
    a = crop.set_random_state(7)(images)
    assert tuple(a.shape) == (48, 3, 64, 64)
    assert np.array_equal(a.numpy(), crop.set_random_state(7)(images).numpy())
    b = whole.set_random_state(7)(images)
    assert tuple(b.shape) == (48, 3, 64, 64)

    def ranges(x):
        flat = x[:, 0].flatten(1)
        return (flat.max(1).values - flat.min(1).values).numpy()

    rc, rw = ranges(a), ranges(b)
    assert rc.mean() < rw.mean() - 0.04 * rw.max()  # a crop spans less of the gradient than the whole image
    assert len(np.unique(rc.round(3))) > 8  # each image its own crop


def test_cached_source_trains_from_the_larger_cache_and_evaluates_as_served(data_dir, tmp_path):
    """Training batches come from the cache_size cache; validation and test keep pixels at the training size,
    equal to what a served image decodes to; a shard set (one size) refuses cache_size."""
    import shutil

    from medpipe.train.data import CachedSource, _check_shards_match

    data = tmp_path / "data"
    shutil.copytree(data_dir, data, ignore=shutil.ignore_patterns("cache"))
    cfg = make_config({"model": "densenet-test", "image_size": 32, "cache_size": 48, "batch_size": 8,
                       "workers": 0, "threads": 1})
    source = CachedSource(data, cfg)
    try:
        assert source.train.pixels.shape[1:] == (48, 48, 3)
        assert source.val.pixels.shape[1:] == source.test.pixels.shape[1:] == (32, 32, 3)
        x, y = next(iter(source.epoch(0)))
        assert tuple(x.shape) == (8, 3, 32, 32) and len(y) == 8
        paths = dict(pd.read_csv(data / "records.csv")[["image_id", "path"]].itertuples(index=False))
        spec = PreprocessSpec(image_size=32)
        for i, image_id in enumerate(source.test.ids[:4]):
            assert np.array_equal(source.test.pixels[source.test.rows[i]], spec.read(paths[image_id]))
        # the cache key holds the size: two caches side by side, never one reused for the other
        assert len([p for p in (data / "cache").iterdir() if not p.name.startswith(".")]) == 2
    finally:
        source.close()
    with pytest.raises(ConfigError, match="--cache-size 48"):
        _check_shards_match("shards", {"image_size": 32, "interpolation": "bicubic"}, cfg)


def test_train_at_96_px_predict_serve_and_onnx_agree(data_dir, tmp_path, capsys):
    """densenet-test at 96 px from a 128 px cache: the package records 96 px; `medpipe predict` on the raw test
    images gives the probabilities the run's in-process test evaluation wrote (within 1e-4), and so do the
    server and the ONNX export."""
    import onnxruntime as ort
    from fastapi.testclient import TestClient

    from medpipe.infer.predictor import Predictor
    from medpipe.package import read_meta
    from medpipe.serve.app import ServeConfig, create_app

    run = tmp_path / "run"
    assert main(["train", "--data", str(data_dir), "--out", str(run), "--model", "densenet-test", "--image-size", "96",
                 "--cache-size", "128", "--batch-size", "8", "--epochs", "1", "--max-steps-per-epoch", "3",
                 "--bootstrap", "0", "--threads", "1", "--deterministic", "--workers", "0"]) == 0
    assert read_meta(run / "model").preprocessing.image_size == 96
    table = pd.read_csv(run / "report" / "predictions.csv")
    classes = [c for c in table.columns if c not in ("image_id", "label", "predicted")]
    paths = dict(pd.read_csv(data_dir / "records.csv")[["image_id", "path"]].itertuples(index=False))
    files = [paths[i] for i in table["image_id"][:4]]
    capsys.readouterr()
    assert main(["predict", "--model", str(run / "model"), "--json", *files]) == 0
    predicted = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    expected = table[classes].to_numpy()[:4]
    got = np.array([[p["probabilities"][c] for c in classes] for p in predicted])
    assert np.abs(got - expected).max() < 1e-4
    predictor = Predictor(run / "model")
    with open(files[0], "rb") as f:
        body = f.read()
    with TestClient(create_app(predictor, ServeConfig()).app) as c:
        r = c.post("/invocations", content=body, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200
    served = r.json()["predictions"][0]["probabilities"]
    assert max(abs(served[c] - expected[0][k]) for k, c in enumerate(classes)) < 1e-4
    onnx = tmp_path / "m.onnx"
    assert main(["export", "--model", str(run / "model"), "--format", "onnx", "--out", str(onnx)]) == 0
    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[2:] == [96, 96]
    pixels = [predictor.spec.read(p) for p in files]
    from medpipe.preprocess import eval_batch

    ref = predictor.logits(pixels).numpy()
    assert np.abs(sess.run(None, {"image": eval_batch(pixels, predictor.spec).numpy()})[0] - ref).max() < 1e-4
