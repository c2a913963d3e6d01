"""A training loop of one's own, on the library API alone: PR2 in a few RL-style cycles.

Run with 2 ranks (expert parallel 2) on CPU (``bash launch/demo.sh``)::

    torchrun --nproc-per-node 2 -m pr2_megatron.examples.minimal_loop

Each cycle: a PR2 rollout pass (micro-batches of ``--rollout-micro-batch`` sequences) records
the predicted routes and the plain-replay ones; :class:`~pr2_megatron.routes.RoutePath` gathers
them into one route table on every rank. Then ``--mini-steps`` training steps (off-N) replay
the predicted routes in *another* layout -- micro-batches of ``--train-micro-batch``
sequences, in reverse order -- training the predictor from mini-step 2 on. Every mini-step
prints how well the predicted and the plain-replay route agree with the live router.

This is the README's "use it in your stack" example, runnable: nothing here imports the
reference trainer (:mod:`pr2_megatron.rl`).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist


def synthetic_batch(batch: int, seq: int, vocab: int, generator: torch.Generator):
    """Arithmetic sequences ``a, a+d, a+2d, ... (mod vocab)``: next-token prediction."""
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    step = torch.randint(1, 5, (batch, 1), generator=generator)
    tokens = (start + step * torch.arange(seq + 1)) % vocab
    return tokens[:, :-1], tokens[:, 1:]


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=8, help="rollout batches")
    parser.add_argument("--mini-steps", type=int, default=4, help="off-N mini-steps per rollout")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-multiplier", type=float, default=1.0, help="predictor lr = lr × α")
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank")
    parser.add_argument("--rollout-micro-batch", type=int, default=2)
    parser.add_argument("--train-micro-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--expert-parallel", type=int, default=None, help="default: world size")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--json", default=None, help="write per-step metrics here (rank 0)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    """Parse arguments, run the loop, print one line per mini-step and a summary."""
    args = _parse(argv)
    from megatron.core import parallel_state

    from pr2_megatron.models import MoEModelConfig, build_gpt_moe
    from pr2_megatron.routes import MicroBatch, RoutePath
    from pr2_megatron.routing import PR2RouterConfig, RoutingController, param_groups
    from pr2_megatron.runtime.parallel import (
        ParallelConfig,
        average_gradients,
        destroy_parallel,
        initialize_parallel,
    )

    # CPU bring-up (gloo, the CPU patches) happens inside initialize_parallel without CUDA.
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    ep = args.expert_parallel or dist.get_world_size()
    parallel = ParallelConfig(expert_model_parallel_size=ep)
    initialize_parallel(parallel, seed=args.seed)
    model_cfg = MoEModelConfig(num_layers=2, hidden_size=64, num_experts=8, topk=2)
    model = build_gpt_moe(model_cfg, parallel, PR2RouterConfig(lr_multiplier=args.lr_multiplier))
    controller = RoutingController(model)
    path = RoutePath(controller)  # groups from Megatron's parallel state
    optimizer = torch.optim.Adam(param_groups(model, lr=args.lr, weight_decay=0.0))

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_group = parallel_state.get_data_parallel_group()
    generator = torch.Generator().manual_seed(args.seed + dp_rank)
    first_id = dp_rank * args.batch  # sample ids are unique over all data-parallel ranks
    sample_ids = list(range(first_id, first_id + args.batch))
    rank0 = dist.get_rank() == 0
    history = []
    if rank0:
        print(
            f"PR2 minimal loop: {dist.get_world_size()} ranks, EP={ep}, "
            f"{model_cfg.num_experts} experts top-{model_cfg.topk}, "
            f"{len(controller.layer_numbers)} MoE layers, off-{args.mini_steps}"
        )
        print(" cycle step   loss   overlap(pred)  overlap(plain)  zero-dev  predictor-loss")

    def micro_batches(size, reverse=False):
        rows = [list(range(i, min(i + size, args.batch))) for i in range(0, args.batch, size)]
        rows = rows[::-1] if reverse else rows
        return [(r, MicroBatch([sample_ids[i] for i in r], args.seq)) for r in rows]

    for cycle in range(args.cycles):
        ids, labels = synthetic_batch(args.batch, args.seq, model_cfg.vocab_size, generator)
        positions = torch.arange(args.seq).expand_as(ids)

        # Rollout: PR2 predicts the routes; each forward's tokens are named for the cache.
        controller.predict()
        rollout = micro_batches(args.rollout_micro_batch)
        with torch.no_grad():
            for rows, batch in rollout:
                path.name_tokens(batch)
                model(ids[rows], positions[rows], None)
        table = path.gather([batch for _, batch in rollout])  # the same table on every rank

        # Training: another micro-batch layout, replaying the predicted routes.
        for step in range(1, args.mini_steps + 1):
            controller.replay(train_predictor=step >= 2, collect_metrics=True)
            optimizer.zero_grad()
            total = torch.zeros(())
            for rows, batch in micro_batches(args.train_micro_batch, reverse=True):
                path.set_targets(table, batch)  # before the forward
                loss = model(ids[rows], positions[rows], None, labels=labels[rows]).float()
                loss = loss.sum() / (args.batch * args.seq)
                loss.backward()
                total += loss.detach()
            controller.finish()  # every target consumed
            average_gradients(model)
            optimizer.step()
            metrics = controller.metrics(group=dp_group)
            dist.all_reduce(total, group=dp_group)
            record = {
                "cycle": cycle,
                "mini_step": step,
                "loss": total.item() / dist.get_world_size(dp_group),
                **metrics,
            }
            history.append(record)
            if rank0:
                print(
                    f"{cycle:6d} {step:4d} {record['loss']:7.3f} "
                    f"{record['topk_overlap/replayed']:14.3f} "
                    f"{record['topk_overlap/plain']:15.3f} "
                    f"{record['zero_deviation_ratio']:9.3f} "
                    f"{record.get('predictor/loss', float('nan')):15.2e}"
                )
    if rank0:
        late = [r for r in history if r["mini_step"] >= 2 and r["cycle"] >= args.cycles // 2]
        if late:
            mean = lambda key: sum(r[key] for r in late) / len(late)  # noqa: E731
            print(
                f"second half, mini-steps >= 2: overlap(pred) {mean('topk_overlap/replayed'):.3f}"
                f"  overlap(plain) {mean('topk_overlap/plain'):.3f}"
            )
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(history, handle, indent=1)
    destroy_parallel()


if __name__ == "__main__":
    main()
