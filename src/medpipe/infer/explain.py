"""Grad-CAM explanations with ``monai.visualize.GradCAM``.

The target layer is the last module whose output is still a spatial feature map (found once per
model by tracing a forward pass): ``class_layers.relu`` in MONAI's DenseNets, ``layer4`` in its
ResNets/SEResNets, the head activation in EfficientNet. The map is upsampled to the model's input
size and scaled to [0, 1].
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

def target_layer(model: nn.Module, x: torch.Tensor) -> str:
    """Name of the last module (in execution order) that outputs an NCHW map larger than 1x1."""
    order: list[str] = []
    hooks = []
    for name, mod in model.named_modules():
        if name and not list(mod.children()):
            def hook(_m, _i, out, name=name):
                if isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[-1] * out.shape[-2] > 1:
                    order.append(name)
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise ValueError("model has no spatial feature map to explain")
    return order[-1]


class GradCamExplainer:
    """Grad-CAM on a private copy of the model.

    MONAI's GradCAM registers permanent forward and full-backward hooks on the target layer; they
    would slow and alter every later forward pass, so they live on a deep copy used only here.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor):
        from monai.visualize import GradCAM

        self.model = copy.deepcopy(model).eval().to(memory_format=torch.contiguous_format)
        self.layer = target_layer(self.model, example.float())
        self.cam = GradCAM(nn_module=self.model, target_layers=self.layer)

    def __call__(self, x: torch.Tensor, class_idx: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """Logits (1, C) and the map (H, W) float32 in [0, 1] for the predicted (or given) class."""
        x = x[:1].float()
        with torch.no_grad():
            logits = self.model(x).float()
        k = int(logits.argmax(1)) if class_idx is None else int(class_idx)
        with torch.enable_grad():
            cam = self.cam(x.clone().requires_grad_(True), class_idx=k)
        self.model.zero_grad(set_to_none=True)
        m = np.nan_to_num(cam[0, 0].detach().float().cpu().numpy(), nan=0.0)
        lo, hi = float(m.min()), float(m.max())
        m = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
        return logits, m.astype(np.float32)
