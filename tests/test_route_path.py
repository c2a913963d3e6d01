"""Routes recorded at rollout in one layout are replayed in a different training layout.

Rollout: every data-parallel rank generates its own samples in micro-batches of one sample.
The routes go into one route table (one collective per micro-batch for all layers). Training:
another data-parallel split, micro-batches of two samples in another order. Every token must be
dispatched to the same experts, and at the rollout weights the training log-probs must equal the
rollout log-probs (importance ratio 1).
"""

import dataclasses

import pytest
import torch

from pr2_megatron.models import MoEModelConfig
from pr2_megatron.runtime.parallel import ParallelConfig
from pr2_megatron.testing.distributed import run_distributed
from pr2_megatron.testing.moe import TinySetup

pytestmark = pytest.mark.slow

SEQ, NUM_SAMPLES = 8, 4


def _samples():
    generator = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 64, (NUM_SAMPLES, SEQ), generator=generator)
    labels = torch.randint(0, 64, (NUM_SAMPLES, SEQ), generator=generator)
    return ids, labels


def _token_logprob(model, ids, labels):
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    return -model(ids, positions, None, labels=labels)  # [B, S] log π(label)


def _rollout_then_train(setup, rollout_samples, train_samples):
    """Through the public route path only (RoutePath), as a foreign training loop would."""
    from megatron.core import parallel_state

    from pr2_megatron.routes import MicroBatch, RoutePath
    from pr2_megatron.routing import RoutingController
    from pr2_megatron.runtime.parallel import initialize_parallel
    from pr2_megatron.testing.moe import build, randomize_predictors

    initialize_parallel(setup.parallel, seed=setup.seed)
    model = build(setup)
    randomize_predictors(model, scale=1.0, seed=7)
    ctl = RoutingController(model)
    path = RoutePath(ctl)
    ids, labels = _samples()
    data_rank = parallel_state.get_data_parallel_rank()

    ctl.predict()
    rollout_logprob = {}
    rollout_batches = [MicroBatch([s], SEQ) for s in rollout_samples[data_rank]]
    with torch.no_grad():
        for batch in rollout_batches:
            path.name_tokens(batch)
            sample = batch.sample_ids[0]
            rollout_logprob[sample] = _token_logprob(model, ids[[sample]], labels[[sample]])[0]
    table = path.gather(rollout_batches)

    ctl.replay(train_predictor=True, collect_metrics=True)
    batch = MicroBatch(train_samples[data_rank], SEQ)
    path.set_targets(table, batch)
    rows = list(batch.sample_ids)
    train_logprob = _token_logprob(model, ids[rows], labels[rows])
    train_logprob.sum().backward()
    ctl.finish()
    replayed = ctl.forward_routes()[0]["replayed"]
    return {
        "rollout_logprob": rollout_logprob,
        "train_logprob": dict(zip(rows, train_logprob.detach())),
        "replayed": replayed,
        "targets": path.targets(table, batch),
        "table_samples": table.sample_ids.tolist(),
        "table_bytes_per_token_layer": table.routes_TLK.element_size() * table.topk,
        "predictor_losses": [r.predictor_losses[0] for r in ctl.routers],
        "self_paired_losses": [_self_paired_loss(r, rows) for r in ctl.routers],
    }


def _self_paired_loss(router, sample_ids):
    """The predictor loss when every training token meets its own cached rollout features.

    At the rollout weights the live logits of a token equal its cached ones, so the kl-post
    loss is KL(softmax(z) || softmax(z + Δ)) over the cached tokens of these samples. A token
    paired with another token's features would give another value.
    """
    from pr2_megatron.routes import KEY_STRIDE
    from pr2_megatron.routing.predictor import predictor_loss

    cached = router.feature_cache.features()
    mine = torch.isin(cached.keys_C // KEY_STRIDE, torch.tensor(sample_ids))
    logits = cached.logits_CE[mine]
    with torch.no_grad():
        delta = router.predictor(cached.hidden_CH[mine])
    return float(predictor_loss("kl-post", logits, logits, delta))


LAYOUTS = {
    # EP=2 over 2 ranks (DP=2): rollout rank r gets samples {r, r+2}; training swaps them.
    "ep2": (
        ParallelConfig(expert_model_parallel_size=2),
        [[0, 2], [1, 3]],
        [[3, 0], [2, 1]],
    ),
    # TP=2 with SP (DP=1): each rank routes half of every sequence.
    "tp2_sp": (
        ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True),
        [[0, 1, 2, 3]],
        [[2, 0, 3, 1]],
    ),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_replay_in_another_layout_dispatches_recorded_experts(layout):
    parallel, rollout, train = LAYOUTS[layout]
    setup = dataclasses.replace(TinySetup(model=MoEModelConfig(num_experts=4)), parallel=parallel)
    results = run_distributed(_rollout_then_train, 2, setup, rollout, train)
    rollout_logprob = {}
    for res in results:
        rollout_logprob.update(res["rollout_logprob"])
        assert res["table_samples"] == list(range(NUM_SAMPLES))
        assert res["table_bytes_per_token_layer"] == 2  # uint8 ids, k = 2
        assert torch.equal(res["replayed"], res["targets"])  # routers dispatched the table rows
        # The predictor trained on the right tokens in the other layout (named by RoutePath).
        assert min(res["self_paired_losses"]) > 0
        torch.testing.assert_close(
            res["predictor_losses"], res["self_paired_losses"], rtol=1e-4, atol=1e-7
        )
    for res in results:
        for sample, train_lp in res["train_logprob"].items():
            torch.testing.assert_close(train_lp, rollout_logprob[sample], rtol=1e-5, atol=1e-5)
            ratio = torch.exp(train_lp - rollout_logprob[sample])
            assert (ratio - 1).abs().max() < 1e-4
