"""Checks of a rank's own recorded routes before they are gathered, and one shared verdict.

Legend: S' local positions, B samples, N real tokens, L MoE layers, K top-k.

Each rank checks only the rows it recorded (cost proportional to its own tokens, not to the
table); the first problem is kept as a small status vector. The data-parallel ranks' statuses
travel inside the last forward's route buffer; the model-parallel groups' are exchanged once per
table. So every rank raises, and none is left waiting in a collective.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from pr2_megatron.errors import RouteError
from pr2_megatron.routes.wire import STATUS_FIELDS, _all_gather

__all__ = ["FirstProblem"]

# Codes of the first problem a rank found in its own routes (propagated to every rank).
_OK, _OUT_OF_RANGE, _DUPLICATE, _BAD_LENGTHS = range(4)


class FirstProblem:
    """The first bad route (or length) among this rank's own real tokens, as a status vector.

    Each rank checks only the rows it recorded (cost proportional to its own tokens); the
    statuses are exchanged once per table, so every rank raises the same kind of error and
    none is left waiting in a collective.
    """

    def __init__(self, device: torch.device) -> None:
        self.status = torch.zeros(STATUS_FIELDS, dtype=torch.long, device=device)
        self.found = False

    def note(self, code: int, forward: int, sample: int, position: int, layer: int, value: int):
        """Keep the first problem only."""
        if not self.found:
            self.found = True
            self.status = torch.tensor(
                [code, forward, sample, position, layer, value],
                dtype=torch.long,
                device=self.status.device,
            )

    def check_routes(
        self, routes_SBLK, real_SB, sample_ids, positions_S, layers, bound, forward, *, distinct
    ):
        """Expert ids in ``[0, bound)`` (and, with ``distinct``, k distinct ids per row).

        Only real tokens (``real_SB``) count. The range check first looks at the extremes of
        the whole tensor (one cheap pass); rows are examined one by one only when an extreme
        lies outside, so a clean rank pays one reduction. The k-distinct check costs k(k-1)/2
        compares per row: routes that Megatron's top-k produced are distinct by construction,
        so callers check them only where they come from elsewhere.
        """
        if self.found or routes_SBLK.numel() == 0 or not bool(real_SB.any()):
            return
        where = (real_SB, sample_ids, positions_S, layers, forward)
        if routes_SBLK.dtype.is_signed:
            low, high = (int(v) for v in torch.aminmax(routes_SBLK))
        else:  # uint8: no id below 0, one pass for the maximum
            low, high = 0, int(routes_SBLK.amax())
        if low < 0 or high >= bound:
            outside_SBLK = (routes_SBLK < 0) | (routes_SBLK >= bound)
            self._find(routes_SBLK, outside_SBLK, where, _OUT_OF_RANGE)
        if distinct and not self.found:
            self._find(routes_SBLK, _rows_with_duplicates(routes_SBLK), where, _DUPLICATE)

    def _find(self, routes_SBLK, bad, where, code) -> None:
        """Note the first real token-layer row flagged in ``bad`` (``[S', B, L(, K)]``)."""
        real_SB, sample_ids, positions_S, layers, forward = where
        bad_SBL = bad.any(-1) if bad.dim() == 4 else bad
        bad_SBL = bad_SBL & real_SB.unsqueeze(-1)
        if not bool(bad_SBL.any()):
            return
        position, sample, column = (int(i) for i in bad_SBL.nonzero()[0])
        value = 0
        if code == _OUT_OF_RANGE:
            row_K = routes_SBLK[position, sample, column]
            value = int(row_K[bad[position, sample, column]][0])
        self.note(
            code,
            forward,
            int(sample_ids[sample]),
            int(positions_S[position]),
            int(layers[column]),
            value,
        )

    def raise_if_any(self, groups, bound: int, gathered: Optional[torch.Tensor] = None) -> None:
        """Exchange the statuses over every group in turn; raise on every rank if any is bad.

        ``gathered`` (``[R, STATUS_FIELDS]``): statuses that already crossed a group (the data
        group's, in the route buffer), taken first. Exchanging over each group of a grid of
        groups in turn reaches every rank of the grid.
        """
        status = self.status
        if gathered is not None:
            bad = (gathered[:, 0] != _OK).nonzero()
            if bad.numel():
                status = gathered[int(bad[0])]
        for group in groups:
            if group is None or dist.get_world_size(group) == 1:
                continue
            gathered = _all_gather(status, group)
            bad = (gathered[:, 0] != _OK).nonzero()
            if bad.numel():
                status = gathered[int(bad[0])]
        code, forward, sample, position, layer, value = (int(v) for v in status.tolist())
        if code == _OUT_OF_RANGE:
            raise RouteError(
                f"forward {forward}: sample id {sample}, token {position}, MoE layer {layer}: "
                f"expert id {value} out of range [0, {bound})"
            )
        if code == _DUPLICATE:
            raise RouteError(
                f"forward {forward}: sample id {sample}, token {position}, MoE layer {layer}: "
                "duplicate expert ids in the row (k distinct experts are required; duplicates "
                "break alltoall split sizes)"
            )
        if code == _BAD_LENGTHS:
            raise RouteError(
                f"forward {forward}: sample id {sample} has length {value}, outside the "
                f"forward's [0, {position}] tokens"
            )


def _rows_with_duplicates(routes_XK: torch.Tensor) -> torch.Tensor:
    """``[...]`` bool: rows (last dim) with a repeated id; pairwise compares, k is small."""
    columns_KX = routes_XK.reshape(-1, routes_XK.shape[-1]).t().contiguous()
    dup_X = torch.zeros(columns_KX.shape[1], dtype=torch.bool, device=routes_XK.device)
    k = columns_KX.shape[0]
    for i in range(k):
        for j in range(i + 1, k):
            dup_X |= columns_KX[i] == columns_KX[j]
    return dup_X.view(routes_XK.shape[:-1])
