"""ProbMoE routing against top-k: supervised warm start, expert load balance, cost per step.

Prints two tables and writes JSON (``--out``, default ``outputs/bench_probmoe.json``):

1. A short supervised warm start (next-token prediction on the arithmetic sequences of
   :func:`pr2_megatron.examples.minimal_loop.synthetic_batch`, one process, CPU) of the same tiny
   GPT-MoE with Megatron's stock ``TopKRouter`` and with the ProbMoE router (exact-k with SIMPLE
   gates, exact-k with marginal gates, dynamic-k). Same initial weights, same batches. Reported: the
   training loss averaged over windows of steps (the loss curve), the held-out loss with
   deterministic routing at the end, the coefficient of variation of tokens per expert (std / mean
   over experts, averaged over MoE layers; 0 = perfectly balanced) over the last quarter of training
   and at evaluation, experts per token, and the time of a training step (forward + backward + Adam)
   as the median of per-step ratios to top-k. The variants' steps are interleaved (one step of each,
   in rotated order), so a slow phase of the shared machine hits all of them alike.
2. Router-only cost: forward + backward of one router on a batch of tokens, ProbMoE exact-k
   against ``TopKRouter`` (and against ProbMoE on its previous DP), at the E/k of the tiny
   model, of OLMoE (64 experts, top-8) and of DeepSeek-V3 (256, top-8): the rows of
   ``benchmarks/probmoe_router_cost.py`` for the freshly built routers (thread CPU time).

Run: ``python benchmarks/probmoe_vs_topk.py [--steps 150] [--out outputs/bench_probmoe.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from _bench import single_process_megatron, table

VOCAB, SEQ, BATCH = 64, 32, 16


def _variants():
    from pr2_megatron.routing.probmoe.router import ProbMoEConfig

    return {
        "topk": dict(topk=2, router="topk", probmoe=None),
        "probmoe exact-k simple": dict(
            topk=2, router="probmoe", probmoe=ProbMoEConfig(mode="exact-k", gate="simple")
        ),
        "probmoe exact-k marginal": dict(
            topk=2, router="probmoe", probmoe=ProbMoEConfig(mode="exact-k", gate="marginal")
        ),
        "probmoe dynamic-k [1,3]": dict(
            topk=3, router="probmoe", probmoe=ProbMoEConfig(mode="dynamic-k", k_min=1)
        ),
    }


class _LoadCounter:
    """Tokens per expert seen by every router's routing map (a forward hook)."""

    def __init__(self, model, num_experts: int) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        self.routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
        self.counts = torch.zeros(len(self.routers), num_experts, dtype=torch.float64)
        self.active = False
        for index, router in enumerate(self.routers):
            router.register_forward_hook(self._hook(index))

    def _hook(self, index):
        def hook(_module, _inputs, output):
            if self.active:
                self.counts[index] += output[1].detach().sum(0).double()

        return hook

    def reset(self) -> None:
        self.counts.zero_()

    def cv(self) -> float:
        """Coefficient of variation of tokens per expert, averaged over layers."""
        mean = self.counts.mean(1)
        return float((self.counts.std(1, unbiased=False) / mean.clamp(min=1e-12)).mean())

    def experts_per_token(self, num_tokens: int) -> float:
        return float(self.counts.sum(1).mean() / max(num_tokens, 1))


def warm_start(steps: int, lr: float, seed: int, threads: int) -> dict:
    from pr2_megatron.examples.minimal_loop import synthetic_batch
    from pr2_megatron.models.builder import MoEModelConfig, build_gpt_moe
    from pr2_megatron.runtime.parallel import ParallelConfig, initialize_parallel

    torch.set_num_threads(threads)
    variants = _variants()
    runs = {}
    for name, spec in variants.items():
        initialize_parallel(ParallelConfig(), seed=seed)
        cfg = MoEModelConfig(
            num_layers=2, hidden_size=64, num_experts=8, topk=spec["topk"], vocab_size=VOCAB
        )
        kwargs = {"probmoe": spec["probmoe"]} if spec["probmoe"] is not None else {}
        model = build_gpt_moe(cfg, ParallelConfig(), router=spec["router"], **kwargs)
        model.train()
        runs[name] = {
            "model": model,
            "optimizer": torch.optim.Adam(model.parameters(), lr=lr),
            "load": _LoadCounter(model, cfg.num_experts),
            "losses": [],
            "times": [],
        }
    data = torch.Generator().manual_seed(seed)
    eval_ids, eval_labels = synthetic_batch(4 * BATCH, SEQ, VOCAB, torch.Generator().manual_seed(7))
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    names = list(runs)
    for step in range(steps):
        ids, labels = synthetic_batch(BATCH, SEQ, VOCAB, data)
        shift = step % len(names)
        for name in names[shift:] + names[:shift]:
            run = runs[name]
            run["load"].active = step >= steps - steps // 4
            start = time.perf_counter()
            run["optimizer"].zero_grad()
            loss = run["model"](ids, positions, None, labels=labels).float().mean()
            loss.backward()
            run["optimizer"].step()
            run["times"].append(time.perf_counter() - start)
            run["losses"].append(float(loss.detach()))
    results = {}
    base_times = runs["topk"]["times"]
    eval_positions = torch.arange(SEQ).expand_as(eval_ids)
    for name, run in runs.items():
        train_cv = run["load"].cv()
        train_k = run["load"].experts_per_token((steps // 4) * BATCH * SEQ)
        run["load"].reset()
        run["load"].active = True
        run["model"].eval()
        with torch.no_grad():
            eval_loss = run["model"](eval_ids, eval_positions, None, labels=eval_labels)
        losses = run["losses"]
        window = max(steps // 6, 1)
        curve = {
            f"{i + 1}-{min(i + window, steps)}": statistics.fmean(losses[i : i + window])
            for i in range(0, steps, window)
        }
        results[name] = {
            "loss_curve": curve,
            "final_train_loss": statistics.fmean(losses[-window:]),
            "eval_loss": float(eval_loss.float().mean()),
            "cv_tokens_per_expert_train": train_cv,
            "cv_tokens_per_expert_eval": run["load"].cv(),
            "experts_per_token_train": train_k,
            "experts_per_token_eval": run["load"].experts_per_token(eval_ids.numel()),
            "step_ms": 1e3 * statistics.median(run["times"][1:]),
            "step_time_ratio_to_topk": statistics.median(
                a / b for a, b in zip(run["times"][1:], base_times[1:])
            ),
        }
    return results


def router_cost(tokens: int, repeats: int, seed: int) -> list[dict]:
    """The router-only rows of ``probmoe_router_cost.py`` for the freshly built routers."""
    from probmoe_router_cost import router_rows

    rows = router_rows(tokens, repeats, seed, spreads={"init": None})
    for row in rows:
        row["ratio"] = row["probmoe_x_topk"]
    return rows


def router_cost_table(cost: list[dict]) -> str:
    """The cost columns of the router-only rows, as ``probmoe_router_cost.py`` heads them."""
    from probmoe_router_cost import COST_HEADERS, COST_KEYS

    return _table(list(COST_HEADERS), [[r[key] for key in COST_KEYS] for r in cost])


def _three_decimals(value: object) -> str:
    """A cell of this benchmark's tables: every float with 3 decimals, whatever its size."""
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _table(headers: list[str], rows: list[list[object]]) -> str:
    """:func:`_bench.table` with :func:`_three_decimals` cells."""
    return table(headers, rows, cell=_three_decimals)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="warm-start steps per variant")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (shared machine)")
    parser.add_argument("--router-tokens", type=int, default=4096)
    parser.add_argument("--router-repeats", type=int, default=10)
    parser.add_argument("--out", default="outputs/bench_probmoe.json")
    args = parser.parse_args(argv)

    single_process_megatron(args.seed)
    warm = warm_start(args.steps, args.lr, args.seed, args.threads)
    names = list(warm)
    curve_keys = list(warm[names[0]]["loss_curve"])
    print(f"Warm start: {args.steps} steps, batch {BATCH}x{SEQ}, E=8, Adam lr {args.lr}\n")
    print("Training loss (mean over steps):")
    print(
        _table(
            ["router", *curve_keys],
            [[n, *warm[n]["loss_curve"].values()] for n in names],
        )
    )
    print()
    print(
        _table(
            [
                "router",
                "eval loss",
                "CV train",
                "CV eval",
                "k train",
                "k eval",
                "step ms",
                "x topk",
            ],
            [
                [
                    n,
                    warm[n]["eval_loss"],
                    warm[n]["cv_tokens_per_expert_train"],
                    warm[n]["cv_tokens_per_expert_eval"],
                    warm[n]["experts_per_token_train"],
                    warm[n]["experts_per_token_eval"],
                    warm[n]["step_ms"],
                    warm[n]["step_time_ratio_to_topk"],
                ]
                for n in names
            ],
        )
    )
    cost = router_cost(args.router_tokens, args.router_repeats, args.seed)
    print("\nRouter only (forward + backward):")
    print(router_cost_table(cost))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    payload = {
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "settings": vars(args),
        "warm_start": warm,
        "router_cost": cost,
    }
    with open(args.out, "w") as handle:
        json.dump(payload, handle, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
