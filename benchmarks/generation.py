"""Rollout generation: the KV-cached sampler against the full-forward sampler.

The tiny model of ``configs/tiny.yaml`` (4 MoE layers, H=64, 8 experts top-2) with the PR2
router in the rollout's ``predict`` phase, one process, one thread, fp32 unless stated:

1. **Decode cost per token vs sequence length S** (128 ... 2048): every forward is timed
   (a wrapper around the model). The cached sampler's decoding forwards with the KV cache
   filled to about S (prompts of ``S - N - 1`` tokens, N new ones) against the full-forward
   sampler's forwards over the whole ``[B, S]`` buffer, each divided by the B tokens it
   generates; minimum (least disturbed) and median over all forwards of all repeats.
2. **Tokens/s** of a whole rollout micro-batch (mixed prompt lengths, ``max_new_tokens`` up to
   the buffer): cached vs full forward, same generator, same samples.
3. **Route memory per generated token** held at the end of a rollout micro-batch: the routers'
   records of the pass (int64 ``[T, K]`` per forward and layer, predicted and plain-replay) and
   the micro-batch's ``[S, B, L, K]`` routes (int64 before, the route table's uint8 now).
4. **bf16 rollout**: how many sampled tokens the two samplers share in bf16 numerics.

Run: ``python benchmarks/generation.py [--quick]`` (tables + ``outputs/bench_generation.json``).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch
from _bench import default_out, markdown_table, median, set_threads, table, write_json

FULL = dict(lengths=[128, 256, 512, 1024, 2048], batch=8, new=16, full_max=2048, repeats=3)
QUICK = dict(lengths=[128, 256, 512], batch=4, new=8, full_max=512, repeats=2)
EOS, PAD = 2, 0


def build(max_len: int):
    """The tiny PR2 model (predict phase), its controller and route path."""
    from pr2_megatron.models import MoEModelConfig
    from pr2_megatron.routes import RoutePath
    from pr2_megatron.routing import RoutingController
    from pr2_megatron.runtime.parallel import ParallelConfig, initialize_parallel
    from pr2_megatron.testing.distributed import init_single_process_group
    from pr2_megatron.testing.moe import TinySetup, build, randomize_predictors

    init_single_process_group()
    initialize_parallel(ParallelConfig(), seed=1234)
    config = MoEModelConfig(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        num_experts=8,
        topk=2,
        expert_ffn_hidden_size=64,
        vocab_size=64,
        max_sequence_length=max_len,
    )
    model = build(TinySetup(model=config))
    randomize_predictors(model, scale=1.0, seed=3)
    controller = RoutingController(model)
    return model, controller, RoutePath(controller)


def problems(lengths: list[int], seed: int = 0):
    from pr2_megatron.rl.tasks import Problem

    generator = torch.Generator().manual_seed(seed)
    return [
        Problem(tuple(torch.randint(3, 64, (n,), generator=generator).tolist()), ())
        for n in lengths
    ]


def run(model, controller, path, prompts, cached, seq_len, new, dtype="fp32", eos=-1):
    """One rollout micro-batch; returns (seconds, RolloutMicroBatch, route bytes held)."""
    from pr2_megatron.rl.generation import generate_cached
    from pr2_megatron.rl.rollout import generate_full_forward

    controller.predict()
    sampler = generate_cached if cached else generate_full_forward
    start = time.perf_counter()
    out = sampler(
        model,
        prompts,
        seq_len=seq_len,
        max_new_tokens=new,
        temperature=1.0,
        top_p=1.0,
        generator=torch.Generator().manual_seed(7),
        eos_id=eos,
        pad_id=PAD,
        path=path,
        dtype=dtype,
    )
    seconds = time.perf_counter() - start
    records = sum(
        t.numel() * t.element_size()
        for r in controller.routers
        for t in (*r.recorded, *r.recorded_plain)
    )
    micro = sum(t.numel() * t.element_size() for t in (out.routes_SBLK, out.plain_routes_SBLK))
    return seconds, out, records, micro


class TimedModel(torch.nn.Module):
    """The model, with the wall time of every forward recorded (the samplers see the model)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.module = model
        self.seconds: list[float] = []

    def forward(self, *args, **kwargs):
        """The model's forward, timed."""
        start = time.perf_counter()
        out = self.module(*args, **kwargs)
        self.seconds.append(time.perf_counter() - start)
        return out


def decode_cost_rows(cfg, model, controller, path) -> list[dict]:
    """Seconds per forward, timed forward by forward: decoding steps vs full-buffer steps."""
    rows = []
    batch, new = cfg["batch"], cfg["new"]
    timed = TimedModel(model)
    for seq_len in cfg["lengths"]:
        cached, full = [], []
        for _ in range(cfg["repeats"]):
            timed.seconds = []
            prompts = problems([seq_len - new - 1] * batch)
            run(timed, controller, path, prompts, True, seq_len, new + 1)
            cached += timed.seconds[1:]  # the decoding forwards (not the prefill)
            if seq_len <= cfg["full_max"]:
                steps = new if seq_len <= 512 else 2
                timed.seconds = []
                prompts = problems([seq_len - steps - 1] * batch)
                run(timed, controller, path, prompts, False, seq_len, steps)
                full += timed.seconds
        row = {
            "S": seq_len,
            "cached_ms_per_token": 1e3 * min(cached) / batch,
            "cached_ms_per_token_median": 1e3 * median(cached) / batch,
        }
        if full:
            row["full_ms_per_token"] = 1e3 * min(full) / batch
            row["full_ms_per_token_median"] = 1e3 * median(full) / batch
            row["full/cached"] = min(full) / min(cached)
        rows.append(row)
        print(f"  S={seq_len}: {row}", flush=True)
    first = rows[0]
    for row in rows:
        for kind in ("cached", "full"):
            if f"{kind}_ms_per_token" in row:
                row[f"{kind}_growth_vs_{first['S']}"] = (
                    row[f"{kind}_ms_per_token"] / first[f"{kind}_ms_per_token"]
                )
                row[f"{kind}_growth_vs_{first['S']}_median"] = (
                    row[f"{kind}_ms_per_token_median"] / first[f"{kind}_ms_per_token_median"]
                )
    return rows


def throughput_rows(cfg, model, controller, path) -> list[dict]:
    rows = []
    batch = cfg["batch"]
    for seq_len in [s for s in cfg["lengths"] if s <= min(512, cfg["full_max"])]:
        short, long = seq_len // 8, seq_len // 4
        lengths = [short + (long - short) * b // max(1, batch - 1) for b in range(batch)]
        new = seq_len - long + 1
        prompts = problems(lengths, seed=1)
        full_s, full_out, full_records, full_micro = run(
            model, controller, path, prompts, False, seq_len, new
        )
        cached_s, cached_out, records, micro = run(
            model, controller, path, prompts, True, seq_len, new
        )
        generated = int((cached_out.total_lens - cached_out.prompt_lens).sum())
        same = torch.equal(full_out.tokens, cached_out.tokens)
        rows.append(
            {
                "S": seq_len,
                "prompts": f"{short}..{long}",
                "new_tokens": new,
                "full_tokens_per_s": generated / full_s,
                "cached_tokens_per_s": generated / cached_s,
                "speedup": full_s / cached_s,
                "same_tokens": same,
                "full_route_bytes_per_token": (full_records + full_micro) / generated,
                "cached_route_bytes_per_token": (records + micro) / generated,
                "full_records_bytes_per_token": full_records / generated,
                "cached_records_bytes_per_token": records / generated,
                "cached_micro_batch_bytes_per_token": micro / generated,
                "int64_micro_batch_bytes_per_token": 8 * micro / generated,
            }
        )
        print(f"  S={seq_len}: {rows[-1]}", flush=True)
    return rows


def bf16_rows(cfg, model, controller, path) -> list[dict]:
    rows = []
    for seq_len in cfg["lengths"][:2]:
        lengths = [seq_len // 8 + b for b in range(cfg["batch"])]
        prompts = problems(lengths, seed=2)
        new = seq_len // 2
        _, full, _, _ = run(model, controller, path, prompts, False, seq_len, new, dtype="bf16")
        _, cached, _, _ = run(model, controller, path, prompts, True, seq_len, new, dtype="bf16")
        generated = same = 0
        first_diff, logprob_diff = [], 0.0
        for b in range(full.tokens.shape[0]):
            p, n = int(full.prompt_lens[b]), int(min(full.total_lens[b], cached.total_lens[b]))
            equal = full.tokens[b, p:n] == cached.tokens[b, p:n]
            generated, same = generated + (n - p), same + int(equal.sum())
            diff = torch.nonzero(~equal)
            prefix = int(diff[0]) if diff.numel() else n - p
            first_diff.append(prefix)
            if prefix:  # log-probs of the tokens sampled before the first difference
                delta = (
                    full.logprobs[b, p - 1 : p - 1 + prefix]
                    - cached.logprobs[b, p - 1 : p - 1 + prefix]
                )
                logprob_diff = max(logprob_diff, float(delta.abs().max()))
        rows.append(
            {
                "S": seq_len,
                "new_tokens": new,
                "identical_tokens": same / generated,
                "mean_tokens_before_first_difference": sum(first_diff) / len(first_diff),
                "max_logprob_diff_before_first_difference": logprob_diff,
            }
        )
        print(f"  bf16 S={seq_len}: {rows[-1]}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cfg = QUICK if args.quick else FULL
    set_threads(1)
    model, controller, path = build(max(cfg["lengths"]))
    print("1. decode cost per token", flush=True)
    decode = decode_cost_rows(cfg, model, controller, path)
    print("2.-3. tokens/s and route memory", flush=True)
    throughput = throughput_rows(cfg, model, controller, path)
    print("4. bf16", flush=True)
    bf16 = bf16_rows(cfg, model, controller, path)

    base = decode[0]["S"]
    headers1 = [
        "S",
        "cached ms/token (min)",
        f"growth vs {base}",
        "(median)",
        "full ms/token (min)",
        f"growth vs {base}",
        "full/cached",
    ]
    rows1 = [
        [
            r["S"],
            r["cached_ms_per_token"],
            r[f"cached_growth_vs_{base}"],
            r[f"cached_growth_vs_{base}_median"],
            r.get("full_ms_per_token", "-"),
            r.get(f"full_growth_vs_{base}", "-"),
            r.get("full/cached", "-"),
        ]
        for r in decode
    ]
    headers2 = ["S", "prompts", "new", "full tok/s", "cached tok/s", "speedup", "same tokens"]
    rows2 = [
        [
            r["S"],
            r["prompts"],
            r["new_tokens"],
            r["full_tokens_per_s"],
            r["cached_tokens_per_s"],
            r["speedup"],
            r["same_tokens"],
        ]
        for r in throughput
    ]
    headers3 = [
        "S",
        "full: B/token",
        "cached: B/token",
        "cached records",
        "cached [S,B,L,K] uint8",
        "same in int64",
    ]
    rows3 = [
        [
            r["S"],
            r["full_route_bytes_per_token"],
            r["cached_route_bytes_per_token"],
            r["cached_records_bytes_per_token"],
            r["cached_micro_batch_bytes_per_token"],
            r["int64_micro_batch_bytes_per_token"],
        ]
        for r in throughput
    ]
    headers4 = [
        "S",
        "new",
        "identical tokens",
        "tokens before 1st difference",
        "max |Δ logp| before",
    ]
    rows4 = [
        [
            r["S"],
            r["new_tokens"],
            r["identical_tokens"],
            r["mean_tokens_before_first_difference"],
            r["max_logprob_diff_before_first_difference"],
        ]
        for r in bf16
    ]
    for title, headers, rows in (
        ("Decode cost per generated token (fp32, B sequences)", headers1, rows1),
        ("Whole micro-batch, fp32", headers2, rows2),
        ("Route memory per generated token, bytes", headers3, rows3),
        ("bf16 rollout: full-forward vs cached samples", headers4, rows4),
    ):
        print(f"\n{title}\n{table(headers, rows)}")
    write_json(
        args.out or default_out("bench_generation", args.quick),
        {
            "config": cfg,
            "decode_cost": decode,
            "throughput_and_memory": throughput,
            "bf16": bf16,
            "markdown": {
                "decode_cost": markdown_table(headers1, rows1),
                "throughput": markdown_table(headers2, rows2),
                "route_memory": markdown_table(headers3, rows3),
                "bf16": markdown_table(headers4, rows4),
            },
        },
    )


if __name__ == "__main__":
    main()
