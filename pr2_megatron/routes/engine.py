"""Routes as rollout engines return them (vLLM / SGLang ``routed_experts``) -> a route table.

Legend: T tokens of a request, L layers, K top-k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pr2_megatron.errors import RouteError
from pr2_megatron.routes.table import RouteTable
from pr2_megatron.routes.values import IntArray, SampleIds, _as_id_list, _as_int_tensor

__all__ = ["from_engine_routed_experts"]


def from_engine_routed_experts(
    per_request: Sequence[IntArray],
    *,
    moe_layer_numbers: Sequence[int],
    num_experts: int,
    topk: int,
    sample_ids: SampleIds | None = None,
    num_hidden_layers: int,
) -> RouteTable:
    """Build a table from routes as rollout engines return them (vLLM / SGLang ``routed_experts``).

    Each request is ``[T_i, num_hidden_layers, K]`` (tensor or integer numpy array) whose layer
    axis covers *all* decoder layers, dense ones included; 0-based index i is Megatron layer
    number i + 1. Only the MoE layers ``moe_layer_numbers`` (1-based, global) are kept; the dense
    layers' entries are ignored (engines fill them with zeros or garbage). E.g. DeepSeek-V3 with
    three dense first layers: ``num_hidden_layers=61``, ``moe_layer_numbers=range(4, 62)``.
    ``sample_ids`` defaults to ``0..len(per_request)-1``.
    """
    if isinstance(num_hidden_layers, bool) or not isinstance(num_hidden_layers, int):
        raise RouteError(f"num_hidden_layers must be an int, got {num_hidden_layers!r}")
    if num_hidden_layers < 1:
        raise RouteError(f"num_hidden_layers must be >= 1, got {num_hidden_layers}")
    moe_layer_numbers = tuple(int(n) for n in moe_layer_numbers)
    for n in moe_layer_numbers:
        if not 1 <= n <= num_hidden_layers:
            raise RouteError(
                f"MoE layer number {n} is out of range 1..{num_hidden_layers} "
                f"(num_hidden_layers={num_hidden_layers}; layer numbers are 1-based)"
            )
    ids = (
        list(range(len(per_request)))
        if sample_ids is None
        else _as_id_list(sample_ids, "sample_ids")
    )
    if len(ids) != len(per_request):
        raise RouteError(f"got {len(per_request)} requests but {len(ids)} sample_ids")
    cols = torch.tensor([n - 1 for n in moe_layer_numbers], dtype=torch.int64)
    per_sample = []
    for sid, values in zip(ids, per_request):
        values_TLK = _as_int_tensor(values, f"routed_experts of sample id {sid}")
        if values_TLK.ndim != 3 or values_TLK.shape[1] != num_hidden_layers:
            raise RouteError(
                f"routed_experts of sample id {sid}: shape {tuple(values_TLK.shape)}, expected "
                f"(T_i, num_hidden_layers={num_hidden_layers}, {topk})"
            )
        per_sample.append(values_TLK.index_select(1, cols.to(values_TLK.device)))
    return RouteTable.from_samples(
        per_sample,
        sample_ids=ids,
        layer_numbers=moe_layer_numbers,
        num_experts=num_experts,
        topk=topk,
    )
