"""The predictability diagnostic in the trainer, and as a command over a run's files.

Legend of shape suffixes: N recorded tokens, H hidden, E experts, B responses, S positions.

In a run (``diagnostics.predictability: true``; modes r2 / r3 / pr2, whose mini-steps name their
tokens) a :class:`~pr2_megatron.routing.probe.FeatureRecorder` records, for the response tokens
of every rollout batch (or a ``diagnostics.sample_fraction`` of its responses), each MoE layer's
router input ``h_old`` and logits ``z_old`` at rollout and the logits ``z_cur`` of the training
forward of the token's mini-step. After each step the records of all data-parallel ranks are
gathered, written to ``<logging.dir>/predictability/step_NNNNN.safetensors`` and reduced to a
``predictability`` record in ``metrics.jsonl``: the lagged gain (a ridge fit on the previous
rollout batch), the within-batch ceiling and the plain-replay overlap, overall and per layer
(definitions: :mod:`pr2_megatron.metrics.predictability`).

The command summarises runs from those files, with paired standard errors over steps, and for
pr2 runs the reference's per-router predictor metrics from ``metrics.jsonl``::

    python -m pr2_megatron.rl.diagnostics runs/testbed/r3 [runs/testbed/pr2 ...] [--json out.json]

A testbed *qualifies* when its lagged gain is >= 0.01 top-k overlap and >= 3 paired standard
errors (:func:`qualifies`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Optional

import torch

from pr2_megatron.metrics.predictability import (
    RIDGE_LAMBDA,
    LayerTokens,
    step_gains,
    summarize_gains,
)

#: A testbed qualifies with a lagged gain of at least this much top-k overlap ...
QUALIFY_MIN_GAIN = 0.01
#: ... and at least this many paired standard errors.
QUALIFY_MIN_SE = 3.0
KEY_BITS = 32  # token key = sample_id · 2³² + position (pr2_megatron.routes.KEY_STRIDE)


@dataclass
class DiagnosticsConfig:
    """Run-time diagnostics of the router drift (docs/pr2_effect.md)."""

    #: Record router inputs and logits of rollout and mini-step forwards and log the
    #: predictability diagnostic per step (``predictability`` records; modes r2, r3, pr2).
    predictability: bool = False
    #: Share of each step's responses recorded (a hash of sample id and step; 1.0: all).
    sample_fraction: float = 1.0
    #: Also write each step's records to ``<logging.dir>/predictability/step_NNNNN.safetensors``.
    write_files: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.sample_fraction <= 1.0:
            raise ValueError(
                f"diagnostics.sample_fraction must be in (0, 1], got {self.sample_fraction}"
            )


def _sample_keep(step: int, fraction: float):
    """``keep(keys_T)``: the responses of ``step`` a hash of (sample id, step) selects."""
    if fraction >= 1.0:
        return None
    bound = int(fraction * 2**32)

    def keep(keys_T: torch.Tensor) -> torch.Tensor:
        sample_T = keys_T >> KEY_BITS
        hashed_T = (sample_T * 2654435761 + step * 40503) % 2**32
        return hashed_T < bound

    return keep


def response_keys(mask_BS: torch.Tensor, sample_ids: list[int]) -> torch.Tensor:
    """Sorted token names of the response positions (``mask > 0``) of a rollout batch."""
    rows_B, positions = torch.nonzero(mask_BS > 0, as_tuple=True)
    ids_B = torch.tensor(sample_ids, dtype=torch.long)
    return torch.sort((ids_B[rows_B] << KEY_BITS) + positions).values


class StepDiagnostics:
    """The trainer's predictability recorder: windows per pass, one record per step.

    Hooks, in order, per RL step: :meth:`begin_rollout`, :meth:`end_rollout`, then per
    mini-step :meth:`begin_mini_step` / :meth:`end_mini_step`, then :meth:`end_step`.
    """

    def __init__(self, cfg, controller, log, *, rank0: bool, groups: list) -> None:
        from pr2_megatron.routing.probe import FeatureRecorder

        self.cfg = cfg.diagnostics
        self.enabled = bool(self.cfg.predictability and controller is not None)
        if self.enabled and cfg.replay.mode == "none":
            # Live routing names no training tokens; a comparison runs none with the same config.
            self.enabled = False
            if rank0:
                print("pr2-train: diagnostics.predictability off for replay.mode=none", flush=True)
        self.controller = controller
        self.log = log
        self.rank0 = rank0
        self.groups = groups
        self.group_size = cfg.rollout.group_size
        self.topk = cfg.model.topk
        self.directory = Path(cfg.logging.dir) / "predictability"
        self.recorder = FeatureRecorder()
        self._previous: Optional[dict[int, LayerTokens]] = None
        self._step = 0

    # ------------------------------------------------------------------------------ windows
    def begin_rollout(self, step: int) -> None:
        """A rollout batch starts: record its forwards' rollout features."""
        if not self.enabled:
            return
        self._step = step
        self.recorder.clear()
        self.recorder.keep = _sample_keep(step, self.cfg.sample_fraction)
        self._open("rollout")

    def end_rollout(self) -> None:
        """The rollout is over (the old-log-prob pass is not recorded)."""
        self._close()

    def begin_mini_step(self, mini_step: int) -> None:
        """Record the training forwards of ``mini_step`` (their logits z_cur)."""
        if self.enabled:
            self._open(int(mini_step))

    def end_mini_step(self) -> None:
        """The mini-step's forwards are over."""
        self._close()

    def _open(self, window) -> None:
        self.recorder.set_window(window)
        self.controller.attach_probe(self.recorder)

    def _close(self) -> None:
        if self.enabled:
            self.recorder.set_window(None)
            self.controller.detach_probe()

    # --------------------------------------------------------------------------- per step
    def end_step(self, step: int, mask_BS: torch.Tensor, sample_ids: list[int]) -> None:
        """Gather the step's response tokens over the ranks; rank 0 writes and logs them."""
        if not self.enabled:
            return
        responses = response_keys(mask_BS, sample_ids)
        tokens = {}
        for layer in self.controller.layer_numbers:
            later = sorted(w for w in self.recorder.windows(layer) if w != "rollout")
            joined = self.recorder.joined(layer, "rollout", later)
            rows = torch.isin(joined.keys_N, responses)
            tokens[layer] = self._gather(joined, rows)
        self.recorder.clear()
        if not self.rank0:
            return
        layers = {n: _layer_tokens(t, self.group_size) for n, t in tokens.items()}
        if self.cfg.write_files:
            write_step(self.directory / f"step_{step:05d}.safetensors", tokens, step, self.topk)
        gains = step_gains(layers, self._previous, self.topk)
        self._previous = layers
        record = {"event": "predictability", "step": step}
        record.update({f"predictability/{key}": value for key, value in gains.items()})
        self.log.write(record)

    def _gather(self, joined, rows) -> dict[str, torch.Tensor]:
        """A layer's selected tokens of every rank of the routing groups, concatenated."""
        ints_N2 = torch.stack([joined.keys_N[rows], joined.window_N[rows]], dim=1)
        parts = [joined.hidden_old_NH, joined.logits_old_NE, joined.logits_cur_NE]
        parts.append(joined.hidden_cur_NH)
        widths = [p.shape[1] for p in parts]
        floats_NX = torch.cat([p[rows] for p in parts], dim=1)
        for group in self.groups:
            ints_N2 = _all_gather_rows(ints_N2, group)
            floats_NX = _all_gather_rows(floats_NX, group)
        hidden_old, logits_old, logits_cur, hidden_cur = floats_NX.split(widths, dim=1)
        return {
            "keys": ints_N2[:, 0].contiguous(),
            "mini_step": ints_N2[:, 1].contiguous(),
            "hidden_old": hidden_old.contiguous(),
            "logits_old": logits_old.contiguous(),
            "logits_cur": logits_cur.contiguous(),
            "hidden_cur": hidden_cur.contiguous(),
        }


def _all_gather_rows(rows_NX: torch.Tensor, group) -> torch.Tensor:
    """Rows of every rank of ``group`` (variable counts; padded all-gather), rank order."""
    import torch.distributed as dist

    if group is None or dist.get_world_size(group) == 1:
        return rows_NX
    count = torch.tensor([rows_NX.shape[0]])
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, count, group=group)
    largest = max(int(c) for c in counts)
    width = rows_NX.shape[1] if rows_NX.dim() == 2 else 0
    padded = rows_NX.new_zeros((largest, width))
    padded[: rows_NX.shape[0]] = rows_NX
    parts = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[: int(c)] for part, c in zip(parts, counts)])


def _layer_tokens(tensors: dict[str, torch.Tensor], group_size: int) -> LayerTokens:
    return LayerTokens(
        hidden_old_NH=tensors["hidden_old"].float(),
        logits_old_NE=tensors["logits_old"].float(),
        logits_cur_NE=tensors["logits_cur"].float(),
        mini_step_N=tensors["mini_step"].long(),
        prompt_N=(tensors["keys"].long() >> KEY_BITS) // group_size,
    )


# -------------------------------------------------------------------------------- files
def write_step(path: Path, tokens: dict[int, dict[str, torch.Tensor]], step: int, topk: int):
    """One step's records as safetensors: ``layer_{n}/{keys,mini_step,hidden_old,...}``."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {
        f"layer_{n}/{name}": t.contiguous() for n, ts in tokens.items() for name, t in ts.items()
    }
    metadata = {"step": str(step), "topk": str(topk)}
    tmp = path.with_suffix(".partial")
    save_file(flat, str(tmp), metadata=metadata)
    tmp.replace(path)


def read_step(path: Path) -> tuple[int, int, dict[int, dict[str, torch.Tensor]]]:
    """``(step, topk, tensors per layer)`` of a file :func:`write_step` wrote."""
    from safetensors import safe_open

    tokens: dict[int, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        for name in handle.keys():
            layer, field = name.split("/", 1)
            tokens.setdefault(int(layer[len("layer_") :]), {})[field] = handle.get_tensor(name)
    return int(metadata["step"]), int(metadata["topk"]), tokens


# ------------------------------------------------------------------------------ command
def summarize_run(run_dir: Path, group_size: Optional[int] = None) -> dict:
    """The diagnostic of one run: means and paired SEs over steps, per layer, pr2 metrics."""
    run_dir = Path(run_dir)
    if group_size is None:
        group_size = _config_group_size(run_dir)
    files = sorted((run_dir / "predictability").glob("step_*.safetensors"))
    per_step: dict[int, dict[str, float]] = {}
    previous, previous_step = None, None
    for path in files:
        step, topk, tensors = read_step(path)
        layers = {n: _layer_tokens(t, group_size) for n, t in tensors.items()}
        lagged_from = previous if previous_step == step - 1 else None
        per_step[step] = step_gains(layers, lagged_from, topk)
        previous, previous_step = layers, step
    out: dict = {"run": str(run_dir), "steps": len(per_step), "ridge_lambda": RIDGE_LAMBDA}
    keys = sorted({k for gains in per_step.values() for k in gains if k != "tokens"})
    for key in keys:
        out[key] = summarize_gains([g[key] for g in per_step.values() if key in g])
    out["qualifies"] = qualifies(out)
    out.update(_predictor_metrics(run_dir))
    return out


def _config_group_size(run_dir: Path) -> int:
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return int(config["rollout"]["group_size"])


def _predictor_metrics(run_dir: Path) -> dict:
    """Means over the run of the reference's predictor metrics (pr2 runs; {} otherwise)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    wanted = ("predictor/route_change_fraction", "predictor/flip_fallback_fraction",
              "predictor/topk_accuracy", "predictor/delta_to_logit_ratio")  # fmt: skip
    out = {}
    for record in records:
        if record.get("event") not in ("rollout", "mini_step"):
            continue
        for key, value in record.items():
            if key.startswith(wanted) and isinstance(value, (int, float)):
                out.setdefault(key, []).append(float(value))
    return {key: mean(values) for key, values in sorted(out.items())}


def qualifies(summary: dict) -> bool:
    """Lagged gain >= :data:`QUALIFY_MIN_GAIN` and >= :data:`QUALIFY_MIN_SE` paired SEs."""
    lagged = summary.get("lagged_gain")
    if not lagged or lagged["n"] < 2 or not math.isfinite(lagged["se"]):
        return False
    return lagged["mean"] >= QUALIFY_MIN_GAIN and lagged["mean"] >= QUALIFY_MIN_SE * lagged["se"]


def markdown(summaries: list[dict]) -> str:
    """The runs' diagnostics as a markdown table (overall, then per layer)."""

    def cell(summary, key):
        value = summary.get(key)
        if not value or not value["n"]:
            return "—"
        return f"{value['mean']:+.4f} ± {value['se']:.4f}"

    lines = [
        "| run | steps | plain overlap (≥2) | lagged gain ± SE | within-batch gain ± SE | "
        "qualifies |",
        "|---|---|---|---|---|---|",
    ]
    for s in summaries:
        plain = s.get("plain_overlap", {}).get("mean", float("nan"))
        lines.append(
            f"| {s['run']} | {s['steps']} | {plain:.4f} | {cell(s, 'lagged_gain')} | "
            f"{cell(s, 'within_gain')} | {'yes' if s['qualifies'] else 'no'} |"
        )
    layer_keys = sorted(
        {k.split("/layer_")[1] for s in summaries for k in s if "/layer_" in k and "gain" in k},
        key=int,
    )
    if layer_keys:
        lines += ["", "Per layer (lagged / within-batch gain):", ""]
        lines.append("| run | " + " | ".join(f"layer {n}" for n in layer_keys) + " |")
        lines.append("|---" * (len(layer_keys) + 1) + "|")
        for s in summaries:
            cells = []
            for n in layer_keys:
                lag = s.get(f"lagged_gain/layer_{n}", {}).get("mean", float("nan"))
                within = s.get(f"within_gain/layer_{n}", {}).get("mean", float("nan"))
                cells.append(f"{lag:+.4f} / {within:+.4f}")
            lines.append(f"| {s['run']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """``python -m pr2_megatron.rl.diagnostics RUN_DIR ...``: the table, optionally JSON."""
    parser = argparse.ArgumentParser(description="Predictability diagnostic of router drift")
    parser.add_argument("runs", nargs="+", help="run directories (logging.dir of pr2-train)")
    parser.add_argument("--json", default=None, help="also write the summaries here")
    args = parser.parse_args(argv)
    summaries = [summarize_run(Path(run)) for run in args.runs]
    print(markdown(summaries))
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
