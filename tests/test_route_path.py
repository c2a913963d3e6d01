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

from pr2_megatron.model import MoEModelConfig
from pr2_megatron.parallel import ParallelConfig
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
    from megatron.core import parallel_state

    from pr2_megatron.api import RoutingController
    from pr2_megatron.parallel import initialize_parallel
    from pr2_megatron.route_comm import gather_route_table, micro_batch_targets
    from pr2_megatron.testing.moe import build, randomize_predictors

    initialize_parallel(setup.parallel, seed=setup.seed)
    model = build(setup)
    randomize_predictors(model, scale=1.0, seed=7)
    ctl = RoutingController(model)
    ids, labels = _samples()
    data_rank = parallel_state.get_data_parallel_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()

    ctl.predict()
    rollout_logprob = {}
    with torch.no_grad():
        for sample in rollout_samples[data_rank]:
            rollout_logprob[sample] = _token_logprob(model, ids[[sample]], labels[[sample]])[0]
    table = gather_route_table(
        ctl.collect_routes(),
        [[s] for s in rollout_samples[data_rank]],
        layer_numbers=ctl.layer_numbers,
        num_experts=ctl.num_experts,
        topk=ctl.topk,
        old_routes_per_forward=ctl.collect_live_routes(),
        data_group=parallel_state.get_data_parallel_group(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        sequence_parallel=setup.parallel.sequence_parallel,
    )

    ctl.replay(collect_metrics=True)
    batch = train_samples[data_rank]
    targets = micro_batch_targets(
        table,
        batch,
        SEQ,
        tp_rank=tp_rank,
        tp_size=tp_size,
        sequence_parallel=setup.parallel.sequence_parallel,
    )
    ctl.set_targets(targets)
    train_logprob = _token_logprob(model, ids[batch], labels[batch])
    train_logprob.sum().backward()
    ctl.finish()
    replayed = torch.stack([r.metric_records[0]["replayed"] for r in ctl.routers], dim=1)
    return {
        "rollout_logprob": rollout_logprob,
        "train_logprob": dict(zip(batch, train_logprob.detach())),
        "replayed": replayed,
        "targets": targets,
        "table_samples": table.sample_ids.tolist(),
        "table_bytes_per_token_layer": table.routes_TLK.element_size() * table.topk,
    }


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
    for res in results:
        for sample, train_lp in res["train_logprob"].items():
            torch.testing.assert_close(train_lp, rollout_logprob[sample], rtol=1e-5, atol=1e-5)
            ratio = torch.exp(train_lp - rollout_logprob[sample])
            assert (ratio - 1).abs().max() < 1e-4
