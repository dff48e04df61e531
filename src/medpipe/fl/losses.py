"""Loss terms that federated strategies add to a site's local training (FedProx's proximal term).

    from medpipe.fl.losses import proximal_term
    weights, metrics = local_fit(cfg, source, epochs=k, weights=global_weights,
                                 loss_terms=[proximal_term(global_weights, mu=0.01)])
"""

from __future__ import annotations

from typing import Callable

import torch


def proximal_term(reference: dict[str, torch.Tensor], mu: float) -> Callable[[torch.nn.Module], torch.Tensor]:
    """FedProx's proximal term ``mu/2 * ||w - w_ref||^2`` over the trainable parameters, as a loss term
    for :meth:`medpipe.train.engine.Engine.add_loss_term` and :func:`medpipe.train.engine.local_fit`.

    Args:
        reference: the weights to stay near (the global model of the round), by parameter name.
        mu: the strength of the pull towards ``reference`` (FedProx's mu); 0 adds nothing.

    Returns:
        ``term(model)``: the scalar ``mu/2 * ||w - w_ref||^2`` over ``model``'s trainable parameters
        (the reference is moved to each parameter's device and dtype once)."""
    ref: dict[str, torch.Tensor] = {}

    def term(model: torch.nn.Module) -> torch.Tensor:
        total = 0.0
        for name, p in model.named_parameters():
            if name not in ref:
                ref[name] = reference[name].detach().to(p.device, p.dtype)
            total = total + (p - ref[name]).pow(2).sum()
        return 0.5 * mu * total

    return term
