"""Replay metric records: bytes held over a metrics-on training mini-step, before and after.

A training mini-step with routing metrics (what ``pr2-train`` runs every mini-step) needs, per
forward, the replayed route, the live router's top-k and the plain-replay route of every MoE
layer, plus the rollout's routes of the micro-batch for the ``rollout_vs_train/`` numbers.

* ``previous``: the routers keep each forward's records as int64 until the mini-step ends (the
  previous ``PR2Router`` record, reproduced here by patching ``_route_record``), the trainer
  computes every micro-batch's rollout routes up front and reads ``forward_routes()`` (a stacked
  copy of every forward) at the end, as the previous ``Trainer._mini_step`` did.
* ``current``: records in the route table's dtype (uint8 up to 256 experts), streamed: each
  forward's routes go to the trainer's reducer (``RoutingController.replay(on_forward=...)``,
  ``pr2_megatron.rl.step_metrics.MiniStepRouting``) as soon as the forward has run, then released;
  the trainer computes a micro-batch's rollout routes just before its forward.

Measured: the peak over the mini-step (sampled after every forward, inside the reducer and at the
end) of the bytes of distinct tensor storages held by the routers' records, by the trainer's
rollout routes and by stacked copies (``forward_routes()``, the reducer's forward), and whether
both variants give the same metrics (bit for bit). Tiny GPT-MoE with E experts and top-k as in
the target models, fp32, one process; the projection to real sizes scales the measured bytes
per token-layer and is labelled as such.

Run: ``python benchmarks/metric_records.py [--quick]`` (tables +
``outputs/bench_metric_records[_quick].json``).
"""

from __future__ import annotations

import argparse
import contextlib
import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # Megatron compiles the expert-bias update

import torch
from _bench import (
    default_out,
    interleaved,
    median,
    paired_ratio,
    print_table,
    set_threads,
    single_process_megatron,
    write_result,
)

FULL = dict(layers=4, experts=128, topk=8, hidden=64, seq=512, batch=2, micro_batches=4)
QUICK = dict(layers=2, experts=16, topk=4, hidden=64, seq=128, batch=2, micro_batches=3)
#: Real models for the projection: (MoE layers, top-k).
MODELS = {"OLMoE-1B-7B": (16, 8), "Qwen3-30B-A3B": (48, 8), "DeepSeek-V3": (58, 8)}


def unique_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once)."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def record_tensors(controller) -> list[torch.Tensor]:
    """Every tensor the routers hold in per-forward records."""
    out = []
    for router in controller.routers:
        out += [*router.recorded, *router.recorded_plain]
        for record in router.metric_records:
            out += list(record.values())
    return out


@contextlib.contextmanager
def previous_records(controller):
    """Routers keep records as before: the tensors as routed (int64), unconverted."""
    for router in controller.routers:
        router._route_record = lambda replayed, live, plain: {
            "replayed": replayed,
            "live": live,
            "plain": plain,
        }
    try:
        yield
    finally:
        for router in controller.routers:
            del router._route_record


class Peak:
    """Running maximum of held bytes: the records' own elements, and distinct storages.

    ``enabled=False``: a no-op, for the timed runs.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.total = 0
        self.records = 0  # the most record bytes held at any sample
        self.parts: dict[str, int] = {}

    def watch_routers(self, controller, parts) -> None:
        """Also sample whenever a router has recorded (records of a forward in progress)."""
        if not self.enabled:
            return
        for router in controller.routers:
            hook = router.on_forward_recorded

            def sampled(r, hook=hook):
                self.sample(record_tensors(controller), **parts())
                if hook is not None:
                    hook(r)

            router.on_forward_recorded = sampled

    def sample(self, records, **parts) -> None:
        """Record a sample; keeps the parts of the sample with the most distinct bytes.

        ``records`` count their own elements (a view as its size); every other part counts
        the distinct storages behind it; the total counts distinct storages of everything (a
        record that is a view of a rollout route adds nothing to it).
        """
        if not self.enabled:
            return
        sizes = {"records": sum(t.nbytes for t in records)}
        self.records = max(self.records, sizes["records"])
        sizes.update({name: unique_bytes(tensors) for name, tensors in parts.items()})
        everything = unique_bytes([*records, *(t for ts in parts.values() for t in ts)])
        if everything > self.total:
            self.total, self.parts = everything, sizes


def setup_model(sizes: dict):
    """The model, its controller, the micro-batches and their rollout routes and rows."""
    from pr2_megatron.models.builder import MoEModelConfig
    from pr2_megatron.routing.controller import RoutingController
    from pr2_megatron.testing.moe import TinySetup, build, token_batch

    seq, batch = sizes["seq"], sizes["batch"]
    model = build(
        TinySetup(
            model=MoEModelConfig(
                num_layers=sizes["layers"],
                hidden_size=sizes["hidden"],
                num_experts=sizes["experts"],
                topk=sizes["topk"],
                expert_ffn_hidden_size=32,
                max_sequence_length=seq,
            )
        )
    )
    ctl = RoutingController(model)
    batches = [token_batch(batch, seq, 64, seed=s) for s in range(sizes["micro_batches"])]
    # "Rollout": the live routes of each micro-batch, then the routers move (training).
    ctl.record()
    with torch.no_grad():
        for ids, _ in batches:
            _forward(model, ids)
    rollout = [r.long() for r in ctl.collect_routes()]
    plain = [torch.roll(r, 1, dims=0) for r in rollout]  # another route of the same tokens
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for router in ctl.routers:
            router.weight.add_(torch.randn(router.weight.shape, generator=generator) * 0.5)
    # Response tokens: the second half of each sequence, rows in [S, B] order.
    rows = torch.nonzero((torch.arange(seq) >= seq // 2).repeat_interleave(batch)).squeeze(1)
    return model, ctl, batches, rollout, plain, rows


def _forward(model, ids, labels=None):
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    return model(ids, positions, None, labels=labels)


def previous_mini_step(model, ctl, batches, rollout, plain, rows, peak: Peak) -> dict:
    """The previous trainer: routes up front, records kept, ``forward_routes()`` at the end."""
    from pr2_megatron.metrics import routing_agreement

    ctl.replay(collect_metrics=True)
    routes = [(r.clone(), p.clone()) for r, p in zip(rollout, plain)]  # computed up front
    held = [t for pair in routes for t in pair]
    peak.watch_routers(ctl, lambda: {"rollout_routes": held})
    with previous_records(ctl):
        for (ids, labels), (route, route_plain) in zip(batches, routes):
            ctl.set_targets(route, route_plain)
            _forward(model, ids, labels).float().mean().backward()
            peak.sample(record_tensors(ctl), rollout_routes=held)
    ctl.finish()
    used = ctl.forward_routes()
    stacked = [t for f in used for t in f.values() if t is not None]
    peak.sample(record_tensors(ctl), rollout_routes=held, stacked=stacked)
    layers = ctl.layer_numbers
    rows_per_forward = [rows] * len(used)
    sampled = [
        {"replayed": f["replayed"], "live": f["live"], "plain": p}
        for f, (_, p) in zip(used, routes)
    ]
    trained = [{"replayed": r, "live": f["replayed"]} for f, (r, _) in zip(used, routes)]
    return {
        **_prefixed(
            "routing/", routing_agreement(sampled, layers, rows_per_forward=rows_per_forward)
        ),
        **_prefixed(
            "rollout_vs_train/",
            routing_agreement(trained, layers, rows_per_forward=rows_per_forward),
        ),
    }


def current_mini_step(model, ctl, batches, rollout, plain, rows, peak: Peak) -> dict:
    """The current trainer: each forward's routes reduced and released as soon as it ran."""
    from pr2_megatron.rl.step_metrics import MiniStepRouting

    reducer = MiniStepRouting(ctl.layer_numbers, ctl.layer_numbers, live_routing=False)
    current = {}

    def on_forward(forward):
        stacked = [t for t in forward.values() if t is not None]
        peak.sample(record_tensors(ctl), rollout_routes=current["held"], stacked=stacked)
        reducer(forward)

    ctl.replay(collect_metrics=True, on_forward=on_forward)
    peak.watch_routers(ctl, lambda: {"rollout_routes": current["held"]})
    for (ids, labels), route, route_plain in zip(batches, rollout, plain):
        route, route_plain = route.clone(), route_plain.clone()  # just before the forward
        current["held"] = [route, route_plain]
        reducer.expect(rows, route, route_plain)
        ctl.set_targets(route, route_plain)
        _forward(model, ids, labels).float().mean().backward()
        peak.sample(record_tensors(ctl), rollout_routes=current["held"])
    ctl.finish()
    return reducer.summary([], torch.device("cpu"))


def _prefixed(prefix, agreement) -> dict:
    summary = agreement if isinstance(agreement, dict) else agreement.summary()
    return {f"{prefix}{k}": v for k, v in summary.items()}


def run(args) -> dict:
    sizes = dict(QUICK if args.quick else FULL)
    single_process_megatron()
    state = setup_model(sizes)
    model, ctl, batches, rollout, plain, rows = state
    tokens = sizes["seq"] * sizes["batch"]
    peaks = {"previous": Peak(), "current": Peak()}
    metrics = {
        "previous": previous_mini_step(
            model, ctl, batches, rollout, plain, rows, peaks["previous"]
        ),
        "current": current_mini_step(model, ctl, batches, rollout, plain, rows, peaks["current"]),
    }
    assert metrics["previous"] == metrics["current"], "the metrics changed"
    print(f"metrics identical (bit for bit): {len(metrics['current'])} values", flush=True)
    samples = interleaved(
        {
            "previous": lambda: previous_mini_step(*state, Peak(enabled=False)),
            "current": lambda: current_mini_step(*state, Peak(enabled=False)),
        },
        args.repeats,
    )
    token_layers = tokens * sizes["layers"]
    rows_out = []
    for name, peak in peaks.items():
        rows_out.append(
            {
                "variant": name,
                "micro_batches": sizes["micro_batches"],
                "tokens_per_micro_batch": tokens,
                "moe_layers": sizes["layers"],
                "E": sizes["experts"],
                "k": sizes["topk"],
                "records_peak_bytes": peak.records,
                "rollout_routes_peak_bytes": peak.parts.get("rollout_routes", 0),
                "stacked_peak_bytes": peak.parts.get("stacked", 0),
                "total_peak_bytes": peak.total,
                "records_bytes_per_token_layer": peak.records / token_layers,
                "total_bytes_per_token_layer": peak.total / token_layers,
                "mini_step_ms": median(samples[name]) * 1e3,
                "ratio_vs_previous": paired_ratio(samples, name, "previous"),
            }
        )
    return {
        "sizes": sizes,
        "rows": rows_out,
        "projection": projection(rows_out, sizes),
        "metrics_identical": True,
    }


def projection(rows: list[dict], sizes: dict) -> list[dict]:
    """Bytes at real sizes from the measured bytes per token-layer (k as measured).

    ``previous`` holds every micro-batch of the mini-step; ``current`` one micro-batch.
    """
    per = {r["variant"]: r["total_bytes_per_token_layer"] / sizes["micro_batches"] for r in rows}
    per["current"] = per["current"] * sizes["micro_batches"]  # one micro-batch at a time
    rec = {r["variant"]: r["records_bytes_per_token_layer"] for r in rows}
    rec_prev_per_mb = rec["previous"] / sizes["micro_batches"]
    out = []
    for model, (layers, topk) in MODELS.items():
        if topk != sizes["topk"]:
            continue
        for tokens, micro in ((32768, 4), (32768, 8)):
            token_layers = tokens * layers
            out.append(
                {
                    "model": model,
                    "moe_layers": layers,
                    "tokens_per_micro_batch": tokens,
                    "micro_batches": micro,
                    "previous_records_MiB": rec_prev_per_mb * token_layers * micro / 2**20,
                    "current_records_MiB": rec["current"] * token_layers / 2**20,
                    "previous_total_MiB": per["previous"] * token_layers * micro / 2**20,
                    "current_total_MiB": per["current"] * token_layers / 2**20,
                }
            )
    return out


def report(result: dict) -> str:
    """Tables as text (printed) and Markdown (returned)."""
    md = []
    headers = ["variant", "micro-batches", "tokens/mb", "MoE layers", "E", "k", "records MiB"]
    headers += ["rollout routes MiB", "stacked copies MiB", "peak MiB", "records B/token-layer"]
    headers += ["peak B/token-layer", "mini-step ms", "x previous"]
    rows = [
        [
            r["variant"],
            r["micro_batches"],
            r["tokens_per_micro_batch"],
            r["moe_layers"],
            r["E"],
            r["k"],
            r["records_peak_bytes"] / 2**20,
            r["rollout_routes_peak_bytes"] / 2**20,
            r["stacked_peak_bytes"] / 2**20,
            r["total_peak_bytes"] / 2**20,
            r["records_bytes_per_token_layer"],
            r["total_bytes_per_token_layer"],
            r["mini_step_ms"],
            r["ratio_vs_previous"],
        ]
        for r in result["rows"]
    ]
    title = "Peak bytes held over a metrics-on mini-step (measured)"
    md.append(print_table(title, headers, rows, blank_line=False))
    headers = ["model", "MoE layers", "tokens/mb", "micro-batches", "previous records MiB"]
    headers += ["current records MiB", "previous peak MiB", "current peak MiB"]
    rows = [
        [
            r["model"],
            r["moe_layers"],
            r["tokens_per_micro_batch"],
            r["micro_batches"],
            r["previous_records_MiB"],
            r["current_records_MiB"],
            r["previous_total_MiB"],
            r["current_total_MiB"],
        ]
        for r in result["projection"]
    ]
    if rows:
        title = "PROJECTION from the measured bytes per token-layer, k = 8 (not measured)"
        md.append(print_table(title, headers, rows))
    return "\n\n".join(md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, well under a minute")
    parser.add_argument("--repeats", type=int, default=3, help="timed mini-steps per variant")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads")
    parser.add_argument("--out", help="JSON path (default outputs/bench_metric_records.json)")
    args = parser.parse_args()
    args.out = args.out or default_out("bench_metric_records", args.quick)
    set_threads(args.threads)
    write_result(args.out, run(args), report)


if __name__ == "__main__":
    main()
