"""Hugging Face import and export under TP=2, EP=2 and PP=2 (2 gloo ranks each).

Every rank loads its shards from the same safetensors directory (lazily: an EP rank reads only
its own experts, a PP stage only its own layers), runs the forward (TP, EP: logits gathered
over TP equal transformers' within 1e-4), moves its weights, and all ranks export together;
transformers loads the export (one file, or one per writing rank with an index) and gives the
Megatron model's logits. PP: the export of the unchanged model is the source bit for bit and
loads with the source's logits.
"""

from __future__ import annotations

import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from support.hf_models import build_hf, deepseek_v3_config, qwen3_config, tiny_hf  # noqa: E402

from pr2_megatron.runtime.parallel import ParallelConfig  # noqa: E402
from pr2_megatron.testing.distributed import run_distributed  # noqa: E402

pytestmark = pytest.mark.slow


def _gathered_logits(model, ids):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from support.hf_models import megatron_logits

    return gather_from_tensor_model_parallel_region(megatron_logits(model, ids))


def _experts_read(keys):
    return sorted({int(m.group(1)) for k in keys if (m := re.search(r"experts\.(\d+)\.", k))})


def _layers_read(keys):
    return sorted({int(m.group(1)) for k in keys if (m := re.match(r"model\.layers\.(\d+)\.", k))})


def _worker(layouts, sources, out_root, forward):
    """Import, (forward, perturb, forward), export each source in its layout (a
    ``ParallelConfig`` per name); rank 0 loads the exports."""
    import torch.distributed as dist
    from support.hf_models import hf_logits, load_saved, perturb, token_ids

    from pr2_megatron.models.hf import export_hf_checkpoint, load_hf_checkpoint
    from pr2_megatron.models.hf.config_map import moe_config_from_hf
    from pr2_megatron.models.hf.read import read_hf_checkpoint
    from pr2_megatron.runtime.parallel import release_parallel_state
    from pr2_megatron.testing.moe import TinySetup, build

    ids = token_ids()
    results = {}
    for name, source in sources.items():
        hf_config, _ = read_hf_checkpoint(source)
        model_cfg = moe_config_from_hf(hf_config)
        model = build(TinySetup(model=model_cfg, parallel=layouts[name]))
        report = load_hf_checkpoint(model, model_cfg, source)
        result = {
            "experts": _experts_read(report.keys_read),
            "layers": _layers_read(report.keys_read),
        }
        result["keys"] = report.keys_read
        if forward:
            reference = hf_logits(load_saved(source), ids)
            result["import_delta"] = float((_gathered_logits(model, ids) - reference).abs().max())
            perturb(model)
            expected = _gathered_logits(model, ids)
        out = export_hf_checkpoint(model, model_cfg, f"{out_root}/{name}", hf_config=source)
        if dist.get_rank() == 0:
            result["files"] = sorted(p.name for p in out.iterdir() if "safetensors" in p.name)
            exported = hf_logits(load_saved(out), ids)
            target = expected if forward else hf_logits(load_saved(source), ids)
            result["export_delta"] = float((exported - target).abs().max())
        results[name] = result
        release_parallel_state()
    return results


def _sources(tmp_path, models):
    sources = {}
    for name, hf in models.items():
        hf.save_pretrained(tmp_path / name)
        sources[name] = str(tmp_path / name)
    return sources


def test_tp2_import_and_export(tmp_path):
    models = {name: tiny_hf(name) for name in ("qwen3_moe", "olmoe", "deepseek_v3")}
    tp_sp = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
    # MLA on the local spec too: its latent norms (LatentNorm) and down projections
    # (DuplicatedLinear, replicated over TP) take sequence parallelism.
    layouts = {"qwen3_moe": tp_sp, "olmoe": tp_sp, "deepseek_v3": tp_sp}
    ranks = run_distributed(
        _worker, 2, layouts, _sources(tmp_path, models), str(tmp_path / "out"), True
    )
    for name in models:
        for rank in ranks:
            assert rank[name]["import_delta"] < 1e-4, (name, rank[name]["import_delta"])
        assert ranks[0][name]["export_delta"] < 1e-4, (name, ranks[0][name]["export_delta"])
        assert ranks[0][name]["files"] == ["model.safetensors"]  # TP peers write nothing twice


def test_ep2_import_reads_own_experts_and_exports_per_rank_files(tmp_path):
    models = {name: tiny_hf(name) for name in ("qwen3_moe_dense_tied", "deepseek_v3_yarn")}
    layouts = dict.fromkeys(models, ParallelConfig(expert_model_parallel_size=2))
    ranks = run_distributed(
        _worker, 2, layouts, _sources(tmp_path, models), str(tmp_path / "out"), True
    )
    for name in models:
        assert [rank[name]["experts"] for rank in ranks] == [[0, 1, 2, 3], [4, 5, 6, 7]]
        for rank in ranks:
            assert rank[name]["import_delta"] < 1e-4, (name, rank[name]["import_delta"])
        assert ranks[0][name]["export_delta"] < 1e-4, (name, ranks[0][name]["export_delta"])
        assert ranks[0][name]["files"] == [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
        ]


def test_pp2_each_stage_reads_its_layers_and_the_export_is_the_source(tmp_path):
    models = {
        # (tied embeddings under PP: Megatron moves the shared weight to CUDA, not on CPU)
        "qwen3_moe": build_hf(qwen3_config(num_hidden_layers=4, mlp_only_layers=[0])),
        "deepseek_v3": build_hf(deepseek_v3_config(num_hidden_layers=4)),
    }
    layouts = dict.fromkeys(models, ParallelConfig(pipeline_model_parallel_size=2))
    ranks = run_distributed(
        _worker, 2, layouts, _sources(tmp_path, models), str(tmp_path / "out"), False
    )
    for name in models:
        assert [rank[name]["layers"] for rank in ranks] == [[0, 1], [2, 3]]
        first, last = (set(rank[name]["keys"]) for rank in ranks)
        assert "model.embed_tokens.weight" in first and "model.norm.weight" in last
        assert ranks[0][name]["export_delta"] == 0.0
        assert len(ranks[0][name]["files"]) == 3  # a file per stage and the index
        assert "lm_head.weight" in last and "lm_head.weight" not in first


# ------------------------------------------------------------------ the trainer's two keys
def _train(overrides):
    from pr2_megatron.rl.config import load_config
    from pr2_megatron.rl.train import Trainer
    from pr2_megatron.runtime.parallel import destroy_parallel

    code = Trainer(load_config("configs/tiny.yaml", overrides)).run()
    destroy_parallel()
    return code


def _model_overrides(hf_config, **run_keys):
    """``model.<key>=<value>`` for every field of the checkpoint's model config."""
    import dataclasses
    import json

    from pr2_megatron.models.hf import moe_config_from_hf

    fields = {**dataclasses.asdict(moe_config_from_hf(hf_config)), **run_keys}
    return [f"model.{key}={json.dumps(value)}" for key, value in fields.items()]


def test_trainer_starts_from_hf_checkpoint_and_exports_at_the_end(tmp_path):
    from safetensors.torch import load_file
    from support.hf_models import load_saved

    hf = build_hf(qwen3_config(vocab_size=16, num_hidden_layers=2, head_dim=16))
    hf.save_pretrained(tmp_path / "source")
    overrides = [
        *_model_overrides(
            hf.config, max_sequence_length=32, hf_checkpoint=str(tmp_path / "source")
        ),
        f"checkpoint.export_hf={tmp_path / 'export'}",
        "steps=1",
        "warm_start.steps=0",
        "rollout.prompts_per_step=4",
        "rollout.group_size=4",
        "grpo.micro_batch_size=4",
        "replay.off_n=2",
        "logging.tensorboard=false",
        f"logging.dir={tmp_path / 'run'}",
    ]
    overrides.append(f"checkpoint.dir={tmp_path / 'checkpoints'}")
    assert run_distributed(_train, 2, overrides) == [0, 0]  # EP=2 (configs/tiny.yaml)
    source = load_file(tmp_path / "source" / "model.safetensors")
    exported = {}
    for file in (tmp_path / "export").glob("*.safetensors"):
        exported.update(load_file(file))
    assert sorted(exported) == sorted(source)
    moved = {k: float((exported[k] - source[k]).abs().max()) for k in source}
    # The checkpoint's weights after one RL step (Adam at lr 3e-4 moves them by about 1e-3 at
    # most; none at all when every reward of the step is 0), not Megatron's random init (std
    # 0.02 against the checkpoint's 0.2).
    assert max(moved.values()) < 0.02
    load_saved(tmp_path / "export")
    # Exporting a finished run's checkpoint: the same config resumes at its last step, trains
    # no further and exports the same tensors.
    overrides.append(f"checkpoint.export_hf={tmp_path / 'again'}")
    assert run_distributed(_train, 2, overrides) == [0, 0]
    again = {}
    for file in (tmp_path / "again").glob("*.safetensors"):
        again.update(load_file(file))
    assert sorted(again) == sorted(exported)
    assert all(torch.equal(again[k], exported[k]) for k in exported)
