"""The controller's contract: no silently empty results, one exception type, one α source."""

import pytest
import torch

from pr2_megatron.errors import RouteError
from pr2_megatron.models import MoEModelConfig
from pr2_megatron.routes import RouteTable
from pr2_megatron.routing import PR2RouterConfig, RoutingController, param_groups
from pr2_megatron.testing.moe import TinySetup, build, lm_loss, token_batch

pytestmark = pytest.mark.usefixtures("megatron_single")


def test_a_model_without_pr2_routers_is_an_error():
    stock = build(TinySetup(), router="topk")
    with pytest.raises(ValueError, match=r"MoE layers \[1, 2\] have a TopKRouter, not a PR2Router"):
        RoutingController(stock)
    dense = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="no PR2 router"):
        RoutingController(dense)
    assert RoutingController(dense, allow_empty=True).layer_numbers == []  # a PP stage


def test_metrics_of_a_pass_that_collected_nothing_are_errors():
    model = build(TinySetup())
    ctl = RoutingController(model)
    ids, _ = token_batch(2, 6, 64, seed=0)
    ctl.replay(collect_metrics=True)
    with pytest.raises(RuntimeError, match="no forward ran"):
        ctl.metrics()
    ctl.record()
    with torch.no_grad():
        lm_loss(model, ids, None)
    with pytest.raises(RuntimeError, match="record pass collects no metrics"):
        ctl.metrics()
    ctl.replay()  # no collect_metrics, no predictor training
    ctl.set_targets(torch.stack([torch.tensor([0, 1])] * 12).unsqueeze(1).repeat(1, 2, 1))
    with torch.no_grad():
        lm_loss(model, ids, None)
    with pytest.raises(RuntimeError, match="replay pass collects no metrics"):
        ctl.metrics()
    with pytest.raises(RuntimeError, match="collects no metrics"):
        ctl.forward_routes()


def test_metrics_of_a_replay_pass_report_agreement_with_the_plain_route():
    model = build(TinySetup())
    ctl = RoutingController(model)
    ids, _ = token_batch(2, 6, 64, seed=0)
    ctl.record()
    with torch.no_grad():
        lm_loss(model, ids, None)
    live = ctl.collect_routes()[0]
    # The two experts the live route does not use (4 experts, top-2): no overlap at all.
    unused = torch.ones(*live.shape[:2], 4, dtype=torch.bool).scatter(2, live, False)
    other = unused.nonzero()[:, 2].view(live.shape)
    ctl.replay(collect_metrics=True)
    ctl.set_targets(live, other)
    with torch.no_grad():
        lm_loss(model, ids, None)
    metrics = ctl.metrics()
    assert metrics["topk_overlap/replayed"] == 1.0 and metrics["zero_deviation_ratio"] == 1.0
    assert metrics["topk_overlap/plain"] == 0.0
    assert set(metrics) >= {"topk_overlap/plain/layer_1", "topk_overlap/plain/layer_2"}


def test_every_bad_route_error_is_one_exception_type(tmp_path):
    model = build(TinySetup())
    ctl = RoutingController(model)
    ids, _ = token_batch(2, 6, 64, seed=0)
    ctl.replay()
    bad_table = dict(sample_ids=[0], layer_numbers=[1], num_experts=4, topk=2)
    path = tmp_path / "table.safetensors"
    RouteTable.from_samples([torch.tensor([[[0, 1]]])], **bad_table).save(path)
    path.write_bytes(path.read_bytes()[:-1])  # truncated
    for bad in (
        lambda: ctl.set_targets(torch.zeros(12, 2, 2, dtype=torch.long)),  # duplicate ids
        lambda: ctl.set_targets(torch.full((12, 2, 2), 9)),  # out of range
        lambda: RouteTable.from_samples([torch.zeros(3, 1, 2, dtype=torch.long)], **bad_table),
        lambda: RouteTable.load(path),
    ):
        with pytest.raises(RouteError):
            bad()
    with torch.no_grad(), pytest.raises(RouteError, match="replay forward without a target"):
        lm_loss(model, ids, None)
    assert issubclass(RouteError, ValueError)


def test_param_groups_take_alpha_from_the_routers():
    model = build(TinySetup(pr2=PR2RouterConfig(lr_multiplier=250.0)))
    groups = param_groups(model, lr=1e-3, weight_decay=0.1)
    predictor = [g for g in groups if g.get("pr2_predictor")]
    assert len(predictor) == 1 and predictor[0]["lr"] == pytest.approx(0.25)
    assert predictor[0]["weight_decay"] == 0.1  # the policy's (predictor_weight_decay=None)
    told = param_groups(model, lr=1e-3, weight_decay=0.1, lr_multiplier=2.0)
    assert [g for g in told if g.get("pr2_predictor")][0]["lr"] == pytest.approx(2e-3)


def test_param_groups_refuse_routers_that_disagree_on_alpha():
    a = build(TinySetup(model=MoEModelConfig(num_layers=1), pr2=PR2RouterConfig(lr_multiplier=1)))
    b = build(TinySetup(model=MoEModelConfig(num_layers=1), pr2=PR2RouterConfig(lr_multiplier=2)))
    with pytest.raises(ValueError, match=r"different lr multipliers: \[1.0, 2.0\]|\[1, 2\]"):
        param_groups([a, b], lr=1e-3, weight_decay=0.0)


# ------------------------------------------------------------- per-forward route records
def _moved_model_and_routes(forwards=3):
    """A tiny model, the live routes of ``forwards`` micro-batches, then routers moved away."""
    model = build(TinySetup())
    ctl = RoutingController(model)
    batches = [token_batch(2, 6, 64, seed=s)[0] for s in range(forwards)]
    ctl.record()
    with torch.no_grad():
        for ids in batches:
            lm_loss(model, ids, None)
    routes = ctl.collect_routes()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for router in ctl.routers:
            router.weight.add_(torch.randn(router.weight.shape, generator=generator))
    plains = [torch.roll(r, 1, dims=0) for r in routes]  # another route of the same tokens
    return model, ctl, batches, routes, plains


def _replay_pass(model, ctl, batches, routes, plains, after_forward=None, **phase):
    ctl.replay(collect_metrics=True, **phase)
    for ids, route, plain in zip(batches, routes, plains):
        ctl.set_targets(route, plain)
        with torch.no_grad():
            lm_loss(model, ids, None)
        if after_forward is not None:
            after_forward()
    ctl.finish()
    return ctl.metrics()


def test_replay_records_use_the_route_tables_dtype_and_leave_agreement_unchanged():
    from pr2_megatron.metrics import routing_agreement, topk_overlap

    model, ctl, batches, routes, plains = _moved_model_and_routes()
    metrics = _replay_pass(model, ctl, batches, routes, plains)
    forwards = ctl.forward_routes()
    assert all(f[key].dtype == torch.uint8 for f in forwards for key in ("replayed", "live"))
    as_int64 = [{k: v.long() for k, v in f.items()} for f in forwards]
    layers = ctl.layer_numbers
    assert routing_agreement(as_int64, layers).summary() == metrics  # bit for bit
    live = torch.cat([f["live"] for f in as_int64])
    replayed = torch.cat([f["replayed"] for f in as_int64])
    assert torch.equal(replayed, torch.cat(routes))  # the ids themselves are unchanged
    for column, layer in enumerate(layers):  # brute force: |A ∩ B| / k over token sets
        pairs = zip(replayed[:, column].tolist(), live[:, column].tolist())
        overlap = [len(set(a) & set(b)) / 2 for a, b in pairs]
        assert metrics[f"topk_overlap/replayed/layer_{layer}"] == pytest.approx(
            sum(overlap) / len(overlap), abs=1e-12
        )
        assert float(topk_overlap(replayed[:, column], live[:, column]).mean()) < 1.0
    ctl.routers[0].route_id_bound = 300  # e.g. ProbMoE dynamic-k ids E + j beyond 256
    record = ctl.routers[0]._route_record(routes[0][:, 0], routes[0][:, 0], None)
    assert record["replayed"].dtype == torch.int16 and record["plain"] is None


def test_streamed_forwards_give_the_same_metrics_and_hold_no_record_between_forwards():
    model, ctl, batches, routes, plains = _moved_model_and_routes()
    held_keep = []
    kept = _replay_pass(
        model,
        ctl,
        batches,
        routes,
        plains,
        after_forward=lambda: held_keep.append(ctl.held_record_bytes()),
    )
    per_forward = len(ctl.layer_numbers) * 12 * 2 * 3  # L x T x K x (replayed, live, plain) uint8
    assert held_keep == [per_forward * (f + 1) for f in range(3)]
    expected_routes = ctl.forward_routes()
    streamed, held_stream = [], []
    metrics = _replay_pass(
        model,
        ctl,
        batches,
        routes,
        plains,
        after_forward=lambda: held_stream.append(ctl.held_record_bytes()),
        on_forward=streamed.append,
    )
    assert metrics == kept  # bit for bit
    assert held_stream == [0, 0, 0]
    assert len(streamed) == 3
    for got, want in zip(streamed, expected_routes):
        assert all(torch.equal(got[key], want[key]) for key in ("replayed", "live", "plain"))
    with pytest.raises(RuntimeError, match="streams its routes to on_forward"):
        ctl.forward_routes()


def test_released_forwards_still_count_in_the_pass_metrics():
    model, ctl, batches, routes, plains = _moved_model_and_routes()
    kept = _replay_pass(model, ctl, batches, routes, plains)
    seen = []

    def consume_and_release():
        seen.extend(ctl.forward_routes())
        assert ctl.release_forward_records() == 1 and ctl.held_record_bytes() == 0

    metrics = _replay_pass(model, ctl, batches, routes, plains, consume_and_release)
    assert metrics == kept and len(seen) == 3


def test_streaming_a_record_pass_hands_over_the_live_routes():
    model, ctl, batches, routes, _ = _moved_model_and_routes()
    ctl.record()
    with torch.no_grad():
        for ids in batches:
            lm_loss(model, ids, None)
    expected = ctl.collect_routes()
    streamed = []
    ctl.record(on_forward=streamed.append)
    with torch.no_grad():
        for ids in batches:
            lm_loss(model, ids, None)
            assert ctl.held_record_bytes() == 0
    ctl.finish()
    assert len(streamed) == 3
    for got, want in zip(streamed, expected):
        assert torch.equal(got["live"], want) and got["replayed"] is got["live"]


def test_streaming_misuse_is_rejected_naming_the_problem():
    model, ctl, batches, routes, plains = _moved_model_and_routes(forwards=1)
    with pytest.raises(ValueError, match="needs the record phase or the replay phase"):
        ctl.replay(on_forward=print)  # no collect_metrics: nothing to stream
    with pytest.raises(ValueError, match="not 'predict'"):
        ctl.set_phase("predict", on_forward=print)
    ctl.replay(collect_metrics=True, on_forward=lambda routes: None)
    ctl.set_targets(routes[0])
    with torch.no_grad():
        lm_loss(model, batches[0], None)
    record = ctl.routers[1]._route_record(routes[0][:, 1], routes[0][:, 1], None)
    ctl.routers[1].metric_records.append(record)  # a forward only the second layer routed
    with pytest.raises(RouteError, match=r"MoE layer 2: 1 forward\(s\)"):
        ctl.finish()


def test_param_groups_take_predictor_betas_and_weight_decay_from_the_routers():
    pr2 = PR2RouterConfig(predictor_betas=[0.9, 0.98], predictor_weight_decay=0.0)
    model = build(TinySetup(pr2=pr2))
    groups = param_groups(model, lr=1e-3, weight_decay=0.1)
    policy, predictor = groups
    assert policy["weight_decay"] == 0.1 and "betas" not in policy
    assert predictor["weight_decay"] == 0.0 and predictor["betas"] == (0.9, 0.98)
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.999))
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.999)  # the policy keeps its own
    assert optimizer.param_groups[1]["betas"] == (0.9, 0.98)


def test_predictor_optimizer_keys_are_checked():
    with pytest.raises(ValueError, match="predictor_betas"):
        PR2RouterConfig(predictor_betas=[0.9])
    with pytest.raises(ValueError, match="predictor_weight_decay"):
        PR2RouterConfig(predictor_weight_decay=-1.0)
