"""Probability calibration fitted on validation logits: temperature scaling.

The training job fits the package's temperature (and the flip-TTA one) with it; the INT8 gate refits
it on the quantised model's logits. torch loads only when a fit runs, so importing this module is light.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only
    import torch


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Temperature scaling (Guo et al. 2017): one scalar minimising validation NLL.

    Args:
        logits: N x C validation logits (from inference mode or not).
        y: the N true class indices.

    Returns:
        The temperature T (probabilities are ``softmax(logits / T)``); 1.0 with fewer than 2 images or
        when the fit leaves (0.05, 20).
    """
    import torch  # deferred: torch loads only when a temperature is fitted
    import torch.nn.functional as F
    if len(y) < 2:
        return 1.0
    logits, y = logits.detach().clone(), y.clone()  # may come from inference_mode
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    t = float(log_t.detach().exp())
    return t if math.isfinite(t) and 0.05 < t < 20 else 1.0
