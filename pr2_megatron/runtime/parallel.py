"""Process groups and Megatron parallel state for CPU (gloo) and GPU (NCCL) runs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class ParallelConfig:
    """Model-parallel layout; data parallelism takes the remaining factor of the world size."""

    #: Tensor parallel size (TP); the router and predictor stay replicated across it.
    tensor_model_parallel_size: int = 1
    #: Pipeline parallel size (PP): each stage owns a slice of the layers.
    pipeline_model_parallel_size: int = 1
    #: Virtual pipeline chunks per stage (VPP), or None.
    virtual_pipeline_model_parallel_size: Optional[int] = None
    #: Context parallel size (CP): each rank holds 1/CP of every sequence.
    context_parallel_size: int = 1
    #: Expert parallel size (EP): experts are split across this many ranks.
    expert_model_parallel_size: int = 1
    #: Tensor parallel size inside experts (gloo supports 1 only: uneven all-gathers).
    expert_tensor_parallel_size: int = 1
    #: Sequence parallelism: with TP > 1 each TP rank routes S/TP tokens.
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "context_parallel_size",
            "expert_model_parallel_size",
            "expert_tensor_parallel_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("parallel.sequence_parallel=True needs tensor_model_parallel_size > 1")

    def check_world_size(self, world_size: int) -> int:
        """Data-parallel size for ``world_size``; ValueError naming the sizes if they don't fit."""
        tp_pp_cp = (
            self.tensor_model_parallel_size
            * self.pipeline_model_parallel_size
            * self.context_parallel_size
        )
        if world_size % tp_pp_cp:
            raise ValueError(
                f"world size {world_size} is not divisible by TP×PP×CP = "
                f"{self.tensor_model_parallel_size}×{self.pipeline_model_parallel_size}×"
                f"{self.context_parallel_size}"
            )
        expert_grid = (
            self.expert_model_parallel_size
            * self.expert_tensor_parallel_size
            * self.pipeline_model_parallel_size
        )
        if world_size % expert_grid:
            raise ValueError(
                f"world size {world_size} is not divisible by EP×ETP×PP = "
                f"{self.expert_model_parallel_size}×{self.expert_tensor_parallel_size}×"
                f"{self.pipeline_model_parallel_size}"
            )
        return world_size // tp_pp_cp


def use_cuda() -> bool:
    """Whether this run uses CUDA (NCCL, TE when present) rather than the CPU bring-up."""
    return torch.cuda.is_available()


def initialize_parallel(parallel: ParallelConfig, seed: int = 1234) -> torch.device:
    """Join the process group (from torchrun's environment), build Megatron's groups, seed RNGs.

    On a machine without CUDA this enables :mod:`pr2_megatron.runtime.cpu` and uses gloo.
    Returns the device the model lives on.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    cuda = use_cuda()
    if not cuda:
        from pr2_megatron.runtime.cpu import enable_cpu_bringup

        enable_cpu_bringup()
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    parallel.check_world_size(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        release_parallel_state()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def destroy_parallel() -> None:
    """Tear down Megatron's groups and the default process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def release_parallel_state() -> None:
    """Forget Megatron's parallel state *and* shut its process groups down.

    ``destroy_model_parallel`` only drops Megatron's references; the groups stay alive in
    torch (gloo keeps threads per group), so a process that initialises parallel state many
    times (a test session) piles up thousands of idle threads. Every group except the default
    one belongs to the parallel state being replaced.
    """
    from megatron.core import parallel_state
    from torch.distributed import distributed_c10d

    parallel_state.destroy_model_parallel()
    default = distributed_c10d._get_default_group()
    for group in list(distributed_c10d._world.pg_map):
        if group is not default:
            dist.destroy_process_group(group)


def average_gradients(model: torch.nn.Module) -> None:
    """All-reduce gradients as Megatron's DDP would, for runs without its DDP wrapper.

    Sequence-parallel replicated weights (norms, router, predictor) are first summed over TP
    (each TP rank saw its own sequence chunk); then dense weights are averaged over the
    data-parallel group and expert weights over the expert-data-parallel group.
    """
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    dp_group = parallel_state.get_data_parallel_group()
    expert_dp_group = parallel_state.get_expert_data_parallel_group()
    for param in model.parameters():
        if param.grad is None:
            continue
        if getattr(param, "sequence_parallel", False) and dist.get_world_size(tp_group) > 1:
            dist.all_reduce(param.grad, group=tp_group)
        group = dp_group if getattr(param, "allreduce", True) else expert_dp_group
        if dist.get_world_size(group) > 1:
            dist.all_reduce(param.grad, group=group)
            param.grad /= dist.get_world_size(group)
