"""The predictability diagnostic: ridge fit, lagged and within-batch gains, recorder, files."""

import math

import pytest
import torch

from pr2_megatron.metrics.predictability import (
    RIDGE_LAMBDA,
    LayerTokens,
    fit_gain,
    ridge_fit,
    step_gains,
    summarize_gains,
)
from pr2_megatron.rl.diagnostics import (
    markdown,
    qualifies,
    read_step,
    response_keys,
    summarize_run,
    write_step,
)
from pr2_megatron.routing.probe import FeatureRecorder


def _tokens(w_EH, n=600, hidden=16, experts=8, seed=0, noise=0.0, prompts=40):
    """A step's tokens whose logit shift is ``w h`` (plus noise), at mini-steps 2-4 and 1."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen)
    z_old = torch.randn(n, experts, generator=gen)
    shift = h @ w_EH.T + noise * torch.randn(n, experts, generator=gen)
    mini = torch.randint(1, 5, (n,), generator=gen)
    shift[mini == 1] = 0.0
    return LayerTokens(
        h, z_old, z_old + shift, mini, torch.randint(0, prompts, (n,), generator=gen)
    )


def test_ridge_fit_is_the_closed_form_with_a_scale_free_lambda():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 10, generator=gen), torch.randn(300, 4, generator=gen)
    gram = x.double().T @ x.double()
    reg = RIDGE_LAMBDA * torch.trace(gram) / 10
    expected = torch.linalg.solve(
        gram + reg * torch.eye(10, dtype=torch.float64), x.double().T @ y.double()
    )
    assert torch.allclose(ridge_fit(x, y), expected.T.float(), atol=1e-5)
    # Scale-free: scaling h by c scales W by 1/c (the same predictions).
    assert torch.allclose(ridge_fit(3 * x, y) * 3, ridge_fit(x, y), atol=1e-5)
    w = torch.randn(4, 10, generator=gen)
    assert torch.allclose(ridge_fit(x, x @ w.T, lam=1e-9), w, atol=1e-4)
    assert RIDGE_LAMBDA == 0.1  # fixed before any result (docs/pr2_effect.md)


def test_persistent_drift_has_a_lagged_gain_and_a_fresh_one_does_not():
    gen = torch.Generator().manual_seed(1)
    persistent = torch.randn(8, 16, generator=gen) * 0.3
    steps = [_tokens(persistent, seed=s) for s in range(4)]
    gains = [step_gains({1: steps[s]}, {1: steps[s - 1]}, k=2) for s in range(1, 4)]
    assert all(g["lagged_gain"] > 0.05 for g in gains)
    assert all(g["within_gain"] > 0.05 for g in gains)
    # A new random direction every step: within the batch it is still linear, across not.
    fresh = [_tokens(torch.randn(8, 16, generator=gen) * 0.3, seed=10 + s) for s in range(4)]
    gains = [step_gains({1: fresh[s]}, {1: fresh[s - 1]}, k=2) for s in range(1, 4)]
    assert all(g["within_gain"] > 0.05 for g in gains)
    assert all(g["lagged_gain"] < 0.02 for g in gains)
    assert gains[0]["plain_overlap"] < 0.95  # the drift is there
    assert "lagged_gain" not in step_gains({1: fresh[0]}, None, k=2)


def test_gain_ignores_mini_step_one_and_a_zero_fit_gains_nothing():
    tokens = _tokens(torch.ones(8, 16) * 0.1)
    gain, plain, n = fit_gain(torch.zeros(8, 16), tokens.moved(), k=2)
    assert gain == 0.0 and n == int((tokens.mini_step_N >= 2).sum())
    moved_plain = step_gains({3: tokens}, None, k=2)["plain_overlap/layer_3"]
    assert moved_plain == pytest.approx(plain / n)


def test_within_batch_split_keeps_a_prompt_on_one_side():
    # A shift that differs by prompt parity only: a fit on the other half learns the wrong one.
    tokens = _tokens(torch.zeros(8, 16), n=400)
    sign = torch.where(tokens.prompt_N % 2 == 0, 1.0, -1.0).unsqueeze(1)
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(4))
    tokens.logits_cur_NE = tokens.logits_old_NE + sign * (tokens.hidden_old_NH @ w.T)
    tokens.logits_cur_NE[tokens.mini_step_N == 1] = tokens.logits_old_NE[tokens.mini_step_N == 1]
    assert step_gains({1: tokens}, None, k=2)["within_gain"] < -0.05


def test_summary_is_the_mean_and_paired_standard_error():
    summary = summarize_gains([0.01, 0.03, 0.02, 0.04])
    assert summary["mean"] == pytest.approx(0.025) and summary["n"] == 4
    sd = math.sqrt(sum((v - 0.025) ** 2 for v in [0.01, 0.03, 0.02, 0.04]) / 3)
    assert summary["se"] == pytest.approx(sd / 2)
    assert qualifies({"lagged_gain": {"mean": 0.012, "se": 0.003, "n": 20}})
    assert not qualifies({"lagged_gain": {"mean": 0.012, "se": 0.005, "n": 20}})  # < 3 SE
    assert not qualifies({"lagged_gain": {"mean": 0.008, "se": 0.001, "n": 20}})  # < 0.01


class _Router:
    def __init__(self, layer):
        self.route_layer_number = layer


def test_recorder_joins_rollout_features_with_later_logits_by_name():
    recorder = FeatureRecorder()
    router = _Router(2)
    keys = torch.tensor([10, -1, 12, 11])
    hidden = torch.arange(8.0).reshape(4, 2)
    logits = torch.arange(12.0).reshape(4, 3)
    recorder(router, keys, hidden, logits)  # no window: ignored
    assert recorder.layers == []
    recorder.set_window("rollout")
    recorder(router, keys, hidden, logits)
    recorder.set_window(3)
    recorder(router, torch.tensor([12, 99, 10]), torch.zeros(3, 2), -torch.ones(3, 3))
    joined = recorder.joined(2, "rollout", [3])
    assert joined.keys_N.tolist() == [10, 12]  # sorted; 99 was not recorded at rollout, -1 never
    assert torch.equal(joined.hidden_old_NH, hidden[[0, 2]])
    assert torch.equal(joined.logits_old_NE, logits[[0, 2]])
    assert torch.equal(joined.logits_cur_NE, -torch.ones(2, 3))
    assert joined.window_N.tolist() == [3, 3]
    recorder.keep = lambda k: k != 12
    recorder.clear()
    recorder.set_window("rollout")
    recorder(router, keys, hidden, logits)
    assert recorder.records(2, "rollout")[0].tolist() == [10, 11]


def test_response_keys_name_the_masked_positions():
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 0]])
    keys = response_keys(mask, [5, 9])
    assert keys.tolist() == sorted([(5 << 32) + 1, (5 << 32) + 2, (9 << 32) + 2])


def test_run_files_round_trip_and_summarize(tmp_path):
    gen = torch.Generator().manual_seed(5)
    persistent = torch.randn(8, 16, generator=gen) * 0.3
    (tmp_path / "config.yaml").write_text("rollout:\n  group_size: 4\n")
    for step in range(1, 6):
        tokens = _tokens(persistent, seed=step)
        keys = (torch.arange(len(tokens)) // 5 << 32) + torch.arange(len(tokens)) % 5
        tensors = {
            "keys": keys,
            "mini_step": tokens.mini_step_N,
            "hidden_old": tokens.hidden_old_NH,
            "logits_old": tokens.logits_old_NE,
            "logits_cur": tokens.logits_cur_NE,
        }
        write_step(
            tmp_path / "predictability" / f"step_{step:05d}.safetensors", {1: tensors}, step, 2
        )
    step, topk, back = read_step(tmp_path / "predictability" / "step_00002.safetensors")
    assert (step, topk) == (2, 2) and torch.equal(back[1]["keys"], keys)
    summary = summarize_run(tmp_path)
    assert summary["steps"] == 5 and summary["lagged_gain"]["n"] == 4
    assert summary["lagged_gain"]["mean"] > 0.05 and summary["qualifies"]
    assert "lagged gain" in markdown([summary])
