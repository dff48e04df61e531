"""Train and eval presets: the single source of transforms (MONAI dictionary transforms).

Both presets start from the pixels :func:`medpipe.data.imageio.decode_image` returns (RGB uint8,
HWC, already resized to ``spec.image_size`` — in the pixel cache or from raw bytes, identically)
under the key ``"image"`` and end with a normalised float32 CHW tensor. The eval preset is
deterministic; its parameters are the :class:`~medpipe.config.PreprocessSpec` stored in every model
package, so evaluate, predict, serve and batch all build it from the package, never by hand.

Dermoscopy has no canonical orientation, so the train preset flips on both axes, rotates by
multiples of 90 degrees, applies a small affine (rotation, zoom) and jitters colour and intensity.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureTyped,
    Lambdad,
    NormalizeIntensityd,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Transposed,
)

from monai.data import set_track_meta

from medpipe.config import PreprocessSpec

KEY = "image"
# medpipe never needs MONAI's per-tensor metadata; tracking it costs ~4x per item on small images.
set_track_meta(False)


def _common_head() -> list:
    return [
        Transposed(keys=KEY, indices=(2, 0, 1)),  # HWC -> CHW
        EnsureTyped(keys=KEY, data_type="tensor", dtype=torch.float32, track_meta=False),
        ScaleIntensityRanged(keys=KEY, a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True),
    ]


def _normalise(spec: PreprocessSpec):
    return NormalizeIntensityd(keys=KEY, subtrahend=np.asarray(spec.mean, np.float32)[:, None, None],
                               divisor=np.asarray(spec.std, np.float32)[:, None, None])


def eval_preset(spec: PreprocessSpec) -> Compose:
    return Compose([*_common_head(), _normalise(spec)])


def train_preset(spec: PreprocessSpec) -> Compose:
    return Compose([
        *_common_head(),
        RandFlipd(keys=KEY, prob=0.5, spatial_axis=0),
        RandFlipd(keys=KEY, prob=0.5, spatial_axis=1),
        RandRotate90d(keys=KEY, prob=0.75, max_k=3, spatial_axes=(0, 1)),
        RandAffined(keys=KEY, prob=0.5, rotate_range=(math.radians(15),), scale_range=((-0.1, 0.15),),
                    mode="bilinear", padding_mode="reflection"),
        RandScaleIntensityd(keys=KEY, factors=0.1, prob=0.8, channel_wise=True),  # per-channel colour jitter
        RandShiftIntensityd(keys=KEY, offsets=0.05, prob=0.5),  # brightness
        RandAdjustContrastd(keys=KEY, gamma=(0.8, 1.25), prob=0.5),
        Lambdad(keys=KEY, func=lambda x: x.clamp(0.0, 1.0)),
        _normalise(spec),
    ])


def eval_batch(images: list[np.ndarray], spec: PreprocessSpec) -> torch.Tensor:
    """Eval preset over a list of HWC uint8 arrays, stacked to an NCHW float tensor."""
    tf = eval_preset(spec)
    return torch.stack([tf({KEY: np.array(img)})[KEY] for img in images])
