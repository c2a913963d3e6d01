"""Packed (THD) micro-batches: sequences concatenated into one stream (verl, slime, NeMo-RL).

Legend: T tokens of the packed stream (``sum(padded_lengths)``, Megatron's ``[T, 1]`` forward),
T_local the rows one rank routes, N samples of the micro-batch, L MoE layers, K top-k, P parts
(replayed routes, plain-replay routes), X bytes of one row's K ids.

A packed micro-batch is ``[1, T]`` tokens with ``packed_seq_params`` (``qkv_format="thd"``,
``cu_seqlens`` of the real lengths and ``cu_seqlens_padded`` of the padded ones). Sequence i
occupies rows ``[cu_seqlens_padded[i], cu_seqlens_padded[i+1])``: its ``lengths[i]`` real tokens,
then ``padded_lengths[i] - lengths[i]`` alignment padding (stacks pad every sequence to a
multiple of TP, or of ``2·CP·TP`` under context parallelism, so that each rank's slice holds
whole chunks). What a rank routes:

* context parallelism (Megatron's ``get_thd_batch_on_this_cp_rank``, i.e. Transformer Engine's
  ``thd_get_partitioned_indices``): **every sequence** is cut into ``2·CP`` equal chunks and CP
  rank r keeps chunks ``r`` and ``2·CP − 1 − r`` of each sequence, sequence after sequence
  (:func:`thd_partitioned_indices`);
* sequence parallelism: the rank's stream (its CP part) is cut into TP equal contiguous chunks.

Padding (alignment) tokens get :func:`~pr2_megatron.routes.targets.padding_routes_of` routes,
numbered in stream order over the whole micro-batch, are never counted as tokens, never enter a
route table and get no feature-cache name. Route tables are layout-free (rows per sample), so a
right-padded rollout replays into a packed training layout and back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from pr2_megatron.errors import RouteError
from pr2_megatron.routes.table import RouteTable, route_dtype
from pr2_megatron.routes.targets import _replay_source, padding_routes_of

__all__ = [
    "PackedMicroBatch",
    "gather_packed_route_table",
    "packed_local_rows",
    "packed_targets",
    "packed_token_keys",
    "thd_partitioned_indices",
]


@dataclass(frozen=True)
class PackedMicroBatch:
    """One packed (THD) forward: the samples' real lengths and padded lengths, in stream order.

    ``padded_lengths`` default to the lengths rounded up to a multiple of ``alignment`` (1: no
    padding). Build it from Megatron's ``PackedSeqParams`` with :meth:`from_cu_seqlens`.
    """

    sample_ids: tuple[int, ...]
    lengths: tuple[int, ...]
    padded_lengths: Optional[tuple[int, ...]] = None
    alignment: int = 1

    def __post_init__(self) -> None:
        ids = tuple(int(i) for i in self.sample_ids)
        lengths = tuple(int(n) for n in self.lengths)
        object.__setattr__(self, "sample_ids", ids)
        object.__setattr__(self, "lengths", lengths)
        if not ids:
            raise RouteError("a packed micro-batch needs at least one sample")
        if min(ids) < 0:
            raise RouteError(f"sample ids must be >= 0, got {min(ids)}")
        if len(lengths) != len(ids):
            raise RouteError(f"packed micro-batch of {len(ids)} samples has {len(lengths)} lengths")
        if self.alignment < 1:
            raise RouteError(f"alignment must be >= 1, got {self.alignment}")
        if self.padded_lengths is None:
            a = self.alignment
            padded = tuple(-(-n // a) * a for n in lengths)
        else:
            padded = tuple(int(n) for n in self.padded_lengths)
            if len(padded) != len(ids):
                raise RouteError(f"{len(ids)} samples but {len(padded)} padded lengths")
        object.__setattr__(self, "padded_lengths", padded)
        for sample, length, pad in zip(ids, lengths, padded):
            if length < 0 or pad < length:
                raise RouteError(
                    f"sample id {sample}: length {length} and padded length {pad} "
                    "(need 0 <= length <= padded length)"
                )
            if pad % self.alignment:
                raise RouteError(
                    f"sample id {sample}: padded length {pad} is not a multiple of the "
                    f"alignment {self.alignment}"
                )

    @classmethod
    def from_cu_seqlens(cls, sample_ids, cu_seqlens, cu_seqlens_padded=None) -> PackedMicroBatch:
        """From ``PackedSeqParams``' ``cu_seqlens_q`` (and ``cu_seqlens_q_padded``)."""
        cu = torch.as_tensor(cu_seqlens).long().cpu()
        lengths = cu.diff().tolist()
        padded = None
        if cu_seqlens_padded is not None:
            padded = torch.as_tensor(cu_seqlens_padded).long().cpu().diff().tolist()
        return cls(tuple(sample_ids), tuple(lengths), None if padded is None else tuple(padded))

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def seq_len(self) -> int:
        """T: rows of the packed stream (real and padding tokens)."""
        return sum(self.padded_lengths)

    @property
    def real_lengths(self) -> list[int]:
        """Real token count of each sample."""
        return list(self.lengths)

    @property
    def cu_seqlens(self) -> torch.Tensor:
        """int32 ``[N + 1]`` cumulative real lengths (``PackedSeqParams.cu_seqlens_q``)."""
        return _cumulative(self.lengths)

    @property
    def cu_seqlens_padded(self) -> torch.Tensor:
        """int32 ``[N + 1]`` cumulative padded lengths (``cu_seqlens_q_padded``)."""
        return _cumulative(self.padded_lengths)


def _cumulative(values: Sequence[int]) -> torch.Tensor:
    out = torch.zeros(len(values) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(list(values), dtype=torch.int32).cumsum(0)
    return out


def thd_partitioned_indices(padded_lengths: Sequence[int], cp_rank: int, cp_size: int):
    """Stream rows of CP rank ``cp_rank`` in a packed stream (TE's ``thd_get_partitioned_indices``).

    Each sequence (padded length divisible by ``2·CP``) is cut into ``2·CP`` chunks; the rank
    keeps chunks ``cp_rank`` and ``2·CP − 1 − cp_rank`` of every sequence, in stream order.
    Returns int64 ``[T / CP]``.
    """
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise RouteError(f"context-parallel rank {cp_rank} is outside a group of {cp_size}")
    parts, start = [], 0
    for index, padded in enumerate(padded_lengths):
        if padded % (2 * cp_size):
            raise RouteError(
                f"packed sequence {index}: padded length {padded} is not divisible by "
                f"2·CP = {2 * cp_size} (pad every sequence to a multiple of 2·CP·TP)"
            )
        chunk = padded // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            parts.append(torch.arange(start + c * chunk, start + (c + 1) * chunk))
        start += padded
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def packed_local_rows(
    batch: PackedMicroBatch,
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
    cp_rank: int = 0,
    cp_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sample_T, position_T)`` of the rows this rank routes, in its order (int64).

    ``sample_T`` is the index of the row's sample in ``batch`` and ``position_T`` its position
    in that sample (``>= lengths[sample]``: an alignment padding token). CP part first, then
    the TP rank's SP chunk of it.
    """
    padded_N = torch.tensor(batch.padded_lengths, dtype=torch.long)
    sample_T = torch.repeat_interleave(torch.arange(len(batch)), padded_N)
    starts_N = padded_N.cumsum(0) - padded_N
    position_T = torch.arange(batch.seq_len) - starts_N[sample_T]
    if cp_size > 1:
        rows = thd_partitioned_indices(batch.padded_lengths, cp_rank, cp_size)
        sample_T, position_T = sample_T[rows], position_T[rows]
    if tp_size > 1:
        local = sample_T.numel()
        if local % tp_size:
            raise RouteError(
                f"packed stream of {local} rows (of {batch.seq_len}, context-parallel size "
                f"{cp_size}) is not divisible by TP={tp_size}: pad every sequence to a multiple "
                "of TP (2·CP·TP with CP)"
            )
        chunk = local // tp_size
        sample_T = sample_T[tp_rank * chunk : (tp_rank + 1) * chunk]
        position_T = position_T[tp_rank * chunk : (tp_rank + 1) * chunk]
    return sample_T, position_T


def _padding_numbers(batch: PackedMicroBatch, sample_T, position_T) -> torch.Tensor:
    """Each padding row's index among the micro-batch's padding tokens, in stream order."""
    lengths_N = torch.tensor(batch.lengths, dtype=torch.long)
    padding_N = torch.tensor(batch.padded_lengths, dtype=torch.long) - lengths_N
    before_N = padding_N.cumsum(0) - padding_N
    return before_N[sample_T] + position_T - lengths_N[sample_T]


def packed_targets(
    table: RouteTable,
    batch: PackedMicroBatch,
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
    cp_rank: int = 0,
    cp_size: int = 1,
    layer_numbers: Optional[Sequence[int]] = None,
    plain: bool = False,
    padding_experts: Optional[int] = None,
) -> torch.Tensor:
    """Replay targets ``[T_local, L, K]`` (int64) of a packed forward on this rank.

    Real rows take the table's route of their (sample, position); alignment padding rows get
    :func:`padding_routes_of` over ``padding_experts`` (default the table's E). Columns by
    layer number, as :func:`~pr2_megatron.routes.targets.micro_batch_targets`.
    """
    table.check_tokens(batch.sample_ids, batch.lengths)
    source = _replay_source(table, layer_numbers, plain)
    device = source.device
    sample_T, position_T = packed_local_rows(
        batch, tp_rank=tp_rank, tp_size=tp_size, cp_rank=cp_rank, cp_size=cp_size
    )
    lengths_N = torch.tensor(batch.lengths, dtype=torch.long)
    real_T = position_T < lengths_N[sample_T]
    starts_N = table.cu_seqlens.cpu()[table._indices_of(batch.sample_ids).cpu()]
    num_layers, topk = source.shape[1], table.topk
    out_TLK = torch.empty((sample_T.numel(), num_layers, topk), dtype=torch.long, device=device)
    rows = (starts_N[sample_T] + position_T)[real_T]
    out_TLK[real_T.to(device)] = source[rows.to(device)].long()
    pad_T = ~real_T
    if bool(pad_T.any()) and num_layers:
        numbers = _padding_numbers(batch, sample_T[pad_T], position_T[pad_T]).to(device)
        pad_RK = padding_routes_of(numbers, topk, padding_experts or table.num_experts)
        out_TLK[pad_T.to(device)] = pad_RK.unsqueeze(1).expand(-1, num_layers, -1)
    return out_TLK


def packed_token_keys(
    batch: PackedMicroBatch, *, key_stride: int, tp_rank=0, tp_size=1, cp_rank=0, cp_size=1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature-cache names ``(keys_T, groups_T)`` of this rank's rows; padding gets key -1."""
    sample_T, position_T = packed_local_rows(
        batch, tp_rank=tp_rank, tp_size=tp_size, cp_rank=cp_rank, cp_size=cp_size
    )
    ids_N = torch.tensor(batch.sample_ids, dtype=torch.long)
    lengths_N = torch.tensor(batch.lengths, dtype=torch.long)
    keys_T = ids_N[sample_T] * key_stride + position_T
    keys_T = torch.where(position_T < lengths_N[sample_T], keys_T, torch.full_like(keys_T, -1))
    return keys_T, ids_N[sample_T]


# --------------------------------------------------------------------------------- gather
def _full_stream(local_TPLX, batch: PackedMicroBatch, tp_group, tp_size, cp_group, cp_size):
    """The TP (SP) and CP ranks' rows -> the whole packed stream ``[T, P, L, X]`` (bytes)."""
    from pr2_megatron.routes.wire import _all_gather

    if tp_size > 1:
        local_TPLX = _all_gather(local_TPLX, tp_group).reshape(-1, *local_TPLX.shape[1:])
    if cp_size > 1:
        gathered = _all_gather(local_TPLX, cp_group)
        full = gathered.new_empty((batch.seq_len, *local_TPLX.shape[1:]))
        for rank in range(cp_size):
            rows = thd_partitioned_indices(batch.padded_lengths, rank, cp_size)
            full[rows.to(full.device)] = gathered[rank]
        local_TPLX = full
    if local_TPLX.shape[0] != batch.seq_len:
        raise RouteError(
            f"packed forward of samples {list(batch.sample_ids)[:8]}: {local_TPLX.shape[0]} "
            f"rows after the TP/CP gather, the batch packs {batch.seq_len}"
        )
    return local_TPLX


def gather_packed_route_table(
    routes_per_forward: Optional[Sequence[torch.Tensor]],
    batches: Sequence[PackedMicroBatch],
    *,
    layer_numbers: Sequence[int],
    num_experts: int,
    topk: int,
    plain_routes_per_forward: Optional[Sequence[torch.Tensor]] = None,
    data_group=None,
    tp_group=None,
    sequence_parallel: bool = False,
    cp_group=None,
    pp_group=None,
) -> RouteTable:
    """The route table of packed forwards on every rank (see :func:`gather_route_table`).

    Per forward: the TP (SP) chunks and CP parts are put back into the packed stream, the
    alignment padding is dropped, and the samples travel over the pipeline and data-parallel
    groups as right-padded columns (padded to the group's largest forward with zero-length
    placeholder columns: packed micro-batches differ in size across data-parallel ranks; one
    small exchange per table agrees on the shapes). Only real tokens enter the table.
    """
    from pr2_megatron.routes.gather import gather_route_table
    from pr2_megatron.routes.wire import _as_bytes

    def size(group):
        return 1 if group is None else dist.get_world_size(group)

    tp_size = size(tp_group) if sequence_parallel else 1
    cp_size = size(cp_group)
    has_layers = bool(layer_numbers) and bool(routes_per_forward)
    dtype = route_dtype(num_experts) if has_layers else torch.uint8
    device = routes_per_forward[0].device if has_layers else torch.device("cpu")
    if has_layers and len(routes_per_forward) != len(batches):
        raise RouteError(f"{len(routes_per_forward)} forwards of routes but {len(batches)} batches")
    # Agree on [S, B] per forward over the data-parallel group (and the world, if None).
    shape_F2 = torch.tensor(
        [[max(max(b.lengths), 1), len(b)] for b in batches], dtype=torch.long, device=device
    ).reshape(-1, 2)
    from pr2_megatron.routes.wire import _all_gather

    group = data_group if data_group is not None else dist.group.WORLD
    if dist.get_world_size(group) > 1:
        shape_F2 = _all_gather(shape_F2, group).amax(dim=0)
    rank = dist.get_rank()
    routes_out, plain_out, ids_out, lengths_out = [], [], [], []
    for forward, batch in enumerate(batches):
        seq, width = (int(v) for v in shape_F2[forward])
        ids = list(batch.sample_ids) + [
            -(1 + (rank * len(batches) + forward) * width + b) for b in range(width - len(batch))
        ]
        ids_out.append(ids)
        lengths_out.append(list(batch.lengths) + [0] * (width - len(batch)))
        if not has_layers:
            continue
        parts = [routes_per_forward[forward]]
        if plain_routes_per_forward is not None:
            parts.append(plain_routes_per_forward[forward])
        local_TPLX = _as_bytes(torch.stack([p.to(dtype) for p in parts], dim=1))
        full_TPLX = _full_stream(local_TPLX, batch, tp_group, tp_size, cp_group, cp_size)
        full_TPLK = full_TPLX.contiguous().view(dtype)
        columns_SBPLK = full_TPLK.new_zeros((seq, width, *full_TPLK.shape[1:]))
        start = 0
        for b, (length, padded) in enumerate(zip(batch.lengths, batch.padded_lengths)):
            columns_SBPLK[:length, b] = full_TPLK[start : start + length]
            start += padded
        flat_TPLK = columns_SBPLK.reshape(seq * width, *full_TPLK.shape[1:])
        routes_out.append(flat_TPLK[:, 0])
        if plain_routes_per_forward is not None:
            plain_out.append(flat_TPLK[:, 1])
    table = gather_route_table(
        routes_out if has_layers else None,
        ids_out,
        layer_numbers=layer_numbers,
        num_experts=num_experts,
        topk=topk,
        plain_routes_per_forward=plain_out if plain_routes_per_forward is not None else None,
        lengths_per_forward=lengths_out,
        data_group=data_group,
        pp_group=pp_group,
    )
    real = [int(i) for i in table.sample_ids.tolist() if i >= 0]
    return table.select_samples(real)
