"""Persistent drivers of router drift for testbeds: the load-balancing aux loss in RL only.

``warm_start.aux_loss_coeff`` sets Megatron's ``moe_aux_loss_coeff`` for the warm start and
restores ``model.aux_loss_coeff`` for RL (Megatron's routers read the coefficient at every
training forward, from the model's shared ``TransformerConfig``): a load-balancing loss that
switches on when RL starts keeps pushing the routers in one direction for many steps -- drift
that persists across rollout batches (docs/pr2_effect.md, "The testbed").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch


def set_aux_loss_coeff(
    model: Union[torch.nn.Module, Sequence[torch.nn.Module]], coeff: Optional[float]
) -> Optional[float]:
    """Set the ``moe_aux_loss_coeff`` of every MoE router (of a model or its chunks).

    Returns the previous value.

    ``coeff`` None changes nothing (and returns None), so ``set_aux_loss_coeff(model,
    set_aux_loss_coeff(model, c))`` restores the model's own coefficient.
    """
    from megatron.core.transformer.moe.router import Router

    if coeff is None:
        return None
    chunks = model if isinstance(model, (list, tuple)) else [model]
    configs = {
        id(m.config): m.config for chunk in chunks for m in chunk.modules() if isinstance(m, Router)
    }
    previous = None
    for config in configs.values():
        previous = config.moe_aux_loss_coeff
        config.moe_aux_loss_coeff = float(coeff)
    return previous
