"""The PR2 authors' stabilisers: each against its formula, and in the router's predict phase."""

import math

import pytest
import torch

from pr2_megatron.models import MoEModelConfig
from pr2_megatron.routing import PR2RouterConfig, RoutingController
from pr2_megatron.routing.predictor import predictor_loss
from pr2_megatron.routing.stabilisers import (
    DeltaSettings,
    boundary_margin,
    boundary_weights,
    cap_magnitude,
    cap_margin,
    changed_routes,
    depth_fraction,
    depth_scale,
    flip_fallback,
    hidden_shift_weights,
    margin_cap_eta,
    stabilise_delta,
)
from pr2_megatron.testing.moe import TinySetup, build, randomize_predictors, token_batch


def _topk(k):
    return lambda logits: logits.topk(k, dim=-1).indices


@pytest.mark.parametrize(
    "schedule, decay",
    [
        ("none", lambda d: 0.0),
        ("linear", lambda d: d),
        ("sqrt", math.sqrt),
        ("cosine", lambda d: 0.5 * (1 - math.cos(math.pi * d))),
    ],
)
def test_depth_scale_follows_its_formula(schedule, decay):
    for layer in range(1, 6):
        d = depth_fraction(layer, 5)
        assert d == pytest.approx((layer - 1) / 4)
        expected = 1 - decay(d) * (1 - 0.5)
        assert depth_scale(schedule, d, 0.5) == pytest.approx(expected)
    if schedule != "none":
        assert depth_scale(schedule, 0.0, 0.3) == pytest.approx(1.0)  # first layer: γ = 1
        assert depth_scale(schedule, 1.0, 0.3) == pytest.approx(0.3)  # last layer: γ_min
    assert depth_scale("sqrt", 0.25, 0.5) == pytest.approx(0.75)  # 1 - 0.5 * 0.5
    with pytest.raises(ValueError, match="exp"):
        depth_scale("exp", 0.5, 0.5)


def test_magnitude_cap_bounds_the_ratio_exactly():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 8, generator=gen)
    delta = torch.randn(50, 8, generator=gen) * 0.5
    capped = cap_magnitude(delta, logits, 0.015)
    ratio = capped.abs().mean() / logits.abs().mean()
    assert ratio == pytest.approx(0.015, rel=1e-5)
    # Direction kept; a shift already below the cap is left alone.
    assert torch.allclose(capped / capped.norm(), delta / delta.norm(), atol=1e-6)
    small = delta * 1e-4
    assert torch.equal(cap_magnitude(small, logits, 0.015), small)


def test_margin_cap_bounds_each_token_and_at_eta_one_changes_no_route():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(200, 8, generator=gen)
    delta = torch.randn(200, 8, generator=gen) * 3.0
    margin = boundary_margin(logits, 2)
    sorted_logits = logits.sort(dim=-1, descending=True).values
    assert torch.allclose(margin, sorted_logits[:, 1] - sorted_logits[:, 2])
    for eta in (0.5, 1.0, 1.5):
        capped = cap_margin(delta, logits, 2, eta)
        assert (capped.abs().amax(-1) <= eta * margin / 2 + 1e-6).all()
    # With η <= 1 the k-th and (k+1)-th logits cannot cross: no route changes.
    routes = _topk(2)
    assert not changed_routes(
        routes(logits + cap_margin(delta, logits, 2, 1.0)), routes(logits)
    ).any()
    # With η = 1.5 some do (the cap is not a disguised "Δ = 0").
    assert changed_routes(routes(logits + cap_margin(delta, logits, 2, 1.5)), routes(logits)).any()


def test_margin_cap_anneals_linearly_between_rollouts():
    assert margin_cap_eta(None, 1.5, [80, 160], 100) is None
    assert margin_cap_eta(1.0, None, None, 500) == 1.0
    assert margin_cap_eta(1.0, 1.5, [80, 160], 10) == 1.0
    assert margin_cap_eta(1.0, 1.5, [80, 160], 120) == pytest.approx(1.25)
    assert margin_cap_eta(1.0, 1.5, [80, 160], 200) == 1.5


def test_flip_fallback_restores_the_old_route_where_the_margin_is_small():
    logits = torch.tensor(
        [
            [3.0, 2.0, 1.0, 0.0],  # flips 2 <-> 3 to a post-Δ margin of 0.02: falls back
            [3.0, 2.0, 1.0, 0.0],  # flips 2 <-> 3 to a post-Δ margin of 0.5: kept
            [3.0, 2.0, 1.0, 0.0],  # no flip (small margin, but the same set): kept
        ]
    )
    delta = torch.tensor(
        [
            [0.0, -1.02, 0.0, 0.0],
            [0.0, -0.75, 0.75, 0.0],
            [0.0, -0.98, 0.0, 0.0],
        ]
    )
    out, fallback = flip_fallback(delta, logits, 2, 0.05, _topk(2))
    assert fallback.tolist() == [True, False, False]
    assert torch.equal(out[0], torch.zeros(4))
    assert torch.equal(out[1:], delta[1:])
    routes = _topk(2)
    assert not changed_routes(routes(logits[:1] + out[:1]), routes(logits[:1])).any()
    assert changed_routes(routes(logits[1:2] + out[1:2]), routes(logits[1:2])).all()


def test_boundary_weights_normalise_to_mean_one_and_clip():
    logits = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.5, 0.0], [2.0, 1.9, 0.0], [2.0, 1.99, 0.0]])
    # k = 1: margins 1.0, 0.5, 0.1, 0.01 (the last below m_min = 0.05).
    weights = boundary_weights(logits, 1, margin_min=0.05, weight_max=100.0)
    assert weights.mean() == pytest.approx(1.0)
    inverse = torch.tensor([1 / 1.0, 1 / 0.5, 1 / 0.1, 1 / 0.05])
    assert torch.allclose(weights, inverse / inverse.mean(), atol=1e-5)
    clipped = boundary_weights(logits, 1, margin_min=0.05, weight_max=1.5)
    assert clipped.max() == pytest.approx(1.5)
    assert torch.allclose(clipped[:2], weights[:2])


def test_hidden_shift_weights_are_the_headroom_under_the_threshold():
    old = torch.zeros(4, 10)
    old[:, 0] = 1.0
    cur = old.clone()
    cur[:, 1] = torch.tensor([0.0, 0.005, 0.01, 0.03])  # r = 0, 0.25 τ, 0.5 τ, 1.5 τ
    binary = hidden_shift_weights(cur, old, "binary", 0.02)
    linear = hidden_shift_weights(cur, old, "linear", 0.02)
    quadratic = hidden_shift_weights(cur, old, "quadratic", 0.02)
    assert binary.tolist() == [1.0, 1.0, 1.0, 0.0]
    assert torch.allclose(linear, torch.tensor([1.0, 0.75, 0.5, 0.0]), atol=1e-5)
    assert torch.allclose(quadratic, torch.tensor([1.0, 0.5625, 0.25, 0.0]), atol=1e-5)


def test_weighted_predictor_loss_is_the_weighted_mean_of_token_losses():
    gen = torch.Generator().manual_seed(2)
    old, cur, delta = (torch.randn(6, 8, generator=gen) for _ in range(3))
    for kind in ("kl-post", "l2", "kl"):
        plain = predictor_loss(kind, cur, old, delta)
        assert predictor_loss(kind, cur, old, delta, torch.ones(6)) == pytest.approx(float(plain))
        weights = torch.tensor([1.0, 0.0, 2.0, 0.0, 1.0, 2.0])
        each = torch.stack(
            [
                predictor_loss(kind, cur[i : i + 1], old[i : i + 1], delta[i : i + 1])
                for i in range(6)
            ]
        )
        expected = (weights * each).mean()
        assert predictor_loss(kind, cur, old, delta, weights) == pytest.approx(
            float(expected), rel=1e-5
        )


def test_stabilise_delta_applies_every_stage_and_nothing_when_off():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(100, 8, generator=gen)
    delta = torch.randn(100, 8, generator=gen)
    same, none = stabilise_delta(DeltaSettings(), delta, logits, k=2, depth=0.5, topk_fn=_topk(2))
    assert torch.equal(same, delta) and none is None
    settings = DeltaSettings(
        depth_schedule="sqrt", magnitude_cap=0.05, margin_cap=1.5, flip_fallback_margin=0.05
    )
    out, fallback = stabilise_delta(settings, delta, logits, k=2, depth=1.0, topk_fn=_topk(2))
    assert out.abs().mean() / logits.abs().mean() <= 0.05 + 1e-6
    assert (out.abs().amax(-1) <= 1.5 * boundary_margin(logits, 2) / 2 + 1e-6).all()
    assert fallback is not None and torch.equal(out[fallback], torch.zeros_like(out[fallback]))


def test_stabiliser_keys_are_checked():
    with pytest.raises(ValueError, match="delta_depth_schedule"):
        PR2RouterConfig(delta_depth_schedule="exp")
    with pytest.raises(ValueError, match="delta_magnitude_cap"):
        PR2RouterConfig(delta_magnitude_cap=0.0)
    with pytest.raises(ValueError, match="go together"):
        PR2RouterConfig(delta_margin_cap=1.0, delta_margin_cap_final=1.5)
    with pytest.raises(ValueError, match="first < last"):
        PR2RouterConfig(
            delta_margin_cap=1.0, delta_margin_cap_final=1.5, delta_margin_cap_anneal=[9, 3]
        )
    with pytest.raises(ValueError, match="hidden_shift_weighting"):
        PR2RouterConfig(hidden_shift_weighting="cubic")
    defaults = PR2RouterConfig()
    assert not defaults.delta_settings(rollout_id=1).active  # paper-faithful: all off
    assert defaults.hidden_shift_weighting == "none" and not defaults.boundary_weighting


def _predict_once(pr2, single_process_group_seed=0):
    model = build(TinySetup(model=MoEModelConfig(num_layers=2, num_experts=8), pr2=pr2))
    randomize_predictors(model, scale=2.0, seed=single_process_group_seed)
    ctl = RoutingController(model)
    ids, _ = token_batch(4, 8, 64, seed=0)
    positions = torch.arange(8).expand_as(ids)
    ctl.predict(collect_metrics=True)
    with torch.no_grad():
        model(ids, positions, None)
    changed = [
        changed_routes(p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1]))
        for p, q in zip(ctl.collect_routes(), ctl.collect_plain_routes())
    ]
    return ctl.metrics(), torch.cat(changed)


@pytest.mark.usefixtures("megatron_single")
def test_router_predicts_through_the_stabilisers():
    loose, changed = _predict_once(PR2RouterConfig())
    assert loose["predictor/route_change_fraction"] > 0.1 and changed.any()
    assert loose["predictor/route_change_fraction"] == pytest.approx(changed.float().mean().item())
    # Margin cap at η = 1: the router dispatches exactly the plain-replay routes.
    capped, changed = _predict_once(PR2RouterConfig(delta_margin_cap=1.0))
    assert capped["predictor/route_change_fraction"] == 0.0 and not changed.any()
    # Flip fallback with a huge threshold: every flipped token falls back.
    fallback, changed = _predict_once(PR2RouterConfig(flip_fallback_margin=1e9))
    assert not changed.any() and fallback["predictor/flip_fallback_fraction"] > 0.1
    assert "predictor/route_change_fraction/layer_1" in fallback
