"""Run configuration: YAML files loaded into dataclasses, ``key=value`` overrides, no unknown keys.

A config file mirrors :class:`TrainConfig`: one mapping per section (``model``, ``parallel``,
``router``, ``replay``, ``task``, ``tokenizer``, ``rollout``, ``grpo``, ``optim``,
``warm_start``, ``checkpoint``, ``logging``, ``diagnostics``) plus the top-level ``seed`` and
``steps``. The sections are in :mod:`pr2_megatron.rl.config_sections`; this module holds the
root :class:`TrainConfig` (and its checks across sections), loading, overrides and the
reference. Every field is documented by the ``#:`` comment above it; :func:`config_reference`
renders those comments as the reference in ``docs/config.md`` (a test keeps the two identical).

Errors name the file, the full key path and the bad value, and suggest the nearest known key::

    ConfigError: configs/tiny.yaml: unknown key 'rollout.temprature' (did you mean
    'rollout.temperature'?)
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from pr2_megatron.errors import ConfigError
from pr2_megatron.models.builder import MoEModelConfig
from pr2_megatron.rl.config_sections import (
    CheckpointConfig,
    GRPOConfig,
    LoggingConfig,
    OptimConfig,
    ReplayConfig,
    RolloutConfig,
    RouterConfig,
    TaskConfig,
    TokenizerConfig,
    WarmStartConfig,
)
from pr2_megatron.rl.diagnostics import DiagnosticsConfig
from pr2_megatron.runtime.parallel import ParallelConfig


@dataclass
class TrainConfig:
    """Everything ``pr2-train`` needs."""

    #: Seed of weights, data and sampling.
    seed: int = 1234
    #: RL steps (rollout batches).
    steps: int = 20
    model: MoEModelConfig = field(default_factory=MoEModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.replay.mode != "none" and self.router.kind == "topk":
            raise ValueError(
                f"replay.mode={self.replay.mode!r} needs a router that replays "
                "(router.kind: pr2 or probmoe), got router.kind='topk'"
            )
        if self.replay.mode == "pr2" and self.router.kind != "pr2":
            raise ValueError(f"replay.mode='pr2' needs router.kind='pr2', got {self.router.kind!r}")
        if self.model.params_dtype == "bf16" and not self.optim.distributed_optimizer:
            raise ValueError(
                "model.params_dtype='bf16' needs optim.distributed_optimizer=true: megatron-core "
                "0.16.1's Float16 optimizer cannot checkpoint a bf16 model with fp32 parameters "
                "(the PR2 predictors)"
            )
        if self.task.dataset is not None and self.tokenizer.path is None:
            raise ValueError(
                f"task.dataset={self.task.dataset!r} needs tokenizer.path (a local Hugging Face "
                "tokenizer directory or tokenizer.json)"
            )
        if self.task.dataset is None and self.tokenizer.path is not None:
            raise ValueError(
                f"tokenizer.path={self.tokenizer.path!r} is set but task.dataset is not: the "
                "digit tasks use their own character tokenizer"
            )
        _check_warm_start_task(self)


def _check_warm_start_task(cfg: TrainConfig) -> None:
    """``warm_start.task`` / digits: digit tasks only, and a digit range that is not empty."""
    warm, task = cfg.warm_start, cfg.task
    if task.dataset is not None:
        for key in ("task", "min_digits", "max_digits"):
            value = getattr(warm, key)
            if value is not None:
                raise ValueError(
                    f"warm_start.{key}={value!r} applies to the digit tasks only, but "
                    f"task.dataset={task.dataset!r} is set (the warm start trains on the "
                    f"dataset's reference answers): unset warm_start.{key}"
                )
        return
    _, low, high = warm.digit_task(task)
    if low > high:
        low_key = "warm_start.min_digits" if warm.min_digits is not None else "task.min_digits"
        high_key = "warm_start.max_digits" if warm.max_digits is not None else "task.max_digits"
        raise ValueError(
            f"the warm start's digits {low_key}={low} and {high_key}={high} must satisfy "
            "min_digits <= max_digits"
        )


# --------------------------------------------------------------------------------- loading
def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence = ()) -> TrainConfig:
    """Read a YAML file (or the defaults when ``path`` is None) and apply ``key=value`` overrides.

    Values of overrides are parsed as YAML (``replay.off_n=8``, ``model.moe_layer_freq=[0,1]``).
    """
    source = str(path) if path is not None else "<defaults>"
    data: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise ConfigError(f"{source}: cannot read the config file ({error})") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{source}: malformed YAML: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"{source}: the top level must be a mapping, got {type(data).__name__}"
            )
    for override in overrides:
        _apply_override(data, override)
    return from_dict(TrainConfig, data, source=source)


def _apply_override(data: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not key=value")
    key, text = override.split("=", 1)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: malformed value: {error}") from None
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, data: Any, *, source: str = "<dict>", prefix: str = ""):
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types raise ConfigError."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{near[0]}'?)" if near else ""
            raise ConfigError(
                f"{source}: unknown key '{prefix}{key}'{hint}; known keys of {where}: "
                + ", ".join(fields)
            )
        kwargs[key] = _convert(hints[key], value, source=source, key=f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, ArithmeticError) as error:
        if isinstance(error, ConfigError):
            raise
        if isinstance(error, ArithmeticError):  # e.g. a size of 0 in a divisibility check
            raise ConfigError(f"{source}: invalid values in {where}: {error}") from None
        raise ConfigError(f"{source}: {error}") from None


def _convert(hint: Any, value: Any, *, source: str, key: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    bad = ConfigError(f"{source}: {key} = {value!r} is not a valid {_type_name(hint)}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, source=source, prefix=f"{key}.")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, source=source, key=key)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{source}: {key} = {value!r} is not one of {list(args)}")
    if origin is list:
        if not isinstance(value, list):
            raise bad
        return [
            _convert(args[0], item, source=source, key=f"{key}[{i}]")
            for i, item in enumerate(value)
        ]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad
        try:
            # YAML 1.1 reads ``1e-4`` (no dot) as a string; accept what float() accepts.
            number = float(value)
        except (ValueError, OverflowError):
            raise bad from None
        if not math.isfinite(number):
            raise ConfigError(f"{source}: {key} = {value!r} is not a finite number")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad
    if hint is Any:
        return value
    raise ConfigError(f"{source}: {key}: unsupported field type {hint!r}")


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def to_dict(config) -> dict:
    """A plain dict of a config dataclass (for ``config.yaml`` in the run directory)."""
    return dataclasses.asdict(config)


def dump_yaml(config) -> str:
    """The config as YAML that :func:`load_config` reads back to an equal config."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


# ------------------------------------------------------------------------------ reference
def field_docs(cls: type) -> dict[str, str]:
    """The ``#:`` comments above each field of dataclass ``cls``.

    A field without a comment of its own shares the one of the field above it
    (``min_digits`` / ``max_digits`` under one comment).
    """
    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, str] = {}
    pending: list[str] = []
    previous = ""
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        match = re.match(r"(\w+)\s*:", stripped)
        if match and match.group(1) in names:
            name = match.group(1)
            docs[name] = " ".join(pending) if pending else docs.get(previous, "")
            previous = name
        pending = []
    return docs


def config_reference(cls: type = TrainConfig, prefix: str = "") -> str:
    """Markdown reference of every key of ``cls``: name, default, meaning (``docs/config.md``)."""
    out: list[str] = []
    if not prefix:
        out += [
            "# Config reference",
            "",
            "Generated from the `#:` comments of the dataclasses of `pr2_megatron/rl/config.py`,",
            "`pr2_megatron/rl/config_sections.py` and those they use",
            "(`python -m pr2_megatron.rl.config > docs/config.md`); a test keeps it current.",
            "Every key may be set in a YAML file or on the command line as `key=value`.",
            "",
        ]
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    scalars, sections = [], []
    for f in dataclasses.fields(cls):
        (sections if dataclasses.is_dataclass(hints[f.name]) else scalars).append(f)
    title = prefix.rstrip(".") or "top level"
    if scalars:
        out += [f"## `{title}`", "", (inspect.getdoc(cls) or "").splitlines()[0], ""]
        out += ["| key | default | meaning |", "|---|---|---|"]
        for f in scalars:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            doc = docs.get(f.name, "").replace("|", "\\|")
            out.append(f"| `{prefix}{f.name}` | `{default!r}` | {doc} |")
        out.append("")
    for f in sections:
        out.append(config_reference(hints[f.name], prefix=f"{prefix}{f.name}."))
    return "\n".join(out)


if __name__ == "__main__":
    print(config_reference())
