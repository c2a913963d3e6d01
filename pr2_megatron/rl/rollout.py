"""Rollout with the Megatron model itself: the full-forward sampler, and what samplers share.

Legend: B sequences of a micro-batch, S the fixed forward length, L MoE layers of this rank, K
top-k, V vocabulary.

:func:`generate_full_forward` runs one forward over the whole ``[B, S]`` buffer for every new
token (no KV cache: every step has the same shape, so a position's numbers do not change between
steps). It is the fallback of :func:`pr2_megatron.rl.generation.generate`, which decodes with a
KV cache wherever megatron-core's static inference context runs (docs/trainer.md). Routes are
captured *as the tokens are generated*: the prompt's rows from the first forward, then each new
token's row from the forward that consumed it. All ranks of an expert-parallel group run the
same number of forwards (``max_new_tokens`` per micro-batch), whether or not their sequences
have already stopped, so the dispatcher's collectives always match.

The rollout may run with other numerics than training (``dtype='bf16'``: autocast to bfloat16,
as a separate inference engine would), which is what makes r3 (rollout routes) differ from r2
(routes of the trainer's own old-policy pass).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch

from pr2_megatron.rl.sampling import make_noise, sample_tokens, sample_with_noise
from pr2_megatron.rl.tasks import Problem
from pr2_megatron.routes.path import MicroBatch
from pr2_megatron.routes.table import route_dtype

__all__ = [
    "RolloutMicroBatch",
    "forward_logits",
    "full_vocab_logits",
    "generate_full_forward",
    "model_device",
    "numerics",
    "prompt_buffer",
    "sample_tokens",
]


@dataclass
class RolloutMicroBatch:
    """One rollout micro-batch: sequences, their lengths, log-probs and captured routes."""

    #: ``[B, S + 1]`` prompt + response, right-padded; training input is ``[:, :S]``,
    #: labels ``[:, 1:]``.
    tokens: torch.Tensor
    #: ``[B]`` prompt lengths and total lengths (prompt + response).
    prompt_lens: torch.Tensor
    total_lens: torch.Tensor
    #: ``[B, S]`` log π_rollout of ``tokens[:, t + 1]`` at position t (0 outside responses).
    logprobs: torch.Tensor
    #: Sample ids of the B sequences (names in route tables and the feature cache).
    sample_ids: list[int] = field(default_factory=list)
    #: ``[S, B, L, K]`` routes used at rollout (predicted ones in the predict phase) and the
    #: plain-replay route (the live top-k), in the route table's dtype
    #: (:func:`pr2_megatron.routes.table.route_dtype` of the controller's ``route_id_bound``);
    #: rows at positions ``>= total_lens - 1`` are 0. None when the routers did not record.
    #: With sequence parallelism: this TP rank's ``S / TP`` chunk.
    routes_SBLK: Optional[torch.Tensor] = None
    plain_routes_SBLK: Optional[torch.Tensor] = None

    @property
    def input_lens(self) -> list[int]:
        """Token rows of each sample's training input (its routes in the route table)."""
        return (self.total_lens - 1).tolist()

    def loss_mask(self) -> torch.Tensor:
        """``[B, S]`` 1.0 at the positions whose next token is a response token."""
        seq = self.logprobs.shape[1]
        position = torch.arange(seq).unsqueeze(0)
        return (
            (position >= self.prompt_lens.unsqueeze(1) - 1)
            & (position < self.total_lens.unsqueeze(1) - 1)
        ).float()

    def responses(self) -> list[list[int]]:
        """Response token ids of each sample (``<eos>`` included when generated)."""
        return [
            self.tokens[b, int(p) : int(n)].tolist()
            for b, (p, n) in enumerate(zip(self.prompt_lens, self.total_lens))
        ]


def full_vocab_logits(logits_BSV: torch.Tensor) -> torch.Tensor:
    """Gather vocabulary-parallel logits over tensor-parallel ranks (no-op at TP=1)."""
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return logits_BSV
    return tensor_parallel.gather_from_tensor_model_parallel_region(logits_BSV)


def forward_logits(model, ids_BS: torch.Tensor) -> torch.Tensor:
    """``[B, S, V]`` full-vocabulary logits of ``model`` for right-padded ``ids``."""
    positions = torch.arange(ids_BS.shape[1], device=ids_BS.device).expand_as(ids_BS)
    return full_vocab_logits(model(ids_BS, positions, None))


def model_device(model) -> torch.device:
    """The device of ``model``'s parameters (where its input ids must be)."""
    return next(model.parameters()).device


def numerics(dtype: str):
    """Context for a forward in ``dtype``: bf16 autocast, or nothing for fp32."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    if dtype == "bf16":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    raise ValueError(f"rollout dtype must be fp32 or bf16, got {dtype!r}")


def prompt_buffer(
    problems: list[Problem], seq_len: int, max_new_tokens: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, S + 1]`` right-padded prompts (``pad_id`` elsewhere) and the ``[B]`` prompt lengths.

    ValueError when the longest prompt and ``max_new_tokens`` do not fit ``seq_len`` positions
    (the last new token is never fed, so ``prompt + max_new_tokens - 1 <= seq_len``).
    """
    if not problems:
        raise ValueError("a rollout micro-batch needs at least one problem")
    prompt_lens = torch.tensor([len(p.prompt) for p in problems])
    if int(prompt_lens.min()) < 1:
        raise ValueError(f"problem {int(prompt_lens.argmin())} of the micro-batch has no prompt")
    if int(prompt_lens.max()) + max_new_tokens - 1 > seq_len:
        raise ValueError(
            f"seq_len={seq_len} is too short for prompts of {int(prompt_lens.max())} tokens and "
            f"{max_new_tokens} new tokens"
        )
    tokens = torch.full((len(problems), seq_len + 1), pad_id, dtype=torch.long)
    for row, problem in enumerate(problems):
        tokens[row, : len(problem.prompt)] = torch.tensor(problem.prompt)
    return tokens, prompt_lens


def generate_full_forward(
    model,
    problems: list[Problem],
    *,
    seq_len: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    generator,
    eos_id: int,
    pad_id: int,
    path=None,
    sample_ids: Optional[list[int]] = None,
    dtype: str = "fp32",
) -> RolloutMicroBatch:
    """Sample responses for ``problems`` (one micro-batch) and capture their routes.

    One forward over the whole ``[B, S]`` buffer per new token, always ``max_new_tokens`` of
    them. ``eos_id`` ends a response; ``pad_id`` fills the buffer (both from the task or its
    tokenizer). ``path`` (a :class:`~pr2_megatron.routes.RoutePath` whose controller is already
    in the ``record`` or ``predict`` phase, or None) supplies the routes; they are read from the
    forwards this call runs, so earlier forwards of the same phase may exist. In the predict
    phase the predictor's feature cache is offered each position once, when its route is
    captured, under the path's token names of ``sample_ids`` (default ``0..B-1``). Sampling
    draws one ``[B, V]`` noise block from ``generator`` per step (:mod:`pr2_megatron.rl.sampling`).
    """
    batch = len(problems)
    sample_ids = list(range(batch)) if sample_ids is None else list(sample_ids)
    tokens, prompt_lens = prompt_buffer(problems, seq_len, max_new_tokens, pad_id)
    lengths = prompt_lens.clone()
    active = torch.ones(batch, dtype=torch.bool)
    logprobs = torch.zeros(batch, seq_len)
    controller = None if path is None else path.controller
    recording = controller is not None and bool(controller.routers)
    first_forward = len(controller.routers[0].recorded) if recording else 0
    names = MicroBatch(sample_ids, seq_len) if recording else None
    device = model_device(model)
    # Which position's route to keep from each forward: prefill keeps the prompt, later steps
    # the token just fed (-1: nothing, the sequence has stopped).
    keep_after_prefill: list[torch.Tensor] = []
    noise = None
    for step in range(max_new_tokens):
        if recording:
            captured = _captured_positions(step, prompt_lens, lengths, active, seq_len)
            path.name_tokens(names, captured)
        with torch.no_grad(), numerics(dtype):
            logits = forward_logits(model, tokens[:, :seq_len].to(device))
        last_BV = logits[torch.arange(batch, device=device), (lengths - 1).to(device)]
        if noise is None:
            noise = make_noise(generator, batch, last_BV.shape[-1], max_new_tokens)
        if step > 0:
            keep_after_prefill.append(torch.where(active, lengths - 1, -1))
        sample_step(tokens, logprobs, lengths, active, last_BV, step, noise, temperature, top_p)
        active &= tokens[torch.arange(batch), lengths - 1] != eos_id
    noise.finish()
    out = RolloutMicroBatch(tokens, prompt_lens, lengths, logprobs, sample_ids)
    if recording:
        phase = controller.phase.value
        routes = controller.collect_routes()[first_forward:]
        plain = controller.collect_plain_routes()[first_forward:] if phase == "predict" else routes
        positions = _local_positions(seq_len, routes[0].shape[0] // batch, path)
        dtype_ = route_dtype(controller.route_id_bound)
        out.routes_SBLK, out.plain_routes_SBLK = (
            captured_routes(r, positions, batch, prompt_lens, keep_after_prefill, dtype_)
            for r in (routes, plain)
        )
    return out


def sample_step(tokens, logprobs, lengths, active, last_BV, step, noise, temperature, top_p):
    """Sample the ``step``-th new token of the active rows; write it into the CPU buffers.

    ``tokens`` ``[B, S + 1]``, ``logprobs`` ``[B, S]``, ``lengths`` and ``active`` ``[B]`` (CPU)
    are updated in place for the active rows (``lengths`` grows by one there).
    """
    rows = torch.nonzero(active).squeeze(-1)
    if rows.numel() == 0:
        return
    noise_RV = noise.take(torch.full_like(rows, step), rows, active)
    new_R, logprob_R = sample_with_noise(
        last_BV[rows.to(last_BV.device)], temperature, top_p, noise_RV
    )
    tokens[rows, lengths[rows]] = new_R.cpu()
    logprobs[rows, lengths[rows] - 1] = logprob_R.float().cpu()
    lengths[rows] += 1


def _captured_positions(step, prompt_lens, lengths, active, seq_len) -> torch.Tensor:
    """``[S, B]`` bool: the positions whose route this generation step captures."""
    position = torch.arange(seq_len).unsqueeze(1)
    if step == 0:
        return position < prompt_lens.unsqueeze(0)
    return (position == (lengths - 1).unsqueeze(0)) & active.unsqueeze(0)


def _local_positions(seq_len: int, local_len: int, path) -> torch.Tensor:
    """``[S_local]``: the position of each of this rank's router rows (its CP part, SP chunk)."""
    if local_len == seq_len:
        return torch.arange(seq_len)
    if path is not None:
        return path.local_rows(torch.arange(seq_len))
    from megatron.core import parallel_state  # sequence parallelism without a path

    start = parallel_state.get_tensor_model_parallel_rank() * local_len
    return torch.arange(start, start + local_len)


def captured_routes(routes_F, positions_R, batch, prompt_lens, keep_after_prefill, dtype):
    """``[S_local, B, L, K]`` routes of one micro-batch's generation forwards (full forwards).

    ``routes_F[f]``: forward f's ``[S_local·B, L, K]`` routes, in Megatron's ``[S, B]`` order of
    the rank's rows, whose positions are ``positions_R`` (the rank's CP part and SP chunk:
    :meth:`~pr2_megatron.routes.RoutePath.local_rows`). Forward 0 keeps the prompt positions,
    forward ``f >= 1`` the position ``keep_after_prefill[f - 1][b]`` of sample b (-1: none).
    Positions never kept are 0. Routes are stored in ``dtype`` (the route table's).
    """
    local_len = positions_R.numel()
    shape = (local_len, batch, *routes_F[0].shape[1:])
    out = torch.zeros(shape, dtype=dtype)
    prompt_RB = positions_R.unsqueeze(1) < prompt_lens.unsqueeze(0)
    prefill = routes_F[0].reshape(shape).cpu().to(dtype)
    out[prompt_RB] = prefill[prompt_RB]
    for forward, keep_B in enumerate(keep_after_prefill, start=1):
        keep_RB = (positions_R.unsqueeze(1) == keep_B.unsqueeze(0)) & (keep_B >= 0).unsqueeze(0)
        if bool(keep_RB.any()):
            step_routes = routes_F[forward].reshape(shape).cpu().to(dtype)
            out[keep_RB] = step_routes[keep_RB]
    return out
