"""Optimizer parameter groups for the evolution predictors: ``lr × α``, no weight decay."""

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
    chunks: Iterable[torch.nn.Module] = model if isinstance(model, (list, tuple)) else [model]
    values = {
        m.pr2_config.lr_multiplier for chunk in chunks for m in chunk.modules()
        if isinstance(m, PR2Router)
    }  # fmt: skip
    if not values:
        raise ValueError("the model has no PR2 router, so no predictor lr multiplier")
    if len(values) > 1:
        raise ValueError(f"the model's PR2 routers have different lr multipliers: {sorted(values)}")
    return values.pop()


def param_groups(
    model: Union[torch.nn.Module, Sequence[torch.nn.Module]],
    lr: float,
    weight_decay: float,
    lr_multiplier: Optional[float] = None,
) -> list[dict]:
    """Torch optimizer param groups: the model, and the predictors at ``lr × α`` without decay.

    α is the routers' own ``PR2RouterConfig.lr_multiplier`` unless ``lr_multiplier`` is given
    (one source of truth: two that could disagree silently would train the predictor at another
    rate than configured). The predictor group carries ``pr2_predictor: True``.
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
        groups.append(
            {
                "params": predictor_params,
                "lr": lr * alpha,
                "weight_decay": 0.0,
                "pr2_predictor": True,
            }
        )
    return groups
