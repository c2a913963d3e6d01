"""Sampling one token per sequence: temperature, nucleus top-p, and schedule-free noise.

Legend: B sequences of a micro-batch, V vocabulary, R rows asked for at once.

Sampling is the *exponential race*: with ``q_v ~ Exp(1)`` drawn independently, ``argmax_v
p_v / q_v`` is a sample of ``p``. That is exactly how ``torch.multinomial(p, 1)`` samples on the
CPU, from the same draws of the generator (one ``[B, V]`` ``exponential_`` per call, filled row
after row); ``tests/test_generation.py`` checks both facts for the installed torch, so the
samplers here draw the same tokens as ``torch.multinomial`` did before them.

Making the noise explicit is what lets the KV-cached sampler (:mod:`pr2_megatron.rl.generation`)
reproduce the full-forward sampler (:mod:`pr2_megatron.rl.rollout`): the latter samples the
k-th new token of every sequence in generation step k, the former samples it in whichever
forward reaches that sequence's position (right-padded prompts of different lengths reach it
at different forwards). :class:`StepNoise` hands row b the noise of row b of the k-th
``[B, V]`` draw whenever it asks, so both samplers use the same random numbers.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["SampleNoise", "StepNoise", "make_noise", "sample_tokens", "sample_with_noise"]


def _check_cpu_generator(generator: torch.Generator) -> None:
    if generator.device.type != "cpu":
        raise ValueError(
            f"the rollout sampling generator must be a CPU torch.Generator, got one on "
            f"{generator.device} (the noise is drawn on the CPU and moved to the logits' device)"
        )


def _noise(rows: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """``[rows, V]`` Exp(1) draws, the next ``rows · V`` of ``generator``'s stream."""
    return torch.empty(rows, vocab).exponential_(1.0, generator=generator)


def sample_with_noise(
    logits_RV: torch.Tensor, temperature: float, top_p: float, noise_RV: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from tempered, nucleus-truncated ``logits`` with given noise.

    Returns ``(tokens_R, logprobs_R)``; the log-prob is that of the tempered distribution
    (before nucleus truncation), the distribution training evaluates. ``noise_RV`` holds
    Exp(1) draws (:class:`StepNoise`). A row whose logits are not finite raises ValueError
    (``torch.multinomial`` refused those too).
    """
    logprobs_RV = torch.log_softmax(logits_RV.float() / temperature, dim=-1)
    probs_RV = logprobs_RV.exp()
    bad_R = ~torch.isfinite(probs_RV).all(dim=-1)
    if bool(bad_R.any()):
        row = int(torch.nonzero(bad_R)[0])
        raise ValueError(f"rollout logits of row {row} are not finite (inf or nan): cannot sample")
    if top_p < 1.0:
        sorted_probs, order = probs_RV.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs_RV = torch.zeros_like(probs_RV).scatter(-1, order, sorted_probs)
    tokens_R = (probs_RV / noise_RV.to(probs_RV.device)).argmax(dim=-1)
    return tokens_R, logprobs_RV.gather(-1, tokens_R.unsqueeze(-1)).squeeze(-1)


def sample_tokens(
    logits_BV: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row (temperature, nucleus ``top_p``); return ids and log-probs.

    Draws one ``[B, V]`` noise block from ``generator`` (a CPU generator), the draws
    ``torch.multinomial(probs, 1, generator=generator)`` makes, and returns its tokens.
    """
    _check_cpu_generator(generator)
    noise_BV = _noise(logits_BV.shape[0], logits_BV.shape[-1], generator)
    return sample_with_noise(logits_BV, temperature, top_p, noise_BV)


class StepNoise:
    """The sampling noise of ``steps`` generation steps of B sequences, asked for in any order.

    Step k's noise is the k-th ``[B, V]`` block of ``generator``'s stream (what
    :func:`sample_tokens` draws in step k). :meth:`take` returns row b's noise of step k when
    the sampler reaches that sequence's k-th token; blocks are drawn in step order as they are
    first needed. A row asked for later is held meanwhile: its ``V`` floats, or, when those are
    larger, the generator's state before it (5 KB, re-drawn from on :meth:`take`), so holding
    costs ``min(4·V, 5056)`` bytes per (row, step) between the shortest and the longest prompt.
    :meth:`finish` draws the steps never reached, so that the generator always advances by
    ``steps`` blocks: the samples of a later micro-batch do not depend on where this one
    stopped (nor, through that, on its numerics).
    """

    def __init__(self, generator: torch.Generator, batch: int, vocab: int, steps: int) -> None:
        _check_cpu_generator(generator)
        self.generator, self.batch, self.vocab, self.steps = generator, batch, vocab, steps
        self._drawn = 0  # steps whose block has been drawn
        self._held: dict[tuple[int, int], torch.Tensor] = {}  # (step, row) -> noise or state
        self._scratch: Optional[torch.Generator] = None
        self._state_bytes = generator.get_state().numel()

    def held_bytes(self) -> int:
        """Bytes held for rows that will ask later."""
        return sum(t.numel() * t.element_size() for t in self._held.values())

    def take(
        self, steps_R: torch.Tensor, rows_R: torch.Tensor, pending_B: torch.Tensor
    ) -> torch.Tensor:
        """``[R, V]`` noise: row ``rows_R[i]``'s of step ``steps_R[i]``.

        ``pending_B`` (bool) marks the rows that may still ask for steps not asked yet (those
        not finished); their rows of newly drawn blocks are held. Steps must be asked for in
        increasing order per row (as a sampler does).
        """
        steps, rows = steps_R.tolist(), rows_R.tolist()
        if any(not 0 <= k < self.steps for k in steps):
            raise ValueError(f"generation steps {steps} outside [0, {self.steps})")
        wanted = set(zip(steps, rows))
        fresh: dict[tuple[int, int], torch.Tensor] = {}
        pending = pending_B.tolist()
        while self._drawn <= max(steps, default=-1):
            step = self._drawn
            for row in range(self.batch):
                asked = (step, row) in wanted
                keep = asked or pending[row]
                if keep and not asked and 4 * self.vocab > self._state_bytes:
                    self._held[(step, row)] = self.generator.get_state()
                    _noise(1, self.vocab, self.generator)
                    continue
                noise_1V = _noise(1, self.vocab, self.generator)
                if asked:
                    fresh[(step, row)] = noise_1V[0]
                elif keep:
                    self._held[(step, row)] = noise_1V[0]
            self._drawn += 1
        out = []
        for key in zip(steps, rows):
            if key in fresh:
                out.append(fresh[key])
                continue
            if key not in self._held:
                raise ValueError(f"noise of step {key[0]}, row {key[1]} was not held")
            out.append(self._redraw(self._held.pop(key)))
        if not out:
            return torch.empty(0, self.vocab)
        return torch.stack(out)

    def drop_row(self, row: int) -> None:
        """Forget what is held for ``row`` (it finished: it will not ask again)."""
        for key in [k for k in self._held if k[1] == row]:
            del self._held[key]

    def finish(self) -> None:
        """Draw the steps not reached, so the generator advances by ``steps`` blocks."""
        self._held.clear()
        while self._drawn < self.steps:
            _noise(self.batch, self.vocab, self.generator)
            self._drawn += 1

    def _redraw(self, held: torch.Tensor) -> torch.Tensor:
        if held.dtype != torch.uint8:  # the noise itself
            return held
        if self._scratch is None:
            self._scratch = torch.Generator()
        self._scratch.set_state(held)
        return _noise(1, self.vocab, self._scratch)[0]


class SampleNoise:
    """The sampling noise of B sequences, one generator per sequence (layout-free sampling).

    Row b's k-th new token uses the k-th ``[V]`` draw of ``generators[b]``, whatever the other
    rows of its micro-batch, the micro-batch size, the data-parallel split or the sampler: the
    trainer seeds each sample's generator from (seed, step, global sample id), so a run in
    another layout samples the same tokens. Same interface as :class:`StepNoise`.
    """

    def __init__(self, generators, vocab: int, steps: int) -> None:
        for generator in generators:
            _check_cpu_generator(generator)
        self.generators, self.vocab, self.steps = list(generators), vocab, steps
        self._next = [0] * len(self.generators)  # per row: the step of its next draw

    def held_bytes(self) -> int:
        """Nothing is held: every row draws from its own stream when it asks."""
        return 0

    def take(
        self, steps_R: torch.Tensor, rows_R: torch.Tensor, pending_B: torch.Tensor
    ) -> torch.Tensor:
        """``[R, V]`` noise: row ``rows_R[i]``'s draw of step ``steps_R[i]`` (steps in order)."""
        out = []
        for step, row in zip(steps_R.tolist(), rows_R.tolist()):
            if not 0 <= step < self.steps:
                raise ValueError(f"generation step {step} outside [0, {self.steps})")
            if step != self._next[row]:
                raise ValueError(
                    f"row {row} asks for step {step}, its next draw is step {self._next[row]}"
                )
            out.append(_noise(1, self.vocab, self.generators[row])[0])
            self._next[row] += 1
        if not out:
            return torch.empty(0, self.vocab)
        return torch.stack(out)

    def drop_row(self, row: int) -> None:
        """Nothing to forget (a finished row never asks again)."""

    def finish(self) -> None:
        """Nothing to draw: the generators are the rows' own."""


def make_noise(generator, batch: int, vocab: int, steps: int):
    """:class:`StepNoise` for one generator, :class:`SampleNoise` for one per sequence."""
    if isinstance(generator, torch.Generator):
        return StepNoise(generator, batch, vocab, steps)
    generators = list(generator)
    if len(generators) != batch:
        raise ValueError(f"{len(generators)} sampling generators for {batch} sequences")
    return SampleNoise(generators, vocab, steps)
