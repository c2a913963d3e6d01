"""The sections of a run configuration (:class:`~pr2_megatron.rl.config.TrainConfig`).

Every field is documented by the ``#:`` comment above it (rendered into ``docs/config.md`` by
:func:`pr2_megatron.rl.config.config_reference`); ``__post_init__`` checks what one section can
check alone, naming the key and the bad value. Checks across sections, loading and overrides
are in :mod:`pr2_megatron.rl.config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from pr2_megatron.rl.tasks import DigitTaskName
from pr2_megatron.routing.probmoe.router import ProbMoEConfig
from pr2_megatron.routing.router import PR2RouterConfig

__all__ = [
    "CheckpointConfig",
    "GRPOConfig",
    "LoggingConfig",
    "OptimConfig",
    "ReplayConfig",
    "RolloutConfig",
    "RouterConfig",
    "TaskConfig",
    "TokenizerConfig",
    "WarmStartConfig",
]


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
    name: DigitTaskName = "reverse"
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
    #: Router z-loss coefficient during the warm start (None: ``model.z_loss_coeff``
    #: throughout). With ``model.z_loss_coeff > 0`` and 0 here the z-loss is on in RL only.
    z_loss_coeff: Optional[float] = None
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
        for name in ("aux_loss_coeff", "z_loss_coeff"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"warm_start.{name} must be >= 0, got {value}")
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
