"""Routing agreement: how often the route a token was dispatched to equals the live router's.

These are the numbers the project exists to move (docs/design.md, "Metrics"): top-k overlap and
zero deviation of the replayed route against the live router's own top-k, per layer and per token
across layers, and beside it the same for the *plain-replay* route (the live top-k at rollout,
``I_old`` at θ_old: what plain replay would have dispatched). Nothing here imports Megatron, so
the functions run on any tensors (CPU or GPU); :func:`routing_agreement` is the one place that
turns a pass's routes into these numbers, for the controller and the trainer alike.

Shape legend:
    T  tokens (packed; whatever the caller's token order is, it must be the same in every layer)
    K  top-k (experts per token)
    L  MoE layers
    E  experts

Route rows (``routes_TK``) are sets of ``K`` distinct global expert ids, in any integer dtype
(uint8 / int16 / int32 / int64, mixed freely); order within a row does not matter.

Empty inputs never produce NaN: a ratio whose denominator is zero (no tokens, no masked tokens,
``mean|z| == 0``) is reported as ``0.0``, and the set of keys a function returns does not depend
on whether its inputs were empty, so every rank logs the same keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist

__all__ = ["RoutingAgreement", "routing_agreement", "same_set", "topk_overlap"]


# --------------------------------------------------------------------------------------------
# Set overlap of top-k routes
# --------------------------------------------------------------------------------------------


def _check_route_pair(routes_TK: torch.Tensor, reference_TK: torch.Tensor) -> None:
    """Raise ValueError unless both are ``[T, K]`` integer tensors with equal T and K >= 1."""
    for name, t in (("routes_TK", routes_TK), ("reference_TK", reference_TK)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [T, K], got shape {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer expert ids, got dtype {t.dtype}")
    if routes_TK.shape[1] != reference_TK.shape[1]:
        raise ValueError(
            f"k mismatch: routes_TK has k={routes_TK.shape[1]}, "
            f"reference_TK has k={reference_TK.shape[1]}"
        )
    if routes_TK.shape[0] != reference_TK.shape[0]:
        raise ValueError(
            f"token count mismatch: routes_TK has T={routes_TK.shape[0]}, "
            f"reference_TK has T={reference_TK.shape[0]}"
        )
    if routes_TK.shape[1] == 0:
        raise ValueError(f"k must be >= 1, got routes of shape {tuple(routes_TK.shape)}")


def _shared_count_T(routes_TK: torch.Tensor, reference_TK: torch.Tensor) -> torch.Tensor:
    """Count the ids of each row of ``routes_TK`` that occur in the same row of the reference."""
    # int64 on both sides: uint8 vs int16 etc. would promote anyway, but unsigned types beyond
    # uint8 have patchy kernel support; T*K int64 is tiny next to the [T, K, K] comparison.
    a_TK1 = routes_TK.long().unsqueeze(2)
    b_T1K = reference_TK.long().unsqueeze(1)
    # Rows hold distinct ids, so each id of A matches at most one id of B: any() then sum().
    return (a_TK1 == b_T1K).any(dim=2).sum(dim=1)


def topk_overlap(routes_TK: torch.Tensor, reference_TK: torch.Tensor) -> torch.Tensor:
    """Per-token overlap ``|A ∩ B| / k`` of two top-k routes, as float32 ``[T]`` in ``[0, 1]``.

    Rows must be sets (``k`` distinct ids; the route validator enforces this for route tables).
    Order within a row is irrelevant, and the result is symmetric in its two arguments.

    Raises:
        ValueError: if either input is not 2-D integer, the token counts differ, or the ``k``
            differ (or are 0).

    """
    _check_route_pair(routes_TK, reference_TK)
    k = routes_TK.shape[1]
    return _shared_count_T(routes_TK, reference_TK).float() / k


def same_set(routes_TK: torch.Tensor, reference_TK: torch.Tensor) -> torch.Tensor:
    """Per-token ``BoolTensor[T]``: True where both rows hold the same set of experts.

    Raises:
        ValueError: on the same bad inputs as :func:`topk_overlap`.

    """
    _check_route_pair(routes_TK, reference_TK)
    # Distinct ids on both sides and equal k: equal sets <=> every id of A is found in B.
    return _shared_count_T(routes_TK, reference_TK) == routes_TK.shape[1]


# --------------------------------------------------------------------------------------------
# Accumulator for one replay pass
# --------------------------------------------------------------------------------------------

# Flat layout of RoutingAgreement.as_tensor(): a header, then one block per layer (sorted).
_HEADER = ("tokens", "zero_deviation_tokens")
_LAYER_FIELDS = (
    "pairs",  # token-layer pairs seen with replayed/live routes
    "overlap_replayed_sum",  # Σ topk_overlap(replayed, live)
    "disagree_pairs",  # Σ [set(replayed) != set(live)]
    "plain_pairs",  # token-layer pairs for which plain-replay routes were given
    "overlap_plain_sum",  # Σ topk_overlap(plain, live)
)
_PAIRS, _OVL_REP, _DISAGREE, _PLAIN_PAIRS, _OVL_PLAIN = range(len(_LAYER_FIELDS))


def _ratio(num: float, den: float) -> float:
    """``num / den``, or 0.0 when there is nothing to divide by."""
    return num / den if den > 0 else 0.0


class RoutingAgreement:
    """Accumulates routing agreement over one replay pass (many micro-batches, many layers).

    Usage, per training forward (one micro-batch)::

        agreement.begin_forward()
        for each MoE layer n:  agreement.update(n, replayed_TK, live_TK, plain_TK)
        ...
        metrics = agreement.summary()          # after the pass (optionally after reduce_())

    Forwards are delimited explicitly by :meth:`begin_forward`, which closes the previous one;
    the first :meth:`update` after construction or :meth:`reset` opens a forward by itself.
    Within one forward every layer must see the same ``T`` tokens *in the same order*: the
    per-token quantities (``zero_deviation_ratio``, ``tokens_with_any_disagreement``) AND the
    per-layer agreement of row ``t`` over all layers updated in that forward.  Updating the same
    layer twice in one forward is an error (call the accumulator from the forward only, not from
    activation recompute).  A token's zero deviation is therefore "equal in every layer this rank
    routed it through": with pipeline parallelism that is the stage's layers only.

    ``summary()`` keys (ratios with a zero denominator are 0.0, never NaN):

    - ``topk_overlap/replayed``: mean over token-layer pairs of ``topk_overlap(replayed, live)``;
    - ``topk_overlap/replayed/layer_{n}``: the same for layer ``n`` (``n`` as passed to update);
    - ``router_disagreement``: fraction of token-layer pairs whose sets differ, and per layer
      ``router_disagreement/layer_{n}``;
    - ``zero_deviation_ratio``: fraction of tokens whose replayed set equals the live set in
      every layer;
    - ``tokens_with_any_disagreement``: fraction of tokens that differ in >= 1 layer
      (``1 - zero_deviation_ratio`` whenever there are tokens);
    - ``topk_overlap/plain`` and ``topk_overlap/plain/layer_{n}`` (for every known layer): the
      plain-replay route against the live one - only once ``plain_TK`` has been given for at
      least one token (after :meth:`reduce_`: on any rank).

    Sums live on the device of the first update (no host sync per update); ``summary()`` syncs
    once.  For data-parallel reduction, :meth:`as_tensor` / :meth:`from_tensor` expose the raw
    sums as one flat float64 tensor and :meth:`reduce_` all-reduces it (SUM).

    Args:
        layer_numbers: optional fixed set of layer numbers.  When given, updates for other layers
            raise, and the layer set (hence the flat-tensor layout and the summary keys) is known
            even on a rank that sees no tokens - pass it when ranks may be empty.

    """

    def __init__(self, layer_numbers: Iterable[int] | None = None):
        self._fixed_layers: frozenset[int] | None = None
        if layer_numbers is not None:
            layers = [self._check_layer_number(n) for n in layer_numbers]
            self._fixed_layers = frozenset(layers)
        self.reset()

    # -- state --------------------------------------------------------------------------------

    def reset(self) -> None:
        """Drop every sum and the open forward (the fixed layer set, if any, is kept)."""
        self._device: torch.device | None = None
        self._token_sums: torch.Tensor | None = None  # [2] float64, see _HEADER
        self._layer_sums: dict[int, torch.Tensor] = {}  # layer -> [5] float64, see _LAYER_FIELDS
        self._fwd_agree_T: torch.Tensor | None = None  # AND over this forward's layers
        self._fwd_layers: set[int] = set()
        self._fwd_open = False

    @staticmethod
    def _check_layer_number(layer_number: int) -> int:
        if isinstance(layer_number, bool) or not isinstance(layer_number, int) or layer_number < 0:
            raise ValueError(f"layer_number must be an int >= 0, got {layer_number!r}")
        return layer_number

    def _zeros(self, n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.float64, device=self._device)

    @property
    def layer_numbers(self) -> list[int]:
        """Sorted layer numbers known to the accumulator (fixed set, or those updated so far)."""
        if self._fixed_layers is not None:
            return sorted(self._fixed_layers)
        return sorted(self._layer_sums)

    # -- accumulation -------------------------------------------------------------------------

    def begin_forward(self) -> None:
        """Close the current forward (if any) and open a new one for the next micro-batch."""
        self._close_forward()
        self._fwd_open = True

    def _close_forward(self) -> None:
        if self._fwd_agree_T is not None:
            assert self._token_sums is not None
            n_tokens = self._fwd_agree_T.numel()
            self._token_sums[0] += n_tokens
            self._token_sums[1] += self._fwd_agree_T.sum()
        self._fwd_agree_T = None
        self._fwd_layers = set()
        self._fwd_open = False

    def update(
        self,
        layer_number: int,
        replayed_TK: torch.Tensor,
        live_TK: torch.Tensor,
        plain_TK: torch.Tensor | None = None,
    ) -> None:
        """Add one MoE layer's routes for the tokens of the current forward.

        Args:
            layer_number: the layer's (global MoE) number; used as the key suffix ``layer_{n}``.
            replayed_TK: the route the forward dispatched to (replayed / predicted).
            live_TK: the live router's own top-k for the same tokens.
            plain_TK: optional plain-replay route (the live top-k at rollout) for the same tokens.

        Raises:
            ValueError: on shape / k / dtype mismatches, a layer outside the fixed set, a layer
                updated twice in one forward, or a token count that differs from the forward's
                earlier layers.

        """
        layer_number = self._check_layer_number(layer_number)
        if self._fixed_layers is not None and layer_number not in self._fixed_layers:
            raise ValueError(
                f"layer_number {layer_number} is not in the fixed layer set "
                f"{sorted(self._fixed_layers)}"
            )
        _check_route_pair(replayed_TK, live_TK)
        k = live_TK.shape[1]
        shared_T = _shared_count_T(replayed_TK, live_TK)  # one [T, K, K] compare for both
        agree_T = shared_T == k
        overlap_T = shared_T.to(torch.float64) / k
        plain_overlap_T = None
        if plain_TK is not None:
            if plain_TK.shape != live_TK.shape:
                raise ValueError(
                    f"plain_TK shape {tuple(plain_TK.shape)} != live_TK shape "
                    f"{tuple(live_TK.shape)} (layer {layer_number})"
                )
            plain_overlap_T = topk_overlap(plain_TK, live_TK)

        if not self._fwd_open:
            self.begin_forward()
        if layer_number in self._fwd_layers:
            raise ValueError(
                f"layer {layer_number} updated twice in one forward; call begin_forward() "
                "between micro-batches and do not update from activation recompute"
            )
        if self._fwd_agree_T is not None and self._fwd_agree_T.numel() != agree_T.numel():
            raise ValueError(
                f"layer {layer_number} has T={agree_T.numel()} tokens but earlier layers of this "
                f"forward had T={self._fwd_agree_T.numel()}"
            )

        if self._device is None:
            self._device = live_TK.device
            self._token_sums = self._zeros(len(_HEADER))
        sums = self._layer_sums.get(layer_number)
        if sums is None:
            sums = self._layer_sums[layer_number] = self._zeros(len(_LAYER_FIELDS))

        agree_T = agree_T.to(self._device)
        sums[_PAIRS] += agree_T.numel()
        sums[_OVL_REP] += overlap_T.to(self._device).sum()
        sums[_DISAGREE] += (~agree_T).sum()
        if plain_overlap_T is not None:
            sums[_PLAIN_PAIRS] += plain_overlap_T.numel()
            sums[_OVL_PLAIN] += plain_overlap_T.to(self._device, torch.float64).sum()

        self._fwd_layers.add(layer_number)
        self._fwd_agree_T = agree_T if self._fwd_agree_T is None else self._fwd_agree_T & agree_T

    def add_forward(
        self,
        routes: Mapping[str, torch.Tensor | None],
        layer_numbers: Sequence[int],
        rows: torch.Tensor | None = None,
    ) -> None:
        """Add one forward's ``[T, L, K]`` routes: begin a forward, update every layer.

        ``routes`` holds ``replayed``, ``live`` and optionally ``plain`` (None or missing: not
        given); column l is MoE layer ``layer_numbers[l]``. ``rows`` (int64 indices, or None for
        all rows) keeps only some token rows, e.g. the response tokens. The routes can be
        released afterwards: the accumulator keeps sums (and nothing of the forward once the
        next one begins).
        """
        picked = {
            name: None if routes.get(name) is None else _pick_rows(routes[name], rows)
            for name in ("replayed", "live", "plain")
        }
        self.begin_forward()
        plain = picked["plain"]
        for column, layer in enumerate(layer_numbers):
            self.update(
                layer,
                picked["replayed"][:, column],
                picked["live"][:, column],
                None if plain is None else plain[:, column],
            )

    # -- raw sums and reduction ---------------------------------------------------------------

    def as_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Raw sums as one flat float64 tensor (the open forward included, but not closed).

        Layout: ``[tokens, zero_deviation_tokens]`` followed, for each layer of
        :attr:`layer_numbers` in ascending order, by ``[pairs, overlap_replayed_sum,
        disagree_pairs, plain_pairs, overlap_plain_sum]``.  Length ``2 + 5 * L``.
        """
        if device is None:
            device = self._device if self._device is not None else torch.device("cpu")
        header = torch.zeros(len(_HEADER), dtype=torch.float64, device=device)
        if self._token_sums is not None:
            header += self._token_sums.to(device)
        if self._fwd_agree_T is not None:
            header[0] += self._fwd_agree_T.numel()
            header[1] += self._fwd_agree_T.sum().to(device)
        blocks = [header]
        for n in self.layer_numbers:
            sums = self._layer_sums.get(n)
            if sums is None:
                blocks.append(torch.zeros(len(_LAYER_FIELDS), dtype=torch.float64, device=device))
            else:
                blocks.append(sums.to(device))
        return torch.cat(blocks)

    @classmethod
    def from_tensor(cls, flat: torch.Tensor, layer_numbers: Iterable[int]) -> RoutingAgreement:
        """Rebuild an accumulator (no open forward) from :meth:`as_tensor` output.

        Raises:
            ValueError: if ``flat`` is not 1-D of length ``2 + 5 * len(layer_numbers)``.

        """
        agreement = cls(layer_numbers=layer_numbers)
        agreement._load_flat(flat)
        return agreement

    def _load_flat(self, flat: torch.Tensor) -> None:
        layers = self.layer_numbers
        expected = len(_HEADER) + len(_LAYER_FIELDS) * len(layers)
        if flat.dim() != 1 or flat.numel() != expected:
            raise ValueError(
                f"flat tensor of shape {tuple(flat.shape)} does not match {len(layers)} layers "
                f"(expected length {expected})"
            )
        flat = flat.to(torch.float64)
        self._device = flat.device
        self._fwd_agree_T = None
        self._fwd_layers = set()
        self._fwd_open = False
        self._token_sums = flat[: len(_HEADER)].clone()
        blocks = flat[len(_HEADER) :].view(len(layers), len(_LAYER_FIELDS))
        self._layer_sums = {n: blocks[i].clone() for i, n in enumerate(layers)}

    def reduce_(
        self,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        check_layers: bool = True,
    ) -> RoutingAgreement:
        """All-reduce (SUM) the sums over ``group`` in place; closes the open forward.

        Every rank must call it, and all ranks must share the same layer set (same layers of the
        same model stage, e.g. the data-parallel group); pass ``layer_numbers`` to the constructor
        when a rank may see no tokens.  Zero deviation is a per-token AND over the layers *one*
        rank saw, so reducing across pipeline stages would not make it model-wide.

        Args:
            group: process group (default: the world).
            device: where the flat tensor is reduced; default the accumulator's device, or the
                current CUDA device for NCCL, else CPU.
            check_layers: first verify (one extra small all-reduce) that all ranks hold the same
                layer set, raising ValueError on every rank otherwise.

        Returns:
            ``self``, now holding the global sums.

        """
        if device is None:
            if self._device is not None:
                device = self._device
            elif dist.get_backend(group) == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            else:
                device = torch.device("cpu")
        layers = self.layer_numbers
        if check_layers:
            # Fingerprint [L, Σn, Σn²]; MAX of (fp, -fp) gives max and -min in one collective.
            fp = torch.tensor(
                [len(layers), sum(layers), sum(n * n for n in layers)],
                dtype=torch.float64,
                device=device,
            )
            both = torch.cat([fp, -fp])
            dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
            if not torch.equal(both[:3], -both[3:]):
                raise ValueError(
                    f"ranks hold different MoE layer sets (this rank: {layers}); pass the same "
                    "layer_numbers to RoutingAgreement on every rank of the group"
                )
        self._close_forward()
        flat = self.as_tensor(device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        self._load_flat(flat)
        return self

    # -- readout ------------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        """Tokens counted so far (open forward included)."""
        return int(self.as_tensor("cpu")[0].item())

    def summary(self) -> dict[str, float]:
        """Metrics dict (see the class docstring for the keys); does not change the state."""
        values = self.as_tensor("cpu").tolist()  # one host sync
        tokens, zero_dev_tokens = values[0], values[1]
        layers = self.layer_numbers
        per_layer = {
            n: values[
                len(_HEADER) + i * len(_LAYER_FIELDS) : len(_HEADER) + (i + 1) * len(_LAYER_FIELDS)
            ]
            for i, n in enumerate(layers)
        }
        pairs = sum(s[_PAIRS] for s in per_layer.values())
        plain_pairs = sum(s[_PLAIN_PAIRS] for s in per_layer.values())

        out: dict[str, float] = {
            "topk_overlap/replayed": _ratio(sum(s[_OVL_REP] for s in per_layer.values()), pairs),
            "router_disagreement": _ratio(sum(s[_DISAGREE] for s in per_layer.values()), pairs),
            "zero_deviation_ratio": _ratio(zero_dev_tokens, tokens),
            "tokens_with_any_disagreement": _ratio(tokens - zero_dev_tokens, tokens),
        }
        if plain_pairs > 0:
            out["topk_overlap/plain"] = _ratio(
                sum(s[_OVL_PLAIN] for s in per_layer.values()), plain_pairs
            )
        for n, s in per_layer.items():
            out[f"topk_overlap/replayed/layer_{n}"] = _ratio(s[_OVL_REP], s[_PAIRS])
            out[f"router_disagreement/layer_{n}"] = _ratio(s[_DISAGREE], s[_PAIRS])
            if plain_pairs > 0:
                out[f"topk_overlap/plain/layer_{n}"] = _ratio(s[_OVL_PLAIN], s[_PLAIN_PAIRS])
        return out


def routing_agreement(
    forwards: Sequence[Mapping[str, torch.Tensor | None]],
    layer_numbers: Sequence[int],
    *,
    rows_per_forward: Sequence[torch.Tensor | None] | None = None,
    groups: Sequence[dist.ProcessGroup | None] = (),
) -> RoutingAgreement:
    """Routing agreement of one pass: the one place routes become agreement numbers.

    ``forwards[f]`` holds forward f's ``[T, L, K]`` routes: ``replayed`` (what was dispatched),
    ``live`` (the live router's own top-k) and optionally ``plain`` (the plain-replay route);
    column l is MoE layer ``layer_numbers[l]``. ``rows_per_forward[f]`` (int64 indices, or None
    for all rows) keeps only some token rows, e.g. the response tokens. The sums are all-reduced
    over each of ``groups`` in turn (data-parallel, then tensor-parallel under sequence
    parallelism); pass the same layer numbers on every rank of a group.
    """
    layer_numbers = list(layer_numbers)
    agreement = RoutingAgreement(layer_numbers)
    if rows_per_forward is not None and len(rows_per_forward) != len(forwards):
        raise ValueError(f"{len(rows_per_forward)} row selections for {len(forwards)} forwards")
    for index, routes in enumerate(forwards):
        rows = None if rows_per_forward is None else rows_per_forward[index]
        agreement.add_forward(routes, layer_numbers, rows)
    for group in groups:
        agreement.reduce_(group)
    return agreement


def _pick_rows(routes_TLK: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return routes_TLK if rows is None else routes_TLK[rows]
