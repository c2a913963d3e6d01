"""The predictor's feature cache: a uniform sample of rollout router inputs and logits.

Legend of shape suffixes: T tokens of one forward, C cached tokens, H hidden, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CachedFeatures", "FeatureCache"]


@dataclass
class CachedFeatures:
    """Rollout-time router features for a sample of tokens of one MoE layer."""

    keys_C: torch.Tensor  # int64, sorted ascending, unique token keys
    hidden_CH: torch.Tensor  # bf16 router inputs h
    logits_CE: torch.Tensor  # fp32 router logits z at θ_old


class FeatureCache:
    """Uniform sample of at most ``max_tokens_per_group`` tokens per group (response).

    Every token offered gets a random priority; the cache keeps, within each group, the tokens
    with the smallest priorities seen so far. That is a uniform sample without replacement
    along the response, whatever the number and size of the forwards that offered its tokens.

    Cost: O(new tokens) per :meth:`add`, amortized. Each forward's tokens are selected within
    the forward and appended as a chunk; router inputs are converted to bf16 only for the tokens
    kept. A response that continues over several forwards (chunked prefill, one token per
    decoding step) is handled without touching the rest of the cache: a new token of a response
    already held is admitted only if its priority is below the response's threshold (its
    ``max_tokens_per_group``-th smallest priority so far; a token above it can never be among
    the final smallest), and the per-response selection is redone over the whole cache (a
    *compaction*) only once such admitted tokens are as many as the others, so at most about
    twice the bound is ever held. :meth:`features` gathers the chunks once per pass.
    """

    def __init__(self, max_tokens_per_group: int, seed: int) -> None:
        if max_tokens_per_group < 1:
            raise ValueError(f"feature cache size must be >= 1, got {max_tokens_per_group}")
        self.max_tokens_per_group = max_tokens_per_group
        self._generator = torch.Generator().manual_seed(seed)
        self.clear()

    def clear(self) -> None:
        """Drop every cached token (a new rollout batch starts)."""
        self._chunks: list[CachedFeatures] = []
        self._chunk_groups: list[torch.Tensor] = []
        self._chunk_priority: list[torch.Tensor] = []
        self._held = 0  # tokens in the chunks
        self._spanning = 0  # tokens added since the last compaction to groups held before
        self._group_ids = torch.empty(0, dtype=torch.long)  # sorted
        self._group_threshold = torch.empty(0)  # per group id; inf while below the bound
        self._sorted: CachedFeatures | None = None

    def __len__(self) -> int:
        self._compact()
        return self._held

    def add(
        self,
        keys_T: torch.Tensor,
        groups_T: torch.Tensor,
        hidden_TH: torch.Tensor,
        logits_TE: torch.Tensor,
    ) -> None:
        """Offer one forward's tokens to the cache (router inputs and logits, detached).

        Tokens with a negative key are not offered (padding, positions offered by an earlier
        generation step); their rows are skipped without copying the others.
        """
        limit = self.max_tokens_per_group
        keys_T, groups_T = keys_T.cpu().long(), groups_T.cpu().long()
        rows_T = None  # rows of hidden/logits behind keys_T when some tokens are skipped
        if bool((keys_T < 0).any()):
            rows_T = torch.nonzero(keys_T >= 0).squeeze(1)
            keys_T, groups_T = keys_T[rows_T], groups_T[rows_T]
        priority_T = torch.rand(keys_T.numel(), generator=self._generator)
        known_T = torch.zeros(keys_T.numel(), dtype=torch.bool)
        admit = torch.arange(keys_T.numel())
        if self._group_ids.numel():
            # Tokens of responses already held: admitted below the response's threshold.
            pos_T = torch.searchsorted(self._group_ids, groups_T)
            pos_T = pos_T.clamp(max=self._group_ids.numel() - 1)
            known_T = self._group_ids[pos_T] == groups_T
            if known_T.any():
                threshold_T = torch.where(known_T, self._group_threshold[pos_T], torch.inf)
                admit = torch.nonzero(priority_T < threshold_T).squeeze(1)
        if admit.numel() > limit:
            # More tokens than one response may keep: select within this forward first.
            keep = _smallest_per_group(groups_T[admit], priority_T[admit], limit)
            admit = admit[keep].sort().values
        if admit.numel() == 0:
            return
        if rows_T is None and admit.numel() == keys_T.numel():
            # Everything offered is kept: copy without a gather (bf16 router inputs, fp32 logits).
            hidden_CH = hidden_TH.detach().to("cpu", torch.bfloat16, copy=True)
            logits_CE = logits_TE.detach().to("cpu", torch.float32, copy=True)
        else:
            source = admit if rows_T is None else rows_T[admit]
            hidden_CH = hidden_TH.detach()[source.to(hidden_TH.device)].to("cpu", torch.bfloat16)
            logits_CE = logits_TE.detach()[source.to(logits_TE.device)].to("cpu", torch.float32)
            keys_T, groups_T, priority_T = keys_T[admit], groups_T[admit], priority_T[admit]
            known_T = known_T[admit]
        self._chunks.append(CachedFeatures(keys_C=keys_T, hidden_CH=hidden_CH, logits_CE=logits_CE))
        self._chunk_groups.append(groups_T)
        self._chunk_priority.append(priority_T)
        self._held += keys_T.numel()
        self._sorted = None
        spanning = int(known_T.sum())
        if spanning < keys_T.numel():
            # New responses: this forward's selection is already exact for them.
            fresh = ~known_T
            self._add_groups(groups_T[fresh], priority_T[fresh])
        self._spanning += spanning
        if self._spanning >= max(limit, self._held - self._spanning):
            self._compact()

    def _add_groups(self, groups: torch.Tensor, priority: torch.Tensor) -> None:
        """Register responses not held before, with thresholds from their kept tokens."""
        ids, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
        largest = torch.full((ids.numel(),), -torch.inf)
        largest = largest.scatter_reduce(0, inverse, priority, reduce="amax")
        threshold = torch.where(counts >= self.max_tokens_per_group, largest, torch.inf)
        self._group_ids, order = torch.sort(torch.cat([self._group_ids, ids]))
        self._group_threshold = torch.cat([self._group_threshold, threshold])[order]

    def _compact(self, sort_by_key: bool = False) -> None:
        """Make the chunks one exact sample (and sorted by key if asked)."""
        exact = self._spanning == 0
        if not self._chunks or (exact and (not sort_by_key or self._sorted is not None)):
            return
        if exact and len(self._chunks) == 1:
            self._sort_single_chunk()
            return
        keys = _cat([c.keys_C for c in self._chunks])
        groups = _cat(self._chunk_groups)
        priority = _cat(self._chunk_priority)
        if exact:
            keep = torch.arange(keys.numel())
        else:
            keep = _smallest_per_group(groups, priority, self.max_tokens_per_group)
        # Back in key order (rows of a forward are offered in key order in practice).
        keep = keep[torch.argsort(keys[keep])] if sort_by_key else keep.sort().values
        hidden = _cat([c.hidden_CH for c in self._chunks])
        logits = _cat([c.logits_CE for c in self._chunks])
        if keep.numel() < keys.numel() or not bool((keep == torch.arange(keep.numel())).all()):
            hidden, logits = hidden[keep], logits[keep]
            keys, groups, priority = keys[keep], groups[keep], priority[keep]
        self._chunks = [CachedFeatures(keys_C=keys, hidden_CH=hidden, logits_CE=logits)]
        self._chunk_groups, self._chunk_priority = [groups], [priority]
        self._held = keys.numel()
        if sort_by_key:
            self._sorted = self._chunks[0]
        if not exact:
            # Thresholds: the largest kept priority of every response at its bound.
            index = torch.searchsorted(self._group_ids, groups)
            counts = torch.bincount(index, minlength=self._group_ids.numel())
            largest = torch.full((self._group_ids.numel(),), -torch.inf)
            largest = largest.scatter_reduce(0, index, priority, reduce="amax")
            full = counts >= self.max_tokens_per_group
            self._group_threshold = torch.where(full, largest, torch.inf)
            self._spanning = 0

    def _sort_single_chunk(self) -> None:
        chunk = self._chunks[0]
        keys = chunk.keys_C
        if keys.numel() > 1 and not bool((keys[1:] > keys[:-1]).all()):
            order = torch.argsort(keys)
            chunk = CachedFeatures(
                keys_C=keys[order],
                hidden_CH=chunk.hidden_CH[order],
                logits_CE=chunk.logits_CE[order],
            )
            self._chunks = [chunk]
            self._chunk_groups = [self._chunk_groups[0][order]]
            self._chunk_priority = [self._chunk_priority[0][order]]
        self._sorted = chunk

    def features(self) -> CachedFeatures | None:
        """The cached tokens sorted by key, or ``None`` when the cache is empty."""
        if self._sorted is None:
            self._compact(sort_by_key=True)
        if self._held == 0:
            return None
        return self._sorted

    def lookup(self, keys_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``(token_idx, cache_idx)`` of this forward's tokens that are cached."""
        cached = self.features()
        if cached is None:
            empty = torch.empty(0, dtype=torch.long)
            return empty, empty
        keys_T = keys_T.cpu()
        pos_T = torch.searchsorted(cached.keys_C, keys_T).clamp(max=cached.keys_C.numel() - 1)
        hit_T = cached.keys_C[pos_T] == keys_T
        token_idx = torch.nonzero(hit_T).squeeze(1)
        return token_idx, pos_T[token_idx]

    def nbytes(self) -> int:
        """Bytes held by cached features (router inputs and logits) after a compaction."""
        self._compact()
        return sum(c.hidden_CH.nbytes + c.logits_CE.nbytes for c in self._chunks)


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` that does not copy a single tensor."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _smallest_per_group(groups: torch.Tensor, priority: torch.Tensor, limit: int) -> torch.Tensor:
    """Indices of the ``limit`` smallest priorities within each group."""
    order = torch.argsort(priority)
    order = order[torch.argsort(groups[order], stable=True)]  # by group, then by priority
    sorted_groups = groups[order]
    starts = torch.ones_like(sorted_groups, dtype=torch.bool)
    starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
    position = torch.arange(sorted_groups.numel())
    group_start = torch.cummax(torch.where(starts, position, 0), dim=0).values
    rank_in_group = position - group_start
    return order[rank_in_group < limit]
