"""The trainer on Megatron's machinery at scale-relevant settings, each against a reference run.

* bf16 parameters at a tiny lr: the fp32 main parameters of Megatron's optimizer carry the
  router update fp32 training makes (a bf16 weight alone would round most of it away);
* actor-side PR2 (``replay.mode=pr2 replay.predict_at=old_logprob``): the rollout routes live,
  the old-log-prob pass records the predicted routes, every training forward replays exactly
  those, and the predictors train from mini-step 2 on;
* PP=2 and PP=2 x VPP=2 log the metrics PP=1 logs on the same seed (slow: 2 gloo ranks);
* context parallelism is refused on CPU with the reason.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pr2_megatron.rl.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"

# One rank in the pytest process (EP=1), 2 MoE layers, no warm start, one RL step of 2 mini-steps.
IN_PROCESS = [
    "parallel.expert_model_parallel_size=1",
    "model.num_layers=2",
    "warm_start.steps=0",
    "rollout.prompts_per_step=2",
    "rollout.group_size=4",
    "rollout.micro_batch_size=8",
    "grpo.micro_batch_size=2",
    "replay.off_n=2",
    "logging.tensorboard=false",
]


def _parity_reward(problem, response) -> float:
    """Fraction of even token ids: a reward an untrained policy earns unevenly within a group,
    so the advantages and the router gradient are not zero (the digit tasks give 0 at init)."""
    return sum(int(t) % 2 == 0 for t in response) / max(1, len(response))


def _trainer(run_dir, *overrides):
    from pr2_megatron.rl.train import Trainer

    trainer = Trainer(load_config(TINY, [*IN_PROCESS, f"logging.dir={run_dir}", *overrides]))
    trainer.task.reward = _parity_reward
    return trainer


# ============================================================================ bf16 parameters
def _router_update(run_dir, dtype: str, steps: int):
    trainer = _trainer(run_dir, f"model.params_dtype={dtype}", "optim.lr=1e-6", f"steps={steps}")
    with torch.no_grad():  # both runs start from the same (bf16-representable) weights
        for chunk in trainer.chunks:
            for param in chunk.parameters():
                param.copy_(param.to(torch.bfloat16).to(param.dtype))
    trainer.optimizer.reload_model_params()
    before = [r.weight.detach().float().clone() for r in trainer.routers]
    for _ in range(steps):
        trainer.rl_step()
    after = [r.weight.detach().float().clone() for r in trainer.routers]
    main = [getattr(r.weight, "main_param", None) for r in trainer.routers]
    main = [None if m is None else m.detach().float().clone().view(r.weight.shape)
            for m, r in zip(main, trainer.routers)]  # fmt: skip
    return before, after, main, [r.weight.dtype for r in trainer.routers]


def test_bf16_parameters_get_the_fp32_router_update_at_lr_1e6(megatron_single, tmp_path):
    from pr2_megatron.runtime.parallel import release_parallel_state

    ref_before, ref_after, _, ref_dtypes = _router_update(tmp_path / "fp32", "fp32", 2)
    release_parallel_state()
    before, after, main, dtypes = _router_update(tmp_path / "bf16", "bf16", 2)
    assert set(ref_dtypes) == {torch.float32} and set(dtypes) == {torch.bfloat16}
    assert len(main) == 2 and all(m is not None for m in main)  # fp32 main params exist
    for layer, (r0, r1, b0, b1, m1) in enumerate(zip(ref_before, ref_after, before, after, main)):
        assert torch.equal(r0, b0), layer  # same starting weights
        ref_update, update = r1 - r0, m1 - b0
        assert ref_update.norm() > 0, layer  # 4 Adam steps moved the router
        # The optimizer's update equals fp32 training's: the same size and direction, every
        # element within 5% of the largest (bf16 forward/backward numerics; Adam normalises).
        ratio = float(update.norm() / ref_update.norm())
        cosine = float((update * ref_update).sum() / (update.norm() * ref_update.norm()))
        assert 0.98 < ratio < 1.02, (layer, ratio)
        assert cosine > 0.999, (layer, cosine)
        assert (update - ref_update).abs().max() < 0.05 * ref_update.abs().max(), layer
        # The model runs with those weights rounded to bf16 (nothing else lost) ...
        assert torch.equal(b1, m1.to(torch.bfloat16).float()), layer
        # ... which are the fp32 run's final weights within bf16 rounding (half an ulp of the
        # 8-bit significand, at most |w| / 2^8, plus the small update difference).
        half_ulp = m1.abs() * 2.0**-8
        assert ((b1 - r1).abs() <= half_ulp + (m1 - r1).abs() + 1e-12).all(), layer
        # Control: the bf16 weight alone kept only a few percent of the update (what a plain
        # bf16 AdamW step would have applied), so the checks above can tell the two apart.
        kept = float(((b1 - b0) * ref_update).sum() / ref_update.norm() ** 2)
        assert kept < 0.5, (layer, kept)
