"""How PR2's costs grow with tokens, experts, hidden size and layers; projection to real models.

Measured (one process, CPU, fp32, one thread, interleaved variants). Router-level overheads are
differences of the least disturbed calls, ``min(PR2) - min(stock)`` (the paired medians are in
the JSON); MoE-layer times are minimums; whole-model ratios are medians of per-repeat ratios.

* **Router overhead** at the router alone (Megatron ``TopKRouter`` against ``PR2Router`` on the
  same weights and input), per axis: rollout forward (``pr2 predict`` minus stock, no grad,
  feature cache keeping every token: T_c >= tokens per response), training forward + backward
  (``pr2 replay`` minus stock) and the predictor-loss step (``replay + predictor loss`` minus
  ``replay``, every token cached). Axes: tokens T, experts E, hidden size H.
* **MoE layer** (stock, fwd+bwd and no-grad fwd) on the tokens axis, to put the overheads in
  proportion and to measure the expert GEMM cost per multiply-accumulate (MAC).
* **Layers**: a small GPT-MoE with L = 2, 4, 8 layers, whole-model ratios PR2 / stock (every MoE
  layer has its own router, so each overhead is per layer and the ratio should not move with L).

Computed from exact sizes (no timing): route-table bytes and feature-cache bytes per axis.
Route gather times per axis are in ``route_storage_and_gather.py`` (its JSON is read if present).

**Projection** (clearly a model, not a measurement): the overheads are fitted as
``a·T·H·E + b·T·E + c·T·H`` (GEMM, per-expert elementwise, per-hidden copy terms) and the MoE
layer as ``g·MACs``; both are evaluated at OLMoE, Qwen3-30B-A3B and DeepSeek-V3 sizes (SwiGLU
experts, shared expert where the model has one, 4096 tokens per micro-batch, T_c = all tokens).
Ratios on a GPU differ (GEMMs are relatively cheaper there than elementwise work); the GEMM-only
FLOP ratio of the predictor to the MoE layer is given beside it as a hardware-independent figure.

Run: ``python benchmarks/scaling.py [--quick]`` (tables + ``outputs/bench_scaling.json``; with
``--quick`` ``outputs/bench_scaling_quick.json``).
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # Megatron compiles the expert-bias update

import torch
from _bench import (
    default_out,
    interleaved,
    median,
    moe_transformer_config,
    print_table,
    router_fwd_bwd,
    set_threads,
    single_process_megatron,
    write_result,
)

from pr2_megatron.routes.table import route_dtype

# Real models: hidden, experts, top-k, expert FFN, shared-expert FFN, MoE layers.
REAL = {
    "OLMoE-1B-7B": dict(H=2048, E=64, k=8, F=1024, shared=0, L=16),
    "Qwen3-30B-A3B": dict(H=2048, E=128, k=8, F=768, shared=0, L=48),
    "DeepSeek-V3": dict(H=7168, E=256, k=8, F=2048, shared=2048, L=58),
}


def router_pair(hidden: int, experts: int, topk: int):
    """A stock ``TopKRouter`` and a ``PR2Router`` (T_c large) with the same gate weights."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    from pr2_megatron.routing.router import PR2Router, PR2RouterConfig

    config = moe_transformer_config(hidden, experts, topk)
    pg = get_default_pg_collection()
    stock = TopKRouter(config=config, pg_collection=pg)
    pr2 = PR2Router(config, pg, PR2RouterConfig(feature_cache_tokens=1 << 30))
    stock.set_layer_number(1)
    pr2.set_layer_number(1)
    with torch.no_grad():
        pr2.weight.copy_(stock.weight)
        generator = torch.Generator().manual_seed(0)
        pr2.predictor.weight.copy_(torch.randn(pr2.predictor.weight.shape, generator=generator))
        pr2.predictor.weight.mul_(1e-2 / hidden**0.5)
    return stock, pr2


def router_overheads(tokens: int, hidden: int, experts: int, topk: int, repeats: int) -> dict:
    """Median per-repeat overheads (seconds) of PR2 over the stock router at one size."""
    from pr2_megatron.routing.router import RoutingPhase

    stock, pr2 = router_pair(hidden, experts, topk)
    seq, batch = tokens // 4, 4
    x = torch.randn(seq, batch, hidden, generator=torch.Generator().manual_seed(1))
    x_grad = x.clone().requires_grad_(True)
    pr2.set_phase(RoutingPhase.PREDICT)
    with torch.no_grad():
        pr2(x)
    target = pr2.recorded[0].clone()

    def fwd(router, phase=None):
        def run():
            router.eval()
            if phase is not None:
                router.set_phase(phase)
            with torch.no_grad():
                router(x)

        return run

    def fwd_bwd(router, replay=False, train_predictor=False):
        def run():
            router.train()
            if replay:
                router.set_phase(RoutingPhase.REPLAY, train_predictor=train_predictor)
                router.push_target(target)
            router_fwd_bwd(router, x_grad)

        return run

    rollout = interleaved({"stock": fwd(stock), "predict": fwd(pr2, RoutingPhase.PREDICT)}, repeats)
    # The predictor-loss variant needs the cache of the rollout forward above.
    pr2.set_phase(RoutingPhase.PREDICT)
    with torch.no_grad():
        pr2(x)
    train = interleaved(
        {
            "stock": fwd_bwd(stock),
            "replay": fwd_bwd(pr2, replay=True),
            "replay+loss": fwd_bwd(pr2, replay=True, train_predictor=True),
        },
        repeats,
    )

    def diff(samples, a, b):
        """Least disturbed calls: min(a) - min(b) (and the paired median difference)."""
        paired = median([x - y for x, y in zip(samples[a], samples[b])])
        return (min(samples[a]) - min(samples[b])) * 1e3, paired * 1e3

    predict, predict_paired = diff(rollout, "predict", "stock")
    replay, replay_paired = diff(train, "replay", "stock")
    loss, loss_paired = diff(train, "replay+loss", "replay")
    return {
        "T": tokens,
        "H": hidden,
        "E": experts,
        "k": topk,
        "stock_fwd_ms": min(rollout["stock"]) * 1e3,
        "predict_extra_ms": predict,
        "stock_fwd_bwd_ms": min(train["stock"]) * 1e3,
        "replay_extra_ms": replay,
        "loss_step_ms": loss,
        "paired_median": {"predict": predict_paired, "replay": replay_paired, "loss": loss_paired},
    }


def moe_layer_times(tokens: int, hidden: int, experts: int, topk: int, ffn: int, repeats: int):
    """Stock MoE layer: training fwd+bwd and no-grad fwd (seconds, medians)."""
    from router_cost import build_layer

    layer = build_layer("stock", hidden, experts, topk, ffn, 1)
    seq, batch = tokens // 4, 4
    x = torch.randn(seq, batch, hidden, generator=torch.Generator().manual_seed(1))
    x.requires_grad_(True)
    grad = torch.randn_like(x)

    def train():
        layer.train()
        layer.zero_grad(set_to_none=True)
        x.grad = None
        out, _ = layer(x)
        out.backward(grad)

    def rollout():
        layer.eval()
        with torch.no_grad():
            layer(x)

    samples = interleaved({"train": train, "rollout": rollout}, repeats)
    samples = {name: [min(times)] for name, times in samples.items()}  # least disturbed call
    macs = tokens * topk * 2 * hidden * ffn  # fc1 + fc2 (gelu experts), forward
    return {
        "T": tokens,
        "H": hidden,
        "E": experts,
        "k": topk,
        "F": ffn,
        "train_ms": median(samples["train"]) * 1e3,
        "rollout_ms": median(samples["rollout"]) * 1e3,
        "expert_macs_fwd": macs,
    }


def layers_axis(layer_counts: list[int], repeats: int, hidden: int, seq: int) -> list[dict]:
    """Small GPT-MoE, whole model: PR2 predict / stock (rollout), PR2 replay / stock (train)."""
    return [_layers_point(layers, repeats, hidden, seq) for layers in layer_counts]


def _layers_point(layers: int, repeats: int, hidden: int, seq: int) -> dict:
    from pr2_megatron.models.builder import MoEModelConfig
    from pr2_megatron.routing.controller import RoutingController
    from pr2_megatron.testing.moe import (
        TinySetup,
        build,
        global_state_dict,
        load_full_state,
        token_batch,
    )

    setup = TinySetup(
        model=MoEModelConfig(
            num_layers=layers,
            hidden_size=hidden,
            num_attention_heads=4,
            ffn_hidden_size=2 * hidden,
            num_experts=16,
            topk=4,
            expert_ffn_hidden_size=hidden,
            max_sequence_length=seq,
            vocab_size=256,
        )
    )
    pr2 = build(setup)
    stock = build(setup, router="topk")
    load_full_state(stock, global_state_dict(pr2))
    ctl = RoutingController(pr2)
    ids, labels = token_batch(2, seq, 256, seed=0)
    positions = torch.arange(seq).expand_as(ids)
    ctl.predict()
    with torch.no_grad():
        pr2(ids, positions, None)
    routes = ctl.collect_routes()[0]

    def rollout(model, predict):
        def run():
            model.eval()
            if predict:
                ctl.predict()
            with torch.no_grad():
                model(ids, positions, None)

        return run

    def train(model, replay):
        def run():
            model.train()
            if replay:
                ctl.replay()
                ctl.set_targets(routes)
            model.zero_grad(set_to_none=True)
            model(ids, positions, None, labels=labels).float().mean().backward()

        return run

    samples = interleaved(
        {
            "stock fwd": rollout(stock, False),
            "predict fwd": rollout(pr2, True),
            "stock train": train(stock, False),
            "replay train": train(pr2, True),
        },
        repeats,
    )

    def ratio(a, b):
        return median([x / y for x, y in zip(samples[a], samples[b])])

    return {
        "layers": layers,
        "stock_fwd_ms": median(samples["stock fwd"]) * 1e3,
        "predict_ratio": ratio("predict fwd", "stock fwd"),
        "stock_train_ms": median(samples["stock train"]) * 1e3,
        "replay_ratio": ratio("replay train", "stock train"),
    }


def fit(points: list[dict], key: str) -> list[float]:
    """Non-negative least squares ``key_ms ≈ a·T·H·E + b·T·E + c·T·H``.

    Exact for three coefficients: every subset of them is solved by least squares and the
    non-negative solution with the smallest relative residual is kept.
    """
    design = torch.tensor(
        [[p["T"] * p["H"] * p["E"], p["T"] * p["E"], p["T"] * p["H"]] for p in points],
        dtype=torch.float64,
    )
    target = torch.tensor([p[key] for p in points], dtype=torch.float64)
    # Relative errors: every point counts alike, whatever its size.
    design, target = design / target.abs().unsqueeze(1), target / target.abs()
    scale = design.abs().max(dim=0).values
    best, best_residual = [0.0, 0.0, 0.0], float("inf")
    for mask in range(1, 8):
        columns = [i for i in range(3) if mask >> i & 1]
        sub = design[:, columns] / scale[columns]
        solution = torch.linalg.lstsq(sub, target.unsqueeze(1)).solution.squeeze(1)
        if (solution < 0).any():
            continue
        residual = float(((sub @ solution - target) ** 2).sum())
        if residual < best_residual:
            coef = [0.0, 0.0, 0.0]
            for column, value in zip(columns, (solution / scale[columns]).tolist()):
                coef[column] = value
            best, best_residual = coef, residual
    return best


def evaluate(coef: list[float], tokens: int, hidden: int, experts: int) -> float:
    a, b, c = coef
    return a * tokens * hidden * experts + b * tokens * experts + c * tokens * hidden


def projection(router_points, moe_points, tokens: int = 4096) -> list[dict]:
    predict_coef = fit(router_points, "predict_extra_ms")
    loss_coef = fit(router_points, "loss_step_ms")
    # Expert GEMM cost per forward MAC, from the measured stock MoE layers (gelu: 2 matrices).
    per_mac_fwd = median([p["rollout_ms"] / p["expert_macs_fwd"] for p in moe_points])
    per_mac_train = median([p["train_ms"] / p["expert_macs_fwd"] for p in moe_points])
    rows = []
    for name, m in REAL.items():
        # SwiGLU experts: 3 matrices of H x F per expert; the shared expert for every token.
        macs = tokens * 3 * m["H"] * (m["k"] * m["F"] + m["shared"])
        moe_fwd = per_mac_fwd * macs
        moe_train = per_mac_train * macs
        predict = evaluate(predict_coef, tokens, m["H"], m["E"])
        loss = evaluate(loss_coef, tokens, m["H"], m["E"])
        gemm_ratio = m["E"] / (3 * (m["k"] * m["F"] + m["shared"]) + m["E"])
        rows.append(
            {
                "model": name,
                **m,
                "tokens": tokens,
                "projected_moe_fwd_ms": moe_fwd,
                "projected_predict_extra_ms": predict,
                "projected_predict_fraction": predict / moe_fwd,
                "projected_moe_train_ms": moe_train,
                "projected_loss_step_ms": loss,
                "projected_loss_fraction": loss / moe_train,
                "predictor_gemm_flop_fraction": gemm_ratio,
            }
        )
    return rows, {"predict": predict_coef, "loss_step": loss_coef, "per_mac_fwd_ms": per_mac_fwd}


def bytes_axes(tokens_list, experts_list, layers_list, tc: int = 2048) -> dict:
    """Route-table and feature-cache bytes along each axis (exact sizes)."""

    def table_bytes(tokens, experts, layers, topk=8):
        return tokens * layers * topk * torch.empty(0, dtype=route_dtype(experts)).element_size()

    def cache_bytes(hidden, experts, layers, responses=1):
        return tc * (2 * hidden + 4 * experts) * layers * responses

    return {
        "tokens": [
            {"T": t, "table_MiB (E=128, L=48)": table_bytes(t, 128, 48) / 2**20}
            for t in tokens_list
        ],
        "experts": [
            {
                "E": e,
                "table_B_per_token_layer": table_bytes(1, e, 1),
                "cache_KiB_per_token_layer (H=2048)": (2 * 2048 + 4 * e) / 1024,
            }
            for e in experts_list
        ],
        "layers": [
            {
                "L": n,
                "table_MiB (1M tokens, E=128)": table_bytes(2**20, 128, n) / 2**20,
                "cache_MiB_per_response (H=2048, E=128, T_c=2048)": cache_bytes(2048, 128, n)
                / 2**20,
            }
            for n in layers_list
        ],
    }


def gather_axes(path: str = "outputs/bench_route_comm.json") -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        data = json.load(handle)
    return [
        {k: r[k] for k in ("ranks", "axis", "tokens", "layers", "batched_ms", "per_layer_ms")}
        for r in data.get("gather_ms", [])
        if "axis" in r
    ]


def report(result: dict) -> str:
    md = []
    headers = ["T", "H", "E", "stock fwd ms", "predict +ms", "+% of router", "stock fwd+bwd ms"]
    headers += ["replay +ms", "loss step ms", "predict +us/token"]
    print("\n(router level: min over repeats; +ms = min(PR2) - min(stock))")
    for axis, title in (
        ("tokens", "Router overhead vs tokens (H, E fixed)"),
        ("experts", "Router overhead vs experts"),
        ("hidden", "Router overhead vs hidden size"),
    ):
        rows = [
            [
                p["T"],
                p["H"],
                p["E"],
                p["stock_fwd_ms"],
                p["predict_extra_ms"],
                f"{100 * p['predict_extra_ms'] / p['stock_fwd_ms']:.0f} %",
                p["stock_fwd_bwd_ms"],
                p["replay_extra_ms"],
                p["loss_step_ms"],
                1e3 * p["predict_extra_ms"] / p["T"],
            ]
            for p in result["router"][axis]
        ]
        md.append(print_table(title, headers, rows))
    headers = ["T", "MoE fwd ms (min)", "MoE fwd+bwd ms (min)", "predict +% of MoE fwd"]
    headers += ["loss step % of MoE fwd+bwd"]
    by_tokens = {p["T"]: p for p in result["router"]["tokens"]}
    rows = [
        [
            m["T"],
            m["rollout_ms"],
            m["train_ms"],
            f"{100 * by_tokens[m['T']]['predict_extra_ms'] / m['rollout_ms']:.2f} %",
            f"{100 * by_tokens[m['T']]['loss_step_ms'] / m['train_ms']:.2f} %",
        ]
        for m in result["moe_layer"]
    ]
    title = "MoE layer (stock) vs tokens, and PR2's overhead in proportion"
    md.append(print_table(title, headers, rows))
    headers = ["MoE layers", "stock fwd ms", "predict / stock", "stock train ms"]
    headers += ["replay / stock"]
    rows = [
        [r["layers"], r["stock_fwd_ms"], r["predict_ratio"], r["stock_train_ms"], r["replay_ratio"]]
        for r in result["layers"]
    ]
    md.append(print_table("Whole small GPT-MoE vs number of layers", headers, rows))
    for axis, rows_ in result["bytes"].items():
        headers = list(rows_[0])
        md.append(print_table(f"Bytes vs {axis}", headers, [list(r.values()) for r in rows_]))
    if result["gather"]:
        headers = ["ranks", "axis", "tokens/rank", "layers", "batched ms", "per-layer ms"]
        rows = [list(r.values()) for r in result["gather"]]
        md.append(print_table("Route gather (from route_storage_and_gather.py)", headers, rows))
    headers = ["model", "H", "E", "k", "F", "MoE fwd ms", "predict +ms", "predict %"]
    headers += ["MoE fwd+bwd ms", "loss step ms", "loss %", "predictor GEMM FLOP %"]
    rows = [
        [
            r["model"],
            r["H"],
            r["E"],
            r["k"],
            r["F"],
            r["projected_moe_fwd_ms"],
            r["projected_predict_extra_ms"],
            f"{100 * r['projected_predict_fraction']:.2f} %",
            r["projected_moe_train_ms"],
            r["projected_loss_step_ms"],
            f"{100 * r['projected_loss_fraction']:.2f} %",
            f"{100 * r['predictor_gemm_flop_fraction']:.2f} %",
        ]
        for r in result["projection"]
    ]
    title = "PROJECTION (fitted per-element CPU costs, 4096 tokens/micro-batch, not measured)"
    md.append(print_table(title, headers, rows))
    return "\n\n".join(md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes, well under a minute")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads")
    parser.add_argument("--out", help="JSON path (default: outputs/bench_scaling.json)")
    args = parser.parse_args()
    args.out = args.out or default_out("bench_scaling", args.quick)
    set_threads(args.threads)
    quick = args.quick
    repeats = args.repeats or (3 if quick else 7)
    tokens_axis = [512, 2048] if quick else [1024, 4096, 16384]
    experts_axis = [16, 64] if quick else [16, 64, 128, 256]
    hidden_axis = [256, 512] if quick else [512, 1024, 2048]
    base_t, base_h, base_e = (2048, 512, 64) if quick else (4096, 1024, 64)
    layer_counts = [2, 4] if quick else [2, 4, 8]
    single_process_megatron()

    router = {"tokens": [], "experts": [], "hidden": []}
    print("router overheads ...", flush=True)
    router_repeats = 4 * repeats  # router calls are short: more repeats against the noise
    for t in tokens_axis:
        router["tokens"].append(router_overheads(t, base_h, base_e, 8, router_repeats))
    for e in experts_axis:
        router["experts"].append(router_overheads(base_t, base_h, e, 8, router_repeats))
    for h in hidden_axis:
        router["hidden"].append(router_overheads(base_t, h, base_e, 8, router_repeats))
    print("MoE layer ...", flush=True)
    moe = [
        moe_layer_times(t, base_h, base_e, 8, base_h // 2, max(3, repeats // 2))
        for t in tokens_axis
    ]
    print("layers ...", flush=True)
    layers = layers_axis(layer_counts, 2 * repeats, 128 if quick else 256, 256 if quick else 512)
    points = router["tokens"] + router["experts"] + router["hidden"]
    proj, coefficients = projection(points, moe)
    result = {
        "router": router,
        "moe_layer": moe,
        "layers": layers,
        "bytes": bytes_axes([4096, 16384, 65536, 2**20], [64, 128, 256, 512], [16, 48, 58]),
        "gather": gather_axes(),
        "projection": proj,
        "fit": coefficients,
    }
    write_result(args.out, result, report)


if __name__ == "__main__":
    main()
