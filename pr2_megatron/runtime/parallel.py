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
    #: Virtual pipeline chunks per stage (VPP, Megatron's interleaved schedule), or None.
    virtual_pipeline_model_parallel_size: Optional[int] = None
    #: Context parallel size (CP): each rank holds 1/CP of every sequence.
    context_parallel_size: int = 1
    #: Expert parallel size (EP): experts are split across this many ranks.
    expert_model_parallel_size: int = 1
    #: Tensor parallel size inside experts (gloo supports 1 only: uneven all-gathers).
    expert_tensor_parallel_size: int = 1
    #: Sequence parallelism: with TP > 1 each TP rank routes S/TP tokens.
    sequence_parallel: bool = False
    #: Uneven pipeline (DeepSeek-V3's 61 layers): decoder layers of the first and of the last
    #: stage (Megatron's ``num_layers_in_first/last_pipeline_stage``; None: the even split);
    #: the middle stages share the rest evenly. With VPP each must divide by the chunk count.
    num_layers_in_first_pipeline_stage: Optional[int] = None
    num_layers_in_last_pipeline_stage: Optional[int] = None

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
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and (vpp < 1 or self.pipeline_model_parallel_size == 1):
            raise ValueError(
                f"parallel.virtual_pipeline_model_parallel_size={vpp} needs "
                f"pipeline_model_parallel_size > 1 (got {self.pipeline_model_parallel_size}) "
                "and at least 1 chunk"
            )
        for name in ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage"):
            value = getattr(self, name)
            if value is not None and (value < 1 or self.pipeline_model_parallel_size == 1):
                raise ValueError(
                    f"parallel.{name}={value} needs pipeline_model_parallel_size > 1 (got "
                    f"{self.pipeline_model_parallel_size}) and at least 1 layer"
                )

    @property
    def uneven_pipeline(self) -> bool:
        """Whether the first or last stage has its own layer count."""
        return (
            self.num_layers_in_first_pipeline_stage is not None
            or self.num_layers_in_last_pipeline_stage is not None
        )

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
                f"{self.context_parallel_size} (parallel.tensor_model_parallel_size, "
                "pipeline_model_parallel_size, context_parallel_size)"
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
                f"{self.pipeline_model_parallel_size} (parallel.expert_model_parallel_size, "
                "expert_tensor_parallel_size, pipeline_model_parallel_size)"
            )
        return world_size // tp_pp_cp

    def layers_per_stage(self, num_layers: int) -> list[int]:
        """Decoder layers of each pipeline stage (Megatron's split); ValueError naming the keys."""
        pp, vpp = self.pipeline_model_parallel_size, self.virtual_pipeline_model_parallel_size
        chunks = vpp or 1
        first, last = (
            self.num_layers_in_first_pipeline_stage,
            self.num_layers_in_last_pipeline_stage,
        )
        if not self.uneven_pipeline:
            if num_layers % (pp * chunks):
                raise ValueError(
                    f"model.num_layers={num_layers} is not divisible by "
                    f"parallel.pipeline_model_parallel_size={pp}"
                    + (f" × virtual_pipeline_model_parallel_size={vpp}" if vpp else "")
                    + " (set parallel.num_layers_in_first/last_pipeline_stage for an uneven split)"
                )
            return [num_layers // pp] * pp
        middle_layers, middle_stages = num_layers, pp
        for name, value in (
            ("num_layers_in_first_pipeline_stage", first),
            ("num_layers_in_last_pipeline_stage", last),
        ):
            if value is None:
                continue
            if value % chunks:
                raise ValueError(
                    f"parallel.{name}={value} is not divisible by "
                    f"parallel.virtual_pipeline_model_parallel_size={vpp}"
                )
            middle_layers -= value
            middle_stages -= 1
        if middle_layers < 0 or bool(middle_layers) != bool(middle_stages):
            raise ValueError(
                f"model.num_layers={num_layers} leaves {middle_layers} layers for {middle_stages} "
                f"middle pipeline stages after parallel.num_layers_in_first_pipeline_stage={first}"
                f" and num_layers_in_last_pipeline_stage={last}"
            )
        if middle_stages and middle_layers % (middle_stages * chunks):
            raise ValueError(
                f"the {middle_layers} layers left after parallel.num_layers_in_first_pipeline_"
                f"stage={first} and num_layers_in_last_pipeline_stage={last} do not divide over "
                f"{middle_stages} middle pipeline stages"
                + (f" × virtual_pipeline_model_parallel_size={vpp}" if vpp else "")
            )
        middle = middle_layers // middle_stages if middle_stages else 0
        stages = [middle] * pp
        if first is not None:
            stages[0] = first
        if last is not None:
            stages[-1] = last
        return stages


def check_model_layout(parallel: ParallelConfig, model, world_size: int) -> int:
    """Every size of ``model`` (a ``MoEModelConfig``) that ``parallel`` must divide, at once.

    Returns the data-parallel size. Raises ValueError naming the keys and values: the world
    size against TP×PP×CP and EP×ETP×PP, layers over pipeline stages (even or uneven, VPP
    chunks), heads and query groups, FFN widths and the vocabulary over TP, experts over EP,
    FFN widths of experts over ETP, and MoE with TP but without sequence parallelism (which
    megatron-core refuses in training). Pure arithmetic: no process group is needed.
    """
    dp = parallel.check_world_size(world_size)
    parallel.layers_per_stage(model.num_layers)
    tp = parallel.tensor_model_parallel_size
    tp_sized = {
        "num_attention_heads": model.num_attention_heads,
        "num_query_groups": model.num_query_groups,
        "ffn_hidden_size": model.ffn_hidden_size,
        "shared_expert_ffn_hidden_size": model.shared_expert_ffn_hidden_size,
        "vocab_size": model.vocab_size,
    }
    for name, value in tp_sized.items():
        if value is not None and value % tp:
            raise ValueError(
                f"model.{name}={value} is not divisible by parallel.tensor_model_parallel_size={tp}"
            )
    ep, etp = parallel.expert_model_parallel_size, parallel.expert_tensor_parallel_size
    if model.num_experts % ep:
        raise ValueError(
            f"model.num_experts={model.num_experts} is not divisible by "
            f"parallel.expert_model_parallel_size={ep}"
        )
    if model.expert_ffn_hidden_size % etp:
        raise ValueError(
            f"model.expert_ffn_hidden_size={model.expert_ffn_hidden_size} is not divisible by "
            f"parallel.expert_tensor_parallel_size={etp}"
        )
    if tp > 1 and not parallel.sequence_parallel:
        raise ValueError(
            f"parallel.tensor_model_parallel_size={tp} with MoE layers needs "
            "parallel.sequence_parallel=true (megatron-core refuses MoE with TP but without SP "
            "in training)"
        )
    return dp


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


def device() -> torch.device:
    """The device of this rank's model and of every tensor that meets a collective.

    The current CUDA device with CUDA (NCCL), else the CPU (gloo): one code path for both.
    """
    if use_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_expert_parameter(name: str) -> bool:
    """Whether a parameter (by its name in the model) is a routed expert's weight."""
    return ".experts." in name and ".shared_experts." not in name


def mark_expert_parameters(model: torch.nn.Module) -> int:
    """Mark every routed expert's weight ``allreduce = False``, at every EP (returns how many).

    Megatron marks experts ``allreduce = not expert_parallel``, so at EP=1 they go into the
    dense gradient buffer, which is reduced over DP only: with TP=2 (sequence parallelism,
    expert TP 1) each TP rank's expert replica saw its own sequence chunk and the replicas
    drift apart, because nothing sums their gradients over TP. Marked, Megatron's DDP (and
    :func:`average_gradients`) reduce them over the expert-data-parallel group, which spans the
    TP ranks, with the data-parallel scale; the optimizer then also has the same dense + expert
    structure at every EP, which resharding a checkpoint between EP sizes needs.
    """
    count = 0
    for name, param in model.named_parameters():
        if is_expert_parameter(name):
            param.allreduce = False
            count += 1
    return count


def average_gradients(model: torch.nn.Module) -> None:
    """All-reduce ``.grad`` as Megatron's DDP does, for loops without its DDP wrapper.

    The loss of each rank is its data-parallel share's mean (the global loss is the mean over
    the data-parallel ranks). Sequence-parallel replicated weights (norms, router, predictor)
    are first summed over TP (each TP rank saw its own sequence chunk). Dense weights are then
    averaged over the data-parallel (× context-parallel) group. Expert weights (marked
    ``allreduce = False``, :func:`mark_expert_parameters`) are *summed* over the
    expert-data-parallel group and divided by the data-parallel size: an expert's local
    gradient already holds every expert-parallel rank's tokens (the dispatcher brought them),
    so dividing by the expert-data-parallel size instead over-scales it by EP.
    """
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    expert_dp_group = parallel_state.get_expert_data_parallel_group()
    dp_size = dist.get_world_size(dp_group)
    for param in model.parameters():
        if param.grad is None:
            continue
        if getattr(param, "sequence_parallel", False) and dist.get_world_size(tp_group) > 1:
            dist.all_reduce(param.grad, group=tp_group)
        group = dp_group if getattr(param, "allreduce", True) else expert_dp_group
        if dist.get_world_size(group) > 1:
            dist.all_reduce(param.grad, group=group)
        if dp_size > 1:
            param.grad /= dp_size
