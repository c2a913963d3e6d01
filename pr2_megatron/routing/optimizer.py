"""Optimizer parameter groups for the evolution predictors: ``lr × α``, no weight decay.

* :func:`param_groups`: torch optimizer groups (a loop of one's own, ``torch.optim.AdamW``);
* :func:`predictor_config_overrides`: the same group for Megatron's ``get_megatron_optimizer``
  (``config_overrides``), with its ``OptimizerParamScheduler``.
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


def predictor_config_overrides(
    model: Union[torch.nn.Module, Sequence[torch.nn.Module]],
    optimizer_config,
    lr_multiplier: Optional[float] = None,
) -> dict:
    """``config_overrides`` for Megatron's ``get_megatron_optimizer``: the predictors' own group.

    Megatron's standard overrides (no weight decay on biases and 1-D parameters; the decoupled
    embedding lr when configured) plus one for every parameter marked ``pr2_predictor``:
    ``max_lr = lr × α``, ``min_lr = min_lr × α``, ``wd_mult = 0`` and ``lr_mult = α``. α is the
    routers' ``PR2RouterConfig.lr_multiplier`` unless ``lr_multiplier`` is given.

    Use it with Megatron's ``OptimizerParamScheduler``: in megatron-core the torch optimizer's
    per-group ``lr`` and ``weight_decay`` are set only by the scheduler's ``step`` (from the
    group's ``max_lr`` / ``min_lr`` and ``wd_mult``); without one every group runs at
    ``optimizer_config.lr`` with weight decay. ``lr_mult`` changes no learning rate (0.16.1's
    scheduler ignores it) but makes the group's checkpoint identifier ``(wd_mult, lr_mult,
    is_expert_parallel, is_decoupled_lr)`` unique: with ``lr_mult = 1`` the predictor group
    would collide with the no-decay group of 1-D parameters, and a distributed-optimizer
    checkpoint would load the wrong group's hyperparameters silently. With α = 1 the predictors
    need exactly that group's hyperparameters (lr, no decay) and join it (the same override).
    A warmup ramps every group from the scheduler's one ``init_lr``. The predictor override is
    added only when the model has predictors.
    """
    from megatron.core.optimizer import ParamKey, get_standard_config_overrides
    from megatron.core.optimizer_param_scheduler import ParamGroupOverride

    overrides = get_standard_config_overrides(optimizer_config)
    chunks: Iterable[torch.nn.Module] = model if isinstance(model, (list, tuple)) else [model]
    has_predictor = any(is_predictor_parameter(p) for c in chunks for p in c.parameters())
    if not has_predictor:
        return overrides
    alpha = lr_multiplier_of(model) if lr_multiplier is None else float(lr_multiplier)
    if alpha == 1.0:
        overrides[ParamKey(attr="pr2_predictor")] = ParamGroupOverride(wd_mult=0.0)
        return overrides
    min_lr = optimizer_config.min_lr if optimizer_config.min_lr is not None else 0.0
    overrides[ParamKey(attr="pr2_predictor")] = ParamGroupOverride(
        max_lr=optimizer_config.lr * alpha,
        min_lr=min_lr * alpha,
        wd_mult=0.0,
        lr_mult=alpha,
    )
    return overrides
