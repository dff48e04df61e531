"""Logits of images in a source's pixel cache, in eval mode: the engine's validation (exact across ranks),
calibration and a federated site's evaluation.

    logits = predict_logits(model, source.val.pixels, source.val.rows, cfg.preprocess(), device)
"""

from __future__ import annotations

import numpy as np
import torch

from medpipe.preprocess import eval_batch, flip_averaged
from medpipe.train.distributed import Dist


@torch.inference_mode()
def predict_logits(model, pixels, rows: np.ndarray, spec, device, batch: int = 128,
                   bf16: bool | None = None, tta: bool = False, metadata: np.ndarray | None = None) -> torch.Tensor:
    """Logits of pixels[rows] in eval mode, without gradients.

    Args:
        model: the network (put in eval mode).
        pixels: uint8 images (N, H, W, 3), e.g. a source's memory-mapped pixel cache.
        rows: which images, in the order wanted.
        spec: the eval preprocessing (:class:`medpipe.preprocess.PreprocessSpec`).
        device: where the model is.
        batch: images per forward pass.
        bf16: autocast to bfloat16 (default: on CUDA only).
        tta: average over the image and its three flips.
        metadata: encoded patient metadata per row (len(rows), dim) for a model that takes it.

    Returns:
        Float logits (len(rows), C) on the CPU; (0, 0) for no rows."""
    model.eval()
    outs = []
    bf16 = device.type == "cuda" if bf16 is None else bf16
    for i in range(0, len(rows), batch):
        x = eval_batch(pixels[rows[i:i + batch]], spec).to(device).contiguous(memory_format=torch.channels_last)
        m = None if metadata is None else torch.as_tensor(metadata[i:i + batch]).to(device)
        run = (lambda t: model(t).float()) if m is None else (lambda t: model(t, m).float())
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = flip_averaged(run, x) if tta else run(x)
            outs.append(out.cpu())
    return torch.cat(outs) if outs else torch.zeros((0, 0))


def predict_logits_dist(model, pixels, rows: np.ndarray, spec, device, dd: Dist, bf16: bool | None = None,
                        metadata: np.ndarray | None = None) -> torch.Tensor:
    """Validation logits in row order; with several ranks each predicts rows[rank::world] and the
    pieces are gathered and put back in order, so metrics equal the single-process ones exactly.

    Args:
        model, pixels, rows, spec, device, bf16, metadata: as for :func:`predict_logits`.
        dd: the process group (:class:`medpipe.train.distributed.Dist`); single process when not enabled.

    Returns:
        Float logits (len(rows), C) on the CPU, the same on every rank."""
    if not dd.enabled:
        return predict_logits(model, pixels, rows, spec, device, bf16=bf16, metadata=metadata)
    mine = np.arange(dd.rank, len(rows), dd.world)
    logits = predict_logits(model, pixels, rows[mine], spec, device, bf16=bf16,
                            metadata=None if metadata is None else metadata[mine])
    parts = dd.gather((mine, logits.numpy() if len(mine) else None))
    n_classes = next(p[1].shape[1] for p in parts if p[1] is not None) if len(rows) else 0
    out = np.zeros((len(rows), n_classes), np.float32)
    for idx, part in parts:
        if part is not None:
            out[idx] = part
    return torch.from_numpy(out)
