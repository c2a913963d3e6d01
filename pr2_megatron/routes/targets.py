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

__all__ = ["context_parallel_positions", "micro_batch_targets"]


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
) -> torch.Tensor:
    """Replay targets ``[T_local, L, K]`` (int64) for a training micro-batch of these samples.

    Rows follow Megatron's flattened ``[S, B]`` order. With context parallelism only the
    rank's positions are kept (:func:`context_parallel_positions`, the order
    ``get_batch_on_this_cp_rank`` gives the rank's tokens); with sequence parallelism then only
    this TP rank's chunk of those (``S/CP/TP`` positions). ``layer_numbers`` (default: every
    layer of the table) picks the columns, e.g. a pipeline stage's (all VPP chunks')
    ``RoutingController.layer_numbers``; an empty list gives ``[T_local, 0, K]`` for a stage
    without MoE layers. ``plain=True`` returns the plain-replay (live top-k at rollout) routes.

    ``lengths`` (default: ``seq_len`` for every sample) are the samples' real token counts when
    the micro-batch is right-padded to ``seq_len``: the table holds only the real tokens (it is
    packed), and the padding positions get the fixed route ``0..K-1``. Right padding never
    influences a real token (causal attention, per-token routing), so this is exact for every
    unmasked token.
    """
    lengths = [seq_len] * len(sample_ids) if lengths is None else list(lengths)
    if len(lengths) != len(sample_ids):
        raise RouteError(f"{len(sample_ids)} sample ids but {len(lengths)} lengths")
    too_long = [(s, n) for s, n in zip(sample_ids, lengths) if not 0 <= n <= seq_len]
    if too_long:
        sample, length = too_long[0]
        raise RouteError(f"sample id {sample}: length {length} is outside [0, {seq_len}]")
    table.check_tokens(sample_ids, lengths)
    source = table.plain_routes_TLK if plain else table.routes_TLK
    if source is None:
        raise RouteError("the route table holds no plain-replay (live top-k at rollout) routes")
    columns = None
    if layer_numbers is not None:
        columns = torch.as_tensor(
            [table.layer_index(int(n)) for n in layer_numbers], dtype=torch.long
        )
    num_layers = table.num_layers if columns is None else columns.numel()
    routes_BSLK = torch.empty((len(sample_ids), seq_len, num_layers, table.topk), dtype=torch.long)
    routes_BSLK[:] = torch.arange(table.topk)  # the padding route
    rows = table.rows_for(sample_ids).split(lengths)
    for column, (sample_rows, length) in enumerate(zip(rows, lengths)):
        sample_TLK = source[sample_rows]
        if columns is not None:
            sample_TLK = sample_TLK.index_select(1, columns)
        routes_BSLK[column, :length] = sample_TLK.long()
    routes_SBLK = routes_BSLK.transpose(0, 1)
    if cp_size > 1:
        routes_SBLK = routes_SBLK[context_parallel_positions(seq_len, cp_rank, cp_size)]
    if sequence_parallel and tp_size > 1:
        local_len = routes_SBLK.shape[0]
        if local_len % tp_size:
            raise RouteError(
                f"sequence length {local_len} (of {seq_len}, context-parallel size {cp_size}) "
                f"is not divisible by TP={tp_size}"
            )
        chunk = local_len // tp_size
        routes_SBLK = routes_SBLK[tp_rank * chunk : (tp_rank + 1) * chunk]
    return routes_SBLK.reshape(routes_SBLK.shape[0] * routes_SBLK.shape[1], num_layers, table.topk)
