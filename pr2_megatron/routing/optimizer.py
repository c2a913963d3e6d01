"""Optimizer parameter groups for the evolution predictors: ``lr × α``, the policy's settings.

The predictor group follows the policy's optimizer (betas, weight decay) unless the routers'
``PR2RouterConfig.predictor_betas`` / ``predictor_weight_decay`` say otherwise, as in the PR2
authors' code (the same Adam as the policy at ``lr × α``, constant lr, the shared grad clip).
A predictor has no gradient at mini-step 1 (no loss), so torch's Adam(W) skips it there: no
step and no decay, the authors' lr = wd = 0 for the group at mini-step 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Optional, Union

import torch

from pr2_megatron.routing.predictor import is_predictor_parameter
from pr2_megatron.routing.router import PR2Router


def lr_multiplier_of(model: Union[torch.nn.Module, Sequence[torch.nn.Module]]) -> float:
    """α of the model's PR2 routers (their ``PR2RouterConfig.lr_multiplier``).

    Raises ValueError when the model has no PR2 router or its routers disagree.
    """
    return _routers_setting(model, "lr_multiplier", "lr multipliers")


def _routers_setting(model, name: str, what: str):
    """The one value of ``PR2RouterConfig.<name>`` over the model's PR2 routers."""
    chunks: Iterable[torch.nn.Module] = model if isinstance(model, (list, tuple)) else [model]
    values = {
        _hashable(getattr(m.pr2_config, name)) for chunk in chunks for m in chunk.modules()
        if isinstance(m, PR2Router)
    }  # fmt: skip
    if not values:
        raise ValueError(f"the model has no PR2 router, so no predictor {what}")
    if len(values) > 1:
        listed = sorted(values, key=str)
        raise ValueError(f"the model's PR2 routers have different {what}: {listed}")
    value = values.pop()
    return list(value) if isinstance(value, tuple) else value


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def param_groups(
    model: Union[torch.nn.Module, Sequence[torch.nn.Module]],
    lr: float,
    weight_decay: float,
    lr_multiplier: Optional[float] = None,
) -> list[dict]:
    """Torch optimizer param groups: the model, and the predictors at ``lr × α``.

    α is the routers' own ``PR2RouterConfig.lr_multiplier`` unless ``lr_multiplier`` is given
    (one source of truth: two that could disagree silently would train the predictor at another
    rate than configured). The predictor group's weight decay is the routers'
    ``predictor_weight_decay``, else ``weight_decay`` (the policy's); its betas are the routers'
    ``predictor_betas`` (a ``betas`` entry), else the optimizer's own (no entry: the policy's).
    The predictor group carries ``pr2_predictor: True``.
    """
    chunks: Iterable[torch.nn.Module] = model if isinstance(model, (list, tuple)) else [model]
    model_params, predictor_params = [], []
    for chunk in chunks:
        for param in chunk.parameters():
            if not param.requires_grad:
                continue
            (predictor_params if is_predictor_parameter(param) else model_params).append(param)
    groups = [{"params": model_params, "lr": lr, "weight_decay": weight_decay}]
    if predictor_params:
        alpha = lr_multiplier_of(model) if lr_multiplier is None else lr_multiplier
        decay = _routers_setting(model, "predictor_weight_decay", "predictor weight decays")
        group = {
            "params": predictor_params,
            "lr": lr * alpha,
            "weight_decay": weight_decay if decay is None else decay,
            "pr2_predictor": True,
        }
        betas = _routers_setting(model, "predictor_betas", "predictor betas")
        if betas is not None:
            group["betas"] = tuple(betas)
        groups.append(group)
    return groups
