"""ProbMoE router: exact subset sampling, SIMPLE gradients, record/replay, recompute, EP=2.

Shape-suffix legend: T tokens, E experts, K route width, S enumerated subsets, L MoE layers.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from pr2_megatron.errors import RouteError
from pr2_megatron.models.builder import MoEModelConfig, build_gpt_moe
from pr2_megatron.routing.controller import RoutingController
from pr2_megatron.routing.probmoe.router import (
    ProbMoEConfig,
    ProbMoERouter,
    padded_route_ids,
    probmoe_router_builder,
    routes_to_mask,
)
from pr2_megatron.runtime.parallel import ParallelConfig, initialize_parallel
from pr2_megatron.testing.moe import global_parameters, global_state_dict, lm_loss, token_batch

try:
    from scipy import stats
except ImportError:  # pragma: no cover
    stats = None

pytestmark = pytest.mark.usefixtures("megatron_single")

MODES = {
    "exact-k": dict(topk=2, probmoe=ProbMoEConfig(mode="exact-k")),
    "dynamic-k": dict(topk=3, probmoe=ProbMoEConfig(mode="dynamic-k", k_min=1)),
}


def _skip_dynamic_k_where_unsupported(mode, probmoe=None):
    from pr2_megatron.routing.compat import megatron_features

    dynamic = mode == "dynamic-k" or (probmoe is not None and probmoe.mode == "dynamic-k")
    if dynamic and megatron_features().dispatcher_needs_topk_per_token:
        pytest.skip(
            f"megatron-core {megatron_features().version}: dispatchers need k experts per token"
        )


def _build(mode="exact-k", num_experts=4, seed=1234, probmoe=None, **model_kwargs):
    _skip_dynamic_k_where_unsupported(mode, probmoe)
    setting = MODES[mode]
    model_kwargs.setdefault("topk", setting["topk"])
    cfg = MoEModelConfig(num_experts=num_experts, **model_kwargs)
    initialize_parallel(ParallelConfig(), seed=seed)
    return build_gpt_moe(
        cfg, ParallelConfig(), router="probmoe", probmoe=probmoe or setting["probmoe"]
    )


def _size_range(router):
    return router.k_lo, router.k_hi


def _enumerate(num_experts, k_lo, k_hi):
    """Masks [S, E] of every subset with k_lo <= |S| <= k_hi, in a fixed order."""
    subsets = [
        s for j in range(k_lo, k_hi + 1) for s in itertools.combinations(range(num_experts), j)
    ]
    mask_SE = torch.zeros(len(subsets), num_experts, dtype=torch.float64)
    for i, s in enumerate(subsets):
        mask_SE[i, list(s)] = 1.0
    return mask_SE


def _router_input(router, theta_E, num_tokens, temperature=1.0):
    """Hidden states [T, 1, H] whose router logits are exactly ``theta_E * temperature``."""
    hidden = router.weight.shape[1]
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, 0] = theta_E * temperature
    hidden_T1H = torch.zeros(num_tokens, 1, hidden)
    hidden_T1H[:, :, 0] = 1.0
    return hidden_T1H


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------------------------
# Sampling: sizes, distinctness, frequencies against the exact distribution
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["exact-k", "dynamic-k"])
def test_sampled_subsets_are_valid_and_follow_the_exact_distribution(mode):
    temperature = 0.7
    probmoe = ProbMoEConfig(
        mode=mode, k_min=1, temperature=temperature, seed=11, gate="simple", normalize_gates=True
    )
    model = _build(mode, num_experts=6, probmoe=probmoe, num_layers=1)
    ctl = RoutingController(model)
    router = ctl.routers[0]
    k_lo, k_hi = _size_range(router)
    theta_E = torch.tensor([1.2, -0.4, 0.3, 0.9, -1.5, 0.0])
    num_tokens = 6000
    ctl.record()
    probs_TE, map_TE = router(_router_input(router, theta_E, num_tokens, temperature))
    routes_TK = ctl.collect_routes()[0][:, 0].long()

    # Every row: a set of k_lo..k_hi distinct experts, the route equal to the routing map.
    size_T = map_TE.sum(-1)
    assert bool(((size_T >= k_lo) & (size_T <= k_hi)).all())
    assert torch.equal(routes_to_mask(routes_TK, 6), map_TE)
    assert int((routes_TK < 6).sum()) == int(size_T.sum())  # no duplicates hidden in the route
    assert torch.equal(routes_TK.sort(-1).values, routes_TK)  # ascending, padding last
    assert int(routes_TK.max()) < router.route_id_bound
    if mode == "dynamic-k":
        assert len(set(size_T.tolist())) == k_hi - k_lo + 1  # sizes actually vary
    # Normalised SIMPLE gates: 1/|S| at the chosen experts, 0 elsewhere.
    expected_TE = map_TE.float() / size_T.unsqueeze(1).float()
    torch.testing.assert_close(probs_TE.detach(), expected_TE, rtol=0, atol=1e-7)

    # Empirical subset frequencies against p(S) ∝ exp(Σ θ_e), by enumeration.
    mask_SE = _enumerate(6, k_lo, k_hi)
    p_S = torch.softmax(mask_SE @ theta_E.double(), dim=0)
    code_S = (mask_SE * 2 ** torch.arange(6, dtype=torch.float64)).sum(-1).long()
    code_T = (map_TE.long() * 2 ** torch.arange(6)).sum(-1)
    counts_S = (code_T.unsqueeze(1) == code_S.unsqueeze(0)).sum(0).double()
    assert counts_S.sum() == num_tokens
    expected_S = p_S * num_tokens
    chi2 = float(((counts_S - expected_S) ** 2 / expected_S).sum())
    dof = mask_SE.shape[0] - 1
    if stats is not None:
        assert stats.chi2.sf(chi2, dof) > 1e-3, (chi2, dof)
    else:  # mean dof, sd sqrt(2 dof): 6 sd above the mean
        assert chi2 < dof + 6 * (2 * dof) ** 0.5
    # A wrong distribution (uniform over the same subsets) is clearly rejected by the same test.
    uniform_S = torch.full_like(p_S, num_tokens / p_S.numel())
    assert float(((counts_S - uniform_S) ** 2 / uniform_S).sum()) > 10 * chi2


def test_seeded_sampling_is_reproducible_and_differs_across_forwards():
    probmoe = ProbMoEConfig(mode="exact-k", seed=3)
    model = _build("exact-k", num_experts=6, probmoe=probmoe, num_layers=1)
    router = RoutingController(model).routers[0]
    hidden = _router_input(router, torch.zeros(6), 200)
    first = router(hidden)[1]
    second = router(hidden)[1]
    assert not torch.equal(first, second)
    router._generator = None  # a fresh generator restarts the same stream
    assert torch.equal(router(hidden)[1], first)


# --------------------------------------------------------------------------------------------
# Gradients: SIMPLE and marginal gates against autograd on the enumerated distribution
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, gate, normalize",
    [
        ("exact-k", "simple", True),
        ("exact-k", "simple", False),
        ("exact-k", "marginal", True),
        ("dynamic-k", "simple", True),
        ("dynamic-k", "marginal", False),
    ],
)
def test_router_gradient_matches_enumeration_reference(mode, gate, normalize):
    temperature = 1.3
    probmoe = ProbMoEConfig(
        mode=mode, k_min=1, gate=gate, normalize_gates=normalize, temperature=temperature, seed=5
    )
    model = _build(mode, num_experts=5, probmoe=probmoe, num_layers=1)
    ctl = RoutingController(model)
    router = ctl.routers[0]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=generator))
    hidden_T1H = torch.randn(7, 1, router.weight.shape[1], generator=generator) * 0.2
    coeff_TE = torch.randn(7, 5, generator=generator)
    ctl.record()
    probs_TE, map_TE = router(hidden_T1H)
    (probs_TE * coeff_TE).sum().backward()
    got = router.weight.grad.clone()

    # Reference: the whole distribution enumerated, float64, autograd.
    k_lo, k_hi = _size_range(router)
    mask_SE = _enumerate(5, k_lo, k_hi)
    weight = router.weight.detach().double().requires_grad_(True)
    theta_TE = hidden_T1H[:, 0].double() @ weight.T / temperature
    p_TS = torch.softmax(theta_TE @ mask_SE.T, dim=-1)
    mu_TE = p_TS @ mask_SE
    chosen_TE = map_TE.double()
    if gate == "simple":
        gates_TE = (chosen_TE + mu_TE - mu_TE.detach()) * chosen_TE
        if normalize:
            gates_TE = gates_TE / chosen_TE.sum(-1, keepdim=True)
    else:
        gates_TE = mu_TE * chosen_TE
        if normalize:
            gates_TE = gates_TE / gates_TE.sum(-1, keepdim=True)
    torch.testing.assert_close(probs_TE.detach().double(), gates_TE.detach(), rtol=1e-5, atol=1e-6)
    (gates_TE * coeff_TE.double()).sum().backward()
    torch.testing.assert_close(got.double(), weight.grad, rtol=1e-4, atol=1e-6)
    # The marginals couple all experts: rows of experts chosen for no token get gradient too.
    unused = ~map_TE.any(0)
    if bool(unused.any()):
        assert got[unused].abs().sum() > 0


# --------------------------------------------------------------------------------------------
# Deterministic choice at evaluation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["exact-k", "dynamic-k"])
@pytest.mark.parametrize("selection", ["map", "marginals"])
def test_evaluation_choice_is_deterministic_and_exact(mode, selection):
    probmoe = ProbMoEConfig(mode=mode, k_min=1, eval_selection=selection)
    model = _build(mode, num_experts=6, probmoe=probmoe, num_layers=1)
    router = RoutingController(model).routers[0]
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=generator))
    hidden_T1H = torch.randn(40, 1, router.weight.shape[1], generator=generator) * 0.15
    router.eval()
    first = router(hidden_T1H)[1]
    router.train()
    with torch.no_grad():  # training mode without autograd: also deterministic ("train")
        second = router(hidden_T1H)[1]
    assert torch.equal(first, second)

    k_lo, k_hi = _size_range(router)
    mask_SE = _enumerate(6, k_lo, k_hi)
    theta_TE = (hidden_T1H[:, 0] @ router.weight.detach().T).double()
    if selection == "map":
        best_T = (theta_TE @ mask_SE.T).argmax(-1)  # the most probable subset
        expected = mask_SE[best_T].bool()
    else:
        mu_TE = torch.softmax(theta_TE @ mask_SE.T, dim=-1) @ mask_SE
        size_T = (mu_TE >= 0.5).sum(-1).clamp(k_lo, k_hi)
        rank_TE = mu_TE.argsort(-1, descending=True).argsort(-1)
        expected = rank_TE < size_T.unsqueeze(1)
    assert torch.equal(first, expected)
    if mode == "dynamic-k":
        assert len(set(first.sum(-1).tolist())) > 1


# --------------------------------------------------------------------------------------------
# Record -> replay inside a tiny GPT-MoE
# --------------------------------------------------------------------------------------------


def _capture_maps(ctl):
    maps = {}
    handles = []
    for router in ctl.routers:

        def hook(_module, _inputs, output, number=router.layer_number):
            maps.setdefault(number, []).append(output[1].detach().clone())

        handles.append(router.register_forward_hook(hook))
    return maps, handles


@pytest.mark.parametrize("mode", ["exact-k", "dynamic-k"])
def test_recorded_sampled_subsets_replay_exactly_in_gpt_moe(mode):
    model = _build(mode, num_experts=4)
    ctl = RoutingController(model)
    ids, labels = token_batch(2, 12, 64, seed=2)
    ctl.record()
    maps, handles = _capture_maps(ctl)
    loss_rec = lm_loss(model, ids, labels)
    loss_rec.backward()
    grads_rec = _grads(model)
    routes = ctl.collect_routes()[0]
    assert routes.shape == (24, 2, MODES[mode]["topk"])
    assert ctl.route_id_bound == (4 + 3 if mode == "dynamic-k" else 4)
    for index, router in enumerate(ctl.routers):
        recorded_map = routes_to_mask(routes[:, index], 4)
        assert torch.equal(maps[router.layer_number][0], recorded_map)
    # Training-mode routes are sampled: they differ from the deterministic choice somewhere.
    with torch.no_grad():
        model.eval()
        ctl.record()
        lm_loss(model, ids, None)
        model.train()
    assert not torch.equal(ctl.collect_routes()[0], routes)

    model.zero_grad()
    maps.clear()
    ctl.replay(collect_metrics=True)
    ctl.set_targets(routes)
    loss_rep = lm_loss(model, ids, labels)
    loss_rep.backward()
    ctl.finish()
    assert torch.equal(loss_rep, loss_rec)
    grads_rep = _grads(model)
    assert grads_rep.keys() == grads_rec.keys()
    for name in grads_rec:
        assert torch.equal(grads_rep[name], grads_rec[name]), name
    for index, router in enumerate(ctl.routers):
        assert torch.equal(maps[router.layer_number][0], routes_to_mask(routes[:, index], 4))
    metrics = ctl.metrics()
    assert 0.0 <= metrics["zero_deviation_ratio"] < 1.0  # sampled vs deterministic live route

    # After the routers move, replay still dispatches the recorded subsets; routers get grads.
    with torch.no_grad():
        for router in ctl.routers:
            router.weight.add_(torch.randn_like(router.weight))
    model.zero_grad()
    maps.clear()
    ctl.replay()
    ctl.set_targets(routes)
    lm_loss(model, ids, labels).backward()
    ctl.finish()
    for handle in handles:
        handle.remove()
    for index, router in enumerate(ctl.routers):
        assert torch.equal(maps[router.layer_number][0], routes_to_mask(routes[:, index], 4))
        assert router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["exact-k", "dynamic-k"])
def test_pr2_prediction_composes_with_probmoe(mode):
    from pr2_megatron.testing.moe import randomize_predictors

    model = _build(mode, num_experts=4)
    randomize_predictors(model, scale=2.0, seed=3)
    ctl = RoutingController(model)
    ids, labels = token_batch(2, 12, 64, seed=4)
    ctl.predict()
    with torch.no_grad():
        rollout_out = lm_loss(model, ids, None)
    predicted = ctl.collect_routes()[0]
    live = ctl.collect_plain_routes()[0]
    assert not torch.equal(predicted, live)  # the predictor moved the deterministic choice
    ctl.replay(train_predictor=False)
    ctl.set_targets(predicted, live)
    with torch.no_grad():
        replay_out = lm_loss(model, ids, None)
    ctl.finish()
    assert torch.equal(replay_out, rollout_out)  # rollout function == training function
    ctl.replay(train_predictor=True, collect_metrics=True)
    ctl.set_targets(predicted, live)
    lm_loss(model, ids, labels).backward()
    ctl.finish()
    assert all(p.grad is not None for p in ctl.predictor_parameters())
    metrics = ctl.metrics()
    assert metrics["topk_overlap/plain"] == 1.0 and metrics["zero_deviation_ratio"] < 1.0


def test_recompute_reuses_the_sampled_subset():
    ids, labels = token_batch(2, 10, 64, seed=3)
    plain = _build("dynamic-k", num_experts=4)
    state = global_state_dict(plain)
    ctl = RoutingController(plain)
    recomputed = _build("dynamic-k", num_experts=4, recompute_granularity="selective")
    with torch.no_grad():
        for name, param in global_parameters(recomputed).items():
            param.copy_(state[name])
    ctl_rc = RoutingController(recomputed)
    # Sampling with recompute: the backward recomputes the MoE layer and must reuse the route.
    ctl_rc.record()
    loss_rc = lm_loss(recomputed, ids, labels)
    loss_rc.backward()
    routes = ctl_rc.collect_routes()[0]
    ctl.replay()
    ctl.set_targets(routes)
    loss = lm_loss(plain, ids, labels)
    loss.backward()
    ctl.finish()
    assert torch.equal(loss, loss_rc)
    plain_grads = {n: p.grad for n, p in global_parameters(plain).items() if p.grad is not None}
    for name, param in global_parameters(recomputed).items():
        if param.grad is not None:
            torch.testing.assert_close(param.grad, plain_grads[name], rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------------
# Validation, specs, config
# --------------------------------------------------------------------------------------------


def test_variable_size_targets_are_validated():
    model = _build("dynamic-k", num_experts=4, probmoe=ProbMoEConfig(mode="dynamic-k", k_min=2))
    ctl = RoutingController(model)
    assert ctl.route_id_bound == 7
    ids, _ = token_batch(2, 6, 64, seed=0)
    ok = torch.tensor([0, 2, 6]).repeat(12, 2, 1)  # two experts and empty slot 2 (= E + 2)
    ctl.replay()
    ctl.set_targets(ok)
    with torch.no_grad():
        lm_loss(model, ids, None)
    ctl.finish()
    too_small = torch.tensor([1, 5, 6]).repeat(12, 2, 1)
    ctl.replay()
    ctl.set_targets(too_small)  # distinct ids in range: the controller accepts it ...
    with pytest.raises(RouteError, match="MoE layer 1, token row 0.*2..3 distinct"):
        with torch.no_grad():  # ... and the router rejects a row below k_min
            lm_loss(model, ids, None)
    with pytest.raises(ValueError, match="duplicate expert ids"):
        ctl.set_targets(torch.tensor([1, 1, 6]).repeat(12, 2, 1))
    with pytest.raises(ValueError, match="outside \\[0, 7\\)"):
        ctl.set_targets(torch.tensor([1, 7, 6]).repeat(12, 2, 1))
    # Exact-k routes have no padding: E is out of range.
    exact = _build("exact-k", num_experts=4)
    ctl_exact = RoutingController(exact)
    assert ctl_exact.route_id_bound == 4
    ctl_exact.replay()
    with pytest.raises(ValueError, match="outside \\[0, 4\\)"):
        ctl_exact.set_targets(torch.tensor([1, 4]).repeat(12, 2, 1))


def test_padded_routes_are_sets_that_compare_as_subsets():
    from pr2_megatron.metrics import same_set

    mask_TE = torch.tensor(
        [[0, 1, 0, 1, 0], [0, 0, 1, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 1], [0, 1, 0, 1, 0]],
        dtype=torch.bool,
    )
    routes_TK = padded_route_ids(mask_TE, 3)
    assert routes_TK.tolist() == [[1, 3, 7], [2, 6, 7], [0, 1, 2], [4, 6, 7], [1, 3, 7]]
    assert torch.equal(routes_to_mask(routes_TK, 5), mask_TE)
    other_TK = padded_route_ids(mask_TE[[4, 3, 2, 1, 0]], 3)
    # same_set (written for full top-k rows) is right for padded rows too.
    assert same_set(routes_TK, other_TK).tolist() == [True, False, True, False, True]


def test_dynamic_k_routes_go_through_a_route_table_and_replay(tmp_path):
    from pr2_megatron.routes.table import RouteTable

    model = _build("dynamic-k", num_experts=4)
    ctl = RoutingController(model)
    ids, labels = token_batch(2, 8, 64, seed=5)
    ctl.record()
    loss_rec = lm_loss(model, ids, labels)
    routes_SBLK = ctl.collect_routes()[0].reshape(8, 2, 2, 3)
    table = RouteTable.from_samples(
        [routes_SBLK[:, b] for b in range(2)],
        sample_ids=[10, 11],
        layer_numbers=ctl.layer_numbers,
        num_experts=ctl.route_id_bound,
        topk=ctl.topk,
    )
    table.save(tmp_path / "routes.safetensors")
    loaded = RouteTable.load(tmp_path / "routes.safetensors")
    assert loaded.equal(table)
    per_sample = [loaded.routes_TLK[loaded.sample_slice(b)].long() for b in range(2)]
    ctl.replay()
    ctl.set_targets(torch.stack(per_sample, dim=1).reshape(16, 2, 3))
    with torch.no_grad():
        loss_rep = lm_loss(model, ids, labels)
    ctl.finish()
    assert torch.equal(loss_rep, loss_rec.detach())


def test_spec_builder_puts_probmoe_routers_in_moe_layers_only():
    from pr2_megatron.models.builder import transformer_config
    from pr2_megatron.routing.specs import pr2_decoder_block_spec

    cfg = MoEModelConfig(num_layers=3, moe_layer_freq=[0, 1, 1], topk=2)
    initialize_parallel(ParallelConfig())
    config = transformer_config(cfg, ParallelConfig())
    builder = probmoe_router_builder(ProbMoEConfig(mode="exact-k"))
    spec = pr2_decoder_block_spec(config, router_builder=builder, use_transformer_engine=False)
    from pr2_megatron.routing.specs import _router_of

    routers = [_router_of(layer) for layer in spec.layer_specs]
    assert routers[1] is builder and routers[2] is builder
    model = _build("exact-k", num_layers=3, moe_layer_freq=[0, 1, 1])
    found = [m for m in model.modules() if isinstance(m, ProbMoERouter)]
    assert [r.layer_number for r in found] == [2, 3]
    assert model.decoder.layers[0].mlp.__class__.__name__ == "MLP"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(aux_loss_coeff=0.01), "aux losses"),
        (dict(enable_expert_bias=True, score_function="sigmoid"), "expert_bias"),
        (dict(probmoe=ProbMoEConfig(mode="dynamic-k", k_max=2)), "k_max=2 differs"),
    ],
)
def test_unsupported_settings_are_rejected(kwargs, message):
    probmoe = kwargs.pop("probmoe", None)
    with pytest.raises(ValueError, match=message):
        _build("dynamic-k", num_experts=4, probmoe=probmoe, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="top-k"), "probmoe.mode"),
        (dict(temperature=0.0), "temperature"),
        (dict(k_min=3, k_max=2), "k_max=2"),
        (dict(gate="soft"), "probmoe.gate"),
    ],
)
def test_bad_probmoe_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProbMoEConfig(**kwargs)


def test_probmoe_settings_need_the_probmoe_router():
    initialize_parallel(ParallelConfig())
    with pytest.raises(ValueError, match="router='probmoe'"):
        build_gpt_moe(MoEModelConfig(), ParallelConfig(), router="pr2", probmoe=ProbMoEConfig())


# --------------------------------------------------------------------------------------------
# Expert parallelism: EP=2 in 2 gloo ranks equals the single-process reference
# --------------------------------------------------------------------------------------------

BATCH, SEQ = 2, 8


def _ep_model_cfg(mode, dispatcher):
    return MoEModelConfig(
        num_layers=2, num_experts=4, topk=MODES[mode]["topk"], token_dispatcher=dispatcher
    )


def _ep_step(model, ctl, ids, labels, routes):
    """Deterministic eval routes, then one replayed training forward/backward."""
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    model.eval()
    ctl.record()
    with torch.no_grad():
        model(ids, positions, None)
    eval_routes = ctl.collect_routes()[0]
    model.train()
    ctl.replay()
    ctl.set_targets(routes)
    token_loss = model(ids, positions, None, labels=labels)
    token_loss.sum().backward()
    ctl.finish()
    grads = {
        name: param.grad.detach().clone()
        for name, param in global_parameters(model).items()
        if param.grad is not None and ("router" in name or "local_experts" in name)
    }
    return {"eval_routes": eval_routes, "token_loss": token_loss.detach(), "grads": grads}


def _ep_rank_entry(cases, ids, labels):
    import torch.distributed as dist

    from pr2_megatron.routes.gather import gather_route_table
    from pr2_megatron.testing.moe import load_full_state

    outs = []
    for mode, dispatcher, full_state, routes_SBLK in cases:
        parallel = ParallelConfig(expert_model_parallel_size=2)
        initialize_parallel(parallel, seed=1234)
        model = build_gpt_moe(
            _ep_model_cfg(mode, dispatcher),
            parallel,
            router="probmoe",
            probmoe=MODES[mode]["probmoe"],
        )
        load_full_state(model, full_state)
        rank = dist.get_rank()  # data parallel: one sample per rank
        rank_ids, rank_labels = ids[rank : rank + 1], labels[rank : rank + 1]
        routes = routes_SBLK[:, rank].reshape(SEQ, *routes_SBLK.shape[2:])
        ctl = RoutingController(model)
        out = _ep_step(model, ctl, rank_ids, rank_labels, routes)
        # A sampled rollout pass through the EP dispatcher, its routes all-gathered into one table.
        ctl.record()
        positions = torch.arange(SEQ).expand_as(rank_ids)
        with torch.enable_grad():
            out["sampled_loss"] = model(rank_ids, positions, None, labels=rank_labels).detach()
        sampled = ctl.collect_routes()[0]
        router = ctl.routers[0]
        sizes = torch.stack([routes_to_mask(sampled[:, i], 4).sum(-1) for i in range(2)])
        out["sampled_sizes_ok"] = bool(((sizes >= router.k_lo) & (sizes <= router.k_hi)).all())
        out["sampled"] = sampled
        out["table"] = gather_route_table(
            [sampled],
            [[rank]],
            layer_numbers=ctl.layer_numbers,
            num_experts=ctl.route_id_bound,
            topk=ctl.topk,
        )
        outs.append(out)
    return outs


EP_CASES = [("exact-k", "alltoall"), ("dynamic-k", "alltoall"), ("dynamic-k", "allgather")]


@pytest.mark.slow
def test_expert_parallel_replay_matches_single_process():
    """EP=2 (exact-k alltoall, dynamic-k alltoall and allgather) in one 2-rank launch."""
    from pr2_megatron.routes import micro_batch_targets
    from pr2_megatron.testing.distributed import run_distributed
    from pr2_megatron.testing.moe import load_full_state

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (BATCH, SEQ), generator=generator)
    labels = torch.randint(0, 64, (BATCH, SEQ), generator=generator)
    from pr2_megatron.routing.compat import megatron_features

    cases, refs = [], []
    ep_cases = EP_CASES
    if megatron_features().dispatcher_needs_topk_per_token:
        ep_cases = [case for case in EP_CASES if case[0] == "exact-k"]
    for mode, dispatcher in ep_cases:
        initialize_parallel(ParallelConfig(), seed=1234)
        model = build_gpt_moe(
            _ep_model_cfg(mode, dispatcher),
            ParallelConfig(),
            router="probmoe",
            probmoe=MODES[mode]["probmoe"],
        )
        full_state = global_state_dict(model)
        ctl = RoutingController(model)
        positions = torch.arange(SEQ).expand_as(ids)
        ctl.record()
        model(ids, positions, None, labels=labels)  # training mode: sampled subsets
        routes = ctl.collect_routes()[0]
        if mode == "dynamic-k":
            sizes = routes_to_mask(routes[:, 0], 4).sum(-1)
            assert len(set(sizes.tolist())) > 1, "dynamic-k sampled one size only"
        model.zero_grad()
        refs.append(_ep_step(model, ctl, ids, labels, routes))
        cases.append((mode, dispatcher, full_state, routes.reshape(SEQ, BATCH, *routes.shape[1:])))

    results = run_distributed(_ep_rank_entry, 2, cases, ids, labels)
    for case_index, (mode, dispatcher) in enumerate(ep_cases):
        ref = refs[case_index]
        per_rank = [res[case_index] for res in results]
        eval_SBLK = ref["eval_routes"].reshape(SEQ, BATCH, *ref["eval_routes"].shape[1:])
        where = f"{mode}/{dispatcher}"
        for rank, res in enumerate(per_rank):
            assert torch.equal(res["eval_routes"], eval_SBLK[:, rank]), f"{where} rank {rank}"
            torch.testing.assert_close(
                res["token_loss"], ref["token_loss"][rank : rank + 1], rtol=1e-5, atol=1e-6
            )
            assert res["sampled_sizes_ok"], where
        for name, ref_grad in ref["grads"].items():
            holders = [res["grads"][name] for res in per_rank if name in res["grads"]]
            assert holders, f"{where} {name}: no rank holds a gradient"
            torch.testing.assert_close(
                torch.stack(holders).sum(0), ref_grad, rtol=1e-4, atol=1e-6, msg=f"{where} {name}"
            )
        assert any("router" in name for name in ref["grads"])

        # The EP=2 rollout's sampled routes, all-gathered, replay in one process (another
        # layout): same table on both ranks, every token's loss as at rollout (ratio 1).
        table = per_rank[0]["table"]
        assert table.equal(per_rank[1]["table"])
        for rank, res in enumerate(per_rank):
            rows = table.routes_TLK[table.rows_for([rank])].long()
            assert torch.equal(rows, res["sampled"]), where
        initialize_parallel(ParallelConfig(), seed=1234)
        model = build_gpt_moe(
            _ep_model_cfg(mode, dispatcher),
            ParallelConfig(),
            router="probmoe",
            probmoe=MODES[mode]["probmoe"],
        )
        load_full_state(model, cases[case_index][2])
        ctl = RoutingController(model)
        ctl.replay()
        ctl.set_targets(micro_batch_targets(table, [0, 1], SEQ))
        with torch.no_grad():
            token_loss = model(ids, torch.arange(SEQ).expand_as(ids), None, labels=labels)
        ctl.finish()
        rollout_loss = torch.cat([res["sampled_loss"] for res in per_rank])
        torch.testing.assert_close(token_loss, rollout_loss, rtol=1e-5, atol=1e-6)
