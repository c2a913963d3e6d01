"""Config loading: documented keys, unknown keys rejected, overrides typed, shipped configs load."""

from pathlib import Path

import pytest

from pr2_megatron.rl.config import ConfigError, config_reference, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_docs_reference_is_current():
    # docs/config.md is generated from the dataclasses' #: comments; regenerate with
    # `python -m pr2_megatron.rl.config > docs/config.md`.
    assert (ROOT / "docs" / "config.md").read_text().strip() == config_reference().strip()


def test_every_key_is_documented():
    import dataclasses
    import typing

    from pr2_megatron.rl.config import TrainConfig, field_docs

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", docs.get(f.name, "")

    undocumented = [key for key, doc in walk(TrainConfig) if not doc]
    assert undocumented == []


@pytest.mark.parametrize("path", sorted(str(p) for p in (ROOT / "configs").rglob("*.yaml")))
def test_shipped_configs_load(path):
    load_config(path)


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rollout:\n  temprature: 0.7\n")
    with pytest.raises(
        ConfigError,
        match=r"bad.yaml: unknown key 'rollout.temprature' \(did you mean 'rollout.temperature'",
    ):
        load_config(path)


def test_malformed_yaml_and_wrong_types(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("rollout: [1, 2\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"replay.off_n = 'four' is not a valid int"):
        load_config(None, ["replay.off_n=four"])
    with pytest.raises(ConfigError, match=r"replay.mode = 'r4' is not one of"):
        load_config(None, ["replay.mode=r4"])
    with pytest.raises(ConfigError, match="replay.off_n must be >= 1"):
        load_config(None, ["replay.off_n=0"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(None, ["replay.off_n"])


def test_overrides_are_typed_like_yaml():
    cfg = load_config(None, ["optim.lr=1e-4", "model.moe_layer_freq=[0,1]", "checkpoint.dir=null"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.model.moe_layer_freq == [0, 1]
    assert cfg.checkpoint.dir is None


def test_dump_round_trips(tmp_path):
    from pr2_megatron.rl.config import dump_yaml

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["replay.mode=r3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg


def test_replay_mode_needs_a_replaying_router():
    with pytest.raises(ConfigError, match="router.kind='topk'"):
        load_config(None, ["router.kind=topk", "replay.mode=r2"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["warm_start.task=foo"],
            "warm_start.task='foo' is not a digit task; expected one of reverse, sort, copy, add",
        ),
        (["warm_start.task=3"], r"warm_start.task = 3 is not a valid Optional\[str\]"),
        (["warm_start.min_digits=0"], r"warm_start.min_digits must be >= 1 \(or null\), got 0"),
        (["warm_start.max_digits=-1"], r"warm_start.max_digits must be >= 1 \(or null\), got -1"),
        (
            ["warm_start.min_digits=5", "warm_start.max_digits=3"],
            "warm_start.min_digits=5 and warm_start.max_digits=3 must satisfy min_digits <= ",
        ),
        # Against the RL task's bound where the warm start's own is unset (task: 2-4 digits).
        (
            ["warm_start.min_digits=5"],
            "warm_start.min_digits=5 and task.max_digits=4 must satisfy min_digits <= max_digits",
        ),
        (
            ["warm_start.max_digits=1"],
            "task.min_digits=2 and warm_start.max_digits=1 must satisfy min_digits <= max_digits",
        ),
    ],
)
def test_bad_warm_start_task_keys_name_the_key_and_value(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "key",
    [
        "model.aux_loss_coeff",
        "model.z_loss_coeff",
        "warm_start.aux_loss_coeff",
        "warm_start.z_loss_coeff",
    ],
)
def test_negative_router_loss_coefficients_name_the_key(key):
    with pytest.raises(ConfigError, match=rf"{key} must be >= 0, got -0.5"):
        load_config(None, [f"{key}=-0.5"])


@pytest.mark.parametrize(
    "key, value, shown", [("task", "copy", "'copy'"), ("min_digits", 1, 1), ("max_digits", 6, 6)]
)
def test_warm_start_task_keys_are_rejected_with_a_dataset(key, value, shown):
    dataset = ["task.dataset=x.jsonl", "tokenizer.path=tok"]
    load_config(None, dataset)  # the dataset alone is a valid config
    with pytest.raises(
        ConfigError,
        match=rf"warm_start.{key}={shown} applies to the digit tasks only, but "
        rf"task.dataset='x.jsonl' is set .*: unset warm_start.{key}",
    ):
        load_config(None, [*dataset, f"warm_start.{key}={value}"])


def test_warm_start_task_keys_fall_back_to_the_rl_task():
    tiny = ROOT / "configs" / "tiny.yaml"
    cfg = load_config(tiny)
    warm = cfg.warm_start
    assert [warm.task, warm.min_digits, warm.max_digits] == [None, None, None]
    assert warm.digit_task(cfg.task) == ("reverse", 2, 4)
    cfg = load_config(tiny, ["warm_start.max_digits=6"])
    assert cfg.warm_start.digit_task(cfg.task) == ("reverse", 2, 6)
    overrides = ["warm_start.task=add", "warm_start.min_digits=1", "warm_start.max_digits=1"]
    cfg = load_config(tiny, overrides)
    assert cfg.warm_start.digit_task(cfg.task) == ("add", 1, 1)
    assert (cfg.task.name, cfg.task.min_digits, cfg.task.max_digits) == ("reverse", 2, 4)
