"""The predictor's feature cache: a uniform sample of rollout router inputs and logits.

Legend of shape suffixes: T tokens of one forward, C cached tokens, H hidden, E experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["CachedFeatures", "FeatureCache"]


@dataclass
class CachedFeatures:
    """Rollout-time router features for a sample of tokens of one MoE layer."""

    keys_C: torch.Tensor  # int64, sorted ascending, unique token keys
    hidden_CH: torch.Tensor  # bf16 router inputs h
    logits_CE: torch.Tensor  # fp32 router logits z at θ_old


class _HostCopies:
    """Device-to-host copies of cached features, off the critical path on a GPU.

    A CUDA tensor is converted on its device (on the current stream), then copied into a
    pinned host buffer with ``non_blocking=True`` on a side stream that first waits for the
    current one, so neither the host nor the compute stream waits for the copy; each copy
    records a CUDA event, and :meth:`wait` blocks on the events. The source is marked as used
    by the side stream (``record_stream``), so the caching allocator does not hand its memory
    to another tensor before the copy has read it. A host tensor is copied synchronously and
    leaves nothing to wait for. The cache calls :meth:`wait` before it reads any copied value.
    """

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._pending: list[torch.cuda.Event] = []

    def copy(self, source: torch.Tensor, dtype: torch.dtype, fresh: bool = False) -> torch.Tensor:
        """A host copy of ``source`` in ``dtype``; valid once :meth:`wait` has returned.

        ``fresh``: ``source`` is a temporary of the caller's (a gather), which a host result may
        share instead of copying it.
        """
        source = source.detach()
        if source.device.type != "cuda":
            return source.to("cpu", dtype, copy=not fresh)
        converted = source.to(dtype)  # on the device: half the bytes to move for bf16
        host = torch.empty(converted.shape, dtype=dtype, pin_memory=True)
        stream = self._side_stream(converted.device)
        stream.wait_stream(torch.cuda.current_stream(converted.device))
        with torch.cuda.stream(stream):
            host.copy_(converted, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        converted.record_stream(stream)
        self._pending.append(event)
        return host

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device)
        return stream

    @property
    def pending(self) -> int:
        """Copies issued and not yet waited for."""
        return len(self._pending)

    def wait(self) -> None:
        """Block until every copy issued so far has landed in host memory."""
        for event in self._pending:
            event.synchronize()
        self._pending.clear()

    def forget(self) -> None:
        """Drop the events of copies whose results are discarded.

        The pinned host allocator keeps their buffers until the copies are done.
        """
        self._pending.clear()


class FeatureCache:
    """Uniform sample of at most T_c tokens per response and at most a total over all.

    T_c is ``max_tokens_per_group`` (tokens per group, i.e. response), the total is
    ``max_total_tokens`` (None: no total cap).

    Every token offered gets a random priority (float64, so ties do not occur in practice).
    The cache keeps, within each group, the ``max_tokens_per_group`` tokens with the smallest
    priorities seen so far (the *candidates*), and of the candidates of all groups the
    ``max_total_tokens`` with the smallest priorities. Equivalently: scan every token offered in
    ascending priority and keep it while its response holds fewer than T_c kept tokens and the
    cache fewer than the total. That is a uniform sample without replacement along each
    response, and, when the total cap binds, a uniform sample of the candidates (a response
    keeps tokens in proportion to its length up to T_c), whatever the number and size of the
    forwards that offered the tokens.

    Cost: O(new tokens) per :meth:`add`, amortized. Each forward's tokens are selected within
    the forward and appended as a chunk; router inputs are converted to bf16 only for the tokens
    kept, and copied to the host off the critical path on a GPU (:class:`_HostCopies`; every
    read of the cache waits for the copies first). A response that continues over several
    forwards (chunked prefill, one token per decoding step) is handled without touching the rest
    of the cache: a new token of a response already held is admitted only if its priority is
    below the response's threshold (its ``max_tokens_per_group``-th smallest priority so far; a
    token above it can never be among the final smallest), and the per-response selection is
    redone over the whole cache (a *compaction*) only once such admitted tokens are as many as
    the others, so at most about twice the per-response bound is ever held. With a total cap,
    a compaction also runs once 1.5x the cap is held, and after one every new token must also be
    below the total threshold (the cap-th smallest candidate priority, which can only decrease
    as tokens arrive); a forward that admits more than the cap is cut to its cap smallest
    before anything is copied. Between compactions at most 1.5x the cap plus one forward's
    admitted tokens are held, after one (:meth:`features`, :meth:`nbytes`, ``len``) at most
    the cap. :meth:`features` gathers the chunks once per pass; a compaction
    inside :meth:`add` (rare: it is amortized) waits for the pending host copies.
    """

    def __init__(
        self, max_tokens_per_group: int, seed: int, max_total_tokens: Optional[int] = None
    ) -> None:
        if max_tokens_per_group < 1:
            raise ValueError(f"feature cache size must be >= 1, got {max_tokens_per_group}")
        if max_total_tokens is not None and max_total_tokens < 1:
            raise ValueError(
                f"feature cache total cap must be >= 1 or None, got {max_total_tokens}"
            )
        self.max_tokens_per_group = max_tokens_per_group
        self.max_total_tokens = max_total_tokens
        self._generator = torch.Generator().manual_seed(seed)
        self._copies = _HostCopies()
        self.clear()

    def clear(self) -> None:
        """Drop every cached token (a new rollout batch starts)."""
        self._copies.forget()
        self._chunks: list[CachedFeatures] = []
        self._chunk_groups: list[torch.Tensor] = []
        self._chunk_priority: list[torch.Tensor] = []
        self._held = 0  # tokens in the chunks
        self._spanning = 0  # tokens added since the last compaction to groups held before
        self._group_ids = torch.empty(0, dtype=torch.long)  # sorted
        self._group_threshold = torch.empty(0, dtype=torch.float64)  # inf below the bound
        self._total_threshold = math.inf  # the cap-th smallest candidate priority once binding
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
        priority_T = torch.rand(keys_T.numel(), generator=self._generator, dtype=torch.float64)
        known_T, threshold_T = self._admission_thresholds(groups_T)
        admit = torch.arange(keys_T.numel())
        if threshold_T is not None:
            admit = torch.nonzero(priority_T < threshold_T).squeeze(1)
        if admit.numel() > limit:
            # More tokens than one response may keep: select within this forward first.
            keep = _smallest_per_group(groups_T[admit], priority_T[admit], limit)
            admit = admit[keep].sort().values
        admit = self._cut_to_total(admit, priority_T)
        if admit.numel() == 0:
            return
        if rows_T is None and admit.numel() == keys_T.numel():
            # Everything offered is kept: copy without a gather (bf16 router inputs, fp32 logits).
            hidden_CH = self._copies.copy(hidden_TH, torch.bfloat16)
            logits_CE = self._copies.copy(logits_TE, torch.float32)
        else:
            source = admit if rows_T is None else rows_T[admit]
            hidden_CH = self._copies.copy(_rows(hidden_TH, source), torch.bfloat16, fresh=True)
            logits_CE = self._copies.copy(_rows(logits_TE, source), torch.float32, fresh=True)
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
        if self._spanning >= max(limit, self._held - self._spanning) or self._over_total(1.5):
            self._compact()

    def _admission_thresholds(
        self, groups_T: torch.Tensor
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(known_T, threshold_T)``: tokens of responses already held, admission thresholds.

        ``threshold_T`` is the priority each token must be below to be admitted (None: every
        token is admitted). A token of a held response must be below that response's
        threshold; once the total cap binds, every token must also be below the total
        threshold.
        """
        known_T = torch.zeros(groups_T.numel(), dtype=torch.bool)
        threshold_T = None
        if self._group_ids.numel():
            pos_T = torch.searchsorted(self._group_ids, groups_T)
            pos_T = pos_T.clamp(max=self._group_ids.numel() - 1)
            known_T = self._group_ids[pos_T] == groups_T
            if known_T.any():
                threshold_T = torch.where(known_T, self._group_threshold[pos_T], torch.inf)
        if self._total_threshold < math.inf:
            total_T = torch.full((groups_T.numel(),), self._total_threshold, dtype=torch.float64)
            threshold_T = total_T if threshold_T is None else torch.minimum(threshold_T, total_T)
        return known_T, threshold_T

    def _cut_to_total(self, admit: torch.Tensor, priority_T: torch.Tensor) -> torch.Tensor:
        """Drop admitted tokens that at least ``max_total_tokens`` candidates precede.

        A response has at most T_c tokens admitted here, so it has at least as many candidates
        below any priority p as admitted tokens below p: a token above the cap-th smallest
        admitted priority is preceded by at least the cap of candidates and can never be kept,
        now or later, and that priority bounds the total threshold from now on.
        """
        cap = self.max_total_tokens
        if cap is None or admit.numel() <= cap:
            return admit
        priority = priority_T[admit]
        threshold = float(priority.kthvalue(cap).values)
        self._total_threshold = min(self._total_threshold, threshold)
        return admit[priority <= threshold]

    def _over_total(self, factor: float) -> bool:
        """Whether more than ``factor`` times the total cap is held (False without a cap)."""
        cap = self.max_total_tokens
        return cap is not None and self._held > factor * cap

    def _add_groups(self, groups: torch.Tensor, priority: torch.Tensor) -> None:
        """Register responses not held before, with thresholds from their kept tokens."""
        ids, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
        largest = torch.full((ids.numel(),), -torch.inf, dtype=torch.float64)
        largest = largest.scatter_reduce(0, inverse, priority, reduce="amax")
        threshold = torch.where(counts >= self.max_tokens_per_group, largest, torch.inf)
        self._group_ids, order = torch.sort(torch.cat([self._group_ids, ids]))
        self._group_threshold = torch.cat([self._group_threshold, threshold])[order]

    def _compact(self, sort_by_key: bool = False) -> None:
        """Make the chunks one exact sample (and sorted by key if asked)."""
        exact = self._spanning == 0 and not self._over_total(1.0)
        if not self._chunks or (exact and (not sort_by_key or self._sorted is not None)):
            return
        self._copies.wait()  # the chunks' values are read below
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
            if self.max_total_tokens is not None and keep.numel() > self.max_total_tokens:
                # The total cap: the smallest priorities of all responses' candidates.
                keep = keep[torch.argsort(priority[keep])[: self.max_total_tokens]]
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
            self._update_thresholds(groups, priority)

    def _update_thresholds(self, groups: torch.Tensor, priority: torch.Tensor) -> None:
        """Thresholds after an exact selection of ``groups``/``priority`` (the kept tokens).

        A response at its bound: its largest kept priority. Below it (also when the total cap
        took some of its candidates): none of its own; the total threshold, the largest kept
        priority once the cap binds, bounds every response.
        """
        index = torch.searchsorted(self._group_ids, groups)
        counts = torch.bincount(index, minlength=self._group_ids.numel())
        largest = torch.full((self._group_ids.numel(),), -torch.inf, dtype=torch.float64)
        largest = largest.scatter_reduce(0, index, priority, reduce="amax")
        full = counts >= self.max_tokens_per_group
        self._group_threshold = torch.where(full, largest, torch.inf)
        cap = self.max_total_tokens
        if cap is not None and groups.numel() >= cap:
            self._total_threshold = float(priority.max())
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
        self._copies.wait()
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

    def held_tokens(self) -> int:
        """Tokens held right now, without compacting.

        At most 1.5x the total cap plus one forward's admitted tokens between compactions.
        """
        return self._held


def _rows(values_TX: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``values_TX[rows]`` with host indices, gathered on the values' device."""
    return values_TX.detach()[rows.to(values_TX.device, non_blocking=True)]


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
