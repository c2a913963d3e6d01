"""``pr2-compare``: run none / r2 / r3 / pr2 on the same seed and data, write a table and plots.

::

    python -m pr2_megatron.rl.compare --config configs/tiny.yaml --out runs/compare [key=value ...]

Each mode is one ``pr2-train`` job under torchrun (same config, seed and data; only
``replay.mode`` differs). Then ``summary.md`` (markdown table), ``summary.json`` and PNG plots
(metrics over steps per mode, per-layer agreement) are written to ``--out``.

What the table reports (mini-step 1 is at the rollout weights, so its log-prob mismatch is pure
training/rollout mismatch; from mini-step 2 on the router has moved, so routing agreement there
measures router staleness):

- ``overlap`` / ``zero-dev`` at mini-steps ≥ 2: top-k overlap and zero-deviation ratio of the
  route the tokens were sampled and trained with against the live router (none: the rollout's
  route; r2: the old-pass route; r3: the rollout's; pr2: the predicted route);
- ``router agr.`` at mini-steps ≥ 2: the mean over routers of per-router set agreement
  (``1 − router_disagreement``: the share of token-layer routes equal to the live set), the
  figure that compares across depths -- a zero deviation over 48 layers cannot be compared with
  a 4-layer toy's; ``overlap @1``: the overlap at mini-step 1 (pr2: the cost of predicting
  before the router has moved; plain replay is 1 there with fp32 rollout);
- ``vs plain, same run``: the route trained with minus the plain-replay route (the live top-k
  at rollout), both against the live router on the same tokens (pr2: the gain of prediction
  within its own run; r3: 0);
- ``lagged gain`` (r2 / r3 / pr2 runs with ``diagnostics.predictability``): what a ridge fit on
  the previous rollout batch gains over plain replay, ± its paired standard error over steps
  (:mod:`pr2_megatron.rl.diagnostics`);
- ``k3 KL @1`` and ``extreme @1``: training vs rollout log-prob mismatch at mini-step 1;
- ``clip``: PPO clip fraction over all mini-steps; ``reward``: mean reward of the second half.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from statistics import mean

MODES = ("none", "r2", "r3", "pr2", "pr2-actor")
#: The default comparison (``pr2-actor``, actor-side PR2, on request: ``--modes``).
DEFAULT_MODES = ("none", "r2", "r3", "pr2")
#: The config keys of a mode (``pr2-actor``: ``replay.mode=pr2 replay.predict_at=old_logprob``).
MODE_KEYS = {"pr2-actor": ["replay.mode=pr2", "replay.predict_at=old_logprob"]}


def run_mode(config: str, mode: str, out: Path, nproc: int, overrides: list[str]) -> Path:
    """Run one ``pr2-train`` job for ``mode``; return its run directory."""
    run_dir = out / mode
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", "-m", "pr2_megatron.rl.train", "--config", config,
        *overrides, *MODE_KEYS.get(mode, [f"replay.mode={mode}"]), f"logging.dir={run_dir}",
        "checkpoint.dir=null",
    ]  # fmt: skip
    print("+ " + " ".join(command), flush=True)
    env = dict(os.environ, TORCHDYNAMO_DISABLE=os.environ.get("TORCHDYNAMO_DISABLE", "1"))
    subprocess.run(command, check=True, env=env)
    return run_dir


def load_records(run_dir: Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(records: list[dict]) -> dict:
    """The comparison numbers of one run (see the module docstring)."""
    minis = [r for r in records if r["event"] == "mini_step"]
    late = [r for r in minis if r["mini_step"] >= 2]
    first = [r for r in minis if r["mini_step"] == 1]
    rollouts = [r for r in records if r["event"] == "rollout"]
    half = rollouts[len(rollouts) // 2 :]

    def avg(rows, key):
        values = [r[key] for r in rows if key in r]
        return mean(values) if values else float("nan")

    prefix = "routing/topk_overlap/replayed/layer_"
    layers = sorted({k[len(prefix) :] for r in late for k in r if k.startswith(prefix)}, key=int)
    lagged = _lagged_gain(records)
    return {
        "overlap": avg(late, "routing/topk_overlap/replayed"),
        "router_agreement": 1.0 - avg(late, "routing/router_disagreement"),
        "overlap_ministep1": avg(first, "routing/topk_overlap/replayed"),
        "lagged_gain": lagged["mean"],
        "lagged_gain_se": lagged["se"],
        "overlap_plain_replay": avg(late, "routing/topk_overlap/plain"),
        "gain_vs_plain": avg(late, "routing/topk_overlap/replayed")
        - avg(late, "routing/topk_overlap/plain"),
        "zero_deviation": avg(late, "routing/zero_deviation_ratio"),
        "rollout_vs_train_overlap": avg(minis, "rollout_vs_train/topk_overlap/replayed"),
        "k3_kl_ministep1": avg(first, "logprob/k3_kl"),
        "extreme_ministep1": avg(first, "logprob/extreme_token_fraction"),
        "k3_kl": avg(minis, "logprob/k3_kl"),
        "extreme": avg(minis, "logprob/extreme_token_fraction"),
        "ratio_dev_ministep1": max(
            (r["ppo/ratio_max_abs_dev"] for r in first), default=float("nan")
        ),
        "clip_fraction": avg(minis, "ppo/clip_fraction"),
        "reward_second_half": avg(half, "reward/mean"),
        "reward_final": rollouts[-1]["reward/mean"] if rollouts else float("nan"),
        "predictor_loss": avg(late, "predictor/loss"),
        "step_seconds": avg(minis, "time/step_seconds"),
        "per_layer_overlap": {n: avg(late, f"{prefix}{n}") for n in layers},
    }


def _lagged_gain(records: list[dict]) -> dict:
    """Mean and paired SE over steps of the run's ``predictability/lagged_gain`` records."""
    from pr2_megatron.metrics.predictability import summarize_gains

    values = [
        r["predictability/lagged_gain"]
        for r in records
        if r["event"] == "predictability" and "predictability/lagged_gain" in r
    ]
    return summarize_gains(values)


def _cell(summary: dict, key: str, fmt: str) -> str:
    if key == "lagged_gain":
        mean, se = summary.get("lagged_gain", float("nan")), summary.get("lagged_gain_se")
        return "—" if mean != mean else f"{mean:+.4f} ± {se:.4f}"
    return fmt.format(summary.get(key, float("nan")))


def markdown_table(summaries: dict[str, dict]) -> str:
    """The comparison as a markdown table, one row per mode."""
    columns = [
        ("overlap (≥2)", "overlap", "{:.4f}"),
        ("router agr. (≥2)", "router_agreement", "{:.4f}"),
        ("zero-dev (≥2)", "zero_deviation", "{:.4f}"),
        ("overlap @1", "overlap_ministep1", "{:.4f}"),
        ("vs plain, same run (≥2)", "gain_vs_plain", "{:+.4f}"),
        ("rollout≡train overlap", "rollout_vs_train_overlap", "{:.4f}"),
        ("k3 KL @1", "k3_kl_ministep1", "{:.2e}"),
        ("extreme @1", "extreme_ministep1", "{:.4f}"),
        ("max |ratio-1| @1", "ratio_dev_ministep1", "{:.1e}"),
        ("k3 KL (all)", "k3_kl", "{:.2e}"),
        ("clip frac", "clip_fraction", "{:.4f}"),
        ("reward (2nd half)", "reward_second_half", "{:.3f}"),
        ("step time ×none", "step_time_ratio", "{:.2f}"),
        ("lagged gain", "lagged_gain", ""),
    ]
    lines = [
        "| mode | " + " | ".join(c[0] for c in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for mode, summary in summaries.items():
        cells = [_cell(summary, key, fmt) for _, key, fmt in columns]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    layers = sorted({n for s in summaries.values() for n in s["per_layer_overlap"]}, key=int)
    if layers:
        lines += ["", "Per-layer top-k overlap with the live router (mini-steps ≥ 2):", ""]
        lines.append("| mode | " + " | ".join(f"layer {n}" for n in layers) + " |")
        lines.append("|---" * (len(layers) + 1) + "|")
        for mode, summary in summaries.items():
            cells = [f"{summary['per_layer_overlap'].get(n, float('nan')):.4f}" for n in layers]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(records_by_mode: dict[str, list[dict]], out: Path) -> list[Path]:
    """PNG plots: metrics over steps per mode, per-layer agreement; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("pr2-compare: matplotlib is not installed (pip install -e '.[plots]'); no plots")
        return []
    panels = [
        ("routing/topk_overlap/replayed", "top-k overlap with live router (mini-steps ≥ 2)", True),
        ("routing/zero_deviation_ratio", "zero-deviation ratio (mini-steps ≥ 2)", True),
        ("logprob/k3_kl", "k3 KL train vs rollout (mini-step 1)", False),
        ("ppo/clip_fraction", "PPO clip fraction", None),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (key, title, late) in zip(axes.flat, panels):
        for mode, records in records_by_mode.items():
            per_step: dict[int, list[float]] = {}
            for r in records:
                if r["event"] != "mini_step" or key not in r:
                    continue
                if late is True and r["mini_step"] < 2 or late is False and r["mini_step"] != 1:
                    continue
                per_step.setdefault(r["step"], []).append(r[key])
            steps = sorted(per_step)
            ax.plot(steps, [mean(per_step[s]) for s in steps], label=mode)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
    ax = axes.flat[4]
    for mode, records in records_by_mode.items():
        rows = [r for r in records if r["event"] == "rollout"]
        ax.plot([r["step"] for r in rows], [r["reward/mean"] for r in rows], label=mode)
    ax.set_title("reward", fontsize=10)
    ax = axes.flat[5]
    summaries = {m: summarize(r) for m, r in records_by_mode.items()}
    for mode, summary in summaries.items():
        layers = sorted(summary["per_layer_overlap"], key=int)
        ax.plot(
            [int(n) for n in layers],
            [summary["per_layer_overlap"][n] for n in layers],
            "o-",
            label=mode,
        )
    ax.set_title("per-layer overlap (mini-steps ≥ 2)", fontsize=10)
    ax.set_xlabel("MoE layer")
    for ax in axes.flat:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "comparison.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def main(argv=None) -> int:
    """Console entry point ``pr2-compare``."""
    parser = argparse.ArgumentParser(description="Compare none / r2 / r3 / pr2 on one job")
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"of {MODES}")
    parser.add_argument("--nproc", type=int, default=int(os.environ.get("NPROC", "2")))
    parser.add_argument("--reuse", action="store_true", help="summarize existing runs only")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every mode")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {list(MODES)}")
    records = {}
    for mode in modes:
        run_dir = (
            out / mode
            if args.reuse
            else run_mode(args.config, mode, out, args.nproc, args.overrides)
        )
        records[mode] = load_records(run_dir)
    summaries = {mode: summarize(r) for mode, r in records.items()}
    base = summaries.get("none", next(iter(summaries.values())))["step_seconds"]
    for summary in summaries.values():
        summary["step_time_ratio"] = summary["step_seconds"] / base if base else float("nan")
    table = markdown_table(summaries)
    header = f"# none / r2 / r3 / pr2 on `{args.config}` {' '.join(args.overrides)}\n\n"
    (out / "summary.md").write_text(header + table)
    (out / "summary.json").write_text(json.dumps(summaries, indent=1))
    plots = plot(records, out)
    print(table)
    print(f"wrote {out / 'summary.md'}, {out / 'summary.json'}" + "".join(f", {p}" for p in plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
