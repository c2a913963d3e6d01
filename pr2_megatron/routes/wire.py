"""Route bytes on the wire: one data-parallel buffer per forward, and the table read out of it.

Legend: R data-parallel ranks, S sequence, B samples, P parts (replayed, plain-replay routes),
L MoE layers, K top-k, W bytes per buffer row, X rows of the stacked receive buffers, T tokens.

Routes cross every collective as raw bytes (``uint8``: NCCL has no int16), in the table's
smallest dtype.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pr2_megatron.errors import RouteError
from pr2_megatron.routes.table import RouteTable


def _group_size(group) -> int:
    """Size of an optional group (None: no such parallelism here)."""
    return 1 if group is None else dist.get_world_size(group)


def _all_gather(local: torch.Tensor, group) -> torch.Tensor:
    """``[...]`` on each rank -> ``[group size, ...]`` (gloo needs the concatenated shape)."""
    size = dist.get_world_size(group)
    out = local.new_empty((size * local.shape[0], *local.shape[1:]))
    dist.all_gather_into_tensor(out, local.contiguous(), group=group)
    return out.view(size, *local.shape)


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """An integer tensor's last dim as raw bytes: ``[..., X] -> [..., X · itemsize]`` (uint8)."""
    tensor = tensor.contiguous()
    width = tensor.shape[-1] * tensor.element_size()
    return tensor.view(torch.uint8).reshape(*tensor.shape[:-1], width)


class _ForwardBuffers:
    """One forward's bytes on the wire, gathered over the data-parallel ranks in one collective.

    A rank's buffer is rows of ``W = L·K·itemsize`` bytes: the parts (replayed, plain-replay)
    as ``[P, S, B]`` token rows in the table's dtype, then the int64 sample ids and lengths in
    the last rows. Uniform rows make the received buffer one ``[R · rows, W]`` matrix, from
    which the table's rows are taken with a single ``index_select`` per part
    (:func:`_assemble`). The send buffer is written once (narrowing to the table's dtype).
    """

    def __init__(self, batch: int, seq: int, parts: int, layers: int, topk: int, dtype, device):
        self.batch, self.seq, self.parts, self.layers, self.topk = batch, seq, parts, layers, topk
        self.dtype = dtype
        self.width = self.row_width(layers, topk, dtype)
        self.route_width = self.route_bytes(layers, topk, dtype)
        self.token_rows = parts * seq * batch
        self.rows = self.rows_of(batch, seq, parts, self.width)
        self.send = torch.empty((self.rows, self.width), dtype=torch.uint8, device=device)
        self.send[self.token_rows :] = 0  # the ids' rows past the ids: defined bytes
        self.received = None

    @staticmethod
    def route_bytes(layers: int, topk: int, dtype) -> int:
        """Bytes of one token's routes: ``L · K · itemsize``."""
        return layers * topk * torch.empty(0, dtype=dtype).element_size()

    @classmethod
    def row_width(cls, layers: int, topk: int, dtype) -> int:
        """Bytes of a buffer row: a token's routes, rounded up to 8 (int64 ids stay aligned)."""
        return max(8, -(-cls.route_bytes(layers, topk, dtype) // 8) * 8)

    @staticmethod
    def rows_of(batch: int, seq: int, parts: int, width: int) -> int:
        """Rows of a rank's buffer: the token rows, then enough rows for ids and lengths."""
        return parts * seq * batch + -(-(2 * batch * 8) // width)

    def _meta(self, buffer_RW: torch.Tensor) -> torch.Tensor:
        """The int64 ``[B, 2]`` (sample id, length) of one rank's buffer."""
        meta = buffer_RW[self.token_rows :].reshape(-1)[: 2 * self.batch * 8]
        return meta.view(torch.long).view(self.batch, 2)

    def write(self, ids_B, lengths_B, parts_PSBLK) -> None:
        """Fill the send buffer: the routes in the table's dtype, then ids and lengths."""
        if self.layers:
            routes = self.send[: self.token_rows, : self.route_width].view(self.dtype)
            routes = routes.unflatten(0, (self.parts, self.seq, self.batch))
            routes = routes.unflatten(-1, (self.layers, self.topk))
            for part, source in zip(routes, parts_PSBLK):
                part.copy_(source)
        meta = self.send[self.token_rows :].reshape(-1)[: 2 * self.batch * 8].view(torch.long)
        meta.view(self.batch, 2).copy_(torch.stack([ids_B, lengths_B], dim=1))

    def gather(self, data_group, data_size: int, out: torch.Tensor) -> None:
        """All-gather the ranks' send buffers into ``out`` (contiguous ``[R, rows, W]``)."""
        if data_size == 1:
            out[0].copy_(self.send)
        else:
            dist.all_gather_into_tensor(out.view(-1), self.send.view(-1), group=data_group)
        self.received = out

    def meta(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [R, B], lengths [R, B])`` of every rank."""
        metas = torch.stack([self._meta(rank) for rank in self.received])
        return metas[..., 0], metas[..., 1]


def _assemble(buffers, stacked_XW, layer_numbers, num_experts, topk, has_plain, dtype):
    """The forwards' real tokens, in ascending sample-id order, as a :class:`RouteTable`.

    ``stacked_XW`` holds every forward's received buffer, one after the other.
    """
    metas = [b.meta() for b in buffers]
    ids_N = torch.cat([ids.reshape(-1) for ids, _ in metas])
    lengths_N = torch.cat([lengths.reshape(-1) for _, lengths in metas])
    sorted_ids_N, order_N = torch.sort(ids_N)
    repeated = (sorted_ids_N[1:] == sorted_ids_N[:-1]).nonzero()
    if repeated.numel():
        raise RouteError(
            f"sample id {int(sorted_ids_N[int(repeated[0])])} was recorded twice in the rollout"
        )
    device = ids_N.device
    # Row of token (position 0, part 0) of every sample in the stacked received buffers.
    first_row_N = torch.cat([_first_rows(b, offset) for b, offset in _offsets(buffers)])
    stride_N = torch.cat(  # rows between a sample's consecutive positions
        [torch.full((b.received.shape[0] * b.batch,), b.batch, device=device) for b in buffers]
    )
    part_rows_N = torch.cat(  # rows between the parts of a sample's token
        [
            torch.full((b.received.shape[0] * b.batch,), b.seq * b.batch, device=device)
            for b in buffers
        ]
    )
    sorted_lengths_N = lengths_N[order_N]
    sample_T = torch.repeat_interleave(order_N, sorted_lengths_N)
    starts_N = sorted_lengths_N.cumsum(0) - sorted_lengths_N
    position_T = torch.arange(sample_T.numel(), device=device) - torch.repeat_interleave(
        starts_N, sorted_lengths_N
    )
    rows_T = first_row_N[sample_T] + position_T * stride_N[sample_T]
    route_width = buffers[0].route_width
    if route_width == stacked_XW.shape[1]:
        source_XW = stacked_XW.view(torch.int64)  # row copies in 8-byte words
    else:
        source_XW = stacked_XW[:, :route_width]  # rows padded for alignment: copy the bytes
    parts = []
    for part in range(2 if has_plain else 1):
        rows_TW = source_XW.index_select(0, rows_T + part * part_rows_N[sample_T])
        parts.append(rows_TW.view(torch.uint8).view(dtype).view(-1, len(layer_numbers), topk))
    table = RouteTable(
        routes_TLK=parts[0],
        cu_seqlens=torch.cat([lengths_N.new_zeros(1), sorted_lengths_N.cumsum(0)]),
        sample_ids=sorted_ids_N,
        layer_numbers=layer_numbers,
        num_experts=int(num_experts),
        topk=int(topk),
        plain_routes_TLK=parts[1] if has_plain else None,
    )
    table._validate_layout()  # the values were checked rank by rank before the gather
    return table


def _offsets(buffers):
    """Each forward's buffers with the row offset of its received block in the stack."""
    offset = 0
    for buffer in buffers:
        yield buffer, offset
        offset += buffer.received.shape[0] * buffer.rows


def _first_rows(buffer: _ForwardBuffers, offset: int) -> torch.Tensor:
    """``[R · B]`` row of (position 0, part 0) of each sample (rank-major, then column)."""
    ranks, device = buffer.received.shape[0], buffer.received.device
    rank_N = torch.arange(ranks, device=device).repeat_interleave(buffer.batch)
    column_N = torch.arange(buffer.batch, device=device).repeat(ranks)
    return offset + rank_N * buffer.rows + column_N
