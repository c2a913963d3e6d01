"""Verifiable synthetic tasks with exact-match rewards and a character tokenizer.

A prompt is ``<bos> operand [+ operand] =``; the answer is digits followed by ``<eos>``.
Tasks: ``reverse`` (digits reversed), ``sort`` (digits ascending), ``copy`` and ``add`` (the sum
of two numbers). The reward of a response is 1.0 when it is exactly the answer (digits then
``<eos>``), else 0.0 (``task.reward: exact_match``; ``final_number`` compares the response's last
number instead). Real prompts (JSONL files, Hugging Face tokenizers): :mod:`pr2_megatron.rl.data`.

The constants below are this character tokenizer's ids; the trainer and the samplers take
end-of-sequence and padding ids from the task (``Task.eos_id`` / ``Task.pad_id``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, get_args

import torch

PAD, BOS, EOS, EQUALS, PLUS = 0, 1, 2, 3, 4
DIGIT0 = 5  # '0'..'9' -> 5..14
VOCAB_USED = DIGIT0 + 10
#: The digit tasks (``task.name``, ``warm_start.task``); all share this vocabulary.
DigitTaskName = Literal["reverse", "sort", "copy", "add"]
DIGIT_TASKS: tuple[str, ...] = get_args(DigitTaskName)
_SYMBOLS = {PAD: "_", BOS: "^", EOS: "$", EQUALS: "=", PLUS: "+"}


def encode_digits(text: str) -> list[int]:
    """Token ids of a digit string."""
    if not text.isdigit():
        raise ValueError(f"expected digits, got {text!r}")
    return [DIGIT0 + int(c) for c in text]


def decode(tokens) -> str:
    """Readable text of token ids (``^`` bos, ``$`` eos, ``_`` pad)."""
    out = []
    for token in tokens:
        token = int(token)
        if DIGIT0 <= token < DIGIT0 + 10:
            out.append(str(token - DIGIT0))
        else:
            out.append(_SYMBOLS.get(token, f"<{token}>"))
    return "".join(out)


@dataclass(frozen=True)
class Problem:
    """One prompt and its answer (token ids, answer without ``<eos>``).

    ``reference``: the reference answer's text where the reward reads text (datasets);
    ``source``: where the problem came from (``file:line``), for error messages.
    """

    prompt: tuple[int, ...]
    answer: tuple[int, ...]
    reference: Optional[str] = None
    source: Optional[str] = None


class Task:
    """A digit task family: sample problems, score responses (character tokenizer).

    ``reward``: ``exact_match`` (the answer's digits then ``<eos>``) or ``final_number`` (the
    response's last number equals the answer); other registered rewards read the decoded text
    (:mod:`pr2_megatron.rl.data`).
    """

    #: End-of-sequence and padding ids, and the number of ids the task uses.
    eos_id, pad_id, vocab_size = EOS, PAD, VOCAB_USED

    def __init__(
        self, name: str, min_digits: int, max_digits: int, reward: str = "exact_match"
    ) -> None:
        if name not in DIGIT_TASKS:
            raise ValueError(f"task.name must be one of {', '.join(DIGIT_TASKS)}; got {name!r}")
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"task digits need 1 <= min <= max, got {min_digits}, {max_digits}")
        self.name, self.min_digits, self.max_digits = name, min_digits, max_digits
        self.reward_name = reward

    @property
    def max_prompt_len(self) -> int:
        """Longest prompt in tokens."""
        operands = 2 if self.name == "add" else 1
        return 1 + operands * self.max_digits + (operands - 1) + 1

    @property
    def max_answer_len(self) -> int:
        """Longest answer in tokens, ``<eos>`` included."""
        return self.max_digits + (1 if self.name == "add" else 0) + 1

    def _number(self, generator: torch.Generator) -> str:
        digits = int(torch.randint(self.min_digits, self.max_digits + 1, (1,), generator=generator))
        values = torch.randint(0, 10, (digits,), generator=generator).tolist()
        return "".join(str(v) for v in values)

    def sample(self, count: int, generator: torch.Generator) -> list[Problem]:
        """``count`` problems drawn with ``generator``."""
        problems = []
        for _ in range(count):
            a = self._number(generator)
            if self.name == "add":
                b = self._number(generator)
                prompt = [BOS, *encode_digits(a), PLUS, *encode_digits(b), EQUALS]
                answer = str(int(a) + int(b))
            else:
                prompt = [BOS, *encode_digits(a), EQUALS]
                answer = {"reverse": a[::-1], "sort": "".join(sorted(a)), "copy": a}[self.name]
            problems.append(Problem(tuple(prompt), tuple(encode_digits(answer))))
        return problems

    def reward(self, problem: Problem, response: list[int]) -> float:
        """``exact_match``: 1.0 when ``response`` is exactly the answer then ``<eos>``, else 0.0.

        Other rewards (``final_number``, registered ones) score the decoded texts.
        """
        response = [int(t) for t in response]
        if self.reward_name == "exact_match":
            return float(response == [*problem.answer, EOS])
        from pr2_megatron.rl.data import get_reward

        finished = bool(response) and response[-1] == EOS
        text = decode(response[:-1] if finished else response)
        return float(get_reward(self.reward_name)(text, decode(problem.answer), finished))

    @staticmethod
    def decode(tokens) -> str:
        """Readable text of token ids (:func:`decode`)."""
        return decode(tokens)

    def supervised_batch(self, problems: list[Problem], seq_len: int):
        """Warm-start ``ids``, ``labels`` and answer mask (:func:`supervised_batch`)."""
        return supervised_batch(problems, seq_len, eos_id=self.eos_id, pad_id=self.pad_id)


def supervised_batch(
    problems: list[Problem], seq_len: int, *, eos_id: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``ids [B, seq_len]``, ``labels`` and a loss mask on the answer tokens.

    Each sequence is prompt, answer, ``eos_id``; ``pad_id`` fills the rest.
    """
    ids = torch.full((len(problems), seq_len), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, pad_id)
    mask = torch.zeros(len(problems), seq_len)
    for row, problem in enumerate(problems):
        full = [*problem.prompt, *problem.answer, eos_id]
        if len(full) - 1 > seq_len:
            where = f" ({problem.source})" if problem.source else ""
            raise ValueError(f"problem{where} of {len(full)} tokens does not fit seq_len={seq_len}")
        ids[row, : len(full) - 1] = torch.tensor(full[:-1])
        labels[row, : len(full) - 1] = torch.tensor(full[1:])
        mask[row, len(problem.prompt) - 1 : len(full) - 1] = 1.0
    return ids, labels, mask
