"""Expert-id inputs of route tables: storage dtype, conversion, vectorised checks, packing.

Legend: T tokens, L MoE layers, K top-k. Every check is vectorised over tokens and returns the
first offending entry (or None); messages are built only once a check has failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np
import torch

from pr2_megatron.errors import RouteError

IntArray = Union[torch.Tensor, np.ndarray]
SampleIds = Union[Sequence[int], torch.Tensor, np.ndarray]


# Largest expert count per storage dtype: ids 0..E-1 must fit without wrapping.
_MAX_EXPERTS_UINT8 = 256
_MAX_EXPERTS_INT16 = 32768  # ids 0..32767
_MAX_EXPERTS_INT32 = 2**31 - 1


def route_dtype(num_experts: int) -> torch.dtype:
    """Return the smallest integer dtype that holds expert ids ``0..num_experts-1``.

    uint8 for E <= 256, int16 for E <= 32768 (ids up to 32767), int32 beyond (up to 2**31 - 1).
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, (int, np.integer)):
        raise RouteError(f"num_experts must be an int, got {num_experts!r}")
    if num_experts < 1:
        raise RouteError(f"num_experts must be >= 1, got {num_experts}")
    if num_experts <= _MAX_EXPERTS_UINT8:
        return torch.uint8
    if num_experts <= _MAX_EXPERTS_INT16:
        return torch.int16
    if num_experts <= _MAX_EXPERTS_INT32:
        return torch.int32
    raise RouteError(f"num_experts={num_experts} does not fit int32 expert ids")


def _first_out_of_range(values_TLK: torch.Tensor, num_experts: int) -> tuple[int, int, int] | None:
    """Return ``(t, l, id)`` of the first expert id outside ``[0, num_experts)``, else None."""
    info = torch.iinfo(values_TLK.dtype)
    bad_TLK = torch.zeros(values_TLK.shape, dtype=torch.bool, device=values_TLK.device)
    # Compare only against bounds the dtype can represent: `uint8_tensor >= 256` wraps 256 to 0
    # and flags everything, so a bound beyond the dtype's range means "cannot be violated".
    if info.min < 0:
        bad_TLK |= values_TLK < 0
    if num_experts - 1 < info.max:
        bad_TLK |= values_TLK > num_experts - 1
    if not bool(bad_TLK.any()):
        return None
    t, layer, k = (int(i) for i in bad_TLK.nonzero()[0])
    return t, layer, int(values_TLK[t, layer, k])


def _first_duplicate(values_TLK: torch.Tensor) -> tuple[int, int, int] | None:
    """Return ``(t, l, id)`` of the first (token, layer) row with a repeated expert id."""
    if values_TLK.shape[-1] < 2 or values_TLK.numel() == 0:
        return None
    sorted_TLK = values_TLK.sort(dim=-1).values
    dup_TLK = sorted_TLK[..., 1:] == sorted_TLK[..., :-1]
    if not bool(dup_TLK.any()):
        return None
    t, layer, j = (int(i) for i in dup_TLK.nonzero()[0])
    return t, layer, int(sorted_TLK[t, layer, j])


def _as_int_tensor(values: IntArray, what: str) -> torch.Tensor:
    """Turn a tensor or numpy array of integers into a tensor whose dtype supports comparisons."""
    if isinstance(values, np.ndarray):
        if not np.issubdtype(values.dtype, np.integer):
            raise RouteError(f"{what}: expected an integer array, got dtype {values.dtype}")
        values = torch.from_numpy(np.ascontiguousarray(values))
    if not isinstance(values, torch.Tensor):
        raise RouteError(f"{what}: expected a torch.Tensor or numpy array, got {type(values)}")
    if values.dtype == torch.bool or values.dtype.is_floating_point or values.dtype.is_complex:
        raise RouteError(f"{what}: expected an integer dtype, got {values.dtype}")
    if values.dtype in (torch.uint16, torch.uint32, torch.uint64):
        # Barely supported unsigned types: widen so comparisons and sort work everywhere.
        values = values.to(torch.int64)
    return values


def _as_id_list(sample_ids: SampleIds, what: str) -> list[int]:
    """Turn sample ids (sequence, tensor or array of ints) into a list of Python ints."""
    if isinstance(sample_ids, (torch.Tensor, np.ndarray)):
        if sample_ids.ndim != 1:
            raise RouteError(f"{what} must be 1-D, got shape {tuple(sample_ids.shape)}")
        return [int(i) for i in sample_ids.tolist()]
    out = []
    for i in sample_ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise RouteError(f"{what} must hold ints, got {i!r}")
        out.append(int(i))
    return out


def _first_repeat(ids: Sequence[int]) -> int | None:
    """Return the first id that occurs twice in ``ids``, else None."""
    seen: set[int] = set()
    for i in ids:
        if i in seen:
            return i
        seen.add(i)
    return None


def _describe(x: object) -> str:
    """Short description of a value for error messages."""
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _check_layers_and_topk(layer_numbers: Sequence[int], num_experts: int, topk: int) -> None:
    """Validate layer numbers (1-based, strictly increasing) and 1 <= topk <= num_experts."""
    if not isinstance(layer_numbers, tuple):
        raise RouteError(f"layer_numbers must be a tuple of ints, got {layer_numbers!r}")
    for n in layer_numbers:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise RouteError(
                f"layer_numbers must be 1-based global layer numbers (ints >= 1), got "
                f"{n!r} in {list(layer_numbers)}"
            )
    for a, b in zip(layer_numbers, layer_numbers[1:]):
        if b <= a:
            raise RouteError(
                f"layer_numbers must be strictly increasing: MoE layer {b} follows layer {a} "
                f"in {list(layer_numbers)}"
            )
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise RouteError(f"topk must be an int >= 1, got {topk!r}")
    if topk > num_experts:
        raise RouteError(f"topk={topk} exceeds num_experts={num_experts}")


def _pack(
    per_sample: Sequence[IntArray],
    sample_ids: list[int],
    layer_numbers: tuple[int, ...],
    num_experts: int,
    topk: int,
    dtype: torch.dtype,
    what: str,
) -> torch.Tensor:
    """Check each sample's shape and id range in its own dtype, then narrow and concatenate."""
    _check_layers_and_topk(layer_numbers, num_experts, topk)
    num_layers = len(layer_numbers)
    parts = []
    for sid, values in zip(sample_ids, per_sample):
        values_TLK = _as_int_tensor(values, f"{what} of sample id {sid}")
        if values_TLK.ndim != 3 or tuple(values_TLK.shape[1:]) != (num_layers, topk):
            raise RouteError(
                f"{what} of sample id {sid}: shape {tuple(values_TLK.shape)}, expected "
                f"(T_i, {num_layers}, {topk}) for MoE layers {list(layer_numbers)} and "
                f"topk={topk}"
            )
        # Range check before narrowing: casting 300 to uint8 would silently give 44.
        bad = _first_out_of_range(values_TLK, num_experts)
        if bad is not None:
            t, layer, value = bad
            raise RouteError(
                f"{what} of sample id {sid}, token {t}, MoE layer {layer_numbers[layer]}: "
                f"expert id {value} out of range [0, {num_experts})"
            )
        parts.append(values_TLK.to(dtype))
    if not parts:
        return torch.empty((0, num_layers, topk), dtype=dtype)
    return torch.cat(parts)
