"""PR2 feature cache: memory against T_c and model size, cost of filling it, effect on accuracy.

Prints three tables and writes JSON (``--out``; default ``outputs/bench_feature_cache.json``,
with ``--quick`` ``outputs/bench_feature_cache_quick.json``):

1. Memory. Each cached token holds the router input ``h`` (bf16, 2H bytes) and the router
   logits ``z`` (fp32, 4E bytes). Bytes per response per MoE layer are measured with
   ``FeatureCache.nbytes`` on a cache offered one response longer than T_c (so the cap is
   exercised), at the tiny test size and at real sizes (OLMoE and Qwen3-30B-A3B: H=2048;
   DeepSeek-V3: H=7168); per response for all MoE layers and per rank for
   ``--responses-per-rank`` responses are that number times the layers (and responses).
2. Cost of ``FeatureCache.add`` over a rollout pass: the current cache (O(new tokens) per add)
   against the previous implementation (kept here as ``MergeAllCache``: every add concatenated
   and re-selected the whole cache), interleaved, for a pass of full-sequence forwards and for
   token-by-token decoding (one token per response per forward).
   With a total cap (``feature_cache_max_total_tokens``): the tokens a rank's cache holds per
   layer for 64 responses at T_c = 2048 (Qwen3-30B-A3B bytes per token), and the cost of a
   prefill pass into an uncapped and a capped cache, interleaved.
3. Accuracy on a toy drift task (as ``tests/test_predictor.py``): a tiny GPT-MoE whose routers
   follow a fixed objective for N mini-steps per rollout; the predictor learns from at most T_c
   cached tokens per response. Reported: overlap of the predicted route with the live route
   after the mini-steps (the future route), against the old route's (plain replay), averaged
   over the late rollouts and over seeds.

Run: ``python benchmarks/feature_cache.py [--quick]``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # Megatron compiles the expert-bias update

import torch
from _bench import default_out, interleaved, median, print_table, set_threads, write_json

from pr2_megatron.routing.feature_cache import FeatureCache, _smallest_per_group

MODELS = {
    # name: (hidden H, experts E, MoE layers)
    "tiny (tests)": (64, 4, 2),
    "OLMoE-1B-7B": (2048, 64, 16),
    "Qwen3-30B-A3B": (2048, 128, 48),
    "DeepSeek-V3": (7168, 256, 58),
}


# ------------------------------------------------------------------------------ 1. memory
def memory_rows(tc_list: list[int], responses_per_rank: int) -> list[dict]:
    rows = []
    for name, (hidden, experts, layers) in MODELS.items():
        for tc in tc_list:
            cache = FeatureCache(tc, seed=0)
            tokens = tc + tc // 2  # one response longer than T_c
            cache.add(
                torch.arange(tokens),
                torch.zeros(tokens, dtype=torch.long),
                torch.zeros(tokens, hidden),
                torch.zeros(tokens, experts),
            )
            per_layer = cache.nbytes()
            assert len(cache) == tc and per_layer == tc * (2 * hidden + 4 * experts)
            rows.append(
                {
                    "model": name,
                    "H": hidden,
                    "E": experts,
                    "moe_layers": layers,
                    "T_c": tc,
                    "bytes_per_token": per_layer // tc,
                    "MiB_per_response_layer": per_layer / 2**20,
                    "MiB_per_response": per_layer * layers / 2**20,
                    "GiB_per_rank": per_layer * layers * responses_per_rank / 2**30,
                }
            )
    return rows


# ---------------------------------------------------------------------------- 2. add cost
class MergeAllCache:
    """The previous ``FeatureCache.add``: concatenate everything held, re-select, every add."""

    def __init__(self, max_tokens_per_group: int, seed: int) -> None:
        self.max_tokens_per_group = max_tokens_per_group
        self._generator = torch.Generator().manual_seed(seed)
        self.clear()

    def clear(self) -> None:
        """Drop everything."""
        self._state = None

    def add(self, keys_T, groups_T, hidden_TH, logits_TE) -> None:
        """Merge the new tokens into everything held and select again."""
        priority_T = torch.rand(keys_T.numel(), generator=self._generator)
        hidden_TH = hidden_TH.detach().to("cpu", torch.bfloat16)
        logits_TE = logits_TE.detach().to("cpu", torch.float32)
        if self._state is not None:
            keys, groups, priority, hidden, logits = self._state
            keys_T = torch.cat([keys, keys_T])
            groups_T = torch.cat([groups, groups_T])
            priority_T = torch.cat([priority, priority_T])
            hidden_TH = torch.cat([hidden, hidden_TH])
            logits_TE = torch.cat([logits, logits_TE])
        keep = _smallest_per_group(groups_T, priority_T, self.max_tokens_per_group)
        self._state = (
            keys_T[keep],
            groups_T[keep],
            priority_T[keep],
            hidden_TH[keep],
            logits_TE[keep],
        )

    def features(self):
        """Keys, router inputs and logits sorted by key."""
        keys = self._state[0]
        order = torch.argsort(keys)
        return keys[order], self._state[3][order], self._state[4][order]


def add_cost_rows(args) -> list[dict]:
    hidden, experts, batch, seq = args.hidden, args.experts, args.batch, args.seq
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(batch * seq, hidden, generator=generator)
    z = torch.randn(batch * seq, experts, generator=generator)
    rows = []

    # (a) a rollout pass of full-sequence forwards, B new responses each (the trainer's case).
    def prefill_pass(cls, forwards, tc):
        def run():
            cache = cls(tc, seed=0)
            for f in range(forwards):
                keys = torch.arange(batch * seq) + f * batch * seq
                groups = (torch.arange(batch) + f * batch).repeat(seq)
                cache.add(keys, groups, h, z)
            cache.features()

        return run

    # (b) decoding: a prompt forward, then one token per response per forward (KV-cache style).
    def decode_pass(cls, steps, tc):
        prompt = seq // 4

        def run():
            cache = cls(tc, seed=0)
            cache.add(
                torch.arange(batch * prompt),
                torch.arange(batch).repeat(prompt),
                h[: batch * prompt],
                z[: batch * prompt],
            )
            for step in range(steps):
                keys = batch * prompt + step * batch + torch.arange(batch)
                cache.add(keys, torch.arange(batch), h[:batch], z[:batch])
            cache.features()

        return run

    for forwards in args.forwards:
        for tc in (seq, seq // 4):
            samples = interleaved(
                {
                    "previous": prefill_pass(MergeAllCache, forwards, tc),
                    "current": prefill_pass(FeatureCache, forwards, tc),
                },
                args.repeats,
            )
            rows.append(_cost_row("prefill", forwards, tc, batch * seq, samples))
    for steps in args.decode_steps:
        tc = seq // 4
        samples = interleaved(
            {
                "previous": decode_pass(MergeAllCache, steps, tc),
                "current": decode_pass(FeatureCache, steps, tc),
            },
            args.repeats,
        )
        rows.append(_cost_row("decode", steps, tc, batch, samples))
    return rows


def _cost_row(kind, forwards, tc, tokens_per_forward, samples) -> dict:
    previous, current = median(samples["previous"]), median(samples["current"])
    return {
        "pass": kind,
        "forwards": forwards,
        "tokens_per_forward": tokens_per_forward,
        "T_c": tc,
        "previous_ms": previous * 1e3,
        "current_ms": current * 1e3,
        "speedup": median([p / c for p, c in zip(samples["previous"], samples["current"])]),
        "speedup_min": min(samples["previous"]) / min(samples["current"]),
        "current_us_per_token": current * 1e6 / (forwards * tokens_per_forward),
    }


# ------------------------------------------------------------------------- 2b. total cap
def cap_memory_rows(caps: list[int], responses: int, tc: int) -> list[dict]:
    """Tokens and bytes a rank's cache holds per layer with a total cap (Qwen3-30B-A3B sizes).

    ``responses`` responses longer than T_c are offered (8 forwards); the tokens held are
    measured (``len``) on a cache with H = 8, E = 4, and the bytes are those tokens times the
    bytes of a cached token at the model's size (2H + 4E, measured in table 1).
    """
    hidden, experts, layers = MODELS["Qwen3-30B-A3B"]
    per_token = 2 * hidden + 4 * experts
    length = tc + tc // 2
    rows = []
    for cap in [None, *caps]:
        cache = FeatureCache(tc, seed=0, max_total_tokens=cap)
        per_forward = responses // 8
        for f in range(8):
            groups = (torch.arange(per_forward) + f * per_forward).repeat(length)
            keys = groups * length + torch.arange(length).repeat_interleave(per_forward)
            cache.add(keys, groups, torch.zeros(keys.numel(), 8), torch.zeros(keys.numel(), 4))
        held = len(cache)
        assert held == (responses * tc if cap is None else min(cap, responses * tc))
        rows.append(
            {
                "model": "Qwen3-30B-A3B",
                "responses_per_rank": responses,
                "T_c": tc,
                "cap": cap,
                "tokens_per_layer": held,
                "MiB_per_layer": held * per_token / 2**20,
                "GiB_per_rank": held * per_token * layers / 2**30,
            }
        )
    return rows


def cap_cost_rows(args) -> list[dict]:
    """A prefill pass (16 forwards of 4 new responses) into an uncapped and a capped cache."""
    hidden, experts, batch, seq = args.hidden, args.experts, args.batch, args.seq
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(batch * seq, hidden, generator=generator)
    z = torch.randn(batch * seq, experts, generator=generator)
    forwards = 16
    held = {}

    def prefill(cap):
        def run():
            cache = FeatureCache(seq, seed=0, max_total_tokens=cap)
            for f in range(forwards):
                keys = torch.arange(batch * seq) + f * batch * seq
                groups = (torch.arange(batch) + f * batch).repeat(seq)
                cache.add(keys, groups, h, z)
            cache.features()
            held[cap] = cache.nbytes()

        return run

    caps = [None, *args.fill_caps]
    samples = interleaved({str(cap): prefill(cap) for cap in caps}, args.repeats)
    rows = []
    for cap in caps:
        times = samples[str(cap)]
        rows.append(
            {
                "forwards": forwards,
                "tokens_per_forward": batch * seq,
                "T_c": seq,
                "cap": cap,
                "median_ms": median(times) * 1e3,
                "min_ms": min(times) * 1e3,
                "x_uncapped": median([t / u for t, u in zip(times, samples["None"])]),
                "held_MiB": held[cap] / 2**20,
            }
        )
    return rows


# ---------------------------------------------------------------------------- 3. accuracy
def drift_overlap(
    tc: int, seed: int, seq: int, rollouts: int, mini_steps: int, cap: int | None = None
) -> dict:
    """Late overlap with the future live route: PR2 (cache of T_c tokens) vs plain replay."""
    from pr2_megatron.metrics import topk_overlap
    from pr2_megatron.models.builder import MoEModelConfig
    from pr2_megatron.routing.controller import RoutingController
    from pr2_megatron.routing.router import PR2RouterConfig
    from pr2_megatron.testing.moe import TinySetup, build, token_batch

    topk = 2
    setup = TinySetup(
        model=MoEModelConfig(num_layers=2, num_experts=8, topk=topk, max_sequence_length=seq),
        pr2=PR2RouterConfig(feature_cache_tokens=tc, feature_cache_max_total_tokens=cap),
        seed=1234 + seed,
    )
    model = build(setup)
    ctl = RoutingController(model)
    for param in model.parameters():
        param.requires_grad_(False)
    generator = torch.Generator().manual_seed(5 + seed)
    drift = []
    for router in ctl.routers:
        router.weight.requires_grad_(True)
        router.predictor.weight.requires_grad_(True)
        drift.append(torch.randn(router.weight.shape, generator=generator))
    opt_router = torch.optim.SGD([r.weight for r in ctl.routers], lr=1e-3)
    opt_predictor = torch.optim.Adam(ctl.predictor_parameters(), lr=1e-3)
    ids, labels = token_batch(8, seq, 64, seed=seed)
    positions = torch.arange(seq).expand_as(ids)
    predicted_overlap, old_overlap = [], []
    for _rollout in range(rollouts):
        ctl.predict()
        with torch.no_grad():
            model(ids, positions, None)
        predicted, old = ctl.collect_routes()[0], ctl.collect_plain_routes()[0]
        for step in range(1, mini_steps + 1):
            ctl.replay(train_predictor=step >= 2)
            ctl.set_targets(predicted, old)
            opt_router.zero_grad()
            opt_predictor.zero_grad()
            policy = model(ids, positions, None, labels=labels).float().mean() * 0.0
            objective = sum((r.weight * d).sum() for r, d in zip(ctl.routers, drift))
            (policy + objective).backward()
            ctl.finish()
            opt_router.step()
            opt_predictor.step()
        ctl.record()
        with torch.no_grad():
            model(ids, positions, None)
        future = ctl.collect_routes()[0].reshape(-1, topk)
        predicted_overlap.append(topk_overlap(predicted.reshape(-1, topk), future).mean().item())
        old_overlap.append(topk_overlap(old.reshape(-1, topk), future).mean().item())
    late = max(1, rollouts // 2)
    return {
        "predicted": sum(predicted_overlap[-late:]) / late,
        "old": sum(old_overlap[-late:]) / late,
    }


def accuracy_rows(args) -> list[dict]:
    from _bench import single_process_megatron

    single_process_megatron()
    rows = []
    responses = 8  # of drift_overlap's batch
    settings = [(tc, None) for tc in args.accuracy_tc] + list(args.accuracy_caps)
    for tc, cap in settings:
        runs = [
            drift_overlap(tc, seed, args.accuracy_seq, args.rollouts, args.mini_steps, cap)
            for seed in range(args.seeds)
        ]
        predicted = sum(r["predicted"] for r in runs) / len(runs)
        old = sum(r["old"] for r in runs) / len(runs)
        per_layer = min(tc, args.accuracy_seq) * responses
        if cap is not None:
            per_layer = min(per_layer, cap)
        rows.append(
            {
                "T_c": tc,
                "cap": cap,
                "seq": args.accuracy_seq,
                "cached_fraction": per_layer / (args.accuracy_seq * responses),
                "overlap_predicted": predicted,
                "overlap_old": old,
                "gain": predicted - old,
                "per_seed": runs,
            }
        )
    return rows


def report(memory, cost, cap_memory, cap_cost, accuracy) -> str:
    md = []
    headers = ["model", "H", "E", "MoE layers", "T_c", "B/token", "MiB/resp/layer"]
    headers += ["MiB/resp (all layers)", "GiB/rank"]
    rows = [
        [
            r["model"],
            r["H"],
            r["E"],
            r["moe_layers"],
            r["T_c"],
            r["bytes_per_token"],
            r["MiB_per_response_layer"],
            r["MiB_per_response"],
            r["GiB_per_rank"],
        ]
        for r in memory
    ]
    title = "Feature cache memory (bf16 h + fp32 z per cached token)"
    md.append(print_table(title, headers, rows, blank_line=False))
    headers = ["pass", "forwards", "tokens/fwd", "T_c", "previous ms", "current ms", "x faster"]
    headers += ["x faster (min)", "current us/token"]
    rows = [
        [
            r["pass"],
            r["forwards"],
            r["tokens_per_forward"],
            r["T_c"],
            r["previous_ms"],
            r["current_ms"],
            r["speedup"],
            r["speedup_min"],
            r["current_us_per_token"],
        ]
        for r in cost
    ]
    title = "Filling the cache over one rollout pass (add + final features())"
    md.append(print_table(title, headers, rows))
    headers = ["model", "responses/rank", "T_c", "total cap", "tokens/layer", "MiB/layer"]
    headers += ["GiB/rank"]
    rows = [
        [
            r["model"],
            r["responses_per_rank"],
            r["T_c"],
            "none" if r["cap"] is None else r["cap"],
            r["tokens_per_layer"],
            r["MiB_per_layer"],
            r["GiB_per_rank"],
        ]
        for r in cap_memory
    ]
    title = "Feature cache memory with a total cap (feature_cache_max_total_tokens)"
    md.append(print_table(title, headers, rows))
    headers = ["forwards", "tokens/fwd", "T_c", "total cap", "median ms", "min ms"]
    headers += ["x uncapped", "held MiB"]
    rows = [
        [
            r["forwards"],
            r["tokens_per_forward"],
            r["T_c"],
            "none" if r["cap"] is None else r["cap"],
            r["median_ms"],
            r["min_ms"],
            r["x_uncapped"],
            r["held_MiB"],
        ]
        for r in cap_cost
    ]
    title = "Filling the cache over a prefill pass, with a total cap (add + final features())"
    md.append(print_table(title, headers, rows))
    headers = ["T_c", "total cap", "cached share", "overlap pred", "overlap old (replay)"]
    headers += ["pred - old"]
    rows = [
        [
            r["T_c"],
            "none" if r["cap"] is None else r["cap"],
            r["cached_fraction"],
            r["overlap_predicted"],
            r["overlap_old"],
            r["gain"],
        ]
        for r in accuracy
    ]
    title = "Toy drift: late overlap with the future live route"
    md.append(print_table(title, headers, rows))
    return "\n\n".join(md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes, well under a minute")
    parser.add_argument("--responses-per-rank", type=int, default=64)
    parser.add_argument("--hidden", type=int, help="add cost: hidden size")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="add cost: responses per forward")
    parser.add_argument("--seq", type=int, default=1024, help="add cost: tokens per response")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads")
    parser.add_argument(
        "--out", help="JSON path (default outputs/bench_feature_cache[_quick].json)"
    )
    args = parser.parse_args()
    args.out = args.out or default_out("bench_feature_cache", args.quick)
    set_threads(args.threads)
    quick = args.quick
    args.hidden = args.hidden or (512 if quick else 1024)
    args.repeats = args.repeats or (3 if quick else 5)
    args.forwards = [4, 16] if quick else [4, 16, 32]
    args.decode_steps = [64] if quick else [256]
    args.accuracy_tc = [4, 64] if quick else [2, 8, 32, 64]
    # (T_c, total cap): the same tokens per layer as T_c 8 / 32, sampled over all responses.
    args.accuracy_caps = [(64, 64)] if quick else [(64, 64), (64, 256)]
    args.accuracy_seq = 64
    args.seeds = 1 if quick else 3
    args.rollouts = 6 if quick else 10
    args.mini_steps = 4
    tc_list = [256, 2048] if quick else [256, 1024, 2048, 4096]
    args.caps = [16384, 65536] if quick else [8192, 16384, 32768, 65536]
    args.fill_caps = [2048] if quick else [2048, 8192]

    memory = memory_rows(tc_list, args.responses_per_rank)
    print("filling the cache ...", flush=True)
    cost = add_cost_rows(args)
    print("total cap ...", flush=True)
    cap_memory = cap_memory_rows(args.caps, args.responses_per_rank, 2048)
    cap_cost = cap_cost_rows(args)
    print("toy drift task ...", flush=True)
    accuracy = accuracy_rows(args)
    markdown = report(memory, cost, cap_memory, cap_cost, accuracy)
    write_json(
        args.out,
        {
            "responses_per_rank": args.responses_per_rank,
            "memory": memory,
            "add_cost": cost,
            "cap_memory": cap_memory,
            "cap_cost": cap_cost,
            "accuracy": accuracy,
            "markdown": markdown,
        },
    )


if __name__ == "__main__":
    main()
