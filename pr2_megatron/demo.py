"""The tiny CPU PR2 demo: a GPT-MoE with PR2 routers trains a few RL-style rollout cycles.

Run with 2 ranks (expert parallel 2) on CPU::

    torchrun --nproc-per-node 2 -m pr2_megatron.demo

Each cycle: a PR2 rollout forward records predicted routes (and the live top-k, i.e. what plain
replay would use) for a batch; then ``--mini-steps`` training steps replay the predicted routes
(off-N), training the predictor from mini-step 2 on. Every mini-step prints how well the
predicted route and the old route agree with the live router at that moment.
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


def main(argv=None) -> None:
    """Parse arguments, run the demo, print one line per mini-step and a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=8, help="rollout batches")
    parser.add_argument("--mini-steps", type=int, default=4, help="off-N mini-steps per rollout")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-multiplier", type=float, default=1.0, help="predictor lr = lr × α")
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--expert-parallel", type=int, default=None, help="default: world size")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--json", default=None, help="write per-step metrics here (rank 0)")
    args = parser.parse_args(argv)

    from pr2_megatron.api import RoutingController, param_groups
    from pr2_megatron.model import MoEModelConfig, build_gpt_moe
    from pr2_megatron.parallel import (
        ParallelConfig,
        average_gradients,
        destroy_parallel,
        initialize_parallel,
    )
    from pr2_megatron.router import PR2RouterConfig

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    ep = args.expert_parallel or dist.get_world_size()
    parallel = ParallelConfig(expert_model_parallel_size=ep)
    initialize_parallel(parallel, seed=args.seed)
    model_cfg = MoEModelConfig(num_layers=2, hidden_size=64, num_experts=8, topk=2)
    model = build_gpt_moe(model_cfg, parallel, PR2RouterConfig(lr_multiplier=args.lr_multiplier))
    controller = RoutingController(model)
    optimizer = torch.optim.Adam(
        param_groups(model, lr=args.lr, weight_decay=0.0, lr_multiplier=args.lr_multiplier)
    )
    from megatron.core import parallel_state

    data_rank = parallel_state.get_data_parallel_rank()
    generator = torch.Generator().manual_seed(args.seed + data_rank)
    rank0 = dist.get_rank() == 0
    history = []
    if rank0:
        print(
            f"PR2 demo: {dist.get_world_size()} ranks, EP={ep}, {model_cfg.num_experts} experts "
            f"top-{model_cfg.topk}, {len(controller.layer_numbers)} MoE layers, "
            f"off-{args.mini_steps}"
        )
        print(" cycle step   loss   overlap(pred)  overlap(old)  zero-dev  predictor-loss")
    for cycle in range(args.cycles):
        ids, labels = synthetic_batch(args.batch, args.seq, model_cfg.vocab_size, generator)
        positions = torch.arange(args.seq).expand_as(ids)
        controller.predict()
        with torch.no_grad():
            model(ids, positions, None)
        predicted = controller.collect_routes()[0]
        old = controller.collect_live_routes()[0]
        for step in range(1, args.mini_steps + 1):
            controller.replay(train_predictor=step >= 2, collect_metrics=True)
            controller.set_targets(predicted, old)
            optimizer.zero_grad()
            loss = model(ids, positions, None, labels=labels).float().mean()
            loss.backward()
            controller.finish()
            average_gradients(model)
            optimizer.step()
            metrics = controller.metrics(group=parallel_state.get_data_parallel_group())
            loss_value = loss.detach().clone()
            dist.all_reduce(loss_value)
            record = {
                "cycle": cycle,
                "mini_step": step,
                "loss": loss_value.item() / dist.get_world_size(),
                **metrics,
            }
            history.append(record)
            if rank0:
                print(
                    f"{cycle:6d} {step:4d} {record['loss']:7.3f} "
                    f"{record['topk_overlap/replayed']:14.3f} {record['topk_overlap/old']:13.3f} "
                    f"{record['zero_deviation_ratio']:9.3f} "
                    f"{record.get('predictor/loss', float('nan')):15.2e}"
                )
    if rank0:
        late = [r for r in history if r["mini_step"] >= 2 and r["cycle"] >= args.cycles // 2]
        if late:
            mean = lambda key: sum(r[key] for r in late) / len(late)  # noqa: E731
            print(
                f"second half, mini-steps >= 2: overlap(pred) {mean('topk_overlap/replayed'):.3f}"
                f"  overlap(old) {mean('topk_overlap/old'):.3f}"
            )
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(history, handle, indent=1)
    destroy_parallel()


if __name__ == "__main__":
    main()
