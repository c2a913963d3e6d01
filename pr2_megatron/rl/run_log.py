"""Metrics out of a run: JSON lines, TensorBoard events, a progress line per step (rank 0)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional


class RunLog:
    """Writes ``metrics.jsonl`` (one object per record) and TensorBoard scalars.

    Records carry an ``event`` (``rollout``, ``mini_step``, ``warm_start``) and the RL ``step``.
    On resume, :meth:`truncate_after` drops records of steps after the checkpoint, so the file
    reads as one uninterrupted run.
    """

    def __init__(self, directory, *, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.directory = Path(directory)
        self.path = self.directory / "metrics.jsonl"
        self._writer = None
        if not enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("pr2-train: tensorboard is not installed; writing metrics.jsonl only")
            else:
                self._writer = SummaryWriter(str(self.directory / "tensorboard"))

    def start_fresh(self) -> None:
        """Empty ``metrics.jsonl`` (a run that does not resume starts a new file)."""
        if self.enabled:
            self.path.write_text("")

    def truncate_after(self, step: int) -> None:
        """Keep only records of steps ``<= step`` (resuming after ``step``)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", -1) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict, tb_step: Optional[int] = None) -> None:
        """Append ``record``; numbers also go to TensorBoard under ``<event>/<key>``."""
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, allow_nan=True) + "\n")
        if self._writer is not None and tb_step is not None:
            event = record.get("event", "metrics")
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    if math.isfinite(value):
                        self._writer.add_scalar(f"{event}/{key}", value, tb_step)

    def close(self) -> None:
        """Flush TensorBoard."""
        if self._writer is not None:
            self._writer.close()


def progress_line(step: int, steps: int, rollout: dict, last: dict, seconds: float) -> str:
    """One readable line per RL step."""
    parts = [
        f"step {step:>4d}/{steps}",
        f"reward {rollout['reward/mean']:.3f}",
        f"len {rollout['response/length']:.1f}",
        f"overlap {last.get('routing/topk_overlap/replayed', float('nan')):.3f}",
        f"zero-dev {last.get('routing/zero_deviation_ratio', float('nan')):.3f}",
        f"k3 {last.get('logprob/k3_kl', float('nan')):.2e}",
        f"clip {last.get('ppo/clip_fraction', float('nan')):.3f}",
    ]
    if "predictor/loss" in last:
        parts.append(f"pred-loss {last['predictor/loss']:.2e}")
    parts.append(f"{seconds:.1f}s")
    return " | ".join(parts)
