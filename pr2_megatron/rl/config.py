"""Run configuration: YAML files loaded into dataclasses, ``key=value`` overrides, no unknown keys.

A config file mirrors :class:`TrainConfig`: one mapping per section (``model``, ``parallel``,
``router``, ``replay``, ``task``, ``tokenizer``, ``rollout``, ``grpo``, ``optim``,
``warm_start``, ``checkpoint``, ``logging``, ``diagnostics``) plus the top-level ``seed`` and
``steps``. Every field is documented by the ``#:`` comment above it; :func:`config_reference`
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
from pr2_megatron.rl.diagnostics import DiagnosticsConfig
from pr2_megatron.routing.probmoe.router import ProbMoEConfig
from pr2_megatron.routing.router import PR2RouterConfig
from pr2_megatron.runtime.parallel import ParallelConfig


@dataclass
class RouterConfig:
    """Which router the MoE layers use, and its settings."""

    #: ``pr2`` (records/replays routes, predictor), ``topk`` (Megatron's stock ``TopKRouter``:
    #: no replay, only ``replay.mode=none``) or ``probmoe`` (probabilistic k-subset routing).
    kind: Literal["topk", "pr2", "probmoe"] = "pr2"
    #: PR2 router settings (``kind: pr2``; the predictor also exists under ``kind: probmoe``).
    pr2: PR2RouterConfig = field(default_factory=PR2RouterConfig)
    #: ProbMoE settings (``kind: probmoe``): exact-k or dynamic-k subsets, gates, sampling.
    probmoe: ProbMoEConfig = field(default_factory=ProbMoEConfig)


@dataclass
class ReplayConfig:
    """How training forwards choose experts (docs/design.md, "Replay modes")."""

    #: ``none`` live top-k; ``r2`` routes of the trainer's old-log-prob pass; ``r3`` routes of
    #: the rollout; ``pr2`` predicted routes (where: ``predict_at``). The table of what each
    #: mode does in each pass: ``pr2_megatron/rl/modes.py``.
    mode: Literal["none", "r2", "r3", "pr2"] = "pr2"
    #: Where ``pr2`` applies the predictor: ``rollout`` (rollout-side: the rollout engine
    #: records predicted routes) or ``old_logprob`` (actor-side, ``pr2-actor``: the trainer's
    #: old-log-prob pass predicts in training numerics and every training forward replays those
    #: routes, R2-style; the rollout routes live, so vLLM / SGLang need no change).
    predict_at: Literal["rollout", "old_logprob"] = "rollout"
    #: Off-N: optimizer mini-steps per rollout batch (1, 2, 4, 8, ...).
    off_n: int = 4

    def __post_init__(self) -> None:
        from pr2_megatron.rl.modes import replay_mode

        if self.off_n < 1:
            raise ValueError(f"replay.off_n must be >= 1, got {self.off_n}")
        replay_mode(self.mode, self.predict_at)  # ValueError naming both keys


@dataclass
class TaskConfig:
    """The verifiable task: a synthetic digit task, or prompts and answers from a JSONL file."""

    #: ``reverse`` a digit string, ``sort`` its digits, ``copy`` it, or ``add`` two numbers
    #: (character tokenizer; ignored with ``dataset``).
    name: Literal["reverse", "sort", "copy", "add"] = "reverse"
    #: Shortest and longest operand, in digits.
    min_digits: int = 2
    max_digits: int = 4
    #: JSONL file of prompts and reference answers, one JSON object per line (GSM8K-style);
    #: None: the digit task ``name``. Needs ``tokenizer.path``. Records are drawn uniformly with
    #: replacement, per step from the seed.
    dataset: Optional[str] = None
    #: Fields of a ``dataset`` record holding the prompt (a string) and the reference answer
    #: (a string or a number).
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    #: Reward of a response: ``exact_match`` (the whole response, ended by end-of-sequence,
    #: equals the answer) or ``final_number`` (its final number, after the last ``####`` or
    #: else the last number in the text, equals the answer's), or a name registered with
    #: ``pr2_megatron.rl.data.register_reward``.
    reward: str = "exact_match"

    def __post_init__(self) -> None:
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(
                f"task.min_digits={self.min_digits} and task.max_digits={self.max_digits} must "
                "satisfy 1 <= min_digits <= max_digits"
            )
        for name in ("prompt_field", "answer_field"):
            if not getattr(self, name):
                raise ValueError(f"task.{name} must be a non-empty field name")
        if self.prompt_field == self.answer_field:
            raise ValueError(
                f"task.prompt_field and task.answer_field are both {self.prompt_field!r}"
            )


@dataclass
class TokenizerConfig:
    """The tokenizer of ``task.dataset``, read from local files only (nothing is downloaded)."""

    #: A Hugging Face tokenizer: a local directory (``transformers.AutoTokenizer``, local files
    #: only) or a ``tokenizer.json`` file (``tokenizers.Tokenizer``); None: the digit tasks'
    #: character tokenizer. Its vocabulary must fit ``model.vocab_size``.
    path: Optional[str] = None
    #: Wrap each prompt in the tokenizer's chat template: one user turn plus the generation
    #: prompt (a tokenizer directory with a template).
    chat_template: bool = False
    #: End-of-sequence and padding tokens by name (None: the tokenizer's own; padding falls
    #: back to end-of-sequence).
    eos_token: Optional[str] = None
    pad_token: Optional[str] = None


@dataclass
class RolloutConfig:
    """Sampling responses with the Megatron model itself."""

    #: Prompts per step over all data-parallel ranks (each gets ``group_size`` responses).
    prompts_per_step: int = 8
    #: Responses per prompt (the GRPO group).
    group_size: int = 4
    #: Sampling temperature and nucleus threshold.
    temperature: float = 1.0
    top_p: float = 1.0
    #: Longest response; generation also stops at the end-of-sequence token.
    max_new_tokens: int = 8
    #: Numerics of the rollout forward: ``bf16`` (like a separate inference engine) or ``fp32``
    #: (identical to training). With ``bf16`` r3's routes differ from r2's.
    dtype: Literal["fp32", "bf16"] = "bf16"
    #: Sequences per rollout forward on each rank.
    micro_batch_size: int = 16
    #: KV-cached decoding (megatron-core's ``StaticInferenceContext``: one prefill forward,
    #: then one token per sequence per forward; stops when every sequence of the EP/TP group
    #: has ended). False, or tensor parallelism with sequence parallelism (a one-line notice
    #: says so): a forward over the whole sequence buffer per new token.
    kv_cache: bool = True

    def __post_init__(self) -> None:
        for name in ("prompts_per_step", "group_size", "max_new_tokens", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0:
            raise ValueError(f"rollout.temperature must be > 0, got {self.temperature}")


@dataclass
class GRPOConfig:
    """Policy loss: group-normalised advantages and the PPO clipped objective."""

    #: Clip range of the importance ratio: [1 - eps_low, 1 + eps_high].
    eps_low: float = 0.2
    eps_high: float = 0.28
    #: Sequences per training forward on each rank.
    micro_batch_size: int = 16
    #: Added to the group's reward std before dividing.
    advantage_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1:
            raise ValueError(f"grpo.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        for name in ("eps_low", "eps_high", "advantage_eps"):
            if getattr(self, name) < 0:
                raise ValueError(f"grpo.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class OptimConfig:
    """Adam for the model; the predictors get ``lr × router.pr2.lr_multiplier`` and these.

    Betas and weight decay also apply to the predictors unless ``router.pr2.predictor_betas`` /
    ``router.pr2.predictor_weight_decay`` are set.
    """

    #: Learning rate of the model in RL steps.
    lr: float = 1e-4
    #: Decoupled weight decay (AdamW).
    weight_decay: float = 0.0
    #: Adam betas.
    beta1: float = 0.9
    beta2: float = 0.999
    #: Clip the global gradient norm to this (0 disables clipping; Megatron's clipping over
    #: every parameter of the model, the predictors' included).
    grad_clip: float = 1.0
    #: Megatron's distributed optimizer (fp32 main parameters and Adam states sharded over the
    #: data-parallel ranks). False: Megatron's FP32 optimizer (fp32 models only: a bf16 model
    #: with the fp32 predictor needs the distributed one to checkpoint in megatron-core 0.16.1).
    distributed_optimizer: bool = True

    def __post_init__(self) -> None:
        for name in ("lr", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"optim.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")


@dataclass
class WarmStartConfig:
    """Supervised warm start on correct answers, so rollouts earn reward before RL begins."""

    #: Optimizer steps (0 skips the warm start).
    steps: int = 300
    #: Learning rate and sequences per step (over all data-parallel ranks).
    lr: float = 3e-3
    batch_size: int = 32
    #: Load-balancing aux-loss coefficient during the warm start (None: ``model.aux_loss_coeff``
    #: throughout). With ``model.aux_loss_coeff > 0`` and 0 here the aux loss is on in RL only:
    #: a persistent router drift (the testbed, docs/pr2_effect.md).
    aux_loss_coeff: Optional[float] = None
    #: Digit task of the warm start: ``reverse``, ``sort``, ``copy`` or ``add`` (None:
    #: ``task.name``). Another task than RL's shifts the task distribution between warm start
    #: and RL. Digit tasks only: not with ``task.dataset``.
    task: Optional[str] = None
    #: Shortest and longest operand of the warm-start task, in digits (None: ``task.min_digits``
    #: / ``task.max_digits``). Digit tasks only: not with ``task.dataset``.
    min_digits: Optional[int] = None
    max_digits: Optional[int] = None

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"warm_start.steps must be >= 0, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"warm_start.batch_size must be >= 1, got {self.batch_size}")
        if self.lr < 0:
            raise ValueError(f"warm_start.lr must be >= 0, got {self.lr}")
        if self.aux_loss_coeff is not None and self.aux_loss_coeff < 0:
            raise ValueError(f"warm_start.aux_loss_coeff must be >= 0, got {self.aux_loss_coeff}")
        self._check_digit_task()

    def _check_digit_task(self) -> None:
        from pr2_megatron.rl.tasks import DIGIT_TASKS

        if self.task is not None and self.task not in DIGIT_TASKS:
            raise ValueError(
                f"warm_start.task={self.task!r} is not a digit task; expected one of "
                f"{', '.join(DIGIT_TASKS)} (or null: task.name)"
            )
        for name in ("min_digits", "max_digits"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"warm_start.{name} must be >= 1 (or null), got {value}")
        if None not in (self.min_digits, self.max_digits) and self.min_digits > self.max_digits:
            raise ValueError(
                f"warm_start.min_digits={self.min_digits} and warm_start.max_digits="
                f"{self.max_digits} must satisfy min_digits <= max_digits"
            )

    def digit_task(self, rl_task: TaskConfig) -> tuple[str, int, int]:
        """The warm start's digit task ``(name, min_digits, max_digits)``; unset: ``rl_task``'s."""
        name = rl_task.name if self.task is None else self.task
        low = rl_task.min_digits if self.min_digits is None else self.min_digits
        high = rl_task.max_digits if self.max_digits is None else self.max_digits
        return name, low, high


@dataclass
class CheckpointConfig:
    """Saving and resuming (model, predictors, optimizer, RNG, step, data position)."""

    #: Directory of the checkpoints (None: no checkpoints).
    dir: Optional[str] = None
    #: Save every this many RL steps (0: only at the end and on SIGTERM/SIGUSR1).
    interval: int = 0
    #: Resume from the newest complete checkpoint in ``dir`` when there is one.
    resume: bool = True
    #: Complete checkpoints kept (older ones are deleted after a new one is complete).
    keep: int = 2
    #: Write checkpoints in the background (Megatron's async save in a forked worker); the
    #: next save, the end of the run and a signal wait for it. The step it holds is what the
    #: model was when the save began.
    async_save: bool = False
    #: At the end of the run (not on a signal stop), write the model as a Hugging Face
    #: checkpoint into this directory (None: no export): config.json (``model.hf_checkpoint``'s
    #: when set, else generated) + safetensors, one file per writing rank with an index.
    export_hf: Optional[str] = None

    def __post_init__(self) -> None:
        if self.interval < 0:
            raise ValueError(f"checkpoint.interval must be >= 0, got {self.interval}")
        if self.keep < 0:
            raise ValueError(f"checkpoint.keep must be >= 0 (0 keeps all), got {self.keep}")


@dataclass
class LoggingConfig:
    """Where metrics go."""

    #: Run directory: ``metrics.jsonl``, TensorBoard events, the resolved ``config.yaml``.
    dir: str = "runs/tiny"
    #: Also write TensorBoard events (needs the ``plots`` extra; off with a log line without it).
    tensorboard: bool = True
    #: GPU utilisation, memory and power per step through NVML (off with a log line without it).
    gpu_monitor: bool = True


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
            "Generated from the `#:` comments in `pr2_megatron/rl/config.py` and the dataclasses",
            "it uses (`python -m pr2_megatron.rl.config > docs/config.md`); a test keeps it",
            "current.",
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
