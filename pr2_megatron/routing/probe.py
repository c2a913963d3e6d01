"""A recorder of router inputs and logits per named token: the predictability diagnostic's data.

Legend of shape suffixes: N recorded tokens, T tokens of one forward, H hidden, E experts.

:class:`FeatureRecorder` is a probe for :meth:`RoutingController.attach_probe`: every forward
whose tokens were named (``RoutePath.name_tokens``, in any phase while the probe is attached)
hands it each router's input ``h`` and logits ``z``, and the recorder keeps them per MoE layer
and per *window* (a label set by the caller: the rollout, mini-step 1, 2, ...), for the tokens
its ``keep`` predicate selects. :meth:`FeatureRecorder.joined` pairs a token's rollout features
``(h_old, z_old)`` with its logits ``z_cur`` in a later window, by token name -- the data of
``pr2_megatron.metrics.predictability``.

The feature cache (:mod:`.feature_cache`) holds the same rollout features for PR2's own
predictor, but only in the predict phase and only for a sample of T_c tokens per response; the
recorder works in every phase (r2 / r3 runs) and with every layout the route path names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, Union

import torch

__all__ = ["FeatureRecorder", "JoinedFeatures"]

Window = Union[str, int]


@dataclass
class JoinedFeatures:
    """One MoE layer's recorded tokens: rollout features with the logits of a later window."""

    keys_N: torch.Tensor  # int64 token names (sample_id · 2³² + position), ascending
    hidden_old_NH: torch.Tensor  # fp32 router input at rollout
    logits_old_NE: torch.Tensor  # fp32 router logits at rollout
    logits_cur_NE: torch.Tensor  # fp32 router logits in the later window
    window_N: torch.Tensor  # int64: the later window of each token (e.g. its mini-step)
    hidden_cur_NH: torch.Tensor  # fp32 router input in the later window


class FeatureRecorder:
    """Keeps ``(keys, h, z)`` per MoE layer and window for the tokens ``keep`` selects.

    ``keep(keys_T) -> BoolTensor[T]`` (None: every named token) selects which named tokens are
    kept (key -1, an unnamed token, never is). Call :meth:`set_window` before each pass and
    :meth:`clear` when a new rollout batch starts.
    """

    def __init__(self, keep: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        self.keep = keep
        self.window: Optional[Window] = None
        self.clear()

    def clear(self) -> None:
        """Drop everything recorded."""
        self._chunks: dict[tuple[int, Window], list[tuple[torch.Tensor, ...]]] = {}

    def set_window(self, window: Optional[Window]) -> None:
        """Label the next forwards' records (None: forwards are ignored)."""
        self.window = window

    def __call__(self, router, keys_T: torch.Tensor, hidden_TH, logits_TE) -> None:
        """Probe entry point (``PR2Router.feature_probe``)."""
        if self.window is None:
            return
        keys_T = keys_T.cpu().long()
        rows_T = keys_T >= 0
        if self.keep is not None:
            rows_T &= self.keep(keys_T)
        index = torch.nonzero(rows_T).squeeze(1)
        if index.numel() == 0:
            return
        on_device = index.to(hidden_TH.device)
        hidden = hidden_TH.reshape(-1, hidden_TH.shape[-1])[on_device].float().cpu()
        logits = logits_TE.reshape(-1, logits_TE.shape[-1])[on_device].float().cpu()
        key = (int(router.route_layer_number), self.window)
        self._chunks.setdefault(key, []).append((keys_T[index], hidden, logits))

    def windows(self, layer: int) -> list[Window]:
        """Windows with records of ``layer``."""
        return [w for (n, w) in self._chunks if n == layer]

    @property
    def layers(self) -> list[int]:
        """MoE layer numbers with records, ascending."""
        return sorted({layer for layer, _ in self._chunks})

    def records(self, layer: int, window: Window) -> tuple[torch.Tensor, ...]:
        """``(keys_N, hidden_NH, logits_NE)`` of one layer and window, sorted by key."""
        chunks = self._chunks.get((layer, window), [])
        if not chunks:
            return torch.empty(0, dtype=torch.long), torch.empty(0, 0), torch.empty(0, 0)
        keys, hidden, logits = (torch.cat(parts) for parts in zip(*chunks))
        order = torch.argsort(keys)
        return keys[order], hidden[order], logits[order]

    def joined(self, layer: int, old: Window, later: list[Window]) -> JoinedFeatures:
        """Tokens of ``later`` windows paired by name with their features in window ``old``.

        A token recorded twice in one window keeps its first record (a token is named once
        per pass in practice); later windows must be ints (mini-steps).
        """
        keys_old, hidden_old, logits_old = self.records(layer, old)
        parts = []
        for window in later:
            keys, hidden, logits = self.records(layer, window)
            if keys.numel() == 0 or keys_old.numel() == 0:
                continue
            pos = torch.searchsorted(keys_old, keys).clamp(max=keys_old.numel() - 1)
            hit = keys_old[pos] == keys
            window_N = torch.full((int(hit.sum()),), window)
            parts.append((keys[hit], pos[hit], logits[hit], window_N, hidden[hit]))
        if not parts:
            width_h = hidden_old.shape[1] if hidden_old.dim() == 2 else 0
            width_e = logits_old.shape[1] if logits_old.dim() == 2 else 0
            return JoinedFeatures(
                torch.empty(0, dtype=torch.long),
                torch.empty(0, width_h),
                torch.empty(0, width_e),
                torch.empty(0, width_e),
                torch.empty(0, dtype=torch.long),
                torch.empty(0, width_h),
            )
        keys, pos, logits_cur, window_N, hidden_cur = (torch.cat(p) for p in zip(*parts))
        return JoinedFeatures(
            keys, hidden_old[pos], logits_old[pos], logits_cur, window_N.long(), hidden_cur
        )
