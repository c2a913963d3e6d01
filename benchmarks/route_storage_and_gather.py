"""Route storage and route all-gather cost (issue: route capture and replay).

Prints the tables and writes JSON (``--out``; default ``outputs/bench_route_comm.json``, with
``--quick`` ``outputs/bench_route_comm_quick.json``):

1. Bytes per token per MoE layer of the stored routes at the E/k of OLMoE, Qwen3-30B-A3B and
   DeepSeek-V3: this project's route table (smallest dtype that holds E; also measured on a real
   ``RouteTable`` of packed samples, metadata included), Megatron's ``RouterReplay`` record
   (int64), int32 ids (miles/slime), a padded ``[batch, max_len, layers, k]`` int32 tensor
   (verl-style) at the padding ratio ``--pad-ratio`` (max length / mean length; 4 by default:
   GRPO responses spread widely in length) and the information limit log2 C(E, k) / 8.
   A second table gives the whole rollout batch (``--rollout-tokens`` tokens, every MoE layer).
2. Time of one batched all-gather of all layers' routes per micro-batch against one all-gather
   per layer, on 2 and 4 gloo ranks (``--ranks``), for 4k-64k tokens per rank, and the
   project's whole path (``gather_route_table``: the batched collective plus packing the
   table, checking each rank's own rows: the id range always, k distinct ids per row only for
   routes that do not come from the routers); "table / collective" is the median per-repeat
   ratio of the whole path to its batched collective for the routers' routes (target <= 1.5 at
   4k-32k tokens x 48 layers), "+ distinct check" the same with the k-distinct check.
   Variants run interleaved per repeat (rotated order); each repeat's time is the slowest
   rank's; medians over repeats, and the median of the per-repeat ratios.
3. Scaling of the gather with the number of MoE layers at a fixed token count.

The table is a fresh tensor (the caller keeps it for the whole step); on this machine the first
write to a fresh multi-MiB CPU allocation page-faults, about 1 ms per MiB when loaded.
``--thp`` lets the ranks' PyTorch put large allocations on transparent huge pages
(``THP_MEM_ALLOC_ENABLE=1``, PyTorch's own switch; the kernel's THP mode must be ``madvise`` or
``always``), which removes most of that cost, for the collective's buffers too.

With 4 ranks on a 2-core machine the ranks share cores: the ratios still compare the two
schedules on the same machine, the absolute times are pessimistic.

Run: ``python benchmarks/route_storage_and_gather.py [--quick] [--thp]``.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.distributed as dist
from _bench import default_out, median, print_table, write_json

from pr2_megatron.routes.table import RouteTable, route_dtype
from pr2_megatron.testing.distributed import run_distributed

MODELS = {
    # name: (experts E, top-k, MoE layers)
    "OLMoE-1B-7B": (64, 8, 16),
    "Qwen3-30B-A3B": (128, 8, 48),
    "DeepSeek-V3": (256, 8, 58),
}


def measured_table_bytes(experts: int, topk: int, layers: int, tokens: int) -> float:
    """Bytes per token per layer of a real packed ``RouteTable`` (metadata included)."""
    generator = torch.Generator().manual_seed(0)
    lengths, total = [], 0
    while total < tokens:  # responses of 64..2047 tokens
        n = min(int(torch.randint(64, 2048, (1,), generator=generator)), tokens - total)
        lengths.append(n)
        total += n
    dtype = route_dtype(experts)
    samples = [
        torch.rand(n, layers, experts, generator=generator).argsort(-1)[..., :topk].to(dtype)
        for n in lengths
    ]
    route_table = RouteTable.from_samples(
        samples,
        sample_ids=list(range(len(samples))),
        layer_numbers=tuple(range(1, layers + 1)),
        num_experts=experts,
        topk=topk,
    )
    return route_table.nbytes / (tokens * layers)


def storage_rows(pad_ratio: float, rollout_tokens: int, measure_tokens: int) -> list[dict]:
    rows = []
    for name, (experts, topk, layers) in MODELS.items():
        table_bytes = torch.empty(0, dtype=route_dtype(experts)).element_size() * topk
        row = {
            "model": name,
            "E": experts,
            "k": topk,
            "moe_layers": layers,
            "route_table": table_bytes,
            "route_table_measured": measured_table_bytes(experts, topk, 4, measure_tokens),
            "megatron_int64": 8 * topk,
            "int32": 4 * topk,
            "padded_int32": 4 * topk * pad_ratio,
            "info_limit": math.log2(math.comb(experts, topk)) / 8,
        }
        per_rollout = rollout_tokens * layers / 2**20  # MiB per byte-per-token-layer
        for key in ("route_table", "megatron_int64", "int32", "padded_int32", "info_limit"):
            row[f"rollout_MiB_{key}"] = row[key] * per_rollout
        rows.append(row)
    return rows


def _timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _gather_timing(tokens_list, layer_list, topk, experts, repeats, seq_len):
    """In each rank: interleaved timings of the three ways to gather one micro-batch's routes."""
    from pr2_megatron.routes.gather import gather_route_table

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = route_dtype(experts)
    generator = torch.Generator().manual_seed(rank)
    out = []
    configs = [("tokens", t, layer_list[0]) for t in tokens_list]
    configs += [("layers", tokens_list[0], n) for n in layer_list]
    for axis, tokens, layers in configs:
        # k distinct expert ids per row (the table validates them): a random first id, then
        # steps of E/k.
        first = torch.randint(0, experts, (tokens, layers, 1), generator=generator)
        routes = ((first + torch.arange(topk) * (experts // topk)) % experts).to(dtype)
        batched = routes.new_empty((world * tokens, layers, topk))
        per_layer = [routes[:, i].contiguous() for i in range(layers)]
        per_layer_out = [routes.new_empty((world * tokens, topk)) for _ in range(layers)]
        batch = max(1, tokens // seq_len)
        sample_ids = [rank * batch + b for b in range(batch)]

        def run_batched(out=batched, src=routes):
            dist.all_gather_into_tensor(out, src)

        def run_per_layer(srcs=per_layer, outs=per_layer_out):
            for src, dst in zip(srcs, outs):
                dist.all_gather_into_tensor(dst, src)

        def run_table(src=routes, ids=sample_ids, layers=layers, check_distinct=False):
            gather_route_table(
                [src],
                [ids],
                layer_numbers=list(range(1, layers + 1)),
                num_experts=experts,
                topk=topk,
                check_distinct=check_distinct,
            )

        def run_table_checked(src=routes, ids=sample_ids, layers=layers):
            run_table(src, ids, layers, check_distinct=True)

        variants = {
            "batched": run_batched,
            "per_layer": run_per_layer,
            "table": run_table,
            "table_checked": run_table_checked,
        }
        names = list(variants)
        for name in names:  # warm-up
            _timed(variants[name])
        samples = torch.zeros(len(names), repeats, dtype=torch.float64)
        for r in range(repeats):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                samples[names.index(name), r] = _timed(variants[name])
        dist.all_reduce(samples, op=dist.ReduceOp.MAX)  # each repeat: the slowest rank
        out.append({"axis": axis, "tokens": tokens, "layers": layers, "samples": samples.tolist()})
    return out


def gather_rows(ranks: int, tokens_list, layer_list, repeats: int, seq_len: int) -> list[dict]:
    results = run_distributed(
        _gather_timing, ranks, tokens_list, layer_list, 8, 128, repeats, seq_len, timeout=900
    )[0]
    rows = []
    for result in results:
        batched, per_layer, full, checked = (torch.tensor(s) for s in result["samples"])
        rows.append(
            {
                "ranks": ranks,
                "axis": result["axis"],
                "tokens": result["tokens"],
                "layers": result["layers"],
                "batched_ms": median(batched.tolist()) * 1e3,
                "per_layer_ms": median(per_layer.tolist()) * 1e3,
                "gather_route_table_ms": median(full.tolist()) * 1e3,
                "ratio": median((per_layer / batched).tolist()),
                "table_vs_collective": median((full / batched).tolist()),
                "gather_route_table_checked_ms": median(checked.tolist()) * 1e3,
                "checked_vs_collective": median((checked / batched).tolist()),
                "batched_MB_per_s": result["tokens"]
                * ranks
                * result["layers"]
                * 8
                / median(batched.tolist())
                / 1e6,
            }
        )
    return rows


def report(storage, gather) -> str:
    md = []
    headers = ["model", "E", "k", "table", "table (measured)", "int64", "int32", "padded"]
    headers += ["limit"]
    rows = [
        [
            r["model"],
            r["E"],
            r["k"],
            r["route_table"],
            r["route_table_measured"],
            r["megatron_int64"],
            r["int32"],
            r["padded_int32"],
            r["info_limit"],
        ]
        for r in storage
    ]
    title = "Bytes per token per MoE layer"
    md.append(print_table(title, headers, rows, blank_line=False))
    headers = ["model", "MoE layers", "table MiB", "int64 MiB", "int32 MiB", "padded MiB"]
    headers += ["limit MiB"]
    rows = [
        [
            r["model"],
            r["moe_layers"],
            r["rollout_MiB_route_table"],
            r["rollout_MiB_megatron_int64"],
            r["rollout_MiB_int32"],
            r["rollout_MiB_padded_int32"],
            r["rollout_MiB_info_limit"],
        ]
        for r in storage
    ]
    title = "Whole rollout batch, every MoE layer"
    md.append(print_table(title, headers, rows))
    headers = ["ranks", "tokens/rank", "layers", "batched ms", "per-layer ms", "x faster"]
    headers += ["gather_route_table ms", "table / collective", "+ distinct check / collective"]
    headers += ["batched MB/s"]
    for axis, title in (
        ("tokens", "All-gather of one micro-batch's routes (k=8, E=128, uint8)"),
        ("layers", "Scaling with MoE layers"),
    ):
        rows = []
        for r in gather:
            if r["axis"] != axis:
                continue
            rows.append(
                [
                    r["ranks"],
                    r["tokens"],
                    r["layers"],
                    r["batched_ms"],
                    r["per_layer_ms"],
                    r["ratio"],
                    r["gather_route_table_ms"],
                    r["table_vs_collective"],
                    r["checked_vs_collective"],
                    r["batched_MB_per_s"],
                ]
            )
        if axis == "layers":
            rows.sort(key=lambda row: (row[0], row[2]))
        md.append(print_table(title, headers, rows))
    return "\n\n".join(md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes, well under a minute")
    parser.add_argument("--tokens", type=int, nargs="+", help="tokens per rank per micro-batch")
    parser.add_argument(
        "--layers", type=int, nargs="+", help="MoE layers; the first for the token sweep"
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sample")
    parser.add_argument("--pad-ratio", type=float, default=4.0, help="max / mean length")
    parser.add_argument("--rollout-tokens", type=int, default=2**20, help="for the MiB table")
    parser.add_argument("--out", help="JSON path (default: outputs/bench_route_comm.json)")
    parser.add_argument(
        "--thp",
        action="store_true",
        help="ranks allocate large tensors on transparent huge pages (THP_MEM_ALLOC_ENABLE=1)",
    )
    args = parser.parse_args()
    if args.thp:  # read by each spawned rank's torch at its first allocation
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    args.out = args.out or default_out("bench_route_comm", args.quick)
    tokens = args.tokens or ([4096, 8192] if args.quick else [4096, 8192, 16384, 32768, 65536])
    layers = args.layers or ([48, 16] if args.quick else [48, 16, 58])
    repeats = args.repeats or (3 if args.quick else 7)

    print(
        f"padded: int32 at max length {args.pad_ratio:g}x the mean; measured table: 4 layers, "
        "packed responses of 64-2047 tokens, metadata included\n"
    )
    storage = storage_rows(args.pad_ratio, args.rollout_tokens, 16384 if args.quick else 65536)
    gather = []
    for ranks in args.ranks:
        gather += gather_rows(ranks, tokens, layers, repeats, args.seq_len)
    markdown = report(storage, gather)
    write_json(
        args.out,
        {
            "pad_ratio": args.pad_ratio,
            "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
            "rollout_tokens": args.rollout_tokens,
            "storage_bytes_per_token_layer": storage,
            "gather_ms": gather,
            "markdown": markdown,
        },
    )


if __name__ == "__main__":
    main()
