"""Validation of a :class:`~pr2_megatron.routes.table.RouteTable`'s layout and expert ids.

:meth:`RouteTable.validate <pr2_megatron.routes.table.RouteTable.validate>` runs both checks;
route files and the route gather run :func:`check_layout` alone where the values were checked
already. Every check is vectorized over tokens; a detailed message (sample id, token position
within the sample, global layer number, bad value) is built only once a check has failed. Every
error is a :class:`~pr2_megatron.errors.RouteError`.

Legend: T tokens, L MoE layers, K top-k.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from pr2_megatron.errors import RouteError
from pr2_megatron.routes.values import (
    _check_layers_and_topk,
    _describe,
    _first_duplicate,
    _first_out_of_range,
    route_dtype,
)

if TYPE_CHECKING:
    from pr2_megatron.routes.table import RouteTable

__all__ = ["check_layout", "check_values"]


def check_layout(table: RouteTable) -> None:
    """Check metadata, dtypes, shapes, ``cu_seqlens`` and ``sample_ids`` (no per-token work)."""
    dtype = route_dtype(table.num_experts)
    _check_layers_and_topk(table.layer_numbers, table.num_experts, table.topk)

    for name in ("routes_TLK", "plain_routes_TLK"):
        routes = getattr(table, name)
        if routes is None and name == "plain_routes_TLK":
            continue
        if not isinstance(routes, torch.Tensor):
            raise RouteError(f"{name} must be a torch.Tensor, got {type(routes).__name__}")
        if routes.dtype != dtype:
            raise RouteError(
                f"{name} has dtype {routes.dtype}, expected {dtype} for "
                f"num_experts={table.num_experts}"
            )
        if routes.ndim != 3 or tuple(routes.shape[1:]) != (len(table.layer_numbers), table.topk):
            raise RouteError(
                f"{name} has shape {tuple(routes.shape)}, expected (T, L, K) = "
                f"(T, {len(table.layer_numbers)}, {table.topk}) for MoE layers "
                f"{list(table.layer_numbers)} and topk={table.topk}"
            )
    if (
        table.plain_routes_TLK is not None
        and table.plain_routes_TLK.shape != table.routes_TLK.shape
    ):
        raise RouteError(
            f"plain_routes_TLK has shape {tuple(table.plain_routes_TLK.shape)}, routes_TLK has "
            f"{tuple(table.routes_TLK.shape)}"
        )

    cu = table.cu_seqlens
    num_tokens = table.routes_TLK.shape[0]
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int64 or cu.ndim != 1:
        raise RouteError(f"cu_seqlens must be a 1-D int64 tensor, got {_describe(cu)}")
    if cu.numel() == 0 or int(cu[0]) != 0:
        raise RouteError(f"cu_seqlens must start at 0, got {cu[:4].tolist()}...")
    lengths = cu.diff()
    if bool((lengths < 0).any()):
        i = int((lengths < 0).nonzero()[0])
        sid = _sample_id_at(table, i)
        raise RouteError(
            f"cu_seqlens must be non-decreasing: sample id {sid} (index {i}) spans "
            f"{int(cu[i])}..{int(cu[i + 1])}"
        )
    if int(cu[-1]) != num_tokens:
        raise RouteError(
            f"cu_seqlens ends at {int(cu[-1])} but routes_TLK has T={num_tokens} tokens"
        )

    sids = table.sample_ids
    if not isinstance(sids, torch.Tensor) or sids.dtype != torch.int64 or sids.ndim != 1:
        raise RouteError(f"sample_ids must be a 1-D int64 tensor, got {_describe(sids)}")
    if sids.numel() != cu.numel() - 1:
        raise RouteError(f"{sids.numel()} sample_ids for N={cu.numel() - 1} samples in cu_seqlens")
    if sids.numel() > 1:
        sorted_ids = sids.sort().values
        rep = sorted_ids[1:] == sorted_ids[:-1]
        if bool(rep.any()):
            dup = int(sorted_ids[1:][rep][0])
            raise RouteError(f"sample id {dup} occurs more than once in sample_ids")


def check_values(table: RouteTable, routes_TLK: torch.Tensor, name: str) -> None:
    """Expert id range and distinct ids per row, vectorized; message built only on failure."""
    bad = _first_out_of_range(routes_TLK, table.num_experts)
    if bad is not None:
        t, layer, value = bad
        raise RouteError(
            f"{name}: {_where(table, t, layer)}: expert id {value} out of range "
            f"[0, {table.num_experts})"
        )
    dup = _first_duplicate(routes_TLK)
    if dup is not None:
        t, layer, value = dup
        row = routes_TLK[t, layer].tolist()
        raise RouteError(
            f"{name}: {_where(table, t, layer)}: duplicate expert id {value} in top-{table.topk} "
            f"row {row} (duplicates break alltoall split sizes)"
        )


def _where(table: RouteTable, t: int, layer: int) -> str:
    """Describe packed row t, layer column l as sample id / token position / layer number."""
    t_1 = torch.tensor([t], device=table.cu_seqlens.device)
    i = int(torch.searchsorted(table.cu_seqlens, t_1, right=True)[0]) - 1
    pos = t - int(table.cu_seqlens[i])
    return (
        f"sample id {_sample_id_at(table, i)}, token {pos} (row {t}), "
        f"MoE layer {table.layer_numbers[layer]}"
    )


def _sample_id_at(table: RouteTable, i: int) -> Any:
    """Sample id of the i-th sample, or a placeholder when sample_ids is unusable."""
    try:
        return int(table.sample_ids[i])
    except (IndexError, TypeError, RuntimeError, ValueError):
        return f"<index {i}>"
