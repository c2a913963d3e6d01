"""The ProbMoE subset DP in linear space, one tensor step per subset size (not per expert).

:mod:`pr2_megatron.routing.probmoe.subsets` builds on this module; it is not a public API.

With ``x_q = exp(θ_q − c)`` the elementary symmetric polynomials of every prefix of a token's
experts obey ``e_j[p] = Σ_{q<p} x_q · e_{j-1}[q]`` (``e_j[p]``: mass of the size-``j`` subsets of
positions ``0..p-1``; the last member is ``q``). So the table of size ``j`` is one cumulative sum
over experts of the table of size ``j − 1``: ``k_max`` steps of ``[T, E]`` tensor ops, where the
previous implementation (:mod:`._reference`) took ``E`` steps of ``[T, k_max]`` ``logaddexp``.

Linear space is exact but has a finite range; the tables are float64 (whatever the logits'
dtype) and every path keeps their values inside ``exp(±600)``:

* **unsorted** (the usual path): ``c`` = the row maximum, one ``x`` for all sizes, positions =
  experts. Safe while ``k_max · (max θ − min θ)`` and ``log C(E, k_max)`` are at most 600: a
  spread of 75 between a row's logits at k_max = 8, beyond any router's.
* **ordered** (logits spread further, e.g. ±50 with k_max = 8): positions are the ``k_max``
  largest logits in descending order, then all ``E`` experts with those masked out
  (``N = k_max + E``). Size ``j`` is scaled by the ``j``-th largest logit, so the first nonzero
  cell of every table is exactly 1, every rate ``x_q / x_ref`` is at most 1 and every table and
  adjoint value is bounded by a binomial coefficient: no range limit.

On both paths the tables are sums of non-negative terms (no cancellation); each size ``j``
keeps only its band ``p >= j`` (the cells below are structurally zero). ``-inf`` logits give
``x = 0``: the expert is excluded.

Marginals ``μ = ∂ log Z / ∂θ`` come from the adjoint (the backward half of a forward-backward
pass): ``k_max`` more steps. Their derivative, the Hessian-vector product
``(∂μ/∂θ)ᵀ g = Cov(1[·∈S], Σ_e g_e 1[e∈S])`` that the router's backward needs, is the
forward-mode derivative of both passes along ``g``, written out (no autograd graph). Sampling
walks the table back from the last position: with ``r`` experts still to pick below position
``p``, the last of them is ``q`` with probability ``x_q e_{r-1}[q] / e_r[p]``, an inverse-CDF
look-up (``searchsorted``) in the row ``e_r``: ``k_max`` look-ups per token instead of ``E``
steps.

On the CPU the block drivers below hand exact-k calls on the unsorted path to a fused kernel
(:mod:`~pr2_megatron.routing.probmoe.cpu_kernel`: the same math, equal within 1e-12, the same
draws) when it is available; the tensor ops here run everything else. Tokens are processed in
blocks of rows on CPU (:func:`row_blocks`): a block's tables stay in cache through all
``k_max`` steps. Nothing is kept between a forward and its backward but the
logits: the backward rebuilds the block's tables (two ops per size) instead of reading them back
from memory.

Shape-suffix legend:
    T  tokens (rows of the logits)
    E  experts
    N  DP positions: E (unsorted path) or k_max + E (ordered path)
    L  positions of one size's band: N − j + 1 for size j (positions j − 1 .. N − 1)
    K  subset sizes 0..k_max (k_max + 1 entries), or 1..k_max (one draw per size)
"""

from __future__ import annotations

import math

import torch

from pr2_megatron.routing.probmoe import cpu_kernel

__all__ = ["SubsetDP", "hvp", "marginals", "needs_ordered_path", "row_blocks", "sample"]

#: Largest |log| of a table value that float64 holds with full precision and margin to spare.
_LOG_RANGE = 600.0
#: Rows per block on CPU: ``_BLOCK_CELLS`` DP positions' worth of rows, at least ``_BLOCK_ROWS``.
#: Small enough that a block's tables (k_max + 1 of them, float64) and temporaries stay in the
#: caches, large enough that the per-op overhead stays small (measured on the router's forward
#: and backward: 512 rows best at E = 64, 256 at E = 256).
_BLOCK_ROWS = 256
_BLOCK_CELLS = 1 << 15


def _log_binomial(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _finite_spread_T(theta_TE: torch.Tensor) -> torch.Tensor:
    """Max − min of the finite logits of each row (``-inf`` logits are experts excluded)."""
    high_T = theta_TE.amax(dim=-1)
    low_T = theta_TE.amin(dim=-1)
    if bool(torch.isneginf(low_T).any()):
        low_T = torch.where(torch.isneginf(theta_TE), high_T.unsqueeze(1), theta_TE).amin(dim=-1)
    return high_T - low_T


def needs_ordered_path(theta_TE: torch.Tensor, k_max: int) -> bool:
    """Whether these logits spread too far for the unsorted path's float64 table.

    The unsorted table holds values between ``exp(−k_max · spread)`` and ``C(E, k_max)``; both
    must stay within ``exp(±600)``. One host synchronisation (a max over rows).
    """
    num_tokens, num_experts = theta_TE.shape
    spread = float(_finite_spread_T(theta_TE).max()) if num_tokens else 0.0
    in_range = k_max * spread <= _LOG_RANGE and _log_binomial(num_experts, k_max) <= _LOG_RANGE
    return not in_range


def row_blocks(num_tokens: int, positions: int, device: torch.device) -> list[slice]:
    """Row ranges processed together: all rows on an accelerator, cache-sized blocks on CPU."""
    if device.type != "cpu" or num_tokens == 0:
        return [slice(0, num_tokens)]
    rows = max(_BLOCK_ROWS, _BLOCK_CELLS // max(positions, 1))
    return [slice(start, min(start + rows, num_tokens)) for start in range(0, num_tokens, rows)]


def _safe_log(value: torch.Tensor) -> torch.Tensor:
    """``log`` with ``log 0 = -inf`` and a finite gradient (no 0/0 in the backward)."""
    positive = value > 0
    return torch.where(positive, torch.where(positive, value, 1.0).log(), float("-inf"))


class SubsetDP:
    """The subset DP of one block of rows, sizes 0..k_max.

    Builds the forward table and ``log e_j`` for every size (:attr:`log_esp_TK`);
    :meth:`marginals`, :meth:`hvp` and :meth:`sample` read it. The table is built with
    differentiable tensor ops, so :attr:`log_esp_TK` carries autograd (twice differentiable)
    when the logits require grad; the other methods run without autograd.

    Args:
        theta_TE: Bernoulli logits θ [T, E] (float32 or float64).
        k_min: smallest allowed subset size (for :attr:`log_z_T`, the marginals and sampling).
        k_max: largest size, ``0 <= k_max <= E``.
        ordered: the path (:func:`needs_ordered_path`); None decides from these logits.

    """

    def __init__(
        self, theta_TE: torch.Tensor, k_min: int, k_max: int, ordered: bool | None = None
    ) -> None:
        self.k_min, self.k_max = k_min, k_max
        self.num_tokens, self.num_experts = theta_TE.shape
        self.input_dtype = theta_TE.dtype
        self.dtype = torch.float64
        if ordered is None:
            ordered = needs_ordered_path(theta_TE.detach(), max(k_max, 1))
        self.ordered = ordered
        if ordered:
            self._prepare_ordered(theta_TE)
        else:
            self._prepare_unsorted(theta_TE)
        self.table = self._forward_table()
        self.log_esp_TK = self._log_esp()

    # ------------------------------------------------------------------ positions and rates
    def _prepare_unsorted(self, theta_TE: torch.Tensor) -> None:
        theta_TE = theta_TE.to(self.dtype)
        ref_T1 = theta_TE.detach().amax(dim=-1, keepdim=True)
        ref_T1 = torch.where(torch.isfinite(ref_T1), ref_T1, 0.0)
        self.positions = self.num_experts
        self._x_TN = torch.exp(theta_TE - ref_T1)  # in [0, 1]
        self._x_flipped_TN: torch.Tensor | None = None
        sizes_K = torch.arange(self.k_max + 1, dtype=self.dtype, device=theta_TE.device)
        self.log_scale_TK = ref_T1 * sizes_K  # log of the scale of size j: j · c

    def _prepare_ordered(self, theta_TE: torch.Tensor) -> None:
        theta_TE = theta_TE.to(self.dtype)
        top_TK, top_index_TK = torch.topk(theta_TE, self.k_max, dim=-1)
        self.top_index_TK = top_index_TK
        top_mask_TE = torch.zeros_like(theta_TE, dtype=torch.bool).scatter_(1, top_index_TK, True)
        rest_TE = theta_TE.masked_fill(top_mask_TE, float("-inf"))
        self._sequence_TN = torch.cat([top_TK, rest_TE], dim=1)
        self.positions = self.k_max + self.num_experts
        ref_TK = top_TK.detach()
        self._ref_TK = torch.where(torch.isfinite(ref_TK), ref_TK, 0.0)
        self._band_cache: dict[tuple[int, bool], torch.Tensor] = {}
        zeros_T1 = ref_TK.new_zeros((self.num_tokens, 1))
        self.log_scale_TK = torch.cat([zeros_T1, self._ref_TK.cumsum(dim=-1)], dim=1)

    def rate_band(self, size: int) -> torch.Tensor:
        """``x_q / x_ref(size)`` at positions ``size − 1 .. N − 1``: [T, L] (all <= 1)."""
        if not self.ordered:
            return self._x_TN[:, size - 1 :]
        key = (size, False)
        if key not in self._band_cache:
            ref_T1 = self._ref_TK[:, size - 1 : size]
            self._band_cache[key] = torch.exp(self._sequence_TN[:, size - 1 :] - ref_T1)
        return self._band_cache[key]

    def rate_band_flipped(self, size: int) -> torch.Tensor:
        """:meth:`rate_band` reversed (position ``N − 1 − i`` at index ``i``): [T, L]."""
        if not self.ordered:
            if self._x_flipped_TN is None:
                self._x_flipped_TN = self._x_TN.flip(-1)
            return self._x_flipped_TN[:, : self.positions - size + 1]
        key = (size, True)
        if key not in self._band_cache:
            self._band_cache[key] = self.rate_band(size).flip(-1)
        return self._band_cache[key]

    def to_positions(self, values_TE: torch.Tensor) -> torch.Tensor:
        """Per-expert values [T, E] laid out on the DP positions [T, N] (float64)."""
        values_TE = values_TE.to(self.dtype)
        if not self.ordered:
            return values_TE
        return torch.cat([values_TE.gather(1, self.top_index_TK), values_TE], dim=1)

    def to_experts(self, values_TN: torch.Tensor) -> torch.Tensor:
        """Values on the DP positions [T, N] summed back onto the experts [T, E]."""
        if not self.ordered:
            return values_TN
        top_TK = values_TN[:, : self.k_max]
        return values_TN[:, self.k_max :].scatter_add(1, self.top_index_TK, top_TK)

    def position_experts(self, positions_TK: torch.Tensor) -> torch.Tensor:
        """Expert id of each DP position index (int64, same shape)."""
        if not self.ordered:
            return positions_TK
        top_TK = self.top_index_TK.gather(1, positions_TK.clamp(max=self.k_max - 1))
        return torch.where(positions_TK < self.k_max, top_TK, positions_TK - self.k_max)

    # ------------------------------------------------------------------------ forward table
    def _forward_table(self) -> list[torch.Tensor]:
        """``table[j][:, i] = e_j[j + i] / scale_j``, ``i`` in ``0..N−j`` (``table[0]``: None).

        ``table[j]`` ends with the whole row's ``e_j``; it is a non-decreasing cumulative sum,
        its first cell the product of the first ``j`` rates (exactly 1 on the ordered path).
        """
        table: list[torch.Tensor] = [None]  # size 0: all ones, never stored
        if self.k_max >= 1:
            table.append(torch.cumsum(self.rate_band(1), dim=-1))
        for size in range(2, self.k_max + 1):
            width = self.positions - size + 1
            table.append(torch.cumsum(self.rate_band(size) * table[-1][:, :width], dim=-1))
        return table

    def _tangent_table(self, grad_TN: torch.Tensor) -> list[torch.Tensor]:
        """Derivative of :attr:`table` along ``g`` for sizes 1..k_max − 1 (``[0]``: None).

        The rates' tangent is ``rate · g`` (the scales are constants).
        """
        tangent: list[torch.Tensor] = [None]
        if self.k_max >= 2:
            tangent.append(torch.cumsum(self.rate_band(1) * grad_TN, dim=-1))
        for size in range(2, self.k_max):
            width = self.positions - size + 1
            mixed_TL = torch.addcmul(
                tangent[-1][:, :width], grad_TN[:, size - 1 :], self.table[size - 1][:, :width]
            )
            tangent.append(torch.cumsum(self.rate_band(size) * mixed_TL, dim=-1))
        return tangent

    def _log_esp(self) -> torch.Tensor:
        ones_T = self.log_scale_TK.new_ones(self.num_tokens)
        last_TK = torch.stack([ones_T] + [band[:, -1] for band in self.table[1:]], dim=1)
        return self.log_scale_TK + _safe_log(last_TK)

    @property
    def log_z_T(self) -> torch.Tensor:
        """``log Σ_{j=k_min..k_max} e_j(exp θ)`` [T] (differentiable like :attr:`log_esp_TK`)."""
        return torch.logsumexp(self.log_esp_TK[:, self.k_min :], dim=-1)

    # ----------------------------------------------------------- adjoint: marginals and HVP
    def _seeds_TK(self) -> torch.Tensor:
        """``s_j = scale_j / Z`` for the allowed sizes, 0 below ``k_min``: [T, K]."""
        log_z_T1 = self.log_z_T.detach().unsqueeze(1)
        seeds_TK = torch.exp(self.log_scale_TK.detach() - log_z_T1)
        seeds_TK[:, : self.k_min] = 0.0
        return seeds_TK

    def _next_adjoint(
        self, size: int, suffix_sums_TL: torch.Tensor, seed_T1: torch.Tensor | None
    ) -> torch.Tensor:
        """``rate_size · (seed + [0, suffix sums])`` in reversed positions: [T, L + 1]."""
        rates_TL = self.rate_band_flipped(size)
        if seed_T1 is None:
            adjoint_TL = torch.empty_like(rates_TL)
            adjoint_TL[:, 0] = 0.0
            torch.mul(rates_TL[:, 1:], suffix_sums_TL, out=adjoint_TL[:, 1:])
            return adjoint_TL
        adjoint_TL = rates_TL * seed_T1
        adjoint_TL[:, 1:].addcmul_(rates_TL[:, 1:], suffix_sums_TL)
        return adjoint_TL

    @torch.no_grad()
    def marginals(self) -> torch.Tensor:
        """Inclusion marginals ``μ_e = P(e ∈ S)`` [T, E] in the logits' dtype (no autograd).

        Adjoint pass, in reversed positions so that every suffix sum is a forward cumsum:
        ``G_j[q] = s_j + Σ_{p>q} U_{j+1}[p]``, ``U_j = rate_j · G_j``,
        ``μ_q = Σ_j e_{j-1}[q] · U_j[q]``.
        """
        mu_flipped_TN, _ = self._adjoint_pass(None)
        return self.to_experts(mu_flipped_TN.flip(-1)).to(self.input_dtype)

    @torch.no_grad()
    def hvp(self, grad_TE: torch.Tensor) -> torch.Tensor:
        """``(∂μ/∂θ)ᵀ g`` [T, E] for an upstream gradient ``g`` of the marginals.

        The adjoint pass and its derivative along ``g`` together (the seeds' derivative
        ``−s · Σ g μ`` contributes ``−(Σ g μ) μ``, added at the end).
        """
        grad_TN = self.to_positions(grad_TE)
        mu_flipped_TN, out_flipped_TN = self._adjoint_pass(grad_TN)
        grad_flipped_TN = grad_TN.flip(-1)
        mean_T1 = (grad_flipped_TN * mu_flipped_TN).sum(dim=-1, keepdim=True)
        out_flipped_TN.sub_(mean_T1 * mu_flipped_TN)
        return self.to_experts(out_flipped_TN.flip(-1)).to(self.input_dtype)

    def _adjoint_pass(
        self, grad_TN: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(μ, μ' + (Σ g μ) μ)`` in reversed positions; the second only with ``g``."""
        seeds_TK = self._seeds_TK()
        dynamic = self.k_min < self.k_max
        mu_TN = seeds_TK.new_zeros((self.num_tokens, self.positions))
        adjoint_TL = self.rate_band_flipped(self.k_max) * seeds_TK[:, self.k_max :]
        if grad_TN is not None:
            tangent_table = self._tangent_table(grad_TN)
            grad_flipped_TN = grad_TN.flip(-1)
            out_TN = torch.zeros_like(mu_TN)
            adjoint_tangent_TL = grad_flipped_TN[:, : adjoint_TL.shape[1]] * adjoint_TL
        for size in range(self.k_max, 0, -1):
            width = adjoint_TL.shape[1]
            if size == 1:  # e_0 = 1, its tangent 0
                mu_TN.add_(adjoint_TL)
                if grad_TN is not None:
                    out_TN.add_(adjoint_tangent_TL)
                break
            prefix_TL = self.table[size - 1][:, :width].flip(-1)
            mu_TN[:, :width].addcmul_(prefix_TL, adjoint_TL)
            seed_T1 = seeds_TK[:, size - 1 : size] if dynamic and size - 1 >= self.k_min else None
            next_adjoint_TL = self._next_adjoint(size - 1, adjoint_TL.cumsum(dim=-1), seed_T1)
            if grad_TN is not None:
                prefix_tangent_TL = tangent_table[size - 1][:, :width].flip(-1)
                out_TN[:, :width].addcmul_(prefix_tangent_TL, adjoint_TL)
                out_TN[:, :width].addcmul_(prefix_TL, adjoint_tangent_TL)
                suffix_sums_TL = adjoint_tangent_TL.cumsum(dim=-1)
                adjoint_tangent_TL = grad_flipped_TN[:, : width + 1] * next_adjoint_TL
                adjoint_tangent_TL[:, 1:].addcmul_(
                    self.rate_band_flipped(size - 1)[:, 1:], suffix_sums_TL
                )
            adjoint_TL = next_adjoint_TL
        return mu_TN, (out_TN if grad_TN is not None else None)

    # ---------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(
        self, sizes_T: torch.Tensor, uniform_TK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Subsets of the given sizes, exactly: ``(mask_TE, ids_TK)``.

        Walks the table back from the last position, one size per step (``r = k_max..1``;
        rows with fewer experts start lower). With ``r`` experts left below position ``p``,
        the last of them is the first ``q`` whose cumulative mass ``e_r[q + 1]`` reaches
        ``(1 − u_r) · e_r[p]``.

        Args:
            sizes_T: subset size of each row, in ``[k_min, k_max]`` (int64).
            uniform_TK: one uniform in ``[0, 1)`` per row and size (column ``r − 1``).

        Returns:
            The subsets as a bool mask [T, E], and as expert ids [T, k_max], ascending,
            right-padded with -1 (as :func:`~pr2_megatron.routing.probmoe.subsets.mask_to_indices`).

        """
        device = sizes_T.device
        end_T = torch.full((self.num_tokens,), self.positions, dtype=torch.long, device=device)
        # chosen_TK[:, r - 1]: the position picked with r members left (ascending in r), or N
        # for the unused draws of a smaller subset (its last columns).
        chosen_TK = torch.empty((self.num_tokens, self.k_max), dtype=torch.long, device=device)
        exact = self.k_min == self.k_max
        fraction_TK = 1.0 - uniform_TK.to(self.dtype)  # in (0, 1]: the target never passes e_r[p]
        for size in range(self.k_max, 0, -1):
            cumulative_TL = self.table[size]
            total_T1 = cumulative_TL.gather(1, (end_T - size).unsqueeze(1))
            target_T1 = fraction_TK[:, size - 1 : size] * total_T1
            # The first cell >= target lies at or before end - size: position <= end - 1.
            index_T = torch.searchsorted(cumulative_TL, target_T1, side="left").squeeze(1)
            position_T = index_T + (size - 1)
            if not exact:
                position_T = torch.where(sizes_T >= size, position_T, end_T)
            chosen_TK[:, size - 1] = position_T
            end_T = position_T
        valid_TK = chosen_TK < self.positions
        experts_TK = self.position_experts(chosen_TK.clamp(max=self.positions - 1))
        experts_TK = torch.where(valid_TK, experts_TK, self.num_experts)
        if self.ordered:  # the largest logits' positions come first: put the ids in order
            experts_TK = experts_TK.sort(dim=-1).values
        mask_TE = torch.zeros(
            (self.num_tokens, self.num_experts + 1), dtype=torch.bool, device=device
        )
        mask_TE.scatter_(1, experts_TK, True)
        ids_TK = torch.where(experts_TK < self.num_experts, experts_TK, -1)
        return mask_TE[:, : self.num_experts], ids_TK


# ------------------------------------------------------------------------------------------
# Block drivers: the same operations over all rows, block by block (no autograd)
# ------------------------------------------------------------------------------------------


def _positions(num_experts: int, k_max: int, ordered: bool) -> int:
    return num_experts + k_max if ordered else num_experts


def _on_cpu_kernel(theta_TE: torch.Tensor, k_min: int, k_max: int, ordered: bool) -> bool:
    """Whether the fused CPU kernel takes this call: CPU, unsorted path, exact-k."""
    if theta_TE.device.type != "cpu" or ordered or k_min != k_max or theta_TE.shape[0] == 0:
        return False
    return cpu_kernel.available()


@torch.no_grad()
def marginals(theta_TE: torch.Tensor, k_min: int, k_max: int, ordered: bool) -> torch.Tensor:
    """Exact marginals [T, E] of every row (see :meth:`SubsetDP.marginals`)."""
    if _on_cpu_kernel(theta_TE, k_min, k_max, ordered):
        return cpu_kernel.marginals(theta_TE, k_max)
    num_tokens, num_experts = theta_TE.shape
    blocks = row_blocks(num_tokens, _positions(num_experts, k_max, ordered), theta_TE.device)
    if len(blocks) == 1:
        return SubsetDP(theta_TE, k_min, k_max, ordered).marginals()
    out_TE = torch.empty_like(theta_TE)
    for rows in blocks:
        out_TE[rows] = SubsetDP(theta_TE[rows], k_min, k_max, ordered).marginals()
    return out_TE


@torch.no_grad()
def hvp(
    theta_TE: torch.Tensor, grad_TE: torch.Tensor, k_min: int, k_max: int, ordered: bool
) -> torch.Tensor:
    """``(∂μ/∂θ)ᵀ g`` [T, E] of every row, rebuilding each block's tables."""
    if _on_cpu_kernel(theta_TE, k_min, k_max, ordered):
        return cpu_kernel.hvp(theta_TE, grad_TE, k_max)
    num_tokens, num_experts = theta_TE.shape
    blocks = row_blocks(num_tokens, _positions(num_experts, k_max, ordered), theta_TE.device)
    if len(blocks) == 1:
        return SubsetDP(theta_TE, k_min, k_max, ordered).hvp(grad_TE)
    out_TE = torch.empty_like(theta_TE)
    for rows in blocks:
        out_TE[rows] = SubsetDP(theta_TE[rows], k_min, k_max, ordered).hvp(grad_TE[rows])
    return out_TE


@torch.no_grad()
def sample(
    theta_TE: torch.Tensor,
    k_min: int,
    k_max: int,
    ordered: bool,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact draws ``(mask_TE, sizes_T, ids_TK)`` of every row (see :meth:`SubsetDP.sample`).

    The random numbers are drawn for all rows at once (dynamic-k: the sizes by one
    ``multinomial`` over every row's ``e_j``, a first pass over the blocks; then ``k_max``
    uniforms per row), so the draws do not depend on the blocks.
    """
    num_tokens, num_experts = theta_TE.shape
    device = theta_TE.device
    blocks = row_blocks(num_tokens, _positions(num_experts, k_max, ordered), device)
    if k_min == k_max or num_tokens == 0:
        sizes_T = torch.full((num_tokens,), k_max, dtype=torch.long, device=device)
    else:
        log_esp_TK = torch.cat(
            [SubsetDP(theta_TE[rows], k_min, k_max, ordered).log_esp_TK for rows in blocks]
        )
        size_probs_TK = torch.softmax(log_esp_TK[:, k_min:], dim=-1)
        sizes_T = torch.multinomial(size_probs_TK, 1, generator=generator).squeeze(1) + k_min
    uniform_TK = torch.rand(
        (num_tokens, k_max), generator=generator, dtype=theta_TE.dtype, device=device
    )
    if _on_cpu_kernel(theta_TE, k_min, k_max, ordered):
        mask_TE, ids_TK = cpu_kernel.sample(theta_TE, k_max, uniform_TK)
        return mask_TE, sizes_T, ids_TK
    if len(blocks) == 1:
        mask_TE, ids_TK = SubsetDP(theta_TE, k_min, k_max, ordered).sample(sizes_T, uniform_TK)
        return mask_TE, sizes_T, ids_TK
    mask_TE = torch.empty((num_tokens, num_experts), dtype=torch.bool, device=device)
    ids_TK = torch.empty((num_tokens, k_max), dtype=torch.long, device=device)
    for rows in blocks:
        dp = SubsetDP(theta_TE[rows], k_min, k_max, ordered)
        mask_TE[rows], ids_TK[rows] = dp.sample(sizes_T[rows], uniform_TK[rows])
    return mask_TE, sizes_T, ids_TK
