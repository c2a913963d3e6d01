"""Helpers for tests and benchmarks: build a tiny PR2 GPT-MoE and move full weights onto shards.

A reference model built in one process has the *full* parameters; :func:`load_full_state` copies
them into a model built under any TP/EP/PP layout (each rank takes its slice), so a distributed
run can be compared with the single-process reference on identical weights.
:func:`forward_backward` runs Megatron's pipeline schedules (PP, VPP) over a rank's model chunks
(:func:`build_chunks`), on CPU too (:func:`pipeline_on_cpu`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode

from pr2_megatron.model import MoEModelConfig, build_gpt_moe
from pr2_megatron.parallel import ParallelConfig, initialize_parallel
from pr2_megatron.router import PR2RouterConfig


@dataclass
class TinySetup:
    """Everything a test needs to build the same tiny model in any layout."""

    model: MoEModelConfig = field(default_factory=MoEModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    pr2: PR2RouterConfig = field(default_factory=PR2RouterConfig)
    seed: int = 1234


def build(setup: TinySetup, router: str = "pr2"):
    """Initialise parallel state for ``setup.parallel`` and build the model."""
    initialize_parallel(setup.parallel, seed=setup.seed)
    return build_gpt_moe(setup.model, setup.parallel, setup.pr2, router=router)


def global_state_dict(model) -> dict[str, torch.Tensor]:
    """State of a single-process model keyed by global layer and expert index (detached copies)."""
    return {name: tensor.detach().clone() for name, tensor in global_parameters(model).items()}


def global_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Each parameter of ``model`` (any layout) under its global (single-process) name."""
    from megatron.core import parallel_state

    ep_rank = parallel_state.get_expert_model_parallel_rank()
    out = {}
    layers = model.decoder.layers
    for name, param in model.named_parameters():
        match = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
        if match:
            local, rest = int(match.group(1)), match.group(2)
            layer = layers[local]
            expert = re.match(r"(mlp\.experts\.local_experts\.)(\d+)(\..*)", rest)
            if expert:
                num_local = layer.mlp.num_local_experts
                global_expert = ep_rank * num_local + int(expert.group(2))
                rest = f"{expert.group(1)}{global_expert}{expert.group(3)}"
            name = f"decoder.layers.{layer.layer_number - 1}.{rest}"
        out[name] = param
    return out


def load_full_state(model, full_state: dict[str, torch.Tensor]) -> None:
    """Copy full (single-process) parameters into ``model``'s shards for the current layout."""
    from megatron.core import parallel_state

    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    etp_size = parallel_state.get_expert_tensor_parallel_world_size()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    with torch.no_grad():
        for name, param in global_parameters(model).items():
            full = full_state[name]
            if getattr(param, "tensor_model_parallel", False):
                size, rank = (
                    (etp_size, etp_rank) if ".local_experts." in name else (tp_size, tp_rank)
                )
                full = full.chunk(size, dim=param.partition_dim)[rank]
            if tuple(full.shape) != tuple(param.shape):
                raise ValueError(f"{name}: full slice {tuple(full.shape)} != {tuple(param.shape)}")
            param.copy_(full)


def randomize_predictors(model, scale: float, seed: int) -> None:
    """Give every evolution predictor the same random weights on every rank (test drift)."""
    from pr2_megatron.router import PR2Router

    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, PR2Router):
            weight = module.predictor.weight
            with torch.no_grad():
                weight.copy_(torch.randn(weight.shape, generator=generator) * scale)


def token_batch(batch: int, seq: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(input_ids [B, S], labels [B, S])`` with a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    return ids, labels


def lm_loss(model, ids: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
    """Forward; with labels, mean token cross-entropy (vocab-parallel), else the logits."""
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    out = model(ids, positions, None, labels=labels)
    return out.float().mean() if labels is not None else out


def build_megatron_replay_model(setup: TinySetup):
    """The same model with Megatron's stock ``TopKRouter`` and its own ``RouterReplay`` on."""
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.moe.router import TopKRouter

    from pr2_megatron.model import transformer_config
    from pr2_megatron.specs import pr2_decoder_block_spec

    initialize_parallel(setup.parallel, seed=setup.seed)
    config = transformer_config(setup.model, setup.parallel)
    config.moe_enable_routing_replay = True
    spec = pr2_decoder_block_spec(config, router_builder=TopKRouter)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=setup.model.vocab_size,
        max_sequence_length=setup.model.max_sequence_length,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )


# ------------------------------------------------------------------ pipeline schedules on CPU
class _CudaFactoriesOnCPU(TorchFunctionMode):
    """Turns ``device="cuda"`` of tensor factories into the CPU (see :func:`pipeline_on_cpu`)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


@contextlib.contextmanager
def pipeline_on_cpu(model_chunks: Sequence[torch.nn.Module]):
    """Let Megatron's pipeline schedules (``get_forward_backward_func``) run on CPU with gloo.

    megatron-core 0.16.1's schedules need two things a CPU build of torch lacks:

    * ``total_num_tokens = torch.zeros([], dtype=torch.int, device="cuda")`` in all three
      schedules (no pipelining, 1F1B, interleaved): inside this context tensor factories asked
      for ``device="cuda"`` get the CPU (a torch function mode, active only in the context);
    * ``batch_p2p_comm`` (on by default) is switched off in the chunks' config. With it,
      ``torch.cuda.synchronize()`` runs after every batched p2p (``batch_p2p_sync``), and,
      worse, on gloo the interleaved (VPP) schedule with PP=2 silently crosses messages: one
      ``batch_isend_irecv`` posts a gradient (``send_prev``) and an activation (``send_next``)
      to the same rank with the same tag, that rank posts its activation receive first, and
      gloo matches them in posting order -- same shapes, so no error, wrong numbers from the
      first steady-state micro-batch on. Megatron's unbatched path (``_p2p_ops``) posts each
      rank's sends in the order its peer posts the receives (one group per sending rank when
      PP=2), so nothing crosses.

    On a machine with CUDA this changes nothing; on CPU the configs are restored on exit.
    """
    if torch.cuda.is_available():
        yield
        return
    configs = [chunk.config for chunk in model_chunks]
    saved = [config.batch_p2p_comm for config in configs]
    for config in configs:
        config.batch_p2p_comm = False
    try:
        with _CudaFactoriesOnCPU():
            yield
    finally:
        for config, value in zip(configs, saved):
            config.batch_p2p_comm = value


def forward_backward(
    model_chunks: Sequence[torch.nn.Module],
    forward_step_func,
    micro_batches: Sequence,
    *,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
) -> list:
    """Run Megatron's schedule for the current PP/VPP layout over ``micro_batches``.

    Every model chunk gets its own iterator over the same micro-batches (chunks after the
    first take their input from the previous stage, but still draw their micro-batch).
    Returns the schedule's ``forward_data_store`` (on the last stage: what the loss function
    returned as its last element, per micro-batch).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = list(model_chunks)
    schedule = get_forward_backward_func()
    with pipeline_on_cpu(chunks):
        return schedule(
            forward_step_func=forward_step_func,
            data_iterator=[iter(list(micro_batches)) for _ in chunks],
            model=chunks,
            num_microbatches=len(micro_batches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )


def build_chunks(setup: TinySetup, router: str = "pr2") -> list[torch.nn.Module]:
    """Initialise parallel state and build this rank's model chunks (one per VPP stage)."""
    initialize_parallel(setup.parallel, seed=setup.seed)
    vpp = setup.parallel.virtual_pipeline_model_parallel_size
    stages = [None] if vpp is None else list(range(vpp))
    return [
        build_gpt_moe(setup.model, setup.parallel, setup.pr2, router=router, vp_stage=stage)
        for stage in stages
    ]


def chunks_global_parameters(model_chunks: Sequence[torch.nn.Module]) -> dict:
    """:func:`global_parameters` of every chunk of a rank (VPP), in one dict."""
    out: dict[str, torch.nn.Parameter] = {}
    for chunk in model_chunks:
        out.update(global_parameters(chunk))
    return out
