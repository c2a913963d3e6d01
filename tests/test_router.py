"""PR2 router in one process: phases, replay exactness, gradients, errors (docs/design.md)."""

import pytest
import torch

from pr2_megatron.errors import RouteError
from pr2_megatron.models.builder import MoEModelConfig
from pr2_megatron.routing import RoutingController, param_groups
from pr2_megatron.routing.router import PR2Router
from pr2_megatron.testing.moe import (
    TinySetup,
    build,
    build_megatron_replay_model,
    global_state_dict,
    lm_loss,
    load_full_state,
    randomize_predictors,
    token_batch,
)

pytestmark = pytest.mark.usefixtures("megatron_single")


def _setup(**model_kwargs):
    return TinySetup(model=MoEModelConfig(**model_kwargs))


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_zero_predictor_predict_equals_live_routing():
    model = build(_setup())
    ctl = RoutingController(model)
    ids, _ = token_batch(2, 12, 64, seed=0)
    ctl.record()
    with torch.no_grad():
        live_out = lm_loss(model, ids, None)
    live_routes = ctl.collect_routes()
    ctl.predict()
    with torch.no_grad():
        pred_out = lm_loss(model, ids, None)
    pred_routes = ctl.collect_routes()
    assert len(pred_routes) == 1 and pred_routes[0].shape == (24, 2, 2)
    assert torch.equal(pred_routes[0], live_routes[0])
    assert torch.equal(ctl.collect_plain_routes()[0], live_routes[0])
    assert torch.equal(pred_out, live_out)


def test_nonzero_predictor_changes_routes_but_gates_use_live_scores():
    model = build(_setup())
    randomize_predictors(model, scale=2.0, seed=3)
    ctl = RoutingController(model)
    ids, _ = token_batch(2, 12, 64, seed=0)
    ctl.predict()
    with torch.no_grad():
        predicted_out = lm_loss(model, ids, None)
    predicted = ctl.collect_routes()[0]
    live = ctl.collect_plain_routes()[0]
    assert not torch.equal(predicted, live)
    # The rollout function must equal the training function at θ_old: replaying the predicted
    # route with live gates reproduces the rollout output exactly.
    ctl.replay()
    ctl.set_targets(predicted)
    with torch.no_grad():
        replay_out = lm_loss(model, ids, None)
    ctl.finish()
    assert torch.equal(replay_out, predicted_out)


def test_replay_reproduces_live_output_and_gradients_bit_for_bit():
    model = build(_setup())
    ctl = RoutingController(model)
    ids, labels = token_batch(2, 12, 64, seed=1)
    ctl.record()
    loss_live = lm_loss(model, ids, labels)
    loss_live.backward()
    grads_live = _grads(model)
    routes = ctl.collect_routes()[0]
    model.zero_grad()
    ctl.replay(collect_metrics=True)
    ctl.set_targets(routes)
    loss_replay = lm_loss(model, ids, labels)
    loss_replay.backward()
    ctl.finish()
    assert torch.equal(loss_live, loss_replay)
    grads_replay = _grads(model)
    assert grads_live.keys() == grads_replay.keys()
    for name in grads_live:
        assert torch.equal(grads_live[name], grads_replay[name]), name
    metrics = ctl.metrics()
    assert metrics["zero_deviation_ratio"] == 1.0
    assert metrics["topk_overlap/replayed"] == 1.0


def test_zero_predictor_replay_matches_megatron_router_replay():
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    setup = _setup()
    model = build(setup)
    full = global_state_dict(model)
    ctl = RoutingController(model)
    ids, labels = token_batch(2, 10, 64, seed=2)
    ctl.predict()
    with torch.no_grad():
        lm_loss(model, ids, None)
    routes = ctl.collect_routes()[0]
    # Move the router so that the replayed routes differ from the live ones.
    with torch.no_grad():
        for router in ctl.routers:
            router.weight.add_(torch.randn_like(router.weight) * 0.5)
    moved = global_state_dict(model)
    ctl.replay()
    ctl.set_targets(routes)
    ours = lm_loss(model, ids, labels)
    ours.backward()
    ctl.finish()
    our_router_grads = [r.weight.grad.clone() for r in ctl.routers]

    RouterReplay.clear_global_router_replay_instances()
    model_stock = build_megatron_replay_model(setup)
    load_full_state(model_stock, moved)
    assert full.keys() == moved.keys()
    try:
        RouterReplay.set_replay_data([routes[:, i].long() for i in range(routes.shape[1])])
        RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        theirs = lm_loss(model_stock, ids, labels)
        theirs.backward()
    finally:
        RouterReplay.clear_global_router_replay_instances()
    assert torch.equal(ours, theirs)
    stock_routers = [m for m in model_stock.modules() if type(m).__name__ == "TopKRouter"]
    for ours_grad, router in zip(our_router_grads, stock_routers):
        assert torch.equal(ours_grad, router.weight.grad)


def test_replay_after_router_moves_keeps_experts_and_grads_reach_unpicked_experts():
    model = build(_setup(num_layers=1))
    ctl = RoutingController(model)
    ids, labels = token_batch(2, 12, 64, seed=4)
    ctl.record()
    with torch.no_grad():
        lm_loss(model, ids, None)
    routes = ctl.collect_routes()[0]
    router = ctl.routers[0]
    with torch.no_grad():
        router.weight.add_(torch.randn_like(router.weight) * 2.0)
    ctl.replay(collect_metrics=True)
    ctl.set_targets(routes)
    captured = {}

    def keep_map(_module, _inputs, output):
        captured["probs"], captured["map"] = output

    handle = router.register_forward_hook(keep_map)
    loss = lm_loss(model, ids, labels)
    handle.remove()
    loss.backward()
    ctl.finish()
    # The dispatcher saw exactly the recorded experts.
    replayed_map = torch.zeros_like(captured["map"]).scatter(1, routes[:, 0].long(), True)
    assert torch.equal(captured["map"], replayed_map)
    metrics = ctl.metrics()
    assert metrics["zero_deviation_ratio"] < 1.0  # the live router has moved away
    live = ctl.routers[0].metric_records[0]["live"]
    replayed = routes[:, 0].long()
    not_live = ~(replayed.unsqueeze(-1) == live.unsqueeze(1)).any(-1)  # [T, K]
    assert not_live.any()
    # A replayed-but-not-live expert still computes for that token, so its weights get gradient.
    token, slot = (int(i) for i in torch.nonzero(not_live)[0])
    expert = model.decoder.layers[0].mlp.experts.local_experts[int(replayed[token, slot])]
    assert expert.linear_fc1.weight.grad.abs().sum() > 0


def test_replayed_but_not_live_expert_gets_gradient_at_router_level():
    model = build(_setup(num_layers=1))
    ctl = RoutingController(model)
    router = ctl.routers[0]
    hidden = torch.randn(6, 1, 64)
    with torch.no_grad():
        live = router._topk_indices(router.gating(hidden).reshape(-1, 4))
    # Replay, for every token, the two experts the live router ranks lowest.
    scores = router.gating(hidden).reshape(-1, 4).detach()
    target = scores.argsort(dim=1)[:, :2]
    assert not (target.unsqueeze(-1) == live.unsqueeze(1)).any()
    ctl.replay()
    ctl.set_targets(target.unsqueeze(1))
    probs, routing_map = router(hidden)
    ctl.finish()
    assert torch.equal(routing_map, torch.zeros_like(routing_map).scatter(1, target, True))
    expert = int(target[0, 0])
    probs[0, expert].backward()
    assert router.weight.grad[expert].abs().sum() > 0


@pytest.mark.parametrize(
    "target, message",
    [
        (torch.zeros(24, 2, 3, dtype=torch.long), "must have shape"),
        (torch.full((24, 2, 2), 4, dtype=torch.long), "outside \\[0, 4\\)"),
        (torch.zeros(24, 2, 2, dtype=torch.long), "duplicate expert ids"),
    ],
)
def test_bad_targets_are_rejected_naming_the_layer(target, message):
    model = build(_setup())
    ctl = RoutingController(model)
    ctl.replay()
    with pytest.raises(ValueError, match=message):
        ctl.set_targets(target)
    if "must have shape" not in message:
        with pytest.raises(ValueError, match="MoE layer 1, token row 0"):
            ctl.set_targets(target)


def test_replay_without_target_and_unconsumed_target_are_errors():
    model = build(_setup())
    ctl = RoutingController(model)
    ids, _ = token_batch(2, 12, 64, seed=0)
    ctl.replay()
    with pytest.raises(RouteError, match="MoE layer 1: replay forward without a target"):
        with torch.no_grad():
            lm_loss(model, ids, None)
    ctl.replay()
    ctl.set_targets(torch.arange(2).repeat(24, 2, 1))
    ctl.set_targets(torch.arange(2).repeat(24, 2, 1))
    with torch.no_grad():
        lm_loss(model, ids, None)
    with pytest.raises(RouteError, match="never consumed.*MoE layer 1: 1 target"):
        ctl.finish()


def test_target_for_a_different_token_count_is_rejected():
    model = build(_setup())
    ctl = RoutingController(model)
    ids, _ = token_batch(2, 12, 64, seed=0)
    ctl.replay()
    ctl.set_targets(torch.arange(2).repeat(10, 2, 1))
    with pytest.raises(RouteError, match=r"shape \(10, 2\), this forward routes \(24, 2\)"):
        with torch.no_grad():
            lm_loss(model, ids, None)


def test_dense_first_layers_and_shared_expert_get_pr2_routers_only_in_moe_layers():
    model = build(_setup(num_layers=3, moe_layer_freq=[0, 1, 1], shared_expert_ffn_hidden_size=32))
    ctl = RoutingController(model)
    assert ctl.layer_numbers == [2, 3]
    assert model.decoder.layers[0].mlp.__class__.__name__ == "MLP"
    assert model.decoder.layers[1].mlp.shared_experts is not None
    ids, _ = token_batch(2, 8, 64, seed=0)
    ctl.record()
    with torch.no_grad():
        lm_loss(model, ids, None)
    assert ctl.collect_routes()[0].shape == (16, 2, 2)


def test_megatron_replay_flag_conflicts_with_pr2_router():
    from pr2_megatron.models.builder import transformer_config
    from pr2_megatron.runtime.parallel import ParallelConfig, initialize_parallel

    initialize_parallel(ParallelConfig())
    config = transformer_config(MoEModelConfig(), ParallelConfig())
    config.moe_enable_routing_replay = True
    with pytest.raises(ValueError, match="moe_enable_routing_replay"):
        PR2Router(config)


def test_predictor_param_group_and_zero_init():
    model = build(_setup())
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, lr_multiplier=1e3)
    assert len(groups) == 2
    predictor_group = groups[1]
    assert predictor_group["lr"] == pytest.approx(1.0)
    # Weight decay and betas follow the policy's (the PR2 authors' code) unless configured.
    assert predictor_group["weight_decay"] == 0.1 and "betas" not in predictor_group
    ctl = RoutingController(model)
    assert [p.data_ptr() for p in predictor_group["params"]] == [
        p.data_ptr() for p in ctl.predictor_parameters()
    ]
    assert all(torch.count_nonzero(p) == 0 for p in ctl.predictor_parameters())
