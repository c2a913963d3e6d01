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
    assert predictor[0]["weight_decay"] == 0.0
    told = param_groups(model, lr=1e-3, weight_decay=0.1, lr_multiplier=2.0)
    assert [g for g in told if g.get("pr2_predictor")][0]["lr"] == pytest.approx(2e-3)


def test_param_groups_refuse_routers_that_disagree_on_alpha():
    a = build(TinySetup(model=MoEModelConfig(num_layers=1), pr2=PR2RouterConfig(lr_multiplier=1)))
    b = build(TinySetup(model=MoEModelConfig(num_layers=1), pr2=PR2RouterConfig(lr_multiplier=2)))
    with pytest.raises(ValueError, match=r"different lr multipliers: \[1.0, 2.0\]|\[1, 2\]"):
        param_groups([a, b], lr=1e-3, weight_decay=0.0)
