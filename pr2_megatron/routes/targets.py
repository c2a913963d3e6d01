"""Route table -> the replay targets of one training forward, for any training layout.

Legend: S sequence (micro-batch length), B samples in a micro-batch, T = S·B tokens (Megatron's
``[S, B]`` order, s-major), L MoE layers, K top-k.

Whatever the training micro-batch layout is -- other micro-batch size, order, data-parallel
split -- :func:`micro_batch_targets` takes the rows of the micro-batch's samples from the table,
keeps the stage's layers (PP/VPP) and slices the rank's context-parallel part and
sequence-parallel chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from pr2_megatron.errors import RouteError
from pr2_megatron.routes.table import RouteTable

__all__ = [
    "context_parallel_positions",
    "local_positions",
    "micro_batch_targets",
    "padding_routes_of",
]


def context_parallel_positions(seq_len: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """Sequence positions held by context-parallel rank ``cp_rank``, in the rank's order.

    Megatron's load-balanced split (``megatron.core.utils.get_batch_on_this_cp_rank``): the
    sequence is cut into ``2·CP`` equal chunks and rank r holds chunks ``r`` and
    ``2·CP − 1 − r``, concatenated. Returns int64 ``[S/CP]``.
    """
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise RouteError(f"context-parallel rank {cp_rank} is outside a group of {cp_size}")
    if seq_len % (2 * cp_size):
        raise RouteError(
            f"sequence length {seq_len} is not divisible by 2·CP = {2 * cp_size} (Megatron's "
            "load-balanced context-parallel split)"
        )
    chunk = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk)
    return torch.cat([first, second])


def local_positions(
    seq_len: int, *, tp_rank: int = 0, tp_size: int = 1, cp_rank: int = 0, cp_size: int = 1
) -> torch.Tensor:
    """Sequence positions of the tokens this rank routes, in its ``[S_local]`` order (int64).

    Context parallelism keeps the rank's 2 of ``2·CP`` chunks (:func:`context_parallel_positions`);
    sequence parallelism (``tp_size > 1``) then the TP rank's chunk of those (``S/CP/TP``).
    """
    positions_S = torch.arange(seq_len)
    if cp_size > 1:
        positions_S = context_parallel_positions(seq_len, cp_rank, cp_size)
    if tp_size > 1:
        local = positions_S.numel()
        if local % tp_size:
            raise RouteError(
                f"sequence length {local} (of {seq_len}, context-parallel size {cp_size}) is not "
                f"divisible by TP={tp_size}"
            )
        chunk = local // tp_size
        positions_S = positions_S[tp_rank * chunk : (tp_rank + 1) * chunk]
    return positions_S


def padding_routes_of(numbers_R: torch.Tensor, topk: int, num_experts: int) -> torch.Tensor:
    """``[R, K]`` distinct expert ids for the padding tokens numbered ``numbers_R``.

    Padding token n gets ``(n·K + j) mod E`` for j < K: consecutive padding tokens walk through
    all E experts, so padding lands on every expert (and every expert-parallel rank) alike
    instead of piling on the first K experts. Padding never influences a real token, so any
    distinct ids are exact.
    """
    if topk > num_experts:
        raise RouteError(
            f"top-{topk} padding routes need at least {topk} experts, got {num_experts}"
        )
    offsets_K = torch.arange(topk, device=numbers_R.device)
    return (numbers_R.unsqueeze(1) * topk + offsets_K) % num_experts


def _padding_numbers(positions_S: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
    """``[S_local, B]``: each padding token's index among the micro-batch's padding tokens.

    Counted in the whole ``[S, B]`` micro-batch's row-major order (position, then sample), so a
    rank's sequence-parallel or context-parallel slice numbers its padding as the full
    micro-batch does.
    """
    pad_SB = positions_S.unsqueeze(1) >= lengths_B.unsqueeze(0)
    before_row_S = (positions_S.unsqueeze(1) - lengths_B.unsqueeze(0)).clamp(min=0).sum(1)
    within_row_SB = pad_SB.long().cumsum(1) - pad_SB.long()
    return before_row_S.unsqueeze(1) + within_row_SB


def _replay_source(
    table: RouteTable, layer_numbers: Optional[Sequence[int]], plain: bool
) -> torch.Tensor:
    """The table's routes ``[T, L, K]`` to replay, columns ``layer_numbers`` (default: all).

    The predicted routes, or the plain-replay routes (live top-k at rollout) with ``plain``.
    """
    source = table.plain_routes_TLK if plain else table.routes_TLK
    if source is None:
        raise RouteError("the route table holds no plain-replay (live top-k at rollout) routes")
    if layer_numbers is not None:
        columns = torch.as_tensor(
            [table.layer_index(int(n)) for n in layer_numbers],
            dtype=torch.long,
            device=source.device,
        )
        source = source.index_select(1, columns)
    return source


def micro_batch_targets(
    table: RouteTable,
    sample_ids: Sequence[int],
    seq_len: int,
    *,
    lengths: Optional[Sequence[int]] = None,
    tp_rank: int = 0,
    tp_size: int = 1,
    sequence_parallel: bool = False,
    cp_rank: int = 0,
    cp_size: int = 1,
    layer_numbers: Optional[Sequence[int]] = None,
    plain: bool = False,
    padding_experts: Optional[int] = None,
) -> torch.Tensor:
    """Replay targets ``[T_local, L, K]`` (int64) for a training micro-batch of these samples.

    Rows follow Megatron's flattened ``[S, B]`` order. With context parallelism only the
    rank's positions are kept (:func:`context_parallel_positions`, the order
    ``get_batch_on_this_cp_rank`` gives the rank's tokens); with sequence parallelism then only
    this TP rank's chunk of those (``S/CP/TP`` positions). ``layer_numbers`` (default: every
    layer of the table) picks the columns, e.g. a pipeline stage's (all VPP chunks')
    ``RoutingController.layer_numbers``; an empty list gives ``[T_local, 0, K]`` for a stage
    without MoE layers. ``plain=True`` returns the plain-replay (live top-k at rollout) routes.
    The targets live on the table's device.

    ``lengths`` (default: ``seq_len`` for every sample) are the samples' real token counts when
    the micro-batch is right-padded to ``seq_len``: the table holds only the real tokens (it is
    packed), and the padding positions get :func:`padding_routes_of` over ``padding_experts``
    experts (default the table's E; pass the routed experts when the table's ids go beyond
    them, as ProbMoE dynamic-k's empty slots do). Right padding never influences a real token
    (causal attention, per-token routing), so this is exact for every unmasked token.
    """
    lengths = [seq_len] * len(sample_ids) if lengths is None else list(lengths)
    if len(lengths) != len(sample_ids):
        raise RouteError(f"{len(sample_ids)} sample ids but {len(lengths)} lengths")
    too_long = [(s, n) for s, n in zip(sample_ids, lengths) if not 0 <= n <= seq_len]
    if too_long:
        sample, length = too_long[0]
        raise RouteError(f"sample id {sample}: length {length} is outside [0, {seq_len}]")
    table.check_tokens(sample_ids, lengths)
    source = _replay_source(table, layer_numbers, plain)
    device = source.device
    positions_S = local_positions(
        seq_len,
        tp_rank=tp_rank,
        tp_size=tp_size if sequence_parallel else 1,
        cp_rank=cp_rank,
        cp_size=cp_size,
    ).to(device)
    batch = len(sample_ids)
    lengths_B = torch.tensor(lengths, dtype=torch.long, device=device)
    # Table row of each (local position, sample) token; -1 for padding.
    starts_B = _sample_starts(table, sample_ids, device)
    real_SB = positions_S.unsqueeze(1) < lengths_B.unsqueeze(0)
    rows_SB = torch.where(real_SB, starts_B.unsqueeze(0) + positions_S.unsqueeze(1), -1)
    num_layers, topk = source.shape[1], table.topk
    routes_SBLK = torch.empty(
        (positions_S.numel(), batch, num_layers, topk), dtype=torch.long, device=device
    )
    routes_SBLK[real_SB] = source[rows_SB[real_SB]].long()
    pad_SB = ~real_SB
    if bool(pad_SB.any()) and num_layers:
        number_SB = _padding_numbers(positions_S, lengths_B)
        pad_TK = padding_routes_of(number_SB[pad_SB], topk, padding_experts or table.num_experts)
        routes_SBLK[pad_SB] = pad_TK.unsqueeze(1).expand(-1, num_layers, -1)
    return routes_SBLK.reshape(positions_S.numel() * batch, num_layers, topk)


def _sample_starts(table: RouteTable, sample_ids: Sequence[int], device) -> torch.Tensor:
    """First table row of each sample (int64 ``[B]``)."""
    index_B = table._indices_of(sample_ids).to(device)
    return table.cu_seqlens.to(device)[index_B]
