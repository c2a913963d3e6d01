"""Megatron's training machinery for the trainer: DDP, its optimizer, the lr scheduler.

* :func:`wrap_ddp`: Megatron's ``DistributedDataParallel`` around every model chunk, fp32
  gradient buffers (``main_grad``), wired into the schedules (``no_sync_func``,
  ``finalize_model_grads_func``: data-parallel reduction, sequence-parallel and embedding
  all-reduces, the expert-bias update, all at the end of a schedule).
* :class:`Optimizer`: ``get_megatron_optimizer`` (FP32 optimizer, or the distributed optimizer
  with fp32 main parameters for bf16 models; the predictors in their own group at ``lr × α``
  with the policy's weight decay and betas unless ``router.pr2.predictor_weight_decay`` /
  ``predictor_betas`` say otherwise,
  :func:`~pr2_megatron.routing.optimizer.predictor_config_overrides`),
  Megatron's gradient clipping (``clip_grad``, the global norm over every model-parallel
  shard), and ``OptimizerParamScheduler`` (a constant lr; the per-group lr of the predictors
  comes from it).

Routed experts are marked ``allreduce = False`` by the model builder at every EP, so Megatron's
DDP reduces their gradients over the expert-data-parallel group (which spans the TP ranks at
EP=1) with the data-parallel scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

__all__ = ["Optimizer", "wrap_ddp"]


def wrap_ddp(chunks: Sequence[torch.nn.Module], distributed_optimizer: bool) -> list:
    """Megatron's DDP around each model chunk (VPP: one per chunk), wired into the schedules."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        overlap_param_gather=False,
        use_distributed_optimizer=distributed_optimizer,
    )
    wrapped = [
        DistributedDataParallel(chunk.config, ddp_config, chunk, disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
    config = wrapped[0].config
    no_sync = [chunk.no_sync for chunk in wrapped]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


class Optimizer:
    """Megatron's optimizer and lr scheduler over DDP-wrapped chunks at a constant ``lr``."""

    def __init__(
        self,
        chunks: Sequence,
        *,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        grad_clip: float,
        distributed: bool,
        total_steps: int,
        lr_multiplier: Optional[float] = None,
    ) -> None:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from pr2_megatron.routing.optimizer import predictor_config_overrides

        self.chunks = list(chunks)
        model_config = self.chunks[0].config
        self.config = OptimizerConfig(
            optimizer="adam",
            lr=lr,
            min_lr=lr,
            weight_decay=weight_decay,
            adam_beta1=betas[0],
            adam_beta2=betas[1],
            adam_eps=1e-8,
            clip_grad=grad_clip,
            bf16=bool(model_config.bf16),
            params_dtype=model_config.params_dtype,
            use_distributed_optimizer=distributed,
        )
        inner = [chunk.module for chunk in self.chunks]
        overrides = predictor_config_overrides(inner, self.config, lr_multiplier)
        self.optimizer = get_megatron_optimizer(
            self.config, self.chunks, config_overrides=overrides
        )
        steps = max(1, total_steps)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=lr,
            max_lr=lr,
            min_lr=lr,
            lr_warmup_steps=0,
            lr_decay_steps=steps,
            lr_decay_style="constant",
            start_wd=weight_decay,
            end_wd=weight_decay,
            wd_incr_steps=steps,
            wd_incr_style="constant",
        )

    def zero_grad(self) -> None:
        """Zero the DDP gradient buffers and the optimizer's grads (before each schedule)."""
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self) -> float:
        """One optimizer step (clipping included) and one scheduler step; the grad norm."""
        succeeded, grad_norm, _ = self.optimizer.step()
        if not succeeded:
            raise RuntimeError("the optimizer step was skipped (non-finite gradients)")
        self.scheduler.step(1)
        return float(grad_norm) if grad_norm is not None else 0.0

    def reload_model_params(self) -> None:
        """Copy the model's current weights into the fp32 main parameters (bf16 / dist-opt)."""
        self.optimizer.reload_model_params()
