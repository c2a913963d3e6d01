"""Optimizer parameter groups for the evolution predictors: ``lr × α``, the policy's settings.

The predictor group follows the policy's optimizer (betas, weight decay) unless the routers'
``PR2RouterConfig.predictor_betas`` / ``predictor_weight_decay`` say otherwise, as in the PR2
authors' code (the same Adam as the policy at ``lr × α``, constant lr, the shared grad clip).
A predictor has no gradient at mini-step 1 (no loss), so torch's Adam(W) skips it there: no
step and no decay, the authors' lr = wd = 0 for the group at mini-step 1.

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


def predictor_config_overrides(
    model: Union[torch.nn.Module, Sequence[torch.nn.Module]],
    optimizer_config,
    lr_multiplier: Optional[float] = None,
) -> dict:
    """``config_overrides`` for Megatron's ``get_megatron_optimizer``: the predictors' own group.

    Megatron's standard overrides (no weight decay on biases and 1-D parameters; the decoupled
    embedding lr when configured) plus one for every parameter marked ``pr2_predictor``:
    ``max_lr = lr × α``, ``min_lr = min_lr × α`` and ``lr_mult = α``; the weight decay the
    routers' ``predictor_weight_decay`` (else the policy's: ``wd_mult`` relative to
    ``optimizer_config.weight_decay``, or ``start_wd = end_wd`` when the policy has none); the
    routers' ``predictor_betas`` as the group's ``betas`` when they differ from the policy's
    (Megatron merges an override's entries into the torch param group, whose own ``betas``
    torch's Adam(W) uses). α is the routers' ``PR2RouterConfig.lr_multiplier`` unless
    ``lr_multiplier`` is given.

    Use it with Megatron's ``OptimizerParamScheduler``: in megatron-core the torch optimizer's
    per-group ``lr`` and ``weight_decay`` are set only by the scheduler's ``step`` (from the
    group's ``max_lr`` / ``min_lr``, ``start_wd`` / ``end_wd`` and ``wd_mult``); without one
    every group runs at ``optimizer_config.lr`` with the policy's weight decay. ``lr_mult``
    changes no learning rate (0.16.1's scheduler ignores it) but makes the group's checkpoint
    identifier ``(wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr)`` unique. With α = 1
    the identifier is unique only through ``wd_mult``: predictors with the policy's settings
    join the policy's group, with no decay (and the policy's betas) the no-decay group of 1-D
    parameters (the same hyperparameters, the same override), and any other setting that would
    collide with one of those two groups' identifiers -- a distributed-optimizer checkpoint
    would load the wrong group's hyperparameters silently -- is a ``ConfigError`` naming the
    key (``router.pr2.predictor_betas`` or ``router.pr2.predictor_weight_decay``). A warmup
    ramps every group from the scheduler's one ``init_lr``. The predictor override is added
    only when the model has predictors.
    """
    from megatron.core.optimizer import ParamKey, get_standard_config_overrides
    from megatron.core.optimizer_param_scheduler import ParamGroupOverride

    overrides = get_standard_config_overrides(optimizer_config)
    chunks: Iterable[torch.nn.Module] = model if isinstance(model, (list, tuple)) else [model]
    has_predictor = any(is_predictor_parameter(p) for c in chunks for p in c.parameters())
    if not has_predictor:
        return overrides
    alpha = lr_multiplier_of(model) if lr_multiplier is None else float(lr_multiplier)
    decay = _routers_setting(model, "predictor_weight_decay", "predictor weight decays")
    betas = _routers_setting(model, "predictor_betas", "predictor betas")
    policy_wd = float(optimizer_config.weight_decay)
    policy_betas = (float(optimizer_config.adam_beta1), float(optimizer_config.adam_beta2))
    override = ParamGroupOverride()
    if decay is not None and float(decay) != policy_wd:
        if policy_wd > 0:
            override["wd_mult"] = float(decay) / policy_wd
        elif float(decay) > 0:
            override["start_wd"] = override["end_wd"] = float(decay)
    own_betas = betas is not None and tuple(float(b) for b in betas) != policy_betas
    if own_betas:
        override["betas"] = tuple(float(b) for b in betas)
    if alpha == 1.0:
        _check_alpha_one_group(override, policy_wd)
        if override:
            overrides[ParamKey(attr="pr2_predictor")] = override
        return overrides
    min_lr = optimizer_config.min_lr if optimizer_config.min_lr is not None else 0.0
    override.update(max_lr=optimizer_config.lr * alpha, min_lr=min_lr * alpha, lr_mult=alpha)
    overrides[ParamKey(attr="pr2_predictor")] = override
    return overrides


def _check_alpha_one_group(override: dict, policy_wd: float) -> None:
    """At α = 1: the predictor group must be a policy group or have an identifier of its own."""
    from pr2_megatron.errors import ConfigError

    if not override or override == {"wd_mult": 0.0}:
        return  # the policy's group, or the no-decay group's hyperparameters exactly
    wd_mult = override.get("wd_mult", 1.0)
    if wd_mult not in (0.0, 1.0):
        return  # (wd_mult, 1.0, ...) is an identifier of its own
    key = "predictor_betas" if "betas" in override else "predictor_weight_decay"
    raise ConfigError(
        f"router.pr2.{key}: with router.pr2.lr_multiplier = 1 the predictors' param group "
        f"({override}) would share its checkpoint identifier (wd_mult, lr_mult) = "
        f"({wd_mult}, 1.0) with a policy group of other hyperparameters in megatron-core "
        f"0.16.1's optimizer (policy weight decay {policy_wd}); set lr_multiplier != 1, or "
        f"leave {key} at the policy's value"
    )
