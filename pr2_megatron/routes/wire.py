"""Route bytes on the wire: one data-parallel buffer per forward, and the table read out of it.

Legend: R data-parallel ranks, S sequence, B samples, P parts (replayed, plain-replay routes),
L MoE layers, K top-k, W bytes per buffer row, X rows of the stacked receive buffers, T tokens.

Routes cross every collective as raw bytes (``uint8``: NCCL has no int16), in the table's
smallest dtype. Each rank's buffer also carries its route checks' status (:mod:`.checks`), so
the data-parallel verdict needs no collective of its own.

On the CPU the send and receive buffers are carved from one host workspace kept between
gathers (:func:`workspace`): glibc hands a freed multi-MiB block back to the OS, so a fresh
buffer per gather page-faults every byte again (about 0.37 ms per MiB measured here, most of
a gather's cost beyond its collective). CUDA's caching allocator already reuses blocks, so on
GPUs the buffers are ordinary allocations. The table never aliases the workspace.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pr2_megatron.errors import RouteError
from pr2_megatron.routes.table import RouteTable

#: int64 fields of a rank's route-check status (code, forward, sample id, position, layer, value).
STATUS_FIELDS = 6

_HOST_WORKSPACE: list[torch.Tensor] = []  # at most one uint8 buffer, grown as needed


def workspace(nbytes: int, device: torch.device) -> torch.Tensor:
    """``nbytes`` uint8 scratch bytes on ``device`` for one gather's buffers.

    CPU: a view of the host workspace kept between calls (grown when too small; contents
    undefined); other devices: a new allocation (their caching allocators reuse blocks).
    """
    if torch.device(device).type != "cpu":
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    if not _HOST_WORKSPACE or _HOST_WORKSPACE[0].numel() < nbytes:
        _HOST_WORKSPACE[:] = [torch.empty(nbytes, dtype=torch.uint8)]
    return _HOST_WORKSPACE[0][:nbytes]


def release_workspace() -> None:
    """Free the host workspace (the next gather allocates it again)."""
    _HOST_WORKSPACE.clear()


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
    as ``[P, B, S]`` token rows in the table's dtype (sample-major: each sample's tokens are
    consecutive rows), then the int64 sample ids and lengths and the rank's route-check status
    in the last rows. Uniform rows make the received buffer one ``[R · rows, W]`` matrix in
    which every sample's real tokens are one run of rows, so the table is a concatenation of
    runs (:func:`_assemble`). The send buffer (a ``[rows, W]`` view of the gather's workspace)
    is written once (narrowing to the table's dtype, ``[S, B]`` to ``[B, S]``).
    """

    def __init__(self, batch, seq, parts, layers, topk, dtype, send_RW: torch.Tensor):
        self.batch, self.seq, self.parts, self.layers, self.topk = batch, seq, parts, layers, topk
        self.dtype = dtype
        self.width = self.row_width(layers, topk, dtype)
        self.route_width = self.route_bytes(layers, topk, dtype)
        self.token_rows = parts * seq * batch
        self.rows = self.rows_of(batch, seq, parts, self.width)
        if tuple(send_RW.shape) != (self.rows, self.width):
            raise ValueError(f"send buffer {tuple(send_RW.shape)} for ({self.rows}, {self.width})")
        self.send = send_RW
        self.send[self.token_rows :] = 0  # the rows past ids and status: defined bytes
        if self.route_width < self.width:
            self.send[: self.token_rows, self.route_width :] = 0  # alignment bytes
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
        """Rows of a rank's buffer: the token rows, then rows for ids, lengths and status."""
        return parts * seq * batch + -(-((2 * batch + STATUS_FIELDS) * 8) // width)

    def _words(self, buffer_RW: torch.Tensor) -> torch.Tensor:
        """The int64 words after one rank's token rows: ids and lengths, then the status."""
        words = (2 * self.batch + STATUS_FIELDS) * 8
        return buffer_RW[self.token_rows :].reshape(-1)[:words].view(torch.long)

    def _meta(self, buffer_RW: torch.Tensor) -> torch.Tensor:
        """The int64 ``[B, 2]`` (sample id, length) of one rank's buffer."""
        return self._words(buffer_RW)[: 2 * self.batch].view(self.batch, 2)

    def statuses(self) -> torch.Tensor:
        """``[R, STATUS_FIELDS]``: every rank's route-check status as of its write."""
        return torch.stack([self._words(rank)[2 * self.batch :] for rank in self.received])

    def write(self, ids_B, lengths_B, parts_PSBLK, status: torch.Tensor) -> None:
        """Fill the send buffer: the routes in the table's dtype, then ids, lengths, status."""
        if self.layers:
            routes = self.send[: self.token_rows, : self.route_width].view(self.dtype)
            routes = routes.unflatten(0, (self.parts, self.batch, self.seq))
            routes = routes.unflatten(-1, (self.layers, self.topk))
            for part_BSLK, source_SBLK in zip(routes, parts_PSBLK):
                part_BSLK.copy_(source_SBLK.transpose(0, 1))
        words = self._words(self.send)
        words[: 2 * self.batch].view(self.batch, 2).copy_(torch.stack([ids_B, lengths_B], dim=1))
        words[2 * self.batch :].copy_(status)

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

    ``stacked_XW`` holds every forward's received buffer, one after the other. A sample's real
    tokens are one run of consecutive rows there (per part); the table of a part is the
    concatenation of its samples' runs in sample-id order, adjacent runs merged (ranks holding
    consecutive ids of unpadded samples give one run each): one copy of the table's bytes and
    no per-token index arithmetic.
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
    sorted_lengths_N = lengths_N[order_N]
    first_rows, part_rows = _sample_rows(buffers)
    order, lengths = order_N.tolist(), lengths_N.tolist()
    route_width = buffers[0].route_width
    source_XW = stacked_XW[:, :route_width]  # the alignment bytes of a row stay behind
    parts = []
    for part in range(2 if has_plain else 1):
        runs = _merged_runs(
            (first_rows[n] + part * part_rows[n], lengths[n]) for n in order if lengths[n]
        )
        pieces = [source_XW.narrow(0, start, count) for start, count in runs]
        rows_TW = torch.cat(pieces) if pieces else source_XW[:0].clone()
        parts.append(rows_TW.view(dtype).view(-1, len(layer_numbers), topk))
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


def _sample_rows(buffers) -> tuple[list[int], list[int]]:
    """Per sample (forward, rank, column order): its first row and the rows between its parts.

    The first row is that of its token 0 in part 0, in the stacked received buffers.
    """
    first_rows, part_rows = [], []
    offset = 0
    for buffer in buffers:
        for rank in range(buffer.received.shape[0]):
            base = offset + rank * buffer.rows
            first_rows.extend(base + column * buffer.seq for column in range(buffer.batch))
        part_rows.extend([buffer.batch * buffer.seq] * (buffer.received.shape[0] * buffer.batch))
        offset += buffer.received.shape[0] * buffer.rows
    return first_rows, part_rows


def _merged_runs(runs) -> list[tuple[int, int]]:
    """``(start, count)`` runs of rows, each that begins where the previous ends merged into it."""
    merged: list[list[int]] = []
    for start, count in runs:
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1][1] += count
        else:
            merged.append([start, count])
    return [(start, count) for start, count in merged]
