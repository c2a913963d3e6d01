"""The predictor group under Megatron's own optimizer, as a foreign training loop builds it.

A loop of one's own (Megatron-LM, NeMo, Megatron-Bridge) wraps the model in Megatron's
``DistributedDataParallel`` and builds ``get_megatron_optimizer`` with
:func:`pr2_megatron.routing.predictor_config_overrides` and an ``OptimizerParamScheduler``.
Through a warmup + cosine schedule every step must then apply: the predictors at ``lr × α``
with the policy's weight decay (``router.pr2.predictor_weight_decay`` unset), every other
parameter at the base lr with Megatron's standard decay rule
(no decay on biases and 1-D parameters). Checked on the group hyperparameters and, exactly, on
the update each parameter receives: Adam with β1 = β2 = 0 makes every step's update exact,
``Δp = -lr · wd · p - lr · g / (|g| + ε)`` (torch's AdamW: decoupled decay).
"""

from __future__ import annotations

import math

import pytest
import torch

ALPHA = 10.0
LR, MIN_LR, WD = 1e-2, 1e-3, 0.1
WARMUP, DECAY = 2, 6


def _expected_base_lr(num_steps: int) -> float:
    """Megatron's schedule written out: linear warmup from 0, cosine to MIN_LR, then MIN_LR."""
    if num_steps <= WARMUP:
        return LR * num_steps / WARMUP
    if num_steps > DECAY:
        return MIN_LR
    ratio = (num_steps - WARMUP) / (DECAY - WARMUP)
    return MIN_LR + (LR - MIN_LR) * 0.5 * (math.cos(math.pi * ratio) + 1.0)


def _build(distributed: bool, beta: float):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from pr2_megatron.models import MoEModelConfig
    from pr2_megatron.routing import PR2RouterConfig, predictor_config_overrides
    from pr2_megatron.testing.moe import TinySetup, build, randomize_predictors

    setup = TinySetup(model=MoEModelConfig(num_layers=2), pr2=PR2RouterConfig(lr_multiplier=ALPHA))
    model = build(setup)
    randomize_predictors(model, scale=0.5, seed=1)  # non-zero: weight decay would show
    ddp = DistributedDataParallel(
        model.config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=distributed
        ),
        model,
    )
    config = OptimizerConfig(
        optimizer="adam",
        decoupled_weight_decay=True,
        lr=LR,
        min_lr=MIN_LR,
        weight_decay=WD,
        adam_beta1=beta,
        adam_beta2=beta,
        adam_eps=1e-8,
        clip_grad=0.0,
        use_distributed_optimizer=distributed,
    )
    overrides = predictor_config_overrides(model, config)  # α from the routers' config
    opt = get_megatron_optimizer(config, [ddp], config_overrides=overrides)
    scheduler = OptimizerParamScheduler(
        opt,
        init_lr=0.0,
        max_lr=LR,
        min_lr=MIN_LR,
        lr_warmup_steps=WARMUP,
        lr_decay_steps=DECAY,
        lr_decay_style="cosine",
        start_wd=WD,
        end_wd=WD,
        wd_incr_steps=DECAY,
        wd_incr_style="constant",
    )
    return model, ddp, opt, scheduler


def _decays(name: str, param) -> bool:
    """Megatron's standard rule (get_standard_config_overrides); the predictors follow it too
    (``router.pr2.predictor_weight_decay`` None: the policy's weight decay)."""
    return param.ndim > 1 and not name.endswith(".bias")


@pytest.mark.parametrize("distributed", [False, True], ids=["fp32-optimizer", "distributed"])
def test_predictor_group_lr_times_alpha_and_the_policy_decay_through_the_schedule(
    megatron_single, distributed
):
    from megatron.core.distributed import finalize_model_grads

    model, ddp, opt, scheduler = _build(distributed, beta=0.0)
    params = dict(model.named_parameters())
    predictors = [n for n, p in params.items() if getattr(p, "pr2_predictor", False)]
    assert len(predictors) == 2  # one per MoE layer
    generator = torch.Generator().manual_seed(0)
    for step in range(1, DECAY + 3):  # warmup, cosine decay, past its end
        base = _expected_base_lr(step - 1)  # the scheduler's lr after step - 1 of its steps
        ddp.zero_grad_buffer()
        opt.zero_grad()
        grads = {n: torch.randn(p.shape, generator=generator) for n, p in params.items()}
        for name, param in params.items():
            param.main_grad.copy_(grads[name])
        finalize_model_grads([ddp])
        before = {n: p.detach().clone() for n, p in params.items()}
        succeeded, _, _ = opt.step()
        assert succeeded
        for name, param in params.items():
            predictor = name in predictors
            lr = base * (ALPHA if predictor else 1.0)
            wd = WD if _decays(name, param) else 0.0
            g = grads[name]
            expected = before[name] * (1 - lr * wd) - lr * g / (g.abs() + 1e-8)
            error = float((param.detach() - expected).abs().max())
            assert error < 1e-7, (name, step, error)
        scheduler.step(1)


def test_predictor_group_hyperparameters_of_adam_per_scheduler_step(megatron_single):
    model, _, opt, scheduler = _build(False, beta=0.9)
    predictor_ids = {id(p) for p in model.parameters() if getattr(p, "pr2_predictor", False)}
    names = {id(p): n for n, p in model.named_parameters()}
    groups = opt.param_groups
    kinds = set()
    for step in range(DECAY + 2):
        base = _expected_base_lr(step)
        for group in groups:
            ids = {id(p) for p in group["params"]}
            is_predictor = bool(ids & predictor_ids)
            assert not is_predictor or ids <= predictor_ids  # a group of predictors only
            assert group["lr"] == pytest.approx(base * (ALPHA if is_predictor else 1.0), rel=1e-6)
            decays = {_decays(names[id(p)], p) for p in group["params"]}
            assert len(decays) == 1  # one decay rule per group
            assert group["weight_decay"] == (WD if decays.pop() else 0.0)
            kinds.add((is_predictor, group["weight_decay"]))
        scheduler.step(1)
    assert kinds == {(True, WD), (False, 0.0), (False, WD)}  # predictors: the policy's decay
