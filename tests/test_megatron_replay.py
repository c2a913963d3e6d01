"""Protocol mode: PR2 routers driven through Megatron's RouterReplay as verl's Megatron actor does.

The sequence of calls is verl's R2 (verl/workers/actor/megatron_actor.py, megatron_workers.py):
``compute_log_prob`` sets RECORD on every registered router, runs the forward-only schedule in
eval mode under no_grad with its own micro-batch size and reads ``get_recorded_indices`` after
each forward; then clears indices and action. ``update_policy`` per mini-batch: REPLAY_FORWARD,
the training schedule with another micro-batch size, where each forward_step switches its
routers from REPLAY_BACKWARD to REPLAY_FORWARD, sets the replay data per router
(``set_target_indices``), runs the model and sets REPLAY_BACKWARD; the schedule runs the
backward (recompute pops the FIFO); optimizer step; clear action and indices.
"""

import gc

import pytest
import torch
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

from pr2_megatron.errors import RouteError
from pr2_megatron.models import MoEModelConfig
from pr2_megatron.routing import PR2Router, PR2RouterConfig, RoutingController
from pr2_megatron.routing.megatron_replay import (
    PR2RouterReplay,
    megatron_replay_metrics,
    route_fingerprint,
)
from pr2_megatron.testing.moe import (
    TinySetup,
    build,
    forward_backward,
    global_state_dict,
    load_full_state,
    randomize_predictors,
    token_batch,
)

pytestmark = pytest.mark.usefixtures("megatron_single", "clean_replay_registry")

NUM_SAMPLES, SEQ, LAYERS, K = 4, 8, 2, 2


@pytest.fixture
def clean_replay_registry():
    """An empty RouterReplay list, and Megatron's aux-loss scale unset (process-global state).

    Megatron's schedules copy a [1] scale into ``MoEAuxLossAutoScaler.main_loss_backward_scale``;
    a backward outside the schedules leaves a 0-d one there, and the next schedule's copy fails.
    """
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    RouterReplay.clear_global_router_replay_instances()
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    yield
    RouterReplay.clear_global_router_replay_instances()
    MoEAuxLossAutoScaler.main_loss_backward_scale = None


def _setup(recompute=None, experts=4):
    granularity, modules = {None: (None, ["moe"]), "moe": ("selective", ["moe"])}.get(
        recompute, ("full", ["moe"])
    )
    model = MoEModelConfig(
        num_layers=LAYERS,
        num_experts=experts,
        topk=K,
        recompute_granularity=granularity,
        recompute_modules=modules,
    )
    return TinySetup(model=model, pr2=PR2RouterConfig(megatron_router_replay=True))


def _build(recompute=None, state=None):
    RouterReplay.clear_global_router_replay_instances()
    model = build(_setup(recompute))
    if state is None:
        randomize_predictors(model, scale=2.0, seed=7)
    else:
        load_full_state(model, state)
    return model


def _routers(model):
    return sorted(
        (m for m in model.modules() if isinstance(m, PR2Router)), key=lambda r: r.layer_number
    )


class Dispatch:
    """Every router forward's routing map (checkpointed forwards and recomputes alike)."""

    def __init__(self, model):
        self.maps = {r.layer_number: [] for r in _routers(model)}
        for router in _routers(model):
            router.register_forward_hook(self._hook)

    def _hook(self, router, inputs, output):
        self.maps[router.layer_number].append(output[1].detach().clone())


def _one_hot(route_TK, experts):
    return torch.zeros(route_TK.shape[0], experts, dtype=torch.bool).scatter_(
        1, route_TK.long(), True
    )


def _data():
    return token_batch(NUM_SAMPLES, SEQ, 64, seed=21)


def _step(ids, labels, on_forward=None):
    """A forward_step of Megatron's schedule on a micro-batch of samples (verl's shape)."""

    def step(data_iterator, model):
        samples = next(data_iterator)
        if on_forward is not None:
            on_forward(samples)
        x = ids[samples]
        out = model(x, torch.arange(SEQ).expand_as(x), None, labels=labels[samples])
        if on_forward is not None:
            # verl: after the forward the chunk's routers are put in REPLAY_BACKWARD
            for replay in RouterReplay.global_router_replay_instances:
                if replay.router_replay_action == RouterReplayAction.REPLAY_FORWARD:
                    replay.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)

        def loss_func(token_loss):
            return token_loss.sum(), {"samples": samples}

        return out, loss_func

    return step


def compute_log_prob(model, micro_batches):
    """verl R2 ``compute_log_prob``: RECORD, forward-only schedule, routed_experts per sample."""
    ids, labels = _data()
    RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
    model.eval()
    routed = {}
    recorded_per_forward = []

    def step(data_iterator, model_):
        samples = next(data_iterator)
        x = ids[samples]
        out = model_(x, torch.arange(SEQ).expand_as(x), None, labels=labels[samples])
        # verl's merge_router_topk_indices: read each router's last recorded route now.
        per_layer = [r.get_recorded_indices() for r in RouterReplay.global_router_replay_instances]
        recorded_TLK = torch.stack(per_layer, dim=1)
        recorded_per_forward.append(recorded_TLK)
        for b, sample in enumerate(samples):
            routed[sample] = recorded_TLK.view(SEQ, len(samples), LAYERS, K)[:, b]

        def loss_func(token_loss):
            return token_loss.sum(), {}

        return out, loss_func

    with torch.no_grad():
        forward_backward(
            [model],
            step,
            micro_batches,
            seq_length=SEQ,
            micro_batch_size=len(micro_batches[0]),
            forward_only=True,
        )
    RouterReplay.clear_global_indices()
    RouterReplay.clear_global_router_replay_action()
    return routed, recorded_per_forward


def update_policy(model, routed, mini_batches, lr=0.5, backward_order=None):
    """verl ``update_policy``: per mini-batch REPLAY_FORWARD, schedule, step, clear."""
    ids, labels = _data()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    per_mini_batch = []
    for micro_batches in mini_batches:
        RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        optimizer.zero_grad(set_to_none=True)
        targets = []

        def set_replay_data(samples, targets=targets):
            instances = RouterReplay.global_router_replay_instances
            for replay in instances:
                if replay.router_replay_action == RouterReplayAction.REPLAY_BACKWARD:
                    replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
            data_SBLK = torch.stack([routed[s] for s in samples], dim=1)
            data_TLK = data_SBLK.reshape(-1, LAYERS, K)
            targets.append(data_TLK)
            for index, replay in enumerate(instances):
                replay.set_target_indices(data_TLK[:, index].long())

        forward_backward(
            [model],
            _step(ids, labels, on_forward=set_replay_data),
            micro_batches,
            seq_length=SEQ,
            micro_batch_size=len(micro_batches[0]),
        )
        grads = {
            n: p.grad.clone() if p.grad is not None else None for n, p in model.named_parameters()
        }
        optimizer.step()
        RouterReplay.clear_global_router_replay_action()
        RouterReplay.clear_global_indices()
        per_mini_batch.append(
            {"targets": targets, "grads": grads, **megatron_replay_metrics(model)}
        )
    return per_mini_batch


def _predicted_and_live_routes(model, micro_batches):
    """Reference: the library's own predict / record phases on the same micro-batches."""
    ids, _ = _data()
    ctl = RoutingController(model)
    out = {}
    for phase in ("predict", "record"):
        getattr(ctl, phase)()
        with torch.no_grad():
            for samples in micro_batches:
                x = ids[samples]
                model(x, torch.arange(SEQ).expand_as(x), None)
        out[phase] = ctl.collect_routes()
    ctl.off()
    return out


RECORD_BATCHES = [[0, 1], [2, 3]]  # log_prob_micro_batch_size_per_gpu = 2
TRAIN_MINI_BATCHES = [[[1], [0]], [[3], [2]]]  # ppo_mini_batch_size 2, micro-batch size 1


@pytest.mark.parametrize("recompute", [None, "moe", "full"])
def test_verl_r2_sequence_records_predicted_replays_exactly_and_trains_once_moved(recompute):
    model = _build(recompute)
    reference = _predicted_and_live_routes(model, RECORD_BATCHES)
    dispatch = Dispatch(model)
    routed, recorded = compute_log_prob(model, RECORD_BATCHES)
    # RECORD recorded the predicted route TopK(score_fn(z + Δ)), which differs from live top-k.
    for got, predicted, live in zip(recorded, reference["predict"], reference["record"]):
        assert torch.equal(got, predicted)
        assert not torch.equal(got, live)
    for maps in dispatch.maps.values():
        maps.clear()
    results = update_policy(model, routed, TRAIN_MINI_BATCHES)
    # Every forward (and recompute) dispatched exactly the replay data.
    targets = [t for res in results for t in res["targets"]]
    for layer, maps in dispatch.maps.items():
        expected = [_one_hot(t[:, layer - 1], 4) for t in targets]
        if recompute is None:
            assert len(maps) == len(expected)
            assert all(torch.equal(m, e) for m, e in zip(maps, expected))
        else:
            # forward, then its recompute in backward (no pipelining: one micro-batch at a time)
            assert len(maps) == 2 * len(expected)
            for index, e in enumerate(expected):
                assert torch.equal(maps[2 * index], e) and torch.equal(maps[2 * index + 1], e)
    first, second = results
    # Mini-batch 1: the router has not moved since RECORD -> no predictor loss, no gradient.
    predictor_grads = [g for n, g in first["grads"].items() if "predictor" in n]
    assert all(g is None for g in predictor_grads)
    assert first["predictor/pairing/not_moved"] == 2 * LAYERS
    assert "predictor/loss" not in first
    # Mini-batch 2: the optimizer moved the router -> the predictor trains (snapshot pairing:
    # micro-batches of 1 sample match no RECORD forward of 2 samples).
    predictor_grads = [g for n, g in second["grads"].items() if "predictor" in n]
    assert len(predictor_grads) == LAYERS
    assert all(g is not None and g.abs().sum() > 0 for g in predictor_grads)
    assert second["predictor/pairing/snapshot"] == 2 * LAYERS
    assert second["predictor/pairing/exact"] == 0
    assert second["predictor/loss"] > 0


@pytest.mark.parametrize("recompute", ["moe", "full"])
def test_recompute_under_the_protocol_equals_no_recompute(recompute):
    plain = _build(None)
    state = global_state_dict(plain)
    routed, _ = compute_log_prob(plain, RECORD_BATCHES)
    reference = update_policy(plain, routed, TRAIN_MINI_BATCHES)
    recomputed = _build(recompute, state)
    routed_rec, _ = compute_log_prob(recomputed, RECORD_BATCHES)
    for sample in routed:
        assert torch.equal(routed[sample], routed_rec[sample])
    got = update_policy(recomputed, routed_rec, TRAIN_MINI_BATCHES)
    for ref, res in zip(reference, got):
        for name, grad in ref["grads"].items():
            if grad is None:
                assert res["grads"][name] is None, name
            else:
                torch.testing.assert_close(res["grads"][name], grad, rtol=1e-5, atol=1e-6)


def test_same_layout_as_record_pairs_exactly_and_equals_the_library_path():
    """Training micro-batches equal to the RECORD ones pair with their cached features."""
    model = _build(None)
    state = global_state_dict(model)
    routed, _ = compute_log_prob(model, RECORD_BATCHES)
    results = update_policy(model, routed, [RECORD_BATCHES[:1], RECORD_BATCHES[1:]])
    assert results[0]["predictor/pairing/not_moved"] == LAYERS
    assert results[1]["predictor/pairing/exact"] == LAYERS
    assert results[1]["predictor/pairing/snapshot"] == 0

    # The same losses through the library's own path (PR2 phases, token names) on a twin model.
    from pr2_megatron.routes import MicroBatch, RoutePath

    RouterReplay.clear_global_router_replay_instances()
    twin = build(TinySetup(model=MoEModelConfig(num_layers=LAYERS, num_experts=4, topk=K)))
    load_full_state(twin, state)
    ctl = RoutingController(twin)
    path = RoutePath(ctl)
    ids, labels = _data()
    batches = [MicroBatch(samples, SEQ) for samples in RECORD_BATCHES]
    ctl.predict()
    twin.eval()
    with torch.no_grad():
        for batch in batches:
            path.name_tokens(batch)
            x = ids[list(batch.sample_ids)]
            twin(x, torch.arange(SEQ).expand_as(x), None)
    table = path.gather(batches)
    twin.train()
    optimizer = torch.optim.SGD(twin.parameters(), lr=0.5)
    for step, batch in enumerate(batches, start=1):
        ctl.replay(train_predictor=step >= 2)
        optimizer.zero_grad(set_to_none=True)
        path.set_targets(table, batch)
        x, y = ids[list(batch.sample_ids)], labels[list(batch.sample_ids)]
        twin(x, torch.arange(SEQ).expand_as(x), None, labels=y).sum().backward()
        ctl.finish()
        grads = {n: p.grad for n, p in twin.named_parameters()}
        optimizer.step()
    got = results[1]["grads"]
    for name, grad in grads.items():
        if "predictor" in name:
            torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_protocol_recompute_pairs_its_own_forward_in_reverse_backward_order():
    """Two micro-batches, backward in reverse order: Megatron's FIFO would swap their routes."""
    plain = _build(None)
    state = global_state_dict(plain)
    recomputed = _build("full", state)
    ids, labels = _data()
    generator = torch.Generator().manual_seed(4)
    routes = [torch.rand(SEQ, LAYERS, 4, generator=generator).argsort(-1)[..., :K] for _ in "ab"]

    def run(model):
        model.train()
        RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        losses = []
        for sample, route in zip((0, 1), routes):
            for index, replay in enumerate(RouterReplay.global_router_replay_instances):
                replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
                replay.set_target_indices(route[:, index])
            x = ids[[sample]]
            losses.append(model(x, torch.arange(SEQ).expand_as(x), None, labels=labels[[sample]]))
            RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)
        for loss in reversed(losses):
            loss.sum().backward()
        RouterReplay.clear_global_router_replay_action()
        RouterReplay.clear_global_indices()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    RouterReplay.clear_global_router_replay_instances()
    RouterReplay.global_router_replay_instances.extend(r.router_replay for r in _routers(plain))
    reference = run(plain)
    RouterReplay.clear_global_router_replay_instances()
    RouterReplay.global_router_replay_instances.extend(
        r.router_replay for r in _routers(recomputed)
    )
    got = run(recomputed)
    assert reference.keys() == got.keys()
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------- registrations
def test_a_model_built_twice_raises_naming_the_layers():
    first = _build(None)
    second = build(_setup())  # a second build without clearing Megatron's list
    with pytest.raises(RouteError, match=r"MoE layers \[1, 2\].*two models registered"):
        RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
    del first, second


def test_stale_instances_of_a_destroyed_model_raise():
    model = build(_setup())
    del model
    gc.collect()
    fresh = build(_setup())
    with pytest.raises(
        RouteError, match=r"positions 0 \(layer 1\), 1 \(layer 2\).*no longer exist"
    ):
        RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
    del fresh


def test_a_stock_model_beside_the_policy_raises():
    from pr2_megatron.testing.moe import build_megatron_replay_model

    build_megatron_replay_model(_setup())  # e.g. a reference model with Megatron's router
    build(_setup())
    with pytest.raises(RouteError, match=r"positions \[0, 1\] hold stock RouterReplay"):
        RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)


def test_a_cleared_list_orphans_the_routers_and_their_forward_raises():
    model = _build(None)
    replays = [r.router_replay for r in _routers(model)]
    RouterReplay.clear_global_router_replay_instances()
    replays[0].router_replay_action = RouterReplayAction.RECORD  # per-model walk (NeMo-RL)
    ids, _ = _data()
    with pytest.raises(RouteError, match="MoE layer 1: .*not in Megatron's"):
        with torch.no_grad():
            model(ids[:1], torch.arange(SEQ).expand(1, SEQ), None)


def test_registration_is_the_models_routers_in_layer_order():
    model = _build(None)
    instances = RouterReplay.global_router_replay_instances
    assert [type(i) for i in instances] == [PR2RouterReplay] * LAYERS
    assert instances == [r.router_replay for r in _routers(model)]
    assert [i.layer_number for i in instances] == [1, 2]


def test_bad_replay_data_raises_naming_the_layer_and_row():
    model = _build(None)
    replay = _routers(model)[1].router_replay
    with pytest.raises(RouteError, match=r"MoE layer 2, token row 3: duplicate expert ids"):
        replay.set_target_indices(torch.tensor([[0, 1]] * 3 + [[2, 2]]))
    with pytest.raises(RouteError, match=r"MoE layer 2, token row 0: expert ids \[0, 9\]"):
        replay.set_target_indices(torch.tensor([[0, 9]]))
    replay.set_target_indices(torch.tensor([[0, 1]] * 3))
    RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    for other in RouterReplay.global_router_replay_instances[:1]:
        other.set_target_indices(torch.tensor([[0, 1]] * SEQ))
    ids, _ = _data()
    with pytest.raises(RouteError, match="MoE layer 2: replay data has 3 token rows"):
        with torch.no_grad():
            model(ids[:1], torch.arange(SEQ).expand(1, SEQ), None)


def test_protocol_and_phase_together_raise():
    model = _build(None)
    RoutingController(model).record()
    RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
    ids, _ = _data()
    with pytest.raises(RouteError, match="MoE layer 1: .*RECORD and the PR2 phase 'record'"):
        with torch.no_grad():
            model(ids[:1], torch.arange(SEQ).expand(1, SEQ), None)


def test_protocol_mode_needs_megatron_switch_and_is_off_by_default():
    from pr2_megatron.models.builder import transformer_config
    from pr2_megatron.routing.router import PR2Router as Router
    from pr2_megatron.runtime.parallel import ParallelConfig

    config = transformer_config(MoEModelConfig(num_experts=4, topk=K), ParallelConfig())
    with pytest.raises(ValueError, match="needs Megatron's moe_enable_routing_replay=True"):
        Router(config, pr2_config=PR2RouterConfig(megatron_router_replay=True))
    RouterReplay.clear_global_router_replay_instances()
    build(TinySetup(model=MoEModelConfig(num_experts=4, topk=K)))  # default: never registers
    assert RouterReplay.global_router_replay_instances == []


def test_fingerprint_tells_routes_apart():
    generator = torch.Generator().manual_seed(0)
    route = torch.rand(64, 8, generator=generator).argsort(-1)[:, :2]
    assert torch.equal(route_fingerprint(route), route_fingerprint(route.clone()))
    for row in range(0, 64, 7):
        changed = route.clone()
        changed[row] = changed[row].flip(0)  # same experts, other slot order
        assert not torch.equal(route_fingerprint(changed), route_fingerprint(route))
    assert not torch.equal(route_fingerprint(route[:32]), route_fingerprint(route[32:]))


# ------------------------------------------- Megatron 0.19's inference-engine bookkeeping
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["recorded-data", "static-buffer"])
def test_inference_engine_routing_metadata_gets_the_predicted_routes(cuda_graph):
    """The dynamic engine itself needs CUDA and flash-attn; its route bookkeeping runs here."""
    routing_metadata = pytest.importorskip(
        "megatron.core.inference.contexts.routing_metadata",
        reason="RoutingMetadata is new in megatron-core 0.19",
    )
    model = _build(None)
    ids, _ = _data()
    reference = _predicted_and_live_routes(model, [[0, 1]])["predict"][0]

    class Context:  # the three things RoutingMetadata reads from a DynamicInferenceContext
        max_tokens = 64
        active_token_count = SEQ * 2

        def using_cuda_graph_this_step(self):
            return cuda_graph

    metadata = routing_metadata.RoutingMetadata(Context(), K)
    if cuda_graph:
        metadata.enable_static_buffer_recording()
    RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
    model.eval()
    with torch.no_grad():
        model(ids[[0, 1]], torch.arange(SEQ).expand(2, SEQ), None)
    got = metadata.get_routing_indices()
    assert got is not None and torch.equal(got.long(), reference.long())
    RouterReplay.clear_global_router_replay_action()
    assert not torch.equal(reference, _predicted_and_live_routes(model, [[0, 1]])["record"][0])
    if cuda_graph:
        metadata.disable_static_buffer_recording()
