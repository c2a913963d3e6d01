"""Typed batches of the RL step: the rank's rollout samples and the forwards made of them.

Legend: N samples of this rank's rollout batch, B samples of one forward, S positions (the
training input of a sample is ``tokens[:S]``, its labels ``tokens[1:S + 1]``).

* :class:`RolloutBatch`: what the rollout produced on this rank, on the rank's device.
* :class:`PolicyMicroBatch`: one training or old-log-prob forward (rows of the rollout batch,
  with the route path's :class:`~pr2_megatron.routes.MicroBatch` naming them).
* :class:`SupervisedMicroBatch`: one warm-start forward.
* :func:`mini_batch_rows`: the rows of each off-N mini-batch, the same global samples in any
  data-parallel layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from pr2_megatron.routes.path import MicroBatch

__all__ = [
    "PolicyMicroBatch",
    "RolloutBatch",
    "SupervisedMicroBatch",
    "mini_batch_rows",
    "split_rows",
]


@dataclass
class RolloutBatch:
    """The rank's rollout samples (every tensor on the rank's device)."""

    #: Global sample ids of the N rows (names in route tables and the feature cache).
    sample_ids: list[int]
    #: Training forward length S.
    seq_len: int
    #: ``[N, S]`` training input and labels (right-padded).
    ids_NS: torch.Tensor
    labels_NS: torch.Tensor
    #: ``[N, S]`` 1.0 where the label is a response token (the loss and metric positions).
    mask_NS: torch.Tensor
    #: ``[N, S]`` log π_rollout of each label (0 outside responses).
    rollout_logp_NS: torch.Tensor
    #: Real input tokens of each row (prompt + response - 1): its rows in a route table.
    input_lens: list[int]
    #: ``[N]`` response lengths.
    response_lens_N: torch.Tensor
    #: Response token ids of each row (for the reward).
    responses: list[list[int]] = field(default_factory=list)

    @classmethod
    def from_rollout(cls, micro: Sequence, seq_len: int, device: torch.device) -> RolloutBatch:
        """Concatenate rollout micro-batches (``RolloutMicroBatch``), move them to ``device``."""
        tokens = torch.cat([m.tokens for m in micro])
        prompt_lens = torch.cat([m.prompt_lens for m in micro])
        total_lens = torch.cat([m.total_lens for m in micro])
        return cls(
            sample_ids=[i for m in micro for i in m.sample_ids],
            seq_len=seq_len,
            ids_NS=tokens[:, :seq_len].to(device),
            labels_NS=tokens[:, 1 : seq_len + 1].to(device),
            mask_NS=torch.cat([m.loss_mask() for m in micro]).to(device),
            rollout_logp_NS=torch.cat([m.logprobs for m in micro]).to(device),
            input_lens=(total_lens - 1).tolist(),
            response_lens_N=(total_lens - prompt_lens).to(device),
            responses=[r for m in micro for r in m.responses()],
        )

    def __len__(self) -> int:
        return len(self.sample_ids)

    def route_batch(self, rows: Sequence[int]) -> MicroBatch:
        """The route path's :class:`MicroBatch` of these rows (right-padded, real lengths)."""
        return MicroBatch(
            [self.sample_ids[r] for r in rows], self.seq_len, [self.input_lens[r] for r in rows]
        )

    def micro_batches(
        self,
        rows: Sequence[int],
        size: int,
        *,
        old_logp_NS: Optional[torch.Tensor] = None,
        advantages_N: Optional[torch.Tensor] = None,
    ) -> list[PolicyMicroBatch]:
        """``rows`` cut into forwards of at most ``size`` samples, in order."""
        out = []
        for part in split_rows(rows, size):
            index = torch.tensor(part, device=self.ids_NS.device)
            out.append(
                PolicyMicroBatch(
                    rows=list(part),
                    route_batch=self.route_batch(part),
                    ids_BS=self.ids_NS[index],
                    labels_BS=self.labels_NS[index],
                    mask_BS=self.mask_NS[index],
                    old_logp_BS=None if old_logp_NS is None else old_logp_NS[index],
                    advantages_B=None if advantages_N is None else advantages_N[index],
                )
            )
        return out


@dataclass
class PolicyMicroBatch:
    """One forward of policy samples (old-log-prob pass or a mini-step), full ``[B, S]`` rows.

    Under context parallelism the forward step slices every ``[B, S]`` tensor to the rank's
    part (:class:`pr2_megatron.rl.schedule.SequenceSlicer`); the full rows stay here.
    """

    #: Rows of the :class:`RolloutBatch` in this forward.
    rows: list[int]
    #: The route path's names of the forward's samples (targets, token names, tables).
    route_batch: MicroBatch
    ids_BS: torch.Tensor
    labels_BS: torch.Tensor
    mask_BS: torch.Tensor
    #: ``[B, S]`` log π_old (mini-steps) and ``[B]`` GRPO advantages (mini-steps).
    old_logp_BS: Optional[torch.Tensor] = None
    advantages_B: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class SupervisedMicroBatch:
    """One warm-start forward: inputs, labels and the answer-token mask, ``[B, S]``."""

    ids_BS: torch.Tensor
    labels_BS: torch.Tensor
    mask_BS: torch.Tensor

    def __len__(self) -> int:
        return self.ids_BS.shape[0]


def split_rows(rows: Sequence[int], size: int) -> list[list[int]]:
    """``rows`` in consecutive pieces of ``size`` (the last may be shorter)."""
    rows = list(rows)
    if size < 1:
        raise ValueError(f"micro-batch size must be >= 1, got {size}")
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def mini_batch_rows(num_rows: int, off_n: int, mini_step: int) -> list[int]:
    """Rows of mini-batch ``mini_step`` (1-based) of ``num_rows``: every ``off_n``-th row.

    Strided, so that mini-batch j holds the global samples ``g ≡ j - 1 (mod off_n)`` whatever
    the data-parallel split (each rank holds a contiguous range of a multiple of ``off_n``
    samples): a run resumed in another layout trains on the same mini-batches.
    """
    if num_rows % off_n:
        raise ValueError(f"{num_rows} rows do not split into replay.off_n={off_n} mini-batches")
    if not 1 <= mini_step <= off_n:
        raise ValueError(f"mini-step {mini_step} outside [1, {off_n}]")
    return list(range(mini_step - 1, num_rows, off_n))
