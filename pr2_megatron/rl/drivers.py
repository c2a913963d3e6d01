"""Persistent drivers of router drift for testbeds: router losses switched on in RL only.

``warm_start.aux_loss_coeff`` / ``warm_start.z_loss_coeff`` set Megatron's
``moe_aux_loss_coeff`` / ``moe_z_loss_coeff`` for the warm start, and the model's own
coefficients (``model.aux_loss_coeff`` / ``model.z_loss_coeff``) come back for RL. Megatron's
routers read both at every training forward, from the model's shared ``TransformerConfig``. A
router loss that switches on when RL starts keeps pushing the routers in one direction for many
steps: drift that persists across rollout batches (docs/pr2_effect.md, "The testbed").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch

#: Testbed key (``warm_start.<key>``) -> Megatron ``TransformerConfig`` field.
ROUTER_LOSS_FIELDS = {"aux_loss_coeff": "moe_aux_loss_coeff", "z_loss_coeff": "moe_z_loss_coeff"}


def _router_configs(model: Union[torch.nn.Module, Sequence[torch.nn.Module]]) -> list:
    from megatron.core.transformer.moe.router import Router

    chunks = model if isinstance(model, (list, tuple)) else [model]
    configs = {
        id(m.config): m.config for chunk in chunks for m in chunk.modules() if isinstance(m, Router)
    }
    return list(configs.values())


def set_router_loss_coeffs(
    model: Union[torch.nn.Module, Sequence[torch.nn.Module]], **coeffs: Optional[float]
) -> dict[str, Optional[float]]:
    """Set router-loss coefficients (``aux_loss_coeff``, ``z_loss_coeff``) of every MoE router.

    Returns the previous values of the coefficients set, so that
    ``set_router_loss_coeffs(model, **set_router_loss_coeffs(model, z_loss_coeff=0.1))``
    restores them. A coefficient given as None is left unchanged (and not returned). A z-loss
    coefficient of 0 is stored as Megatron's "off" (None), so the z-loss is not even computed.
    """
    unknown = sorted(set(coeffs) - set(ROUTER_LOSS_FIELDS))
    if unknown:
        raise ValueError(
            f"unknown router-loss coefficient(s) {unknown}; expected {sorted(ROUTER_LOSS_FIELDS)}"
        )
    previous: dict[str, Optional[float]] = {}
    for config in _router_configs(model):
        for name, value in coeffs.items():
            if value is None:
                continue
            field = ROUTER_LOSS_FIELDS[name]
            previous[name] = float(getattr(config, field) or 0.0)  # Megatron's None: off
            stored = float(value)
            if name == "z_loss_coeff" and stored == 0.0:
                stored = None
            setattr(config, field, stored)
    return previous
