"""Recipe options of issue 15 (each off by default): Shades-of-Gray colour constancy (part of the package's
preprocessing), random resized crop and colour-jitter strength (train preset only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medpipe.preprocess import (KEY, Augmentation, PreprocessSpec, eval_batch, eval_preset, flip_averaged,
                                shades_of_gray, train_batch_preset, train_preset)


def _lesion_like(seed: int = 0, n: int = 6, size: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for _ in range(n):
        r = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) ** 0.5
        skin = np.array([200, 160, 140]) + rng.normal(0, 8, (size, size, 3))
        lesion = np.array([110, 70, 50]) + rng.normal(0, 8, (size, size, 3))
        img = np.where((r < rng.uniform(6, 14))[..., None], lesion, skin)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


def test_flip_averaged_is_the_mean_over_the_image_and_its_three_flips():
    """The one flip-TTA helper evaluation and serving share: a position-dependent forward shows every flip
    is taken once (horizontal, vertical, both) and the sum divided by four."""
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    w = torch.randn(3 * 4 * 5, 7, generator=torch.Generator().manual_seed(0))
    forward = lambda t: t.flatten(1) @ w  # noqa: E731
    want = (forward(x) + forward(x.flip(3)) + forward(x.flip(2)) + forward(x.flip(2).flip(3))) / 4
    torch.testing.assert_close(flip_averaged(forward, x), want)
    assert not torch.allclose(flip_averaged(forward, x), forward(x))


def test_shades_of_gray_removes_a_colour_cast():
    """The same lesion photographed under a warm and a cool illuminant gives the same corrected colours
    (up to overall brightness, which Shades-of-Gray keeps), and each corrected image's channel p-means
    are equal (a grey illuminant)."""
    imgs = torch.from_numpy(_lesion_like()).permute(0, 3, 1, 2).float() / 255
    warm = (imgs * torch.tensor([1.0, 0.85, 0.7])[:, None, None]).clamp(0, 1)
    cool = (imgs * torch.tensor([0.7, 0.85, 1.0])[:, None, None]).clamp(0, 1)
    a, b = shades_of_gray(warm), shades_of_gray(cool)

    def chroma(x):
        return x / x.mean(dim=(1, 2, 3), keepdim=True)

    assert float((chroma(warm) - chroma(cool)).abs().mean()) > 0.2
    assert float((chroma(a) - chroma(b)).abs().mean()) < 0.01
    e = a.pow(6).mean(dim=(-2, -1)).pow(1 / 6)
    assert float((e.max(1).values - e.min(1).values).max()) < 0.02
    # one image (CHW) gets the same as in a batch
    assert torch.allclose(shades_of_gray(warm[2]), a[2])


def test_spec_round_trip_and_old_packages():
    spec = PreprocessSpec(image_size=40, color_constancy="shades_of_gray")
    d = spec.to_dict()
    assert d["color_constancy"] == "shades_of_gray"
    assert PreprocessSpec.from_dict(d) == spec
    old = {k: v for k, v in d.items() if not k.startswith("color_constancy")}
    assert PreprocessSpec.from_dict(old).color_constancy == "none"


def test_batch_presets_equal_per_image_presets_with_every_option():
    """The per-batch path stays bit-identical to the per-image MONAI preset with the recipe options on."""
    spec = PreprocessSpec(image_size=40, color_constancy="shades_of_gray")
    aug = Augmentation(crop_scale=0.35, color_jitter=2.0)
    imgs = _lesion_like(1, n=10)
    per_image = train_preset(spec, aug)
    per_image.set_random_state(seed=5)
    ref = torch.stack([per_image({KEY: np.array(im)})[KEY] for im in imgs])
    got = train_batch_preset(spec, aug).set_random_state(5)(imgs)
    assert got.shape == (10, 3, 40, 40) and torch.equal(got, ref)
    plain = train_batch_preset(spec).set_random_state(5)(imgs)
    assert not torch.equal(got, plain)  # the crop and the stronger jitter changed the batch
    ev = eval_preset(spec)
    assert torch.equal(eval_batch(imgs, spec), torch.stack([ev({KEY: np.array(im)})[KEY] for im in imgs]))
    assert not torch.equal(eval_batch(imgs, spec), eval_batch(imgs, PreprocessSpec(image_size=40)))


def test_random_resized_crop_zooms_in():
    """With crop_scale < 1 images are crops blown up: neighbouring pixels get closer in value (an upsampled
    crop is smoother than the original noise), while the default preset keeps the pixel grid."""
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 256, (16, 40, 40, 3), dtype=np.uint8)
    spec = PreprocessSpec(image_size=40)
    quiet = Augmentation(crop_scale=0.25, color_jitter=0.0)
    cropped = train_batch_preset(spec, quiet).set_random_state(0)(noise)
    plain = train_batch_preset(spec, Augmentation(color_jitter=0.0)).set_random_state(0)(noise)

    def roughness(x):
        return float((x[..., 1:] - x[..., :-1]).abs().mean())

    assert roughness(cropped) < 0.8 * roughness(plain)


def test_config_keys_validated_by_name():
    from medpipe.config import make_config
    from medpipe.errors import ConfigError

    cfg = make_config({"color-constancy": "shades_of_gray", "crop_scale": 0.4, "color_jitter": 2})
    assert cfg.preprocess().color_constancy == "shades_of_gray"
    assert cfg.augmentation() == Augmentation(crop_scale=0.4, color_jitter=2.0)
    assert make_config({}).augmentation() == Augmentation()  # off by default
    for key, bad in (("color_constancy", "grey_world"), ("crop_scale", 0.0), ("color_jitter", -1)):
        with pytest.raises(ConfigError, match=key):
            make_config({key: bad})


def test_predictor_applies_colour_constancy_from_the_package(tmp_path):
    """Serving builds its preprocessing from the package: a package trained with colour constancy
    corrects each request's colours the same way."""
    from medpipe.infer.predictor import Predictor
    from medpipe.models import create_model
    from medpipe.package import save_package

    torch.manual_seed(0)
    model = create_model("resnet18", 7).eval()
    spec = PreprocessSpec(image_size=40, color_constancy="shades_of_gray")
    save_package(tmp_path / "pkg", model, name="t", arch="resnet18", classes=list("abcdefg"), spec=spec)
    pred = Predictor(tmp_path / "pkg", device="cpu")
    assert pred.spec.color_constancy == "shades_of_gray"
    imgs = _lesion_like(4, n=3)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    x = (shades_of_gray(x) - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(spec.std)[:, None, None]
    with torch.inference_mode():
        ref = model(x)
    assert torch.allclose(pred.logits(imgs), ref, atol=1e-4)


def test_mixup_and_cutmix_targets_match_what_was_mixed():
    """Image i is 1 in channel i only, so a mixed image shows which images went in and in what share;
    its soft target must be the same blend of their labels."""
    from medpipe.recipe import MixBatches

    n = 8
    x = torch.zeros(n, n, 16, 16)
    x[torch.arange(n), torch.arange(n)] = 1.0
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0])
    onehot = torch.nn.functional.one_hot(y, 7).float()
    for handler in (MixBatches(7, mixup_alpha=0.4, seed=1), MixBatches(7, cutmix_alpha=1.0, seed=2)):
        for step in range(4):
            xm, ym = handler.mix(x, y, step=step)
            assert ym.shape == (n, 7) and torch.allclose(ym.sum(1), torch.ones(n))
            share = xm.mean(dim=(2, 3))  # (n images, n sources): how much of each source image is in each
            assert torch.allclose(share.sum(1), torch.ones(n))
            assert torch.allclose(ym, share @ onehot, atol=1e-5)
            assert (share.max(1).values < 1).any()  # something was mixed
    mixup = MixBatches(7, mixup_alpha=0.4, seed=1)
    a, b, c = mixup.mix(x, y, step=3)[0], mixup.mix(x, y, step=3)[0], mixup.mix(x, y, step=4)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)  # seeded by the global step: a resume mixes the same
    off = MixBatches(7, mixup_alpha=0.4, prob=0.0)
    assert off.mix(x, y, step=0)[1] is y


def test_recipe_handlers_from_config(tmp_path):
    from medpipe.config import make_config
    from medpipe.errors import ConfigError
    from medpipe.recipe import MixBatches, WeightEMA, handlers

    assert handlers(make_config({"mixup_alpha": 0, "ema_decay": 0}), 7) == []
    # the default recipe mixes (mixup 0.2 on every batch) and averages the weights (EMA 0.999)
    mix, ema = handlers(make_config({}), 7, tmp_path)
    assert isinstance(mix, MixBatches) and mix.mixup_alpha == 0.2 and mix.cutmix_alpha == 0 and mix.prob == 1
    assert isinstance(ema, WeightEMA) and ema.decay == 0.999
    hs = handlers(make_config({"mixup_alpha": 0, "ema_decay": 0, "cutmix_alpha": 1.0, "mix_prob": 0.5}), 7)
    assert len(hs) == 1 and isinstance(hs[0], MixBatches) and hs[0].prob == 0.5
    with pytest.raises(ConfigError, match="mix_prob"):
        make_config({"mix_prob": 1.5})


def test_focal_loss_takes_mixed_targets():
    """Focal loss with the default mixup: soft targets go in as they are; for a one-hot target the loss is the
    class-index one, and for a blend it is the same blend of the two one-hot losses (linear in the target)."""
    import numpy as np

    from medpipe.config import make_config
    from medpipe.train.factories import make_loss

    cfg = make_config({"imbalance": "focal"})  # mixup on by default: no longer refused
    assert cfg.mixup_alpha > 0
    loss = make_loss(cfg, np.array([50, 10, 5, 3, 30, 200, 2]), "cpu")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 7, generator=g)
    a, b = torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([6, 5, 4, 3, 2, 1])
    oh = lambda y: torch.nn.functional.one_hot(y, 7).float()  # noqa: E731
    assert torch.allclose(loss(logits, oh(a)), loss(logits, a), atol=1e-6)
    lam = 0.3
    assert torch.allclose(loss(logits, lam * oh(a) + (1 - lam) * oh(b)),
                          lam * loss(logits, a) + (1 - lam) * loss(logits, b), atol=1e-6)


def test_a_real_run_with_every_recipe_option(data_dir, tmp_path):
    """The options reach a real training run: batches are mixed (soft targets reach the loss), the package's
    spec carries the colour constancy, and its decision rule is the configured one."""
    import json

    from medpipe.config import make_config
    from medpipe.pipeline import run
    from medpipe.train.engine import Events

    seen = []

    class Spy:
        def attach(self, engine):
            engine.on(Events.ITERATION_STARTED, lambda e: seen.append(tuple(e.state.batch[1].shape)))

    cfg = make_config({"model": "densenet-test", "image_size": 32, "batch_size": 8, "epochs": 1, "max_steps_per_epoch": 3,
                       "bootstrap": 0, "threads": 1, "workers": 0, "color_constancy": "shades_of_gray",
                       "crop_scale": 0.5, "color_jitter": 1.5, "mixup_alpha": 0.4, "cutmix_alpha": 1.0,
                       "label_smoothing": 0.1, "decision_rule": "prior", "tta": True})
    out = run(data_dir, tmp_path / "run", cfg, handlers=[Spy()], evaluate_test=True)
    assert seen and all(len(s) == 2 and s[1] == 7 for s in seen)  # (N, 7) soft targets on every step
    meta = json.loads((Path(out["model_dir"]) / "model.json").read_text())
    assert meta["preprocessing"]["color_constancy"] == "shades_of_gray"
    assert meta["decision"]["default"] == "prior" and set(meta["decision"]["rules"]) >= {"argmax", "prior"}
    assert meta["training_config"]["mixup_alpha"] == 0.4

    # flip TTA has a calibration of its own, fitted on TTA validation logits, used whenever flips are averaged
    import numpy as np
    import torch

    from medpipe.infer.predictor import Predictor
    from medpipe.train.data import CachedSource
    from medpipe.calibration import fit_temperature
    from medpipe.train.engine import predict_logits

    cal = meta["calibration"]["tta"]
    assert cal["temperature"] > 0 and cal["decision"]["default"] == "prior"
    src = CachedSource(data_dir, cfg)
    try:
        val = src.val
        pred = Predictor(Path(out["model_dir"]))
        logits = predict_logits(pred.model, val.pixels, val.rows, pred.spec, torch.device("cpu"), tta=True)
        assert fit_temperature(logits, torch.from_numpy(val.labels)) == pytest.approx(cal["temperature"], rel=1e-4)
        px = val.pixels[val.rows[:6]]
        want = torch.softmax(logits[:6] / cal["temperature"], 1).numpy()
        np.testing.assert_allclose(pred.probabilities(px, tta=True), want, rtol=1e-4, atol=1e-6)
        plain = torch.softmax(predict_logits(pred.model, px, np.arange(6), pred.spec, torch.device("cpu"))
                              / meta["calibration"]["temperature"], 1).numpy()
        np.testing.assert_allclose(pred.probabilities(px, tta=False), plain, rtol=1e-4, atol=1e-6)
    finally:
        src.close()
    report = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    assert report["tta"] is True and report["calibrated_for_tta"] is True


def _ema_cfg():
    from medpipe.config import make_config

    return make_config({"model": "densenet-test", "image_size": 32, "batch_size": 8, "epochs": 2, "max_steps_per_epoch": 3,
                        "bootstrap": 0, "threads": 1, "workers": 0, "deterministic": True, "ema_decay": 0.9,
                        "warmup_epochs": 0.5})


class _CrashAfterEpoch:
    """Fail the run right after epoch ``n``'s checkpoint (attached after the checkpointer)."""

    def __init__(self, n: int):
        self.n = n

    def attach(self, engine):
        from medpipe.train.engine import Events

        engine.on(Events.VALIDATION_COMPLETED, self)

    def __call__(self, engine):
        if engine.state.epoch == self.n:
            raise RuntimeError("simulated crash after the epoch-end checkpoint")


def test_weight_ema_is_validated_packaged_and_resumes_exactly(data_dir, tmp_path):
    """With ema_decay the package holds the averaged weights (not the raw ones training continued from);
    a run stopped after an epoch end, one stopped mid-epoch by SIGTERM, and a stopped run of the previous
    checkpoint layout (the average in ema.pt) resume to the same weights as a straight run."""
    import shutil
    import sys

    from safetensors.torch import load_file

    from medpipe.pipeline import run
    from medpipe.train.checkpoint import load_checkpoint, save_checkpoint
    from medpipe.train.engine import TrainingInterrupted

    sys.path.insert(0, str(Path(__file__).parent))
    from faults import SigtermAtStep

    straight = run(data_dir, tmp_path / "a", _ema_cfg(), evaluate_test=False)
    last = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    ema = last["parts"]["ema"]  # the average is part of the checkpoint, never a file beside it
    assert not (tmp_path / "a" / "checkpoints" / "ema.pt").exists()
    k = "class_layers.out.weight" if "class_layers.out.weight" in ema["ema"] else next(
        n for n, v in ema["ema"].items() if v.dtype.is_floating_point and v.ndim == 2)
    assert torch.equal(last["model"][k], ema["ema"][k])  # the epoch-end checkpoint holds the average...
    assert not torch.equal(ema["raw"][k], ema["ema"][k])  # ...which differs from the raw weights
    packaged = load_file(Path(straight["model_dir"]) / "weights.safetensors")
    best = load_checkpoint(tmp_path / "a" / "checkpoints" / "best.pt")
    assert torch.equal(packaged[k], best["model"][k])

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(data_dir, tmp_path / "b", _ema_cfg(), evaluate_test=False, handlers=[_CrashAfterEpoch(1)])
    # a run of the previous version kept the average in checkpoints/ema.pt beside a last.pt without parts
    shutil.copytree(tmp_path / "b", tmp_path / "d")
    ck = load_checkpoint(tmp_path / "d" / "checkpoints" / "last.pt")
    part = ck.pop("parts").pop("ema")
    save_checkpoint(tmp_path / "d" / "checkpoints" / "ema.pt", {**part, "global_step": ck["global_step"]})
    save_checkpoint(tmp_path / "d" / "checkpoints" / "last.pt", ck)
    run(data_dir, tmp_path / "b", _ema_cfg(), evaluate_test=False, resume=True)
    run(data_dir, tmp_path / "d", _ema_cfg(), evaluate_test=False, resume=True)
    with pytest.raises(TrainingInterrupted):
        run(data_dir, tmp_path / "c", _ema_cfg(), evaluate_test=False, handlers=[SigtermAtStep(5)])
    assert load_checkpoint(tmp_path / "c" / "checkpoints" / "last.pt")["parts"]["ema"]["raw"] is None  # mid-epoch
    run(data_dir, tmp_path / "c", _ema_cfg(), evaluate_test=False, resume=True)
    for other in ("b", "c", "d"):
        got = load_file(tmp_path / other / "model" / "weights.safetensors")
        for name in packaged:
            torch.testing.assert_close(got[name], packaged[name], rtol=0, atol=0, msg=f"{other}: {name}")
        # the package may be an epoch from before the stop: the last checkpoint's average and raw weights
        # (both after the stop) must match too
        end = load_checkpoint(tmp_path / other / "checkpoints" / "last.pt")
        for part, want, got in (("model", last["model"], end["model"]),
                                ("raw", ema["raw"], end["parts"]["ema"]["raw"])):
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=f"{other} {part}: {name}")
