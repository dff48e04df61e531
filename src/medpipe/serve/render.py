"""Small PNG renderings for the web page: the model's input image and a Grad-CAM overlay."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def png_data_url(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def heatmap_png(cam: np.ndarray) -> str:
    """Grad-CAM map in [0, 1] -> RGBA PNG (inferno colours, alpha rising with the map)."""
    from matplotlib import colormaps

    m = np.clip(np.nan_to_num(cam.astype(np.float32)), 0.0, 1.0)
    rgba = colormaps["inferno"](m)
    rgba[..., 3] = 0.15 + 0.6 * m
    return png_data_url((rgba * 255 + 0.5).astype(np.uint8))
