"""Cost of the PR2 router inside one Megatron MoE layer, against the stock router.

One ``MoELayer`` built through the project's spec (local spec, alltoall dispatcher, one
process, fp32, CPU) with four routers on identical weights and inputs:

* ``stock``: Megatron's ``TopKRouter`` (live top-k);
* ``megatron replay``: ``TopKRouter`` with Megatron's own ``RouterReplay`` (REPLAY_FORWARD
  in training, RECORD at rollout);
* ``pr2 replay``: ``PR2Router`` replaying a target (plus variants with routing metrics and
  with the predictor loss, i.e. a training mini-step i >= 2);
* ``pr2 predict``: ``PR2Router`` rollout (predicted route, live route recorded, features cached),
  with an empty feature cache and with the cache already holding the earlier forwards of the
  rollout pass (``--held-forwards``), also with the previous cache implementation (every add
  merged and re-selected the whole cache; kept in ``feature_cache.py``) for a before/after.

Training variants time forward + backward (input and weight gradients); rollout variants time a
no-grad forward in eval mode. The predict phase is a rollout phase, so it is timed without grad.
The variants run interleaved (one call each per repeat, rotated order) and the table reports
medians and the median of the per-repeat ratios against ``stock`` measured in the same repeat.

The predictor-loss step is also timed in isolation (router forward + backward with and without
``train_predictor``, interleaved, many repeats): its extra cost divided by the MoE layer's
training forward + backward is the fraction of a training mini-step it costs (an upper bound:
a real mini-step also runs attention, the other layers and the optimizer).

Run: ``python benchmarks/router_cost.py [--quick]`` (tables + ``outputs/bench_router_cost.json``;
with ``--quick`` ``outputs/bench_router_cost_quick.json``).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # Megatron compiles the expert-bias update

import torch
from _bench import (
    default_out,
    interleaved,
    markdown_table,
    median,
    min_ratio,
    moe_transformer_config,
    paired_ratio,
    print_table,
    router_fwd_bwd,
    set_threads,
    single_process_megatron,
    table,
    write_result,
)

FULL = dict(hidden=1024, experts=64, topk=8, ffn=512, seq=1024, batch=4, repeats=7)
QUICK = dict(hidden=256, experts=16, topk=4, ffn=256, seq=256, batch=4, repeats=5)


def build_layer(
    kind: str,
    hidden: int,
    experts: int,
    topk: int,
    ffn: int,
    cache_tokens: int,
    cache_total: int | None = None,
):
    """One Megatron ``MoELayer`` (local spec, alltoall) with the router of ``kind``.

    ``cache_total``: the PR2 feature cache's total cap (``feature_cache_max_total_tokens``).
    """
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.moe.router_replay import RouterReplay
    from megatron.core.transformer.spec_utils import build_module

    from pr2_megatron.routing.router import PR2RouterConfig, pr2_router_builder
    from pr2_megatron.routing.specs import pr2_decoder_block_spec

    config = moe_transformer_config(hidden, experts, topk, ffn)
    if kind == "megatron_replay":
        RouterReplay.clear_global_router_replay_instances()
        config.moe_enable_routing_replay = True
    if kind == "pr2":
        pr2_config = PR2RouterConfig(
            feature_cache_tokens=cache_tokens, feature_cache_max_total_tokens=cache_total
        )
        builder = pr2_router_builder(pr2_config)
    else:
        builder = TopKRouter
    spec = pr2_decoder_block_spec(config, router_builder=builder)
    layer = build_module(spec.layer_specs[0].submodules.mlp, config=config)
    layer.set_layer_number(1)
    return layer


def run(args) -> dict:
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    from pr2_megatron.routing.router import RoutingPhase

    sizes = dict(QUICK if args.quick else FULL)
    for key in ("hidden", "experts", "topk", "ffn", "seq", "batch", "repeats"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    hidden, experts, topk, ffn = sizes["hidden"], sizes["experts"], sizes["topk"], sizes["ffn"]
    seq, batch, repeats = sizes["seq"], sizes["batch"], sizes["repeats"]
    tokens = seq * batch
    cache_tokens = args.cache_tokens or seq
    single_process_megatron()
    print(
        f"MoE layer: hidden {hidden}, {experts} experts, top-{topk}, expert FFN {ffn}, "
        f"{tokens} tokens ({batch} x {seq}), T_c {cache_tokens}, fp32, "
        f"{torch.get_num_threads()} threads, {repeats} repeats"
    )

    stock = build_layer("stock", hidden, experts, topk, ffn, cache_tokens)
    mreplay = build_layer("megatron_replay", hidden, experts, topk, ffn, cache_tokens)
    pr2 = build_layer("pr2", hidden, experts, topk, ffn, cache_tokens)
    state = stock.state_dict()
    for layer in (mreplay, pr2):
        missing, unexpected = layer.load_state_dict(state, strict=False)
        assert not unexpected and all("predictor" in k for k in missing), (missing, unexpected)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight = pr2.router.predictor.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * 1e-2 / hidden**0.5)
    x = torch.randn(seq, batch, hidden, generator=generator)
    grad_out = torch.randn(seq, batch, hidden, generator=generator)
    router = pr2.router

    # The rollout: predicted routes (targets of every replay variant) and the feature cache.
    pr2.eval()
    router.set_phase(RoutingPhase.PREDICT)
    with torch.no_grad():
        pr2(x)
    target = router.recorded[0].clone()
    for layer in (stock, mreplay, pr2):
        layer.train()

    x_train = x.clone().requires_grad_(True)

    def train_step(layer):
        layer.zero_grad(set_to_none=True)
        x_train.grad = None
        out, _ = layer(x_train)
        out.backward(grad_out)

    def stock_train():
        train_step(stock)

    def megatron_replay_train():
        replay = mreplay.router.router_replay
        replay.clear_indices()
        replay.set_target_indices(target)
        replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        train_step(mreplay)

    def pr2_replay(train_predictor=False, collect_metrics=False):
        def step():
            router.set_phase(
                RoutingPhase.REPLAY,
                train_predictor=train_predictor,
                collect_metrics=collect_metrics,
            )
            router.push_target(target)
            train_step(pr2)

        return step

    train = (
        {}
        if args.rollout_only
        else {
            "stock": stock_train,
            "megatron replay": megatron_replay_train,
            "pr2 replay": pr2_replay(),
            "pr2 replay + metrics": pr2_replay(collect_metrics=True),
            "pr2 replay + predictor loss": pr2_replay(train_predictor=True),
        }
    )
    train_samples = {}
    if train:
        print("\ntraining forward + backward ...", flush=True)
        train_samples = interleaved(train, repeats)

    # Rollout: no grad, eval mode.
    for layer in (stock, mreplay, pr2):
        layer.eval()
    held = args.held_forwards

    def rollout(layer):
        with torch.no_grad():
            layer(x)

    def megatron_record():
        replay = mreplay.router.router_replay
        replay.clear_indices()
        replay.set_router_replay_action(RouterReplayAction.RECORD)
        rollout(mreplay)

    def pr2_phase(phase):
        def step():
            router.set_phase(phase)
            rollout(pr2)

        return step

    earlier = [
        (
            torch.randn(tokens, hidden, generator=generator),
            torch.randn(tokens, experts, generator=generator),
        )
        for _ in range(min(held, 2))
    ]

    def prefill_cache(layer):
        # The earlier forwards of the same rollout pass: other responses (keys from 2^40 and
        # response ids from 2^20, so they never collide with the timed forward's running
        # positions; negative keys would be skipped by the cache and leave it empty).
        def setup():
            layer.router.set_phase(RoutingPhase.PREDICT)
            for f in range(held):
                keys = (1 << 40) + torch.arange(f * tokens, (f + 1) * tokens)
                groups = (1 << 20) + (torch.arange(batch) + f * batch).repeat(seq)
                layer.router.feature_cache.add(keys, groups, *earlier[f % len(earlier)])

        return setup

    roll = {
        "stock": lambda: rollout(stock),
        "megatron record": megatron_record,
        "pr2 record": pr2_phase(RoutingPhase.RECORD),
        "pr2 predict": pr2_phase(RoutingPhase.PREDICT),
    }
    setups = {}
    if held:
        late = f"pr2 predict, cache holds {held} fwd"
        roll[late] = lambda: rollout(pr2)
        setups[late] = prefill_cache(pr2)
        if args.previous_cache:
            # The same layer with the previous cache implementation (merge-all on every add).
            from feature_cache import MergeAllCache

            pr2_prev = build_layer("pr2", hidden, experts, topk, ffn, cache_tokens)
            pr2_prev.load_state_dict(pr2.state_dict())
            pr2_prev.router.feature_cache = MergeAllCache(cache_tokens, seed=0)
            pr2_prev.eval()
            roll[late + " (previous cache)"] = lambda: rollout(pr2_prev)
            setups[late + " (previous cache)"] = prefill_cache(pr2_prev)
        if args.cache_total:
            # The same layer with a total cap on the cache: late in the pass, most tokens fall
            # above the total threshold and are never copied.
            capped = build_layer("pr2", hidden, experts, topk, ffn, cache_tokens, args.cache_total)
            capped.load_state_dict(pr2.state_dict())
            capped.eval()
            name = f"{late}, total cap {args.cache_total}"
            roll[name] = lambda: rollout(capped)
            setups[name] = prefill_cache(capped)
    print("rollout forward (no grad) ...", flush=True)
    roll_samples = interleaved(roll, repeats, setups=setups)
    if args.rollout_only:
        return {
            "sizes": {**sizes, "tokens": tokens, "cache_tokens": cache_tokens, "held": held},
            "cache_total": args.cache_total,
            "train": [],
            "rollout": _rows(roll_samples, "stock"),
        }

    # The predictor-loss step alone: router forward + backward with / without it.
    pr2.train()
    x_router = x.clone().requires_grad_(True)
    router.set_phase(RoutingPhase.PREDICT)
    with torch.no_grad():
        router(x)

    def router_step(train_predictor):
        def step():
            router.set_phase(RoutingPhase.REPLAY, train_predictor=train_predictor)
            router.push_target(target)
            router_fwd_bwd(router, x_router)

        return step

    print("predictor-loss step in isolation ...", flush=True)
    iso = interleaved(
        {"router": router_step(False), "router + predictor loss": router_step(True)},
        repeats * 4,
    )
    with_loss, without = iso["router + predictor loss"], iso["router"]
    loss_cost = median([a - b for a, b in zip(with_loss, without)])
    loss_cost_min = min(with_loss) - min(without)
    layer_step = median(train_samples["pr2 replay"])
    layer_step_min = min(train_samples["pr2 replay"])
    return {
        "sizes": {**sizes, "tokens": tokens, "cache_tokens": cache_tokens, "held": held},
        "train": _rows(train_samples, "stock"),
        "rollout": _rows(roll_samples, "stock"),
        "predictor_loss": {
            "router_ms": median(without) * 1e3,
            "router_with_loss_ms": median(with_loss) * 1e3,
            "loss_step_ms": loss_cost * 1e3,
            "loss_step_min_ms": loss_cost_min * 1e3,
            "moe_layer_train_ms": layer_step * 1e3,
            "moe_layer_train_min_ms": layer_step_min * 1e3,
            "fraction_of_moe_layer_step": loss_cost / layer_step,
            "fraction_of_moe_layer_step_min": loss_cost_min / layer_step_min,
            "paired_layer_ratio": paired_ratio(
                train_samples, "pr2 replay + predictor loss", "pr2 replay"
            ),
        },
    }


def _rows(samples: dict[str, list[float]], base: str) -> list[dict]:
    return [
        {
            "variant": name,
            "median_ms": median(times) * 1e3,
            "min_ms": min(times) * 1e3,
            "ratio_vs_stock": paired_ratio(samples, name, base),
            "min_ratio_vs_stock": min_ratio(samples, name, base),
        }
        for name, times in samples.items()
    ]


def report(result: dict) -> str:
    """The tables of ``result`` as Markdown (also printed as text)."""
    out = []
    for key, title in (
        ("train", "Training forward + backward of one MoE layer"),
        ("rollout", "Rollout forward (no grad) of one MoE layer"),
    ):
        if not result[key]:
            continue
        headers = ["variant", "median ms", "min ms", "x stock (paired median)", "x stock (min)"]
        rows = [
            [
                r["variant"],
                r["median_ms"],
                r["min_ms"],
                r["ratio_vs_stock"],
                r["min_ratio_vs_stock"],
            ]
            for r in result[key]
        ]
        out.append(print_table(title, headers, rows))
    if "predictor_loss" not in result:
        return "\n\n".join(out)
    p = result["predictor_loss"]
    headers = ["", "router ms", "router + loss ms", "loss step ms", "MoE layer step ms"]
    headers += ["fraction"]
    rows = [
        [
            "median",
            p["router_ms"],
            p["router_with_loss_ms"],
            p["loss_step_ms"],
            p["moe_layer_train_ms"],
            f"{100 * p['fraction_of_moe_layer_step']:.2f} %",
        ],
        [
            "min",
            "",
            "",
            p["loss_step_min_ms"],
            p["moe_layer_train_min_ms"],
            f"{100 * p['fraction_of_moe_layer_step_min']:.2f} %",
        ],
    ]
    print(
        "\nPredictor-loss step (router fwd+bwd with/without it, isolated)\n" + table(headers, rows)
    )
    print(
        f"paired MoE-layer ratio, replay + predictor loss / replay: {p['paired_layer_ratio']:.3f}"
    )
    out.append("**Predictor-loss step**\n\n" + markdown_table(headers, rows))
    return "\n\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, well under a minute")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--experts", type=int)
    parser.add_argument("--topk", type=int)
    parser.add_argument("--ffn", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--cache-tokens", type=int, help="T_c per response (default: seq)")
    parser.add_argument(
        "--held-forwards",
        type=int,
        default=15,
        help="forwards already in the feature cache for the late predict variant (0: skip)",
    )
    parser.add_argument(
        "--no-previous-cache",
        dest="previous_cache",
        action="store_false",
        help="skip the late predict variant with the previous feature cache implementation",
    )
    parser.add_argument(
        "--cache-total",
        type=int,
        default=None,
        help="also time the late predict variant with this total cap on the feature cache",
    )
    parser.add_argument(
        "--rollout-only",
        action="store_true",
        help="time the rollout forward only (skip training variants and the predictor loss)",
    )
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads")
    parser.add_argument("--out", help="JSON path (default: outputs/bench_router_cost.json)")
    args = parser.parse_args()
    args.out = args.out or default_out("bench_router_cost", args.quick)
    set_threads(args.threads)
    write_result(args.out, run(args), report)


if __name__ == "__main__":
    main()
