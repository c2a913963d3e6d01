"""Write the example dataset and tokenizer of ``configs/gsm8k_style.yaml`` (deterministic).

    python configs/data/make_gsm8k_style.py        # rewrites the two files below

* ``gsm8k_style.jsonl``: 64 GSM8K-style word problems (``question`` / ``answer`` fields, the
  answer a one-line worked solution ending in ``#### N``), small numbers;
* ``gsm8k_style_tokenizer/``: a byte-pair tokenizer (``tokenizers``) trained on them, digits
  split one by one, with a ``tokenizer_config.json`` (eos / pad / bos and a chat template),
  loadable with ``transformers.AutoTokenizer.from_pretrained(dir, local_files_only=True)``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATES = [
    (
        "Tom has {a} apples and buys {b} more. How many apples does he have now?",
        "{a} + {b} = {c}",
        lambda a, b: a + b,
    ),
    (
        "A box holds {a} pens. {b} pens are taken out. How many pens are left?",
        "{a} - {b} = {c}",
        lambda a, b: a - b,
    ),
    (
        "Each bag has {a} marbles. How many marbles are in {b} bags?",
        "{a} * {b} = {c}",
        lambda a, b: a * b,
    ),
    (
        "Sara read {a} pages on Monday and {b} pages on Tuesday. How many pages did she read?",
        "{a} + {b} = {c}",
        lambda a, b: a + b,
    ),
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def records(count: int = 64, seed: int = 0) -> list[dict]:
    """``count`` problems drawn with ``seed``."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        question, work, fn = TEMPLATES[i % len(TEMPLATES)]
        a, b = rng.randint(2, 12), rng.randint(1, 9)
        a, b = max(a, b), min(a, b)
        c = fn(a, b)
        out.append(
            {
                "question": question.format(a=a, b=b),
                "answer": f"{work.format(a=a, b=b, c=c)}\n#### {c}",
            }
        )
    return out


def train_tokenizer(texts: list[str], vocab_size: int = 128):
    """A BPE tokenizer over ``texts`` (Metaspace words, single digits), bos prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=list("0123456789+-*=#.?:\n"),
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return tokenizer


def main() -> None:
    """Write the JSONL file and the tokenizer directory next to this script."""
    rows = records()
    (HERE / "gsm8k_style.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [r["question"] for r in rows] + [r["answer"] for r in rows] + ["user: assistant:"]
    folder = HERE / "gsm8k_style_tokenizer"
    folder.mkdir(exist_ok=True)
    train_tokenizer(texts).save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    print(f"wrote {HERE / 'gsm8k_style.jsonl'} ({len(rows)} records) and {folder}")


if __name__ == "__main__":
    main()
