"""Shared helpers of the benchmarks: interleaved timing, single-process Megatron, JSON output.

The machine is shared, so absolute times are noisy: every benchmark runs its variants
interleaved (one call of each per repeat, in a rotated order) and reports medians and the
median of the per-repeat ratios against a baseline measured in the same repeat.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping

import torch

# Run from a checkout (``python benchmarks/<name>.py``) without installing the package.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)


def interleaved(
    variants: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    setups: Mapping[str, Callable[[], object]] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of each variant, ``repeats`` samples each, variants interleaved.

    Each repeat runs every variant once, in an order rotated by one per repeat, so a slow
    phase of the shared machine hits every variant alike. ``setups[name]``, when given, runs
    untimed right before each call of variant ``name``. ``clock``: wall clock by default;
    ``time.thread_time`` counts only the CPU time of this thread (not the waits for a core of
    an oversubscribed machine).
    """
    names = list(variants)
    setups = setups or {}
    for _ in range(warmup):
        for name in names:
            if name in setups:
                setups[name]()
            variants[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            if name in setups:
                setups[name]()
            start = clock()
            variants[name]()
            samples[name].append(clock() - start)
    return samples


def median(values: list[float]) -> float:
    """Median of a non-empty list."""
    return statistics.median(values)


def paired_ratio(samples: dict[str, list[float]], name: str, base: str) -> float:
    """Median over repeats of ``time(name) / time(base)`` measured in the same repeat."""
    return statistics.median(a / b for a, b in zip(samples[name], samples[base]))


def min_ratio(samples: dict[str, list[float]], name: str, base: str) -> float:
    """``min time(name) / min time(base)``: the least disturbed call of each (shared machine)."""
    return min(samples[name]) / min(samples[base])


def set_threads(threads: int) -> None:
    """Set the intra-op threads (the benchmarks use one by default).

    On a shared machine a multi-threaded op waits for its slowest thread, which makes timings
    far noisier than the work they measure.
    """
    torch.set_num_threads(threads)


def single_process_megatron(seed: int = 1234) -> None:
    """A gloo world of one rank and Megatron's parallel state (TP=EP=PP=1), CPU bring-up on."""
    from pr2_megatron.runtime.parallel import ParallelConfig, initialize_parallel
    from pr2_megatron.testing.distributed import init_single_process_group

    init_single_process_group()
    initialize_parallel(ParallelConfig(), seed=seed)


def moe_transformer_config(hidden: int, experts: int, topk: int, ffn: int = 512, layers: int = 1):
    """Megatron's ``TransformerConfig`` of a GPT-MoE of these sizes (TP=EP=PP=1).

    8 attention heads, dense and expert FFN both ``ffn`` wide, alltoall token dispatcher.
    """
    from pr2_megatron.models.builder import MoEModelConfig, transformer_config
    from pr2_megatron.runtime.parallel import ParallelConfig

    model = MoEModelConfig(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=8,
        ffn_hidden_size=ffn,
        num_experts=experts,
        topk=topk,
        expert_ffn_hidden_size=ffn,
        token_dispatcher="alltoall",
    )
    return transformer_config(model, ParallelConfig())


def router_fwd_bwd(router, x: torch.Tensor) -> None:
    """One training step of a router alone: its probs on ``x``, summed and backpropagated.

    The gradients of the router and of ``x`` are dropped first. A PR2 router's phase (and
    replay target) is the caller's to set before.
    """
    router.zero_grad(set_to_none=True)
    x.grad = None
    probs, _ = router(x)
    probs.sum().backward()


def environment() -> dict[str, object]:
    """What the numbers were measured on."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def default_out(name: str, quick: bool) -> str:
    """The default JSON path: ``outputs/<name>.json``, or ``<name>_quick.json`` for quick runs.

    Quick runs never overwrite the full run's numbers.
    """
    return f"outputs/{name}{'_quick' if quick else ''}.json"


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` (plus the environment) as indented JSON, creating the folder."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        json.dump({"environment": environment(), **payload}, handle, indent=1)
    print(f"\nwrote {path}")


def write_result(path: str, result: dict, report: Callable[[dict], str]) -> None:
    """Print the tables of ``result`` and write it, with them, as JSON to ``path``.

    ``report(result)`` prints the tables and returns them as Markdown, which is stored in
    ``result["markdown"]`` before ``result`` goes to :func:`write_json`.
    """
    result["markdown"] = report(result)
    write_json(path, result)


def format_cell(value: object) -> str:
    """A table cell: floats with 3 decimals (1 decimal from 100 up), anything else as ``str``."""
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def table(
    headers: list[str],
    rows: list[list[object]],
    cell: Callable[[object], str] = format_cell,
) -> str:
    """A plain-text table, right-aligned, each cell formatted by ``cell``."""
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    """The same table in Markdown (for docs/performance.md), cells by :func:`format_cell`."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(format_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def print_table(
    title: str, headers: list[str], rows: list[list[object]], blank_line: bool = True
) -> str:
    """Print ``title`` and the text table of ``rows``; return the table as Markdown.

    ``blank_line``: a blank line before the title (off for the first table of a report). The
    Markdown has the title in bold above the table, for a report's ``"markdown"`` entry.
    """
    print(("\n" if blank_line else "") + f"{title}\n" + table(headers, rows))
    return f"**{title}**\n\n" + markdown_table(headers, rows)
