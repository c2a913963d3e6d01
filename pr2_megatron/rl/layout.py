"""Layout checks of a trainer config, before any process group exists (``ConfigError``: exit 2).

:func:`check_layout` raises :class:`~pr2_megatron.rl.config.ConfigError` naming the keys and
values of every size that does not divide and every combination the trainer cannot run:

* the model against the parallel layout (``runtime.parallel.check_model_layout``: world size,
  layers over (uneven, virtual) pipeline stages, heads, widths and vocabulary over TP, experts
  over EP, MoE with TP but without SP);
* batches against the data-parallel ranks and the off-N mini-steps;
* under pipeline parallelism, every schedule's micro-batches of one size (p2p shapes), and
  under VPP a number of micro-batches that is a multiple of PP (Megatron's interleaved
  schedule): rollout, old log-probs, mini-steps, warm start;
* what this machine cannot run: context parallelism needs Transformer Engine's attention
  (CUDA), expert tensor parallelism > 1 needs NCCL (gloo has no uneven all-gather).
"""

from __future__ import annotations

import os
from typing import Optional

from pr2_megatron.rl.config import ConfigError, TrainConfig

__all__ = ["check_layout", "micro_size"]


def micro_size(cfg: TrainConfig, rows: int) -> int:
    """Samples per training forward for a pass of ``rows`` samples on a rank."""
    return max(1, min(cfg.grpo.micro_batch_size, rows))


def check_layout(
    cfg: TrainConfig, world_size: Optional[int] = None, *, cuda: Optional[bool] = None
) -> int:
    """Every layout check of ``cfg`` on ``world_size`` ranks; returns the data-parallel size.

    ``world_size`` defaults to torchrun's ``WORLD_SIZE`` (1 without it); ``cuda`` to whether
    CUDA is available (False: the checks of what the CPU cannot run apply).
    """
    import torch

    from pr2_megatron.runtime.parallel import check_model_layout

    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if cuda is None:
        cuda = torch.cuda.is_available()
    try:
        dp = check_model_layout(cfg.parallel, cfg.model, world_size)
    except ValueError as error:
        raise ConfigError(f"{error} on {world_size} ranks") from None
    _check_batches(cfg, dp)
    if cfg.parallel.pipeline_model_parallel_size > 1:
        _check_pipeline_micro_batches(cfg, dp)
    if not cuda:
        _check_cpu(cfg)
    return dp


def _check_batches(cfg: TrainConfig, dp: int) -> None:
    rollout = cfg.rollout
    if rollout.prompts_per_step % dp:
        raise ConfigError(
            f"rollout.prompts_per_step={rollout.prompts_per_step} is not divisible by the "
            f"data-parallel size {dp}"
        )
    per_rank = rollout.prompts_per_step // dp * rollout.group_size
    if per_rank % cfg.replay.off_n:
        raise ConfigError(
            f"each data-parallel rank holds {per_rank} responses (rollout.prompts_per_step="
            f"{rollout.prompts_per_step} / DP {dp} × rollout.group_size={rollout.group_size}), "
            f"not divisible by replay.off_n={cfg.replay.off_n} mini-batches"
        )
    if cfg.warm_start.steps and cfg.warm_start.batch_size % dp:
        raise ConfigError(
            f"warm_start.batch_size={cfg.warm_start.batch_size} is not divisible by the "
            f"data-parallel size {dp}"
        )


def _check_pipeline_micro_batches(cfg: TrainConfig, dp: int) -> None:
    """Equal micro-batches per schedule (p2p shapes); M % PP == 0 under VPP."""
    pp = cfg.parallel.pipeline_model_parallel_size
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    per_rank = cfg.rollout.prompts_per_step // dp * cfg.rollout.group_size
    per_mini = per_rank // cfg.replay.off_n
    passes = [
        ("rollout", per_rank, cfg.rollout.micro_batch_size, "rollout.micro_batch_size"),
        ("old log-prob", per_rank, micro_size(cfg, per_rank), "grpo.micro_batch_size"),
        ("mini-step", per_mini, micro_size(cfg, per_mini), "grpo.micro_batch_size"),
    ]
    if cfg.warm_start.steps:
        warm = cfg.warm_start.batch_size // dp
        passes.append(("warm-start", warm, micro_size(cfg, warm), "grpo.micro_batch_size"))
    for name, rows, size, key in passes:
        if rows % size:
            raise ConfigError(
                f"pipeline parallelism (parallel.pipeline_model_parallel_size={pp}) needs "
                f"micro-batches of one size: the {name} pass has {rows} samples per rank, not "
                f"divisible by {key}={size}"
            )
        if vpp is not None and (rows // size) % pp:
            raise ConfigError(
                f"the interleaved schedule (parallel.virtual_pipeline_model_parallel_size={vpp})"
                f" needs a multiple of pipeline_model_parallel_size={pp} micro-batches: the "
                f"{name} pass has {rows // size} ({rows} samples per rank / {key}={size})"
            )


def _check_cpu(cfg: TrainConfig) -> None:
    parallel = cfg.parallel
    if parallel.context_parallel_size > 1:
        raise ConfigError(
            f"parallel.context_parallel_size={parallel.context_parallel_size} needs Transformer "
            "Engine's attention (a GPU): megatron-core's local attention has no context "
            "parallelism"
        )
    if parallel.expert_tensor_parallel_size > 1:
        raise ConfigError(
            f"parallel.expert_tensor_parallel_size={parallel.expert_tensor_parallel_size} needs "
            "NCCL (gloo has no uneven all-gather)"
        )
