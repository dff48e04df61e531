"""The preprocessing contract, one object: the spec stored in every package (decode, resize and
normalise rules), array preparation, and the train/eval presets built from it (medpipe.package
stores the spec in ``model.json`` and reads it back as ``PackageMeta.preprocessing``).

Both presets start from the pixels :func:`medpipe.data.imageio.decode_image` returns (RGB uint8,
HWC, already resized to ``spec.image_size`` — in the pixel cache or from raw bytes, identically)
under the key ``"image"`` and end with a normalised float32 CHW tensor. The eval preset is
deterministic; its parameters are the :class:`PreprocessSpec` stored in every model
package, so evaluate, predict, serve and batch all build it from the package, never by hand.

Dermoscopy has no canonical orientation, so the train preset flips on both axes, rotates by
multiples of 90 degrees, applies a small affine (rotation, zoom) and jitters colour and intensity.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # annotations only: importing this module loads neither torch nor MONAI
    import torch
    from monai.transforms import Compose

import functools
from dataclasses import dataclass
import math

import numpy as np

from medpipe.data import imageio


INTERPOLATIONS = tuple(sorted(imageio.RESAMPLE_NAMES))


@dataclass(frozen=True)
class PreprocessSpec:
    """What the model needs from an image; stored in the package, used by every inference path.

    The whole contract, in the order it is applied (``describe()`` writes the same as text for
    exports that travel without medpipe, e.g. the ONNX file's metadata):

    1. decode with Pillow (:func:`medpipe.data.imageio.decode_image`); for a JPEG first
       ``img.draft("RGB", (image_size, image_size))`` (libjpeg decodes at the smallest DCT scale
       1/1, 1/2, 1/4 or 1/8 that keeps both sides >= image_size), then EXIF orientation, then RGB;
    2. resize to image_size x image_size with Pillow's ``interpolation`` filter, ``reducing_gap=None``
       (skipped when the image already has that size);
    3. uint8 HWC -> float32 CHW, divided by 255; Shades-of-Gray colour constancy when
       ``color_constancy`` says so (:func:`shades_of_gray`); then ``(x - mean) / std`` per channel.
    """

    image_size: int = 64
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # "shades_of_gray": Shades-of-Gray colour constancy (Minkowski p-norm) on every image, train and eval
    color_constancy: str = "none"
    color_constancy_power: float = 6.0

    def __post_init__(self):
        if self.interpolation not in imageio.RESAMPLE_NAMES:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if not 8 <= int(self.image_size) <= 4096:
            raise ValueError(f"image_size must be between 8 and 4096, got {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std must each have 3 values, std > 0")
        if self.color_constancy not in COLOR_CONSTANCY:
            raise ValueError(f"color_constancy must be one of {COLOR_CONSTANCY}, got {self.color_constancy!r}")

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the model input."""
        return (int(self.image_size), int(self.image_size))

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "interpolation": self.interpolation,
                "mean": list(self.mean), "std": list(self.std), "color_constancy": self.color_constancy,
                "color_constancy_power": self.color_constancy_power, "input": "RGB uint8 HWC, resized to "
                "image_size x image_size, scaled to [0,1], colour constancy if set, normalised per channel"}

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        return cls(image_size=int(d["image_size"]), interpolation=str(d["interpolation"]),
                   mean=tuple(float(x) for x in d["mean"]), std=tuple(float(x) for x in d["std"]),
                   color_constancy=str(d.get("color_constancy", "none")),  # packages from before the key
                   color_constancy_power=float(d.get("color_constancy_power", 6.0)))

    def describe(self) -> dict:
        """The contract as plain data, for exports read without medpipe (ONNX metadata, bundle docs)."""
        s = self.image_size
        return {**self.to_dict(),
                "decode": f"Pillow; JPEG: Image.draft('RGB', ({s}, {s})) before load (DCT-domain downscale to the "
                          f"smallest scale keeping both sides >= {s}); then ImageOps.exif_transpose, convert('RGB')",
                "resample": imageio.resample_filter(self.interpolation).name,
                "resize": f"Image.resize(({s}, {s}), Image.Resampling.{imageio.resample_filter(self.interpolation).name}"
                          ", reducing_gap=None), skipped when already that size",
                "normalise": "float32 CHW = (uint8 HWC transposed / 255 - mean) / std per channel"
                             + ("" if self.color_constancy == "none" else
                                f"; before subtracting the mean, Shades-of-Gray: e = per-channel mean(x ** "
                                f"{self.color_constancy_power:g}) ** (1 / {self.color_constancy_power:g}), "
                                "e /= ||e||, x = clip(x / (e * sqrt(3)), 0, 1)"),
                "layout": f"NCHW float32, N x 3 x {s} x {s}"}

    def describe_lines(self) -> list[str]:
        """The contract as markdown bullet lines, for model cards (the MONAI bundle's README)."""
        d = self.describe()
        return [*(f"- {k}: {d[k]}" for k in ("decode", "resize", "normalise")),
                f"- mean {list(self.mean)}, std {list(self.std)}"]

    # -- the decode half of the contract -------------------------------------------------------
    def decode(self, data: bytes, name: str | None = None, *,
               max_pixels: int = imageio.DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Encoded image bytes -> resized RGB uint8 HWC (the same function fills the training cache)."""
        return imageio.decode_image(data, name, max_pixels=max_pixels, size=self.size,
                                    interpolation=self.interpolation)

    def read(self, path, *, max_pixels: int = imageio.DEFAULT_MAX_PIXELS) -> np.ndarray:
        """A file -> resized RGB uint8 HWC; errors name the file."""
        return imageio.read_image(path, max_pixels=max_pixels, size=self.size, interpolation=self.interpolation)

    def prepare_array(self, arr: np.ndarray, *, max_pixels: int = imageio.DEFAULT_MAX_PIXELS) -> np.ndarray:
        """An in-memory image (HW, HWC or CHW; uint8, or float in [0,1] or [0,255]) -> resized RGB uint8 HWC.

        The rules live in :func:`medpipe.data.imageio.prepare_array` (torch-free: the service's decode
        processes run them too); an array with an empty side is refused."""
        return imageio.prepare_array(arr, self.size, self.interpolation, max_pixels)


@functools.lru_cache(maxsize=1)
def _load_preprocessd_class() -> type:
    """Built on first use so that importing this module imports neither MONAI nor torch."""
    from monai.transforms import MapTransform

    class LoadPreprocessd(MapTransform):
        """MONAI dictionary transform: an image file path -> the spec's decoded, resized RGB uint8 HWC pixels.

        The MONAI bundle export uses it as its loader, so a bundle run reproduces medpipe's pixels exactly
        (MONAI's ``LoadImaged`` + ``Resized`` resize with torch, not Pillow, and skip the JPEG draft decode).
        With ``error_key``, an unreadable image does not stop the run: its pixels are black and
        ``data[error_key]`` holds the reason naming the file (``""`` for a good image), for the writer to report."""

        def __init__(self, keys, image_size: int, interpolation: str, mean=PreprocessSpec.mean, std=PreprocessSpec.std,
                     max_pixels: int = imageio.DEFAULT_MAX_PIXELS, error_key: str | None = None,
                     allow_missing_keys: bool = False):
            super().__init__(keys, allow_missing_keys)
            use_plain_tensors()
            self.spec = PreprocessSpec(int(image_size), str(interpolation), tuple(mean), tuple(std))
            self.max_pixels = int(max_pixels)
            self.error_key = error_key

        def __call__(self, data):
            d = dict(data)
            if self.error_key:
                d[self.error_key] = ""
            for key in self.key_iterator(d):
                try:
                    pixels = self.spec.read(d[key], max_pixels=self.max_pixels)
                except imageio.ImageError as exc:
                    if not self.error_key:
                        raise
                    d[self.error_key] = f"{exc.code}: {exc}"
                    pixels = np.zeros((*self.spec.size, 3), np.uint8)
                d[key] = pixels if pixels.flags.writeable else pixels.copy()  # torch warns on read-only arrays
            return d

    LoadPreprocessd.__module__, LoadPreprocessd.__qualname__ = __name__, "LoadPreprocessd"
    return LoadPreprocessd


def __getattr__(name: str):
    # ``medpipe.preprocess.LoadPreprocessd`` (a MONAI bundle's ``_target_``) resolves here, lazily.
    if name == "LoadPreprocessd":
        return _load_preprocessd_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


KEY = "image"


def use_plain_tensors() -> None:
    """Switch off MONAI's per-tensor metadata tracking (``monai.data.set_track_meta(False)``): medpipe
    never needs it and it costs ~4x per item on small images. Idempotent; called by whatever builds or
    runs medpipe's MONAI transforms (the presets, the ``Predictor`` and training ``Engine`` constructors,
    the bundle loader), never at import, so importing medpipe leaves MONAI's global setting alone."""
    from monai.data import set_track_meta

    set_track_meta(False)


COLOR_CONSTANCY = ("none", "shades_of_gray")


def shades_of_gray(x: torch.Tensor, power: float = 6.0) -> torch.Tensor:
    """Shades-of-Gray colour constancy (Finlayson & Trezzi 2004; used for dermoscopy by Barata et al.
    2015 and the ISIC 2018-2019 winners): estimate the illuminant per channel as the Minkowski p-mean
    of the image, then rescale the channels so that illuminant becomes grey. ``x``: float in [0, 1],
    CHW or NCHW (each image gets its own estimate); returns the same shape, clipped to [0, 1]."""
    e = x.clamp(min=0).pow(power).mean(dim=(-2, -1), keepdim=True).pow(1.0 / power)  # (.., C, 1, 1)
    e = e / e.norm(dim=-3, keepdim=True).clamp(min=1e-6)
    return (x / (e * math.sqrt(3.0)).clamp(min=1e-6)).clamp(0.0, 1.0)


def _head(batch: bool = False, spec: "PreprocessSpec | None" = None) -> list:
    """uint8 HWC (or NHWC for a batch) -> float32 CHW (NCHW) in [0, 1] (colour-corrected if the spec says so)."""
    import torch
    from monai.transforms import EnsureTyped, Lambdad, ScaleIntensityRanged, Transposed

    use_plain_tensors()
    head = [
        Transposed(keys=KEY, indices=(0, 3, 1, 2) if batch else (2, 0, 1)),
        EnsureTyped(keys=KEY, data_type="tensor", dtype=torch.float32, track_meta=False),
        ScaleIntensityRanged(keys=KEY, a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True),
    ]
    if spec is not None and spec.color_constancy == "shades_of_gray":
        head.append(Lambdad(keys=KEY, func=functools.partial(shades_of_gray, power=spec.color_constancy_power)))
    elif spec is not None and spec.color_constancy != "none":
        raise ValueError(f"color_constancy must be one of {COLOR_CONSTANCY}, got {spec.color_constancy!r}")
    return head


def _normalise(spec: PreprocessSpec):
    from monai.transforms import NormalizeIntensityd

    # (C, 1, 1) broadcasts over CHW and over NCHW alike
    return NormalizeIntensityd(keys=KEY, subtrahend=np.asarray(spec.mean, np.float32)[:, None, None],
                               divisor=np.asarray(spec.std, np.float32)[:, None, None])


def _clamp_unit(x):
    return x.clamp(0.0, 1.0)


def _clamp01():
    from monai.transforms import Lambdad

    # a module-level function, not a lambda: DataLoader workers started by spawn/forkserver (the default
    # from Python 3.14, and in any process that was itself spawned) pickle the transforms
    return Lambdad(keys=KEY, func=_clamp_unit)


@dataclass(frozen=True)
class Augmentation:
    """Options of the train preset only (training config keys; not part of the package's spec).

    ``crop_scale`` < 1: a random resized crop first (MONAI ``RandScaleCropd`` with a random size: each side
    sqrt(crop_scale)..1 of the image drawn on its own, so the area is crop_scale..1 and the aspect ratio varies,
    at a random centre), resized to the input size; 1 = off.
    ``source_size``: the side of the images the preset is given (the training pixel cache, ``cache_size``); 0 or
    the input size: the images already have the input size. Larger: the crop (or, at ``crop_scale`` 1, the whole
    image) is resized down to the input size, anti-aliased, so the crop keeps detail a crop of an input-size
    image would have to invent by upsampling.
    ``color_jitter``: multiplies the strength of the colour, brightness and contrast jitter (1 = the
    default preset, 0 = none, 2 = twice as strong)."""

    crop_scale: float = 1.0
    color_jitter: float = 1.0
    source_size: int = 0

    def __post_init__(self):
        if not 0.05 <= self.crop_scale <= 1.0:
            raise ValueError(f"crop_scale must be in [0.05, 1], got {self.crop_scale}")
        if not 0.0 <= self.color_jitter <= 5.0:
            raise ValueError(f"color_jitter must be in [0, 5], got {self.color_jitter}")
        if self.source_size < 0:
            raise ValueError(f"source_size must be >= 0, got {self.source_size}")


def _augment(spec: PreprocessSpec, aug: Augmentation | None = None) -> list:
    """The random part of the train preset: each image draws its own parameters."""
    from monai.transforms import (RandAdjustContrastd, RandAffined, RandFlipd, RandRotate90d, RandScaleCropd,
                                  RandScaleIntensityd, RandShiftIntensityd, Resized)

    aug = aug or Augmentation()
    size = (spec.image_size, spec.image_size)
    larger = aug.source_size > spec.image_size
    steps = []
    if aug.crop_scale < 1.0:
        side = math.sqrt(aug.crop_scale)
        steps.append(RandScaleCropd(keys=KEY, roi_scale=side, max_roi_scale=1.0, random_center=True,
                                    random_size=True))
    if aug.crop_scale < 1.0 or larger:
        # a crop never smaller than the input (from a large enough cache) is shrunk by area averaging (each output
        # pixel the mean of its footprint: anti-aliased, as Pillow's filters shrink the served images, and ~100x
        # cheaper than MONAI's Gaussian anti-aliasing); a crop that may be smaller is resized bilinearly
        shrinks = aug.source_size * math.sqrt(aug.crop_scale) >= spec.image_size
        steps.append(Resized(keys=KEY, spatial_size=size, mode="area" if larger and shrinks else "bilinear",
                             anti_aliasing=False))
    steps += [
        RandFlipd(keys=KEY, prob=0.5, spatial_axis=0),
        RandFlipd(keys=KEY, prob=0.5, spatial_axis=1),
        RandRotate90d(keys=KEY, prob=0.75, max_k=3, spatial_axes=(0, 1)),
        # cache_grid: the base sampling grid is built once, not per image (same output, ~25% faster)
        RandAffined(keys=KEY, prob=0.5, rotate_range=(math.radians(15),), scale_range=((-0.1, 0.15),),
                    mode="bilinear", padding_mode="reflection", cache_grid=True, spatial_size=size),
    ]
    j = aug.color_jitter
    if j > 0:
        steps += [
            RandScaleIntensityd(keys=KEY, factors=0.1 * j, prob=0.8, channel_wise=True),  # per-channel colour jitter
            RandShiftIntensityd(keys=KEY, offsets=0.05 * j, prob=0.5),  # brightness
            RandAdjustContrastd(keys=KEY, gamma=(0.8 ** j, 1.25 ** j), prob=0.5),
        ]
    return steps


def eval_preset(spec: PreprocessSpec) -> Compose:
    """One image: uint8 HWC -> normalised float32 CHW."""
    from monai.transforms import Compose

    return Compose([*_head(spec=spec), _normalise(spec)])


def train_preset(spec: PreprocessSpec, aug: Augmentation | None = None) -> Compose:
    """One image, augmented: uint8 HWC -> normalised float32 CHW."""
    from monai.transforms import Compose

    return Compose([*_head(spec=spec), *_augment(spec, aug), _clamp01(), _normalise(spec)])


class BatchPreset:
    """A preset over a whole batch: uint8 NHWC in, normalised float32 NCHW out, equal to stacking the
    per-image preset (a test holds them equal). The deterministic head (to float in [0, 1]) and tail
    (clamp, normalise) run once on the stacked batch; only the random middle runs image by image.
    On 64x64 images this takes the train preset from ~0.6 to ~0.35 ms an image on one core."""

    def __init__(self, spec: PreprocessSpec, augment: bool, aug: Augmentation | None = None):
        from monai.transforms import Compose

        self.head = Compose(_head(batch=True, spec=spec))
        self.middle = Compose(_augment(spec, aug)) if augment else None
        self.tail = Compose([_clamp01(), _normalise(spec)] if augment else [_normalise(spec)])

    def set_random_state(self, seed: int) -> "BatchPreset":
        if self.middle is not None:
            self.middle.set_random_state(seed=seed)
        return self

    def __call__(self, images: np.ndarray | list[np.ndarray]) -> torch.Tensor:
        import torch

        use_plain_tensors()  # also in a loader's worker process, which may not share this one's setting
        x = self.head({KEY: np.stack(images) if isinstance(images, list) else np.asarray(images)})[KEY]
        if self.middle is not None:
            x = torch.stack([self.middle({KEY: im})[KEY] for im in x])
        return self.tail({KEY: x})[KEY]


def train_batch_preset(spec: PreprocessSpec, aug: Augmentation | None = None) -> BatchPreset:
    return BatchPreset(spec, augment=True, aug=aug)


@functools.lru_cache(maxsize=16)
def _eval_batch_preset(mean: tuple[float, ...], std: tuple[float, ...], color_constancy: str = "none",
                       power: float = 6.0) -> BatchPreset:
    # deterministic and stateless, so one per normalisation is shared (building one costs ~0.15 ms,
    # which every served request used to pay)
    return BatchPreset(PreprocessSpec(mean=mean, std=std, color_constancy=color_constancy,
                                      color_constancy_power=power), augment=False)


def eval_batch(images: list[np.ndarray] | np.ndarray, spec: PreprocessSpec) -> torch.Tensor:
    """Eval preset over HWC uint8 images (a list or an NHWC array), as one NCHW float tensor."""
    return _eval_batch_preset(tuple(spec.mean), tuple(spec.std), spec.color_constancy,
                              float(spec.color_constancy_power))(images)


FLIPS = ([3], [2], [2, 3])  # flip test-time augmentation: the image and these three flips (of an NCHW batch)


def flip_averaged(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Flip test-time augmentation: ``forward`` (float logits) averaged over ``x`` and its three flips.
    The one place evaluation (train.engine.predict_logits) and serving (infer.Predictor) average flips, so
    the TTA calibration fitted on the one is the one the other applies."""
    import torch

    out = forward(x)
    for dims in FLIPS:
        out = out + forward(torch.flip(x, dims=dims))
    return out / (1 + len(FLIPS))
