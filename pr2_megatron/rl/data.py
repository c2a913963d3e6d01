"""Real prompts for the trainer: JSONL datasets, local Hugging Face tokenizers, rewards.

* :func:`load_records` reads a JSONL file of prompts and reference answers (GSM8K-style, or
  any two string fields), with errors that name the file, the line and what is wrong.
* :class:`TextTokenizer` wraps a Hugging Face tokenizer read from local files only: a directory
  (``transformers.AutoTokenizer``, optionally with its chat template) or a ``tokenizer.json``
  (``tokenizers.Tokenizer``). Nothing is downloaded.
* Rewards are functions ``(response_text, reference_text, finished) -> float`` in a small
  registry (:data:`REWARDS`, :func:`register_reward`): ``exact_match`` and ``final_number``.
* :class:`DatasetTask` is the trainer's task over such a file (the same interface as the digit
  :class:`~pr2_megatron.rl.tasks.Task`), and :func:`build_task` picks one from the config
  (:func:`build_warm_start_task`: the warm start's, another digit task with ``warm_start.task``).

Every error here is a :class:`DataError` (a ``ValueError``) naming the file, line and value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from pr2_megatron.rl.tasks import Problem, supervised_batch

if TYPE_CHECKING:
    from pr2_megatron.rl.config import TrainConfig

__all__ = [
    "REWARDS",
    "DataError",
    "DatasetTask",
    "Record",
    "TextTokenizer",
    "build_task",
    "build_warm_start_task",
    "final_number",
    "get_reward",
    "load_records",
    "register_reward",
]


class DataError(ValueError):
    """A dataset, tokenizer or reward that cannot be used (names the file, line and value)."""


# ------------------------------------------------------------------------------ rewards
#: ``reward(response_text, reference_text, finished) -> float``; ``finished``: the response
#: ended with the end-of-sequence token (it was not cut by ``rollout.max_new_tokens``).
RewardFn = Callable[[str, str, bool], float]

#: Reward functions by name (``task.reward``).
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: register a reward function under ``name`` (for ``task.reward: name``)."""

    def register(fn: RewardFn) -> RewardFn:
        if name in REWARDS and REWARDS[name] is not fn:
            raise DataError(f"a reward named {name!r} is already registered")
        REWARDS[name] = fn
        return fn

    return register


def get_reward(name: str) -> RewardFn:
    """The reward registered as ``name``; DataError listing the known names otherwise."""
    if name not in REWARDS:
        raise DataError(
            f"task.reward={name!r} is not a registered reward; known: {', '.join(sorted(REWARDS))}"
            " (pr2_megatron.rl.data.register_reward adds one)"
        )
    return REWARDS[name]


@register_reward("exact_match")
def exact_match(response: str, reference: str, finished: bool) -> float:
    """1.0 when the response, ended by end-of-sequence, equals the reference (stripped)."""
    return float(finished and response.strip() == reference.strip())


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def final_number(text: str) -> Optional[Decimal]:
    """The final numeric answer of ``text``: after its last ``####`` (GSM8K), else its last number.

    Thousands separators are dropped and a trailing period ignored (``1,000.`` -> 1000); None
    when there is no number.
    """
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        found = _NUMBER.findall(tail)
        if found:
            return _decimal(found[0])
    found = _NUMBER.findall(text)
    return _decimal(found[-1]) if found else None


def _decimal(token: str) -> Optional[Decimal]:
    try:
        return Decimal(token.replace(",", ""))
    except InvalidOperation:
        return None


@register_reward("final_number")
def final_number_reward(response: str, reference: str, finished: bool) -> float:
    """1.0 when the response's final number equals the reference's (numerically: 7 == 7.0)."""
    expected, got = final_number(reference), final_number(response)
    return float(expected is not None and got is not None and got == expected)


# ---------------------------------------------------------------------------- JSONL records
class Record:
    """One prompt and its reference answer, with where it came from (``file:line``)."""

    __slots__ = ("prompt", "answer", "source")

    def __init__(self, prompt: str, answer: str, source: str) -> None:
        self.prompt, self.answer, self.source = prompt, answer, source

    def __repr__(self) -> str:
        return f"Record({self.source})"


def load_records(path, prompt_field: str = "prompt", answer_field: str = "answer") -> list[Record]:
    """The records of a JSONL file: one JSON object per line, blank lines skipped.

    ``prompt_field`` must hold a non-empty string, ``answer_field`` a string or a number
    (GSM8K's ``answer`` is the worked solution ending in ``#### 42``). DataError names the file
    and line of a missing file, malformed JSON, a non-object line, a missing or mistyped field,
    or a file without records.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"task.dataset: {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"task.dataset: {path}: cannot be read ({error})") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{where}: not valid JSON ({error.msg} at column {error.colno})"
            ) from None
        if not isinstance(value, dict):
            raise DataError(
                f"{where}: expected a JSON object with fields {prompt_field!r} and "
                f"{answer_field!r}, got {type(value).__name__}"
            )
        for field, kind in (
            (prompt_field, "task.prompt_field"),
            (answer_field, "task.answer_field"),
        ):
            if field not in value:
                raise DataError(
                    f"{where}: no field {field!r} ({kind}); the record has "
                    f"{', '.join(map(repr, value)) or 'no fields'}"
                )
        prompt, answer = value[prompt_field], value[answer_field]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(
                f"{where}: field {prompt_field!r} must be a non-empty string, got {prompt!r}"
            )
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise DataError(
                f"{where}: field {answer_field!r} must be a string or a number, got {answer!r}"
            )
        records.append(Record(prompt, str(answer), where))
    if not records:
        raise DataError(f"task.dataset: {path}: no records (an empty file?)")
    return records


# ------------------------------------------------------------------------------- tokenizer
class TextTokenizer:
    """A Hugging Face tokenizer from local files: ids of prompts and answers, special ids.

    ``path`` is a directory (``transformers.AutoTokenizer.from_pretrained(path,
    local_files_only=True)``: ``tokenizer.json`` / ``tokenizer_config.json``, chat template
    included) or a ``tokenizer.json`` file (``tokenizers.Tokenizer.from_file``). ``eos_token``
    / ``pad_token`` name the special tokens when the tokenizer does not (padding defaults to
    end-of-sequence). ``chat_template``: prompts become one user turn of the tokenizer's chat
    template plus its generation prompt (directories only).
    """

    def __init__(
        self,
        path,
        *,
        chat_template: bool = False,
        eos_token: Optional[str] = None,
        pad_token: Optional[str] = None,
    ) -> None:
        self.path = Path(path)
        self.chat_template = chat_template
        self._hf = None  # transformers tokenizer (directory)
        self._raw = None  # tokenizers.Tokenizer (file)
        if self.path.is_dir():
            self._load_directory()
        elif self.path.is_file():
            self._load_file()
        else:
            raise DataError(f"tokenizer.path: {self.path}: no such file or directory")
        self.eos_id = self._special_id("eos", eos_token)
        self.pad_id = (
            self._special_id("pad", pad_token) if self._has_pad(pad_token) else self.eos_id
        )

    def _load_directory(self) -> None:
        try:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except Exception as error:  # noqa: BLE001 - transformers raises many kinds
            raise DataError(
                f"tokenizer.path: {self.path}: not a loadable Hugging Face tokenizer directory "
                f"({type(error).__name__}: {error})"
            ) from None
        if self.chat_template and not getattr(self._hf, "chat_template", None):
            raise DataError(
                f"tokenizer.chat_template=true, but the tokenizer in {self.path} has no chat "
                "template (tokenizer_config.json 'chat_template' or chat_template.jinja)"
            )

    def _load_file(self) -> None:
        from tokenizers import Tokenizer

        if self.chat_template:
            raise DataError(
                f"tokenizer.chat_template=true needs a tokenizer directory with a chat template; "
                f"{self.path} is a single tokenizer file"
            )
        try:
            self._raw = Tokenizer.from_file(str(self.path))
        except Exception as error:  # noqa: BLE001 - tokenizers raises plain Exceptions
            raise DataError(
                f"tokenizer.path: {self.path}: not a tokenizers JSON file ({error})"
            ) from None

    def _has_pad(self, pad_token: Optional[str]) -> bool:
        if pad_token is not None:
            return True
        return self._hf is not None and self._hf.pad_token_id is not None

    def _special_id(self, kind: str, token: Optional[str]) -> int:
        """Id of the named token, else the tokenizer's own ``eos``/``pad`` token."""
        if token is None and self._hf is not None:
            own = getattr(self._hf, f"{kind}_token_id")
            if own is not None:
                return int(own)
        if token is None:
            raise DataError(
                f"tokenizer {self.path} defines no {kind} token; set tokenizer.{kind}_token to one "
                "of its tokens"
            )
        if self._hf is not None:
            token_id = self._hf.get_vocab().get(token)
        else:
            token_id = self._raw.token_to_id(token)
        if token_id is None:
            raise DataError(f"tokenizer.{kind}_token={token!r} is not a token of {self.path}")
        return int(token_id)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (every id is below it)."""
        if self._hf is not None:
            return len(self._hf)
        return self._raw.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, special: bool) -> list[int]:
        """Token ids of ``text`` (``special``: with the tokenizer's special tokens, e.g. bos)."""
        if self._hf is not None:
            return list(self._hf.encode(text, add_special_tokens=special))
        return list(self._raw.encode(text, add_special_tokens=special).ids)

    def encode_prompt(self, prompt: str) -> list[int]:
        """Ids of a prompt: the chat template's user turn + generation prompt, or the text."""
        if self.chat_template:
            text = self._hf.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            return self.encode(text, special=False)
        return self.encode(prompt, special=True)

    def decode(self, ids) -> str:
        """Text of ``ids`` without special tokens."""
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=True)
        return self._raw.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------------------------- tasks
class DatasetTask:
    """The trainer's task over a JSONL file: sample prompts, score responses, warm-start batches.

    Prompts and reference answers are tokenized once, when the task is built. ``sample`` draws
    records uniformly with replacement from ``generator`` (so the data of a step is a function
    of the seed and the step, as resuming needs). The warm start trains on the reference answer
    followed by end-of-sequence.
    """

    def __init__(
        self,
        records: list[Record],
        tokenizer: TextTokenizer,
        reward: str,
        *,
        context: int,
        max_new_tokens: int,
        supervised: bool,
        vocab_size: Optional[int] = None,
    ) -> None:
        self.tokenizer, self.reward_name = tokenizer, reward
        self._reward = get_reward(reward)
        self.eos_id, self.pad_id = tokenizer.eos_id, tokenizer.pad_id
        self.vocab_size = tokenizer.vocab_size
        if vocab_size is not None and self.vocab_size > vocab_size:
            raise DataError(
                f"tokenizer {tokenizer.path} has {self.vocab_size} tokens, more than "
                f"model.vocab_size={vocab_size}: raise model.vocab_size to at least "
                f"{self.vocab_size}"
            )
        self.problems = []
        for record in records:
            prompt = tokenizer.encode_prompt(record.prompt)
            answer = tokenizer.encode(record.answer, special=False)
            if len(prompt) + max_new_tokens - 1 > context:
                needed = len(prompt) + max_new_tokens - 1
                raise DataError(
                    f"{record.source}: the prompt is {len(prompt)} tokens long; with "
                    f"rollout.max_new_tokens={max_new_tokens} it needs {needed} positions, more "
                    f"than model.max_sequence_length={context}"
                )
            if supervised and len(prompt) + len(answer) > context:
                raise DataError(
                    f"{record.source}: prompt ({len(prompt)} tokens) and reference answer "
                    f"({len(answer)} tokens) with end-of-sequence need {len(prompt) + len(answer)}"
                    f" positions for the warm start, more than model.max_sequence_length={context}"
                    " (shorten the answer, or warm_start.steps=0)"
                )
            if reward == "final_number" and final_number(record.answer) is None:
                raise DataError(
                    f"{record.source}: the reference answer {record.answer!r} has no number "
                    "(task.reward=final_number)"
                )
            self.problems.append(
                Problem(tuple(prompt), tuple(answer), record.answer, record.source)
            )
        self.max_prompt_len = max(len(p.prompt) for p in self.problems)
        # The warm start feeds answer + eos; without it the answers never enter a sequence.
        self.max_answer_len = max(len(p.answer) for p in self.problems) + 1 if supervised else 1

    def __len__(self) -> int:
        return len(self.problems)

    def sample(self, count: int, generator: torch.Generator) -> list[Problem]:
        """``count`` problems drawn uniformly with replacement with ``generator``."""
        picks = torch.randint(len(self.problems), (count,), generator=generator).tolist()
        return [self.problems[i] for i in picks]

    def decode(self, tokens) -> str:
        """Text of token ids (special tokens dropped)."""
        return self.tokenizer.decode(tokens)

    def reward(self, problem: Problem, response: list[int]) -> float:
        """``task.reward`` of a response (its ids, end-of-sequence included when generated)."""
        response = [int(t) for t in response]
        finished = bool(response) and response[-1] == self.eos_id
        text = self.decode(response[:-1] if finished else response)
        return float(self._reward(text, problem.reference or "", finished))

    def supervised_batch(self, problems: list[Problem], seq_len: int):
        """Warm-start ``ids``, ``labels``, ``mask`` (``rl.tasks.supervised_batch``)."""
        return supervised_batch(problems, seq_len, eos_id=self.eos_id, pad_id=self.pad_id)


def build_task(cfg: TrainConfig):
    """The task of a config: a digit :class:`~pr2_megatron.rl.tasks.Task` or a :class:`DatasetTask`.

    With ``task.dataset`` the records, the tokenizer and every record's length are checked
    here, against ``model.max_sequence_length`` and ``model.vocab_size`` (DataError naming the
    file and line).
    """
    from pr2_megatron.rl.tasks import Task

    task = cfg.task
    get_reward(task.reward)
    if task.dataset is None:
        return Task(task.name, task.min_digits, task.max_digits, reward=task.reward)
    tokenizer = TextTokenizer(
        cfg.tokenizer.path,
        chat_template=cfg.tokenizer.chat_template,
        eos_token=cfg.tokenizer.eos_token,
        pad_token=cfg.tokenizer.pad_token,
    )
    records = load_records(task.dataset, task.prompt_field, task.answer_field)
    return DatasetTask(
        records,
        tokenizer,
        task.reward,
        context=cfg.model.max_sequence_length,
        max_new_tokens=cfg.rollout.max_new_tokens,
        supervised=cfg.warm_start.steps > 0,
        vocab_size=cfg.model.vocab_size,
    )


def build_warm_start_task(cfg: TrainConfig, task):
    """The task the warm start samples from: ``task`` (the RL task), or another digit task.

    ``task`` is the RL task of :func:`build_task`; ``warm_start.task`` / ``min_digits`` /
    ``max_digits`` (each None: ``cfg.task``'s) make the digit
    :class:`~pr2_megatron.rl.tasks.Task` of the warm start. Where they resolve to ``cfg.task``'s
    digit task (all None: always), and with ``task.dataset`` (where the config rejects them),
    the result is ``task`` itself: the same problems for the same generator.
    """
    from pr2_megatron.rl.tasks import Task

    if cfg.task.dataset is not None:
        return task
    name, low, high = cfg.warm_start.digit_task(cfg.task)
    if (name, low, high) == (cfg.task.name, cfg.task.min_digits, cfg.task.max_digits):
        return task
    return Task(name, low, high, reward=cfg.task.reward)
