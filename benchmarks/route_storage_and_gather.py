"""Route storage and route all-gather cost (issue: route capture and replay).

Prints two tables and writes JSON (``--out``, default ``outputs/bench_route_comm.json``):

1. Bytes per token per MoE layer of the stored routes: this project's route table (smallest
   dtype that holds E), Megatron's int64 record, int32 (miles/slime), a padded
   ``[batch, max_len, layers, k]`` int32 tensor (verl) at a given length spread, and the
   information limit log2 C(E, k) bits, at the E/k of OLMoE, Qwen3-30B-A3B and DeepSeek-V3.
2. Time of one batched all-gather of all layers' routes per micro-batch against one
   all-gather per layer, on 2 gloo ranks, for 4k-64k tokens.

Run: ``python benchmarks/route_storage_and_gather.py [--tokens 4096 16384 65536]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist

from pr2_megatron.route_table import route_dtype
from pr2_megatron.testing.distributed import run_distributed

MODELS = {
    # name: (experts E, top-k, MoE layers)
    "OLMoE-1B-7B": (64, 8, 16),
    "Qwen3-30B-A3B": (128, 8, 48),
    "DeepSeek-V3": (256, 8, 58),
}


def storage_rows(mean_len: int = 1024, max_len: int = 4096) -> list[dict]:
    rows = []
    for name, (experts, topk, _layers) in MODELS.items():
        table = torch.empty(0, dtype=route_dtype(experts)).element_size() * topk
        rows.append(
            {
                "model": name,
                "E": experts,
                "k": topk,
                "route_table": table,
                "megatron_int64": 8 * topk,
                "int32": 4 * topk,
                "padded_int32": 4 * topk * max_len / mean_len,
                "info_limit": math.log2(math.comb(experts, topk)) / 8,
            }
        )
    return rows


def _gather_timing(tokens_list, layers, topk, experts, repeats):
    dist.init_process_group("gloo")
    dtype = route_dtype(experts)
    out = {}
    for tokens in tokens_list:
        routes = torch.randint(0, experts, (tokens, layers, topk)).to(dtype)
        world = dist.get_world_size()
        batched = routes.new_empty((world * tokens, layers, topk))
        per_layer = [routes[:, i].contiguous() for i in range(layers)]
        per_layer_out = [routes.new_empty((world * tokens, topk)) for _ in range(layers)]
        timings = {}
        for mode in ("batched", "per_layer"):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(repeats):
                if mode == "batched":
                    dist.all_gather_into_tensor(batched, routes)
                else:
                    for src, dst in zip(per_layer, per_layer_out):
                        dist.all_gather_into_tensor(dst, src)
            timings[mode] = (time.perf_counter() - start) / repeats
        out[tokens] = timings
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="outputs/bench_route_comm.json")
    args = parser.parse_args()

    storage = storage_rows()
    print("Bytes per token per MoE layer (padded: max length 4x the mean)")
    print(
        f"{'model':15s} {'E':>4s} {'k':>2s} {'table':>6s} {'int64':>6s} {'int32':>6s} "
        f"{'padded':>7s} {'limit':>6s}"
    )
    for r in storage:
        print(
            f"{r['model']:15s} {r['E']:4d} {r['k']:2d} {r['route_table']:6d} "
            f"{r['megatron_int64']:6d} {r['int32']:6d} {r['padded_int32']:7.0f} "
            f"{r['info_limit']:6.2f}"
        )

    timing = run_distributed(_gather_timing, 2, args.tokens, args.layers, 8, 128, args.repeats)[0]
    print(f"\nAll-gather of routes, 2 gloo ranks, {args.layers} layers, k=8, E=128 (uint8)")
    print(f"{'tokens':>7s} {'batched ms':>11s} {'per-layer ms':>13s} {'ratio':>6s}")
    gather = []
    for tokens, t in timing.items():
        ratio = t["per_layer"] / t["batched"]
        gather.append({"tokens": tokens, **{k: v * 1e3 for k, v in t.items()}, "ratio": ratio})
        print(f"{tokens:7d} {t['batched'] * 1e3:11.2f} {t['per_layer'] * 1e3:13.2f} {ratio:6.1f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump({"storage_bytes_per_token_layer": storage, "gather_ms": gather}, handle, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
