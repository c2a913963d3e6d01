"""Every trainer forward through Megatron's ``get_forward_backward_func``, and its loss functions.

Legend: B samples of a forward, S positions, S_c = S / CP the rank's context-parallel part,
V / TP the rank's vocabulary shard, M micro-batches of one schedule call.

One code path for every layout: no pipelining, 1F1B (PP), interleaved (PP × VPP), with or
without context parallelism, on CPU (gloo, :func:`~pr2_megatron.runtime.cpu.pipeline_on_cpu`)
and GPU (NCCL). The forward step slices each ``[B, S]`` tensor to the rank's CP part
(Megatron's load-balanced split, :class:`SequenceSlicer`), runs the model chunk, and on the
last pipeline stage hands the logits to a loss function:

* :func:`logprob_loss`: log-probs only (old-log-prob pass, forward-only);
* :func:`ppo_loss_fn`: the PPO clipped loss, token-mean over the mini-batch on all DP ranks;
* :func:`sft_loss_fn`: the warm start's answer NLL, token-mean over the batch on all DP ranks.

Loss scaling. The schedule multiplies a loss function's loss by ``CP / M`` and Megatron's DDP
averages gradients over the ``DP × CP`` ranks, so a loss ``Σ_local · DP · M / N_global``
gives the gradient of ``Σ_all / N_global`` (N_global: the loss tokens of the whole batch on
every DP rank), which is what the trainer optimizes. MoE auxiliary losses (the PR2 predictor's
loss, attached with ``MoEAuxLossAutoScaler``) get the schedule's ``CP / M``: the predictor's
gradient is the mean over forwards, averaged over DP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist

__all__ = [
    "SequenceSlicer",
    "check_token_ids",
    "from_last_stage",
    "logprob_loss",
    "ppo_loss_fn",
    "run_schedule",
    "sft_loss_fn",
    "token_logprobs",
]


class SequenceSlicer:
    """The rank's context-parallel part of ``[B, S]`` tensors, and back to full rows.

    Megatron's load-balanced split (``get_batch_on_this_cp_rank``): chunks r and 2·CP−1−r of
    2·CP equal chunks of the sequence. Identity without context parallelism.
    """

    def __init__(self, seq_len: int) -> None:
        from megatron.core import parallel_state as ps

        from pr2_megatron.routes.targets import context_parallel_positions

        self.seq_len = seq_len
        self.size = ps.get_context_parallel_world_size()
        self.rank = ps.get_context_parallel_rank()
        self.group = ps.get_context_parallel_group() if self.size > 1 else None
        self.positions_of = [torch.arange(seq_len)]
        if self.size > 1:
            self.positions_of = [
                context_parallel_positions(seq_len, r, self.size) for r in range(self.size)
            ]

    def local(self, tensor_BS: torch.Tensor) -> torch.Tensor:
        """``[B, S_c]``: the positions this rank's forward holds."""
        if self.size == 1:
            return tensor_BS
        return tensor_BS[:, self.positions_of[self.rank].to(tensor_BS.device)]

    def full(self, local_BS: torch.Tensor) -> torch.Tensor:
        """``[B, S]`` from every CP rank's ``[B, S_c]`` (collective over the CP group)."""
        if self.size == 1:
            return local_BS
        parts = [torch.empty_like(local_BS) for _ in range(self.size)]
        dist.all_gather(parts, local_BS.contiguous(), group=self.group)
        out = local_BS.new_empty((local_BS.shape[0], self.seq_len, *local_BS.shape[2:]))
        for part, positions in zip(parts, self.positions_of):
            out[:, positions.to(out.device)] = part
        return out


def check_token_ids(tokens: torch.Tensor, vocab_size: int, what: str) -> None:
    """ValueError naming the first token id outside ``[0, vocab_size)``, its row and position.

    Without it a bad id fails deep inside the embedding or the log-prob gather with a bare
    "index out of range" on CPU, and with a device-side assert that names nothing on GPU.
    """
    bad = (tokens < 0) | (tokens >= vocab_size)
    if bool(bad.any()):
        row, position = (int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(
            f"{what} token id {int(tokens[row, position])} at sample row {row}, position "
            f"{position} is outside the vocabulary [0, {vocab_size}) (model.vocab_size)"
        )


def token_logprobs(
    logits_BSV: torch.Tensor, labels_BS: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``[B, S]`` log π(label) of vocabulary-parallel logits (Megatron's vocab-parallel CE)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return -vocab_parallel_cross_entropy(logits_BSV.float() / temperature, labels_BS)


def from_last_stage(tensor: Optional[torch.Tensor], shape, dtype, device) -> torch.Tensor:
    """The last pipeline stage's ``tensor`` on every stage (broadcast over the PP group)."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return tensor
    if tensor is None:
        tensor = torch.empty(shape, dtype=dtype, device=device)
    tensor = tensor.contiguous()
    dist.broadcast(
        tensor,
        src=ps.get_pipeline_model_parallel_last_rank(),
        group=ps.get_pipeline_model_parallel_group(),
    )
    return tensor


# ------------------------------------------------------------------------------ loss functions
def _logprobs_of(batch, logits_BSV, slicer, temperature, vocab_size):
    labels_BS = slicer.local(batch.labels_BS)
    check_token_ids(labels_BS, vocab_size, "label")
    return token_logprobs(logits_BSV, labels_BS, temperature)


def logprob_loss(batch, logits_BSV, slicer, *, temperature: float, vocab_size: int):
    """Forward-only: no loss, the forward's ``[B, S_c]`` log-probs."""
    logp_BS = _logprobs_of(batch, logits_BSV, slicer, temperature, vocab_size)
    return logp_BS.sum() * 0.0, {"logp": logp_BS.detach()}


def ppo_loss_fn(
    batch,
    logits_BSV,
    slicer: SequenceSlicer,
    *,
    temperature: float,
    vocab_size: int,
    scale: float,
    eps_low: float,
    eps_high: float,
):
    """PPO clipped loss of one forward, ``scale`` = DP · M / N_global (module docstring)."""
    from pr2_megatron.rl.grpo import ppo_loss

    logp_BS = _logprobs_of(batch, logits_BSV, slicer, temperature, vocab_size)
    loss, ratio_BS = ppo_loss(
        logp_BS,
        slicer.local(batch.old_logp_BS),
        batch.advantages_B.unsqueeze(-1),
        slicer.local(batch.mask_BS),
        eps_low,
        eps_high,
    )
    return loss * scale, {"logp": logp_BS.detach(), "ratio": ratio_BS.detach()}


def sft_loss_fn(batch, logits_BSV, slicer, *, vocab_size: int, scale: float):
    """Warm start: answer NLL of one forward (temperature 1), ``scale`` = DP · M / N_global."""
    logp_BS = _logprobs_of(batch, logits_BSV, slicer, 1.0, vocab_size)
    nll = -(logp_BS * slicer.local(batch.mask_BS)).sum()
    return nll * scale, {"nll": nll.detach()}


# ----------------------------------------------------------------------------------- schedule
def run_schedule(
    chunks: Sequence[torch.nn.Module],
    micro_batches: Sequence,
    loss_fn: Callable,
    *,
    seq_len: int,
    vocab_size: int,
    forward_only: bool,
) -> list[dict]:
    """Run Megatron's schedule of the current layout over ``micro_batches``.

    ``loss_fn(batch, logits_BSV, slicer)`` turns a forward's ``[B, S_c, V / TP]`` logits into
    ``(loss, outputs)`` (a partial of the loss functions above). Returns the ``outputs`` per
    micro-batch, in order, on the last pipeline stage ([] elsewhere). Forward-only runs
    without grad. Route targets and token names are queued by the caller before the schedule
    (each router consumes them in micro-batch order).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from pr2_megatron.runtime.cpu import pipeline_on_cpu

    if not micro_batches:
        return []
    _reset_aux_loss_scale()
    step = partial(
        _forward_step, loss_fn=loss_fn, slicer=SequenceSlicer(seq_len), vocab_size=vocab_size
    )
    grad = torch.no_grad() if forward_only else contextlib.nullcontext()
    with grad, pipeline_on_cpu(list(chunks)):
        return get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=[iter(list(micro_batches)) for _ in chunks],
            model=list(chunks),
            num_microbatches=len(micro_batches),
            seq_length=seq_len,
            micro_batch_size=len(micro_batches[0]),
            forward_only=forward_only,
        )


def _reset_aux_loss_scale() -> None:
    """Clear Megatron's process-global MoE aux-loss scale before a schedule sets it again.

    The schedules ``copy_`` a ``[1]`` scale into ``MoEAuxLossAutoScaler.main_loss_backward_scale``
    (megatron-core 0.16), but a backward through an aux loss outside the schedules (a plain
    ``loss.backward()`` in the same process: an evaluation, a test, another model) leaves a 0-d
    tensor there, and every later schedule then fails with "output with shape [] doesn't match
    the broadcast shape [1]". Each schedule forward sets the scale before its backward, so
    clearing it loses nothing.
    """
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    scale = MoEAuxLossAutoScaler.main_loss_backward_scale
    if scale is not None and scale.dim() == 0:
        MoEAuxLossAutoScaler.main_loss_backward_scale = None


def _forward_step(data_iterator, model, *, loss_fn, slicer, vocab_size):
    """Megatron's ``forward_step_func``: the rank's CP part in, logits to ``loss_fn`` out."""
    batch = next(data_iterator)
    ids_BS = slicer.local(batch.ids_BS)
    check_token_ids(ids_BS, vocab_size, "input")
    positions_BS = slicer.local(
        torch.arange(batch.ids_BS.shape[1], device=ids_BS.device).expand_as(batch.ids_BS)
    )
    output = model(ids_BS, positions_BS, None)
    return output, partial(loss_fn, batch, slicer=slicer)
