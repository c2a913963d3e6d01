"""The PR2 router in Megatron's ``RouterReplay`` protocol (``megatron_router_replay=True``).

A mixin of :class:`~pr2_megatron.routing.router.PR2Router`: which protocol action a forward
follows, and what RECORD / REPLAY forwards record, cache and train
(:mod:`pr2_megatron.routing.megatron_replay` has the protocol object).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from pr2_megatron.errors import RouteError
from pr2_megatron.routing.megatron_replay import KEY_STRIDE as RECORD_KEY_STRIDE
from pr2_megatron.routing.megatron_replay import PR2RouterReplay, RouterReplayAction
from pr2_megatron.routing.router_config import RoutingPhase

__all__ = ["MegatronProtocol", "unregister_stock_replay"]


class MegatronProtocol:
    """Protocol-mode bookkeeping of a PR2 router (a mixin)."""

    def _megatron_bookkeeping(self, action, chosen_TK, hidden_TH, logits_TE):
        """Protocol mode: RECORD records and caches; a replay forward may train the predictor.

        Returns the predictor loss to attach, or None (docs: :mod:`.megatron_replay`).
        """
        replay = self.router_replay
        if action == RouterReplayAction.RECORD:
            replay.record(self.weight, chosen_TK.detach(), self.feature_cache, hidden_TH, logits_TE)
            return None
        grad = torch.is_grad_enabled() or self._will_be_recomputed()
        if not (self.training and grad):
            return None
        if not replay.router_moved(self.weight):
            replay.pairing_counts["not_moved"] += 1
            return None
        forward = replay.matching_forward(chosen_TK)
        if forward is not None:
            keys_T = forward * RECORD_KEY_STRIDE + torch.arange(chosen_TK.shape[0])
            return functools.partial(self._attach_cached_loss, keys_T=keys_T, pairing="exact")
        return self._attach_snapshot_loss

    def _megatron_action(self) -> Optional[RouterReplayAction]:
        """The protocol action this forward follows (None: the PR2 phase rules)."""
        replay = self.router_replay
        if not isinstance(replay, PR2RouterReplay) or replay.router_replay_action is None:
            return None
        replay.check_registered()
        if self.phase != RoutingPhase.OFF:
            raise RouteError(
                f"MoE layer {self.route_layer_number}: Megatron's RouterReplay action "
                f"{replay.router_replay_action.name} and the PR2 phase {self.phase.value!r} are "
                "both set; drive the router through one of them (controller.off() or "
                "RouterReplay.clear_global_router_replay_action())"
            )
        return replay.router_replay_action


def unregister_stock_replay(stock) -> None:
    """Drop the stock ``RouterReplay`` ``TopKRouter.__init__`` registered (protocol mode)."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    instances = RouterReplay.global_router_replay_instances
    for index, entry in enumerate(instances):
        if entry is stock:
            del instances[index]
            return
