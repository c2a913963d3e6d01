"""ProbMoE exact-k router against Megatron's top-k router: the previous subset DP and the current.

Router only: forward + backward of one router on a batch of tokens (``probs`` times fixed random
coefficients, summed, backpropagated to the router weight), in training mode, so ProbMoE samples
its subset and backpropagates SIMPLE gates through the exact marginals. Variants, interleaved
(one call of each per repeat, order rotated), the same router weights:

* ``topk``: Megatron's ``TopKRouter`` (softmax, top-k);
* ``probmoe previous``: :class:`ProbMoERouter` with the DP it had before (a Python loop over
  experts in log space, marginals by double backward: ``routing/probmoe/_reference.py``);
* ``probmoe tensor ops``: the current DP as tensor ops alone (``routing/probmoe/subset_dp.py``,
  the fused CPU kernel switched off);
* ``probmoe``: the current DP as the router runs it: on the CPU, the exact-k unsorted-path
  calls (sampling and the backward's Hessian-vector product) in the fused kernel
  (``routing/probmoe/cpu_kernel.py``), everything else in tensor ops.

At E/k = 8/2 (the tiny model), 64/8 (OLMoE) and 256/8 (DeepSeek-V3), for three logit spreads:
the freshly initialised router (logits of std ~0.2), router weights scaled to logits of std 2 (a
trained router's spread; both on the DP's usual, unsorted path) and of std 20 (``k_max`` times
the spread of a row's logits beyond 600: the ordered path, largest logits first). Reported:
median ms per call, the median of the per-repeat ratios to top-k, and previous / current
("x faster"). Times are the CPU time of the benchmark's thread by default (``--clock cpu``;
the machine is shared and oversubscribed, wall-clock times include waiting for a core), one
intra-op thread.

Run: ``python benchmarks/probmoe_router_cost.py [--quick]`` → ``outputs/bench_probmoe_router.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # Megatron compiles the expert-bias update

import torch
from _bench import (
    default_out,
    interleaved,
    markdown_table,
    median,
    paired_ratio,
    set_threads,
    single_process_megatron,
    table,
    write_json,
)

SIZES = ((8, 2), (64, 8), (256, 8))
# Logit std the router weights are scaled to (None: the weights as built).
SPREADS = {"init": None, "std 2": 2.0, "std 20": 20.0}
HIDDEN = 64  # default hidden size: MoEModelConfig's, as in probmoe_vs_topk.py (--hidden)


@contextlib.contextmanager
def previous_dp():
    """Run :class:`ProbMoERouter` on the previous (E-loop, log-space) DP inside the block."""
    from pr2_megatron.routing.probmoe import _reference
    from pr2_megatron.routing.probmoe import router as router_module

    saved = router_module.SubsetDistribution
    router_module.SubsetDistribution = _reference.ReferenceSubsetDistribution
    try:
        yield
    finally:
        router_module.SubsetDistribution = saved


def _routers(experts: int, topk: int, seed: int, hidden: int = HIDDEN):
    from pr2_megatron.models.builder import MoEModelConfig, build_gpt_moe
    from pr2_megatron.routing.probmoe.router import ProbMoEConfig
    from pr2_megatron.runtime.parallel import ParallelConfig, initialize_parallel

    routers = {}
    for kind in ("topk", "probmoe"):
        initialize_parallel(ParallelConfig(), seed=seed)
        cfg = MoEModelConfig(
            num_layers=1,
            hidden_size=hidden,
            num_experts=experts,
            topk=topk,
            expert_ffn_hidden_size=8,
        )
        kwargs = {"probmoe": ProbMoEConfig(mode="exact-k", seed=seed)} if kind == "probmoe" else {}
        model = build_gpt_moe(cfg, ParallelConfig(), router=kind, **kwargs)
        routers[kind] = model.decoder.layers[0].mlp.router.train()
    return routers["topk"], routers["probmoe"]


def _set_spread(topk_router, probmoe_router, logit_std, seed: int) -> None:
    hidden = probmoe_router.weight.shape[1]
    with torch.no_grad():
        if logit_std is not None:
            generator = torch.Generator().manual_seed(seed + 2)  # not the input's stream
            weight = torch.randn(probmoe_router.weight.shape, generator=generator)
            probmoe_router.weight.copy_(weight * logit_std / hidden**0.5)
        topk_router.weight.copy_(probmoe_router.weight)


def router_rows(
    tokens: int,
    repeats: int,
    seed: int,
    sizes=SIZES,
    spreads=SPREADS,
    clock=time.thread_time,
    hidden: int = HIDDEN,
) -> list[dict]:
    """One row per (spread, E, k): median ms per variant and paired ratios."""
    from pr2_megatron.routing.probmoe import cpu_kernel
    from pr2_megatron.routing.probmoe.subset_dp import needs_ordered_path

    kernel = cpu_kernel.available()
    rows = []
    for spread_name, logit_std in spreads.items():
        for experts, topk in sizes:
            topk_router, probmoe_router = _routers(experts, topk, seed, hidden)
            _set_spread(topk_router, probmoe_router, logit_std, seed)
            hidden_T1H = torch.randn(
                tokens, 1, hidden, generator=torch.Generator().manual_seed(seed)
            )
            coeff_TE = torch.randn(
                tokens, experts, generator=torch.Generator().manual_seed(seed + 1)
            )

            def step(router, hidden_T1H=hidden_T1H, coeff_TE=coeff_TE):
                router.zero_grad(set_to_none=True)
                probs_TE, _ = router(hidden_T1H)
                (probs_TE * coeff_TE).sum().backward()

            def previous(router=probmoe_router):
                with previous_dp():
                    step(router)

            def tensor_ops(router=probmoe_router):
                cpu_kernel.set_enabled(False)
                try:
                    step(router)
                finally:
                    cpu_kernel.set_enabled(None)

            variants = {
                "topk": lambda router=topk_router: step(router),
                "probmoe previous": previous,
                "probmoe tensor ops": tensor_ops,
                "probmoe": lambda router=probmoe_router: step(router),
            }
            samples = interleaved(variants, repeats, clock=clock)
            with torch.no_grad():
                logits_TE = hidden_T1H[:, 0] @ probmoe_router.weight.T
            rows.append(
                {
                    "logits": spread_name,
                    "path": "ordered" if needs_ordered_path(logits_TE, topk) else "unsorted",
                    "logit_std": float(logits_TE.std()),
                    "E": experts,
                    "k": topk,
                    "tokens": tokens,
                    "hidden": hidden,
                    "topk_ms": 1e3 * median(samples["topk"]),
                    "previous_ms": 1e3 * median(samples["probmoe previous"]),
                    "tensor_ops_ms": 1e3 * median(samples["probmoe tensor ops"]),
                    "probmoe_ms": 1e3 * median(samples["probmoe"]),
                    "previous_x_topk": paired_ratio(samples, "probmoe previous", "topk"),
                    "tensor_ops_x_topk": paired_ratio(samples, "probmoe tensor ops", "topk"),
                    "probmoe_x_topk": paired_ratio(samples, "probmoe", "topk"),
                    "cpu_kernel": kernel,
                    "previous_over_current": paired_ratio(samples, "probmoe previous", "probmoe"),
                }
            )
            print(
                f"  {spread_name:6s} E={experts:3d} k={topk}: x topk "
                f"{rows[-1]['previous_x_topk']:.2f} -> {rows[-1]['tensor_ops_x_topk']:.2f} "
                f"(tensor ops) -> {rows[-1]['probmoe_x_topk']:.2f}",
                flush=True,
            )
    return rows


HEADERS = [
    "logits",
    "DP path",
    "E",
    "k",
    "tokens",
    "topk ms",
    "previous ms",
    "tensor ops ms",
    "probmoe ms",
    "previous x topk",
    "tensor ops x topk",
    "probmoe x topk",
    "x faster",
]
#: The cost columns' headers (after the logits and the DP path, before "x faster").
COST_HEADERS = HEADERS[2:-1]
#: The cost columns of a :func:`router_rows` row, in the order of :data:`COST_HEADERS`;
#: ``probmoe_vs_topk.py`` prints the same columns of its rows.
COST_KEYS = (
    "E",
    "k",
    "tokens",
    "topk_ms",
    "previous_ms",
    "tensor_ops_ms",
    "probmoe_ms",
    "previous_x_topk",
    "tensor_ops_x_topk",
    "probmoe_x_topk",
)


def table_rows(rows: list[dict]) -> list[list[object]]:
    """The rows of :data:`HEADERS`."""
    return [
        [r["logits"], r["path"], *(r[key] for key in COST_KEYS), r["previous_over_current"]]
        for r in rows
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1024 tokens, 5 repeats (~30 s)")
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--hidden", type=int, default=HIDDEN, help="router input size H")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (shared machine)")
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: this thread's CPU time (default; the machine is shared), wall: wall clock",
    )
    parser.add_argument("--out", help="JSON (default outputs/bench_probmoe_router[_quick].json)")
    args = parser.parse_args()
    args.tokens = args.tokens or (1024 if args.quick else 4096)
    args.repeats = args.repeats or (5 if args.quick else 15)
    args.out = args.out or default_out("bench_probmoe_router", args.quick)
    set_threads(args.threads)
    single_process_megatron(args.seed)

    print(
        f"Router forward + backward, {args.tokens} tokens, H {args.hidden}, "
        f"{args.repeats} interleaved repeats, "
        f"{args.clock} time"
    )
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    rows = router_rows(args.tokens, args.repeats, args.seed, clock=clock, hidden=args.hidden)
    print()
    print(table(HEADERS, table_rows(rows)))
    write_json(
        args.out,
        {
            "settings": vars(args),
            "router_cost": rows,
            "markdown": markdown_table(HEADERS, table_rows(rows)),
        },
    )


if __name__ == "__main__":
    main()
