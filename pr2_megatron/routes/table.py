"""Route table: the routes of a whole rollout batch, packed per token.

PR2 records, at rollout, the experts each token is sent to in every MoE layer (the *predicted*
routes, and beside them the plain-replay route: the live top-k at rollout) and replays them in
training. The table is packed per token (no padding to the longest sample), stores global expert
ids in the smallest integer dtype that holds ``num_experts`` ids (never wrapping), and carries the
metadata needed to find a sample's rows: sample ids, cumulative sequence lengths, the global
layer numbers of the MoE layers covered, E and k. Files: :mod:`pr2_megatron.routes.files`
(safetensors, never pickle); rollout engines' format: :mod:`pr2_megatron.routes.engine`.

Every check is vectorized over tokens; a detailed message (sample id, token position within the
sample, global layer number, bad value) is built only once a check has failed. Every error is a
:class:`~pr2_megatron.errors.RouteError`. The checks: :mod:`pr2_megatron.routes.table_checks`;
the storage dtype and the per-sample input checks: :mod:`pr2_megatron.routes.values`.

Legend for shape-suffixed names:
    T  tokens (all samples packed, sample i owns rows ``cu_seqlens[i]:cu_seqlens[i+1]``)
    L  MoE layers covered by the table (``layer_numbers``)
    K  top-k (experts per token per layer)
    E  experts
    N  samples
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pr2_megatron.errors import RouteError
from pr2_megatron.routes.table_checks import check_layout, check_values
from pr2_megatron.routes.values import (
    IntArray,
    SampleIds,
    _as_id_list,
    _first_repeat,
    _pack,
    route_dtype,
)

__all__ = ["RouteTable", "route_dtype"]


@dataclass(eq=False, repr=False)
class RouteTable:
    """Routes for a whole rollout batch, packed per token (no padding).

    Build it with :meth:`from_samples` (or :func:`from_engine_routed_experts`), which validates;
    a table built directly is checked only when :meth:`validate` is called.

    Attributes:
        routes_TLK: global expert ids, dtype ``route_dtype(num_experts)``; row t is one token,
            column l the MoE layer ``layer_numbers[l]``; the k ids of a row are distinct.
        cu_seqlens: int64 [N+1] cumulative token counts (``cu_seqlens[0] == 0``,
            ``cu_seqlens[-1] == T``); sample i owns rows ``cu_seqlens[i]:cu_seqlens[i+1]``.
        sample_ids: int64 [N], the caller's id for each sample (unique), e.g. its index in the
            rollout batch.
        layer_numbers: global 1-based (Megatron-numbered) layer numbers of the covered MoE
            layers, strictly increasing.
        num_experts: E, the number of routed experts per MoE layer.
        topk: K, experts per token per layer.
        plain_routes_TLK: optional live top-k at rollout (same shape and dtype), kept beside the
            predicted routes for metrics.

    """

    routes_TLK: torch.Tensor
    cu_seqlens: torch.Tensor
    sample_ids: torch.Tensor
    layer_numbers: tuple[int, ...]
    num_experts: int
    topk: int
    plain_routes_TLK: torch.Tensor | None = None

    # ----------------------------------------------------------------------------------------
    # Construction
    # ----------------------------------------------------------------------------------------

    @classmethod
    def from_samples(
        cls,
        per_sample: Sequence[IntArray],
        *,
        sample_ids: SampleIds,
        layer_numbers: Sequence[int],
        num_experts: int,
        topk: int,
        plain_per_sample: Sequence[IntArray] | None = None,
    ) -> RouteTable:
        """Pack per-sample routes ``[T_i, L, K]`` (any integer dtype) into a validated table.

        Ids are range-checked in their input dtype before narrowing to
        ``route_dtype(num_experts)``, so an out-of-range id is reported, never wrapped.
        """
        dtype = route_dtype(num_experts)
        layer_numbers = tuple(int(n) for n in layer_numbers)
        ids = _as_id_list(sample_ids, "sample_ids")
        if len(ids) != len(per_sample):
            raise RouteError(f"got {len(per_sample)} samples but {len(ids)} sample_ids")
        if plain_per_sample is not None and len(plain_per_sample) != len(per_sample):
            raise RouteError(
                f"got {len(per_sample)} samples but {len(plain_per_sample)} plain_per_sample "
                "entries"
            )
        routes_TLK = _pack(per_sample, ids, layer_numbers, num_experts, topk, dtype, "routes")
        plain_routes_TLK = None
        if plain_per_sample is not None:
            plain_routes_TLK = _pack(
                plain_per_sample,
                ids,
                layer_numbers,
                num_experts,
                topk,
                dtype,
                "plain-replay routes",
            )
        lengths = torch.tensor([0] + [int(r.shape[0]) for r in per_sample], dtype=torch.int64)
        table = cls(
            routes_TLK=routes_TLK,
            cu_seqlens=lengths.cumsum(0),
            sample_ids=torch.tensor(ids, dtype=torch.int64),
            layer_numbers=layer_numbers,
            num_experts=int(num_experts),
            topk=int(topk),
            plain_routes_TLK=plain_routes_TLK,
        )
        table.validate()
        return table

    @classmethod
    def concat(cls, tables: Sequence[RouteTable]) -> RouteTable:
        """Join tables with the same layers, E and k (e.g. micro-batches or ranks), in order.

        Sample ids must stay unique across the inputs; either all or none carry plain-replay routes.
        """
        if len(tables) == 0:
            raise RouteError("concat needs at least one RouteTable")
        first = tables[0]
        for i, tab in enumerate(tables):
            if not isinstance(tab, RouteTable):
                raise RouteError(f"concat: table {i} is a {type(tab).__name__}, not a RouteTable")
            for field in ("layer_numbers", "num_experts", "topk"):
                if getattr(tab, field) != getattr(first, field):
                    raise RouteError(
                        f"concat: table {i} has {field}={getattr(tab, field)}, "
                        f"table 0 has {getattr(first, field)}"
                    )
            if (tab.plain_routes_TLK is None) != (first.plain_routes_TLK is None):
                raise RouteError(
                    f"concat: table {i} {'lacks' if tab.plain_routes_TLK is None else 'has'} "
                    "plain_routes_TLK, table 0 "
                    f"{'has' if tab.plain_routes_TLK is None else 'lacks'} it"
                )
        owner: dict[int, int] = {}
        for i, tab in enumerate(tables):
            for sid in tab.sample_ids.tolist():
                if sid in owner:
                    raise RouteError(
                        f"concat: duplicate sample id {sid} (in table {owner[sid]} and table {i})"
                    )
                owner[sid] = i
        lengths = torch.cat([tab.cu_seqlens.diff() for tab in tables])
        table = cls(
            routes_TLK=torch.cat([tab.routes_TLK for tab in tables]),
            cu_seqlens=torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]),
            sample_ids=torch.cat([tab.sample_ids for tab in tables]),
            layer_numbers=first.layer_numbers,
            num_experts=first.num_experts,
            topk=first.topk,
            plain_routes_TLK=(
                None
                if first.plain_routes_TLK is None
                else torch.cat([tab.plain_routes_TLK for tab in tables])
            ),
        )
        table.validate()
        return table

    # ----------------------------------------------------------------------------------------
    # Validation
    # ----------------------------------------------------------------------------------------

    def validate(self) -> None:
        """Check layout and contents; raise ValueError naming sample id, layer and bad value.

        Checks: E, k and layer numbers; routes dtype (``route_dtype(E)``) and shape
        ``(T, len(layer_numbers), k)``; ``cu_seqlens`` (int64, starts at 0, non-decreasing,
        ends at T); ``sample_ids`` (int64, one per sample, unique); every id in ``[0, E)``;
        the k ids of every (token, layer) row distinct. The same for ``plain_routes_TLK``.
        """
        self._validate_layout()
        check_values(self, self.routes_TLK, "routes_TLK")
        if self.plain_routes_TLK is not None:
            check_values(self, self.plain_routes_TLK, "plain_routes_TLK")

    def _validate_layout(self) -> None:
        """Metadata, dtypes, shapes, ``cu_seqlens`` and ``sample_ids`` (no per-token work)."""
        check_layout(self)

    # ----------------------------------------------------------------------------------------
    # Shape and lookup
    # ----------------------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        """T, tokens over all samples."""
        return int(self.routes_TLK.shape[0])

    @property
    def num_samples(self) -> int:
        """N, samples in the table."""
        return int(self.sample_ids.numel())

    @property
    def num_layers(self) -> int:
        """L, MoE layers covered."""
        return len(self.layer_numbers)

    @property
    def nbytes(self) -> int:
        """Bytes of route storage: ``routes_TLK`` plus ``plain_routes_TLK`` when present."""
        total = self.routes_TLK.numel() * self.routes_TLK.element_size()
        if self.plain_routes_TLK is not None:
            total += self.plain_routes_TLK.numel() * self.plain_routes_TLK.element_size()
        return total

    def sample_slice(self, i: int) -> slice:
        """Rows of the i-th sample in table order (an index 0..N-1, not a sample id)."""
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample index {i} out of range for {self.num_samples} samples")
        i %= self.num_samples
        return slice(int(self.cu_seqlens[i]), int(self.cu_seqlens[i + 1]))

    def _indices_of(self, sample_ids: SampleIds) -> torch.Tensor:
        """Sample indices (into ``sample_ids``) of the given ids, in the given order."""
        wanted = _as_id_list(sample_ids, "sample_ids")
        index = {sid: i for i, sid in enumerate(self.sample_ids.tolist())}
        missing = [sid for sid in wanted if sid not in index]
        if missing:
            shown = self.sample_ids[:16].tolist()
            more = "..." if self.num_samples > 16 else ""
            raise RouteError(
                f"unknown sample id {missing[0]} (table holds {self.num_samples} samples: "
                f"{shown}{more})"
            )
        return torch.tensor(
            [index[sid] for sid in wanted], dtype=torch.int64, device=self.cu_seqlens.device
        )

    def rows_for(self, sample_ids: SampleIds) -> torch.Tensor:
        """Row indices (int64) of the given samples' tokens, concatenated in the given order."""
        idx_N = self._indices_of(sample_ids)
        starts_N = self.cu_seqlens[idx_N]
        lengths_N = self.cu_seqlens[idx_N + 1] - starts_N
        # Row r of the output belongs to request j: row = starts[j] + (r - out_offsets[j]).
        out_offsets_N = lengths_N.cumsum(0) - lengths_N
        shift_T = torch.repeat_interleave(starts_N - out_offsets_N, lengths_N)
        return torch.arange(shift_T.numel(), dtype=torch.int64, device=shift_T.device) + shift_T

    def select_samples(self, sample_ids: SampleIds) -> RouteTable:
        """Return a new packed table holding the given samples, in the given order."""
        ids = _as_id_list(sample_ids, "sample_ids")
        rep = _first_repeat(ids)
        if rep is not None:
            raise RouteError(f"select_samples: sample id {rep} requested more than once")
        idx_N = self._indices_of(ids)
        rows = self.rows_for(ids)
        lengths_N = self.cu_seqlens[idx_N + 1] - self.cu_seqlens[idx_N]
        return RouteTable(
            routes_TLK=self.routes_TLK[rows],
            cu_seqlens=torch.cat([lengths_N.new_zeros(1), lengths_N.cumsum(0)]),
            sample_ids=torch.tensor(ids, dtype=torch.int64, device=self.sample_ids.device),
            layer_numbers=self.layer_numbers,
            num_experts=self.num_experts,
            topk=self.topk,
            plain_routes_TLK=None if self.plain_routes_TLK is None else self.plain_routes_TLK[rows],
        )

    def layer_index(self, layer_number: int) -> int:
        """Column of the MoE layer with global (1-based) number ``layer_number``."""
        try:
            return self.layer_numbers.index(layer_number)
        except ValueError:
            raise RouteError(
                f"layer {layer_number} is not covered by this route table "
                f"(MoE layers covered: {list(self.layer_numbers)})"
            ) from None

    def select_layers(self, layer_numbers: Sequence[int]) -> RouteTable:
        """Return a table restricted to the given MoE layers (strictly increasing numbers)."""
        layer_numbers = tuple(int(n) for n in layer_numbers)
        if any(b <= a for a, b in zip(layer_numbers, layer_numbers[1:])):
            raise RouteError(
                "select_layers: layer numbers must be strictly increasing, got "
                f"{list(layer_numbers)}"
            )
        cols = torch.tensor(
            [self.layer_index(n) for n in layer_numbers],
            dtype=torch.int64,
            device=self.routes_TLK.device,
        )
        return RouteTable(
            routes_TLK=self.routes_TLK.index_select(1, cols),
            cu_seqlens=self.cu_seqlens.clone(),
            sample_ids=self.sample_ids.clone(),
            layer_numbers=layer_numbers,
            num_experts=self.num_experts,
            topk=self.topk,
            plain_routes_TLK=(
                None
                if self.plain_routes_TLK is None
                else self.plain_routes_TLK.index_select(1, cols)
            ),
        )

    def check_tokens(self, sample_ids: SampleIds, num_tokens_per_sample: SampleIds) -> None:
        """Check that the table's token counts match a micro-batch's, sample by sample.

        Raises ValueError naming the first sample whose count differs (expected = micro-batch,
        actual = table), or an unknown sample id.
        """
        ids = _as_id_list(sample_ids, "sample_ids")
        expected = _as_id_list(num_tokens_per_sample, "num_tokens_per_sample")
        if len(ids) != len(expected):
            raise RouteError(
                f"check_tokens: {len(ids)} sample ids but {len(expected)} token counts"
            )
        idx_N = self._indices_of(ids)
        actual_N = self.cu_seqlens[idx_N + 1] - self.cu_seqlens[idx_N]
        mismatch = actual_N != torch.tensor(expected, dtype=torch.int64, device=actual_N.device)
        if bool(mismatch.any()):
            j = int(mismatch.nonzero()[0])
            raise RouteError(
                f"sample id {ids[j]}: micro-batch has {expected[j]} tokens, route table has "
                f"{int(actual_N[j])} (MoE layers {list(self.layer_numbers)})"
            )

    def equal(self, other: RouteTable) -> bool:
        """Return True when ``other`` holds bit-for-bit the same tensors, dtypes and metadata."""

        def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
            if a is None or b is None:
                return a is b
            return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)

        return (
            self.layer_numbers == other.layer_numbers
            and self.num_experts == other.num_experts
            and self.topk == other.topk
            and same(self.routes_TLK, other.routes_TLK)
            and same(self.cu_seqlens, other.cu_seqlens)
            and same(self.sample_ids, other.sample_ids)
            and same(self.plain_routes_TLK, other.plain_routes_TLK)
        )

    def __repr__(self) -> str:
        return (
            f"RouteTable(T={self.num_tokens}, N={self.num_samples}, "
            f"layers={list(self.layer_numbers)}, E={self.num_experts}, k={self.topk}, "
            f"dtype={self.routes_TLK.dtype}, plain_routes={self.plain_routes_TLK is not None})"
        )

    # ----------------------------------------------------------------------------------------
    # Files (safetensors, never pickle): pr2_megatron.routes.files
    # ----------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the table to a safetensors file with a SHA-256 (see :mod:`.files`)."""
        from pr2_megatron.routes.files import save_route_table

        save_route_table(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, unchecked: bool = False) -> RouteTable:
        """Read and validate a table written by :meth:`save` (see :mod:`.files`)."""
        from pr2_megatron.routes.files import load_route_table

        return load_route_table(path, unchecked=unchecked)
