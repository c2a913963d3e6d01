"""Pair every activation recompute with the forward it recomputes, whatever the backward order.

Legend: T tokens of one forward, K experts per token.

Megatron's activation checkpointing (``tensor_parallel.checkpoint``: selective ``moe`` and full
recompute) runs a region's forward without a graph, then runs it again during backward. A
router must dispatch the recompute to the experts of *that* forward. Pairing recomputes with
forwards first-in-first-out is wrong as soon as the backward order differs from the forward
order (one backward of a summed loss over two micro-batches, reverse order) or a no-grad forward
in training mode leaves a route that is never recomputed.

The pairing rides on what Megatron's checkpoint already restores exactly: before a region is
recomputed, its RNG tracker states are set back to the ones captured when the region's forward
started (``get_cuda_rng_tracker().get_states()`` / ``set_states``). A forward counter lives in
those states under :data:`FORWARD_COUNTER`: each router that will be recomputed reads the
counter, files its route under that number and advances the counter; the recompute restores the
counter to the region's start, so each router reads exactly the number it filed its route under,
in any backward order. A recompute whose number has no route raises
:class:`~pr2_megatron.errors.RouteError` (an RNG tracker that does not restore states, a
checkpoint implementation that does not restore the tracker): never a route of another forward.
"""

from __future__ import annotations

import torch

from pr2_megatron.errors import RouteError

#: Name of the forward counter in Megatron's RNG tracker states.
FORWARD_COUNTER = "pr2-recompute-forward-counter"


def _tracker():
    from megatron.core.tensor_parallel import random as mcore_random

    return mcore_random.get_cuda_rng_tracker()


def _supported(tracker) -> bool:
    """Trackers whose states are a plain dict that ``set_states`` installs as given."""
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    from pr2_megatron.runtime.cpu import CPURNGStatesTracker

    if type(tracker).__name__ == "InferenceCudaRNGStatesTracker":
        return False  # set_states is a no-op there
    return isinstance(tracker, (CudaRNGStatesTracker, CPURNGStatesTracker))


def next_forward_number() -> int:
    """Read the forward counter from the RNG tracker states and advance it by one."""
    tracker = _tracker()
    if not _supported(tracker):
        raise RouteError(
            f"activation recompute with the PR2 router needs Megatron's RNG tracker "
            f"(CudaRNGStatesTracker, use_te_rng_tracker=False); with {type(tracker).__name__} "
            "a recompute cannot be paired with the forward it recomputes"
        )
    states = tracker.get_states()
    number = int(states.get(FORWARD_COUNTER, 0))
    states[FORWARD_COUNTER] = number + 1
    tracker.set_states(states)
    return number


def in_backward() -> bool:
    """Whether the autograd engine is running a backward pass on this thread right now.

    A router forward inside a backward pass is a recompute, whichever checkpoint
    implementation (Megatron's, Transformer Engine's) runs it.
    """
    return torch._C._current_graph_task_id() != -1


class RecomputeRoutes:
    """The routes of one router's forwards that will be recomputed, filed by forward number."""

    def __init__(self, layer_number_of) -> None:
        self._layer_number_of = layer_number_of
        self._routes_by_number: dict[int, tuple[torch.Tensor, object]] = {}

    def __len__(self) -> int:
        return len(self._routes_by_number)

    def file(self, route_TK: torch.Tensor, payload: object = None) -> None:
        """Keep a forward's route for its recompute (call in the checkpointed forward).

        ``payload`` travels with the route to the recompute (e.g. the predictor loss to attach
        there: the checkpointed forward runs without a graph, so a loss attached in it is lost).
        """
        self._routes_by_number[next_forward_number()] = (route_TK, payload)

    def take(self, num_tokens: int) -> torch.Tensor:
        """The route of the forward this recompute recomputes (call in the recompute)."""
        return self.take_with_payload(num_tokens)[0]

    def take_with_payload(self, num_tokens: int) -> tuple[torch.Tensor, object]:
        """``(route, payload)`` of the forward this recompute recomputes."""
        number = next_forward_number()
        route_TK, payload = self._routes_by_number.pop(number, (None, None))
        if route_TK is None:
            raise RouteError(
                f"MoE layer {self._layer_number_of()}: activation recompute of forward "
                f"#{number} found no route of that forward (filed: "
                f"{sorted(self._routes_by_number)[:8]}); the checkpoint did not restore "
                "Megatron's RNG tracker states, or the forward ran outside this pass"
            )
        if route_TK.shape[0] != num_tokens:
            raise RouteError(
                f"MoE layer {self._layer_number_of()}: recompute of forward #{number} routes "
                f"{num_tokens} tokens, its forward routed {route_TK.shape[0]}"
            )
        return route_TK, payload

    def clear(self) -> None:
        """Drop every filed route (a new pass; routes of no-grad forwards are never taken)."""
        self._routes_by_number.clear()
