"""Real prompts (rl/data.py): JSONL records, local Hugging Face tokenizers, rewards, the trainer.

Every tokenizer here is trained inside the test with the ``tokenizers`` package and saved to a
temporary directory; nothing is downloaded. Bad input must fail with an error naming the file,
the line and what is wrong.
"""

import json

import pytest
import torch

from pr2_megatron.rl.data import (
    DataError,
    DatasetTask,
    TextTokenizer,
    build_task,
    build_warm_start_task,
    final_number,
    get_reward,
    load_records,
    register_reward,
)
from pr2_megatron.testing.distributed import run_distributed

CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
QUESTIONS = [
    ("Tom has 3 apples and buys 4 more. How many apples?", "3 + 4 = 7\n#### 7"),
    ("A box has 9 pens. 2 are taken. How many pens are left?", "9 - 2 = 7\n#### 7"),
    ("Each bag has 5 marbles. How many marbles are in 3 bags?", "5 * 3 = 15\n#### 15"),
    ("Sara read 6 pages and 8 pages. How many pages?", "6 + 8 = 14\n#### 14"),
]


def _train_tokenizer(folder, *, with_config=True, special=("<pad>", "<s>", "</s>", "<unk>")):
    """A small BPE tokenizer trained on the questions; a directory (with config) or a file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=90, special_tokens=list(special), initial_alphabet=list("0123456789+-*=#.?:\n")
    )
    texts = [q for q, _ in QUESTIONS] + [a for _, a in QUESTIONS] + ["user: assistant:"]
    tokenizer.train_from_iterator(texts * 4, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    if with_config:
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "pad_token": "<pad>",
            "chat_template": CHAT_TEMPLATE,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _dataset(tmp_path, name="data.jsonl"):
    rows = [{"question": q, "answer": a} for q, a in QUESTIONS]
    return _write_jsonl(tmp_path / name, rows)


# -------------------------------------------------------------------------------- rewards
@pytest.mark.parametrize(
    "text, number",
    [
        ("3 + 4 = 7\n#### 7", "7"),
        ("so the answer is 1,250.", "1250"),
        ("#### -3.5 apples, not 12", "-3.5"),
        ("12 then 40", "40"),
        ("no number here", None),
    ],
)
def test_final_number_reads_gsm8k_answers_and_plain_text(text, number):
    got = final_number(text)
    assert (None if got is None else str(got)) == number


def test_rewards_and_registry():
    assert get_reward("final_number")("the total is 7.0", "3 + 4 = 7\n#### 7", False) == 1.0
    assert get_reward("final_number")("#### 8", "#### 7", True) == 0.0
    assert get_reward("exact_match")(" 42 ", "42", True) == 1.0
    assert get_reward("exact_match")("42", "42", False) == 0.0  # cut by max_new_tokens
    with pytest.raises(DataError, match=r"task.reward='nope' is not a registered reward"):
        get_reward("nope")

    @register_reward("test_length")
    def length_reward(response, reference, finished):
        return float(len(response))

    assert get_reward("test_length") is length_reward


def test_digit_task_keeps_exact_match_and_takes_final_number():
    from pr2_megatron.rl.tasks import EOS, PAD, Task, encode_digits

    exact, final = Task("add", 1, 2), Task("add", 1, 2, reward="final_number")
    problem = exact.sample(1, torch.Generator().manual_seed(0))[0]
    right = [*problem.answer, EOS]
    assert exact.reward(problem, right) == 1.0 and exact.reward(problem, right[:-1]) == 0.0
    assert final.reward(problem, right) == 1.0
    assert final.reward(problem, [*encode_digits("0"), *problem.answer]) == 1.0  # last number
    assert (exact.eos_id, exact.pad_id) == (EOS, PAD)


# --------------------------------------------------------------------------------- records
def test_records_load_with_configured_fields(tmp_path):
    records = load_records(_dataset(tmp_path), "question", "answer")
    assert [r.prompt for r in records] == [q for q, _ in QUESTIONS]
    assert records[2].source.endswith("data.jsonl:3")
    numbers = _write_jsonl(tmp_path / "n.jsonl", [{"prompt": "2+2?", "answer": 4}, ""])
    assert load_records(numbers)[0].answer == "4"  # numbers become strings; blank lines skip


@pytest.mark.parametrize(
    "rows, message",
    [
        (['{"prompt": "a", "answer": "1"}', '{"prompt": "b", '], r"bad.jsonl:2: not valid JSON"),
        (['["a", "b"]'], r"bad.jsonl:1: expected a JSON object .* got list"),
        (['{"prompt": "a", "answer": "1"}', '{"answer": "1"}'], r"bad.jsonl:2: no field 'prompt'"),
        (['{"prompt": "", "answer": "1"}'], r"bad.jsonl:1: field 'prompt' must be a non-empty"),
        (['{"prompt": "a", "answer": [1]}'], r"bad.jsonl:1: field 'answer' must be a string"),
        (["", "  "], r"bad.jsonl: no records"),
    ],
)
def test_bad_records_name_the_file_and_line(tmp_path, rows, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=message):
        load_records(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"task.dataset: .*missing.jsonl: no such file"):
        load_records(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------ tokenizer
def test_tokenizer_directory_with_chat_template(tmp_path):
    tokenizer = TextTokenizer(_train_tokenizer(tmp_path / "tok"), chat_template=True)
    assert (tokenizer.eos_id, tokenizer.pad_id) == (2, 0)  # from tokenizer_config.json
    ids = tokenizer.encode_prompt("How many apples?")
    assert ids[0] == 1  # <s> of the template
    assert tokenizer.decode(ids).startswith("user: How many apples?")
    assert tokenizer.decode(ids).rstrip().endswith("assistant:")
    answer = tokenizer.encode(QUESTIONS[0][1], special=False)
    assert tokenizer.decode(answer) == QUESTIONS[0][1]


def test_tokenizer_file_needs_named_specials(tmp_path):
    path = _train_tokenizer(tmp_path / "raw", with_config=False) / "tokenizer.json"
    with pytest.raises(DataError, match=r"defines no eos token; set tokenizer.eos_token"):
        TextTokenizer(path)
    tokenizer = TextTokenizer(path, eos_token="</s>")
    assert tokenizer.eos_id == 2 and tokenizer.pad_id == 2  # padding falls back to eos
    assert tokenizer.encode_prompt("How many pens?")[0] == 1  # <s> from the post-processor
    with pytest.raises(DataError, match=r"tokenizer.pad_token='<nope>' is not a token"):
        TextTokenizer(path, eos_token="</s>", pad_token="<nope>")
    with pytest.raises(DataError, match=r"chat_template=true needs a tokenizer directory"):
        TextTokenizer(path, eos_token="</s>", chat_template=True)
    with pytest.raises(DataError, match=r"tokenizer.path: .*nowhere: no such file"):
        TextTokenizer(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------- task
def _config(tmp_path, *overrides):
    from pr2_megatron.rl.config import load_config

    tokenizer = _train_tokenizer(tmp_path / "tok")
    return load_config(
        "configs/tiny.yaml",
        [
            f"task.dataset={_dataset(tmp_path)}",
            "task.prompt_field=question",
            "task.reward=final_number",
            f"tokenizer.path={tokenizer}",
            "tokenizer.chat_template=true",
            "model.vocab_size=96",
            "model.max_sequence_length=64",
            "rollout.max_new_tokens=12",
            *overrides,
        ],
    )


def test_dataset_task_samples_scores_and_warm_starts(tmp_path):
    task = build_task(_config(tmp_path))
    assert isinstance(task, DatasetTask) and len(task) == 4
    assert (task.eos_id, task.pad_id) == (2, 0)
    first = task.sample(8, torch.Generator().manual_seed(3))
    assert first == task.sample(8, torch.Generator().manual_seed(3))  # a function of the seed
    problem = first[0]
    right = task.tokenizer.encode("so #### " + str(final_number(problem.reference)), False)
    assert task.reward(problem, [*right, task.eos_id]) == 1.0
    assert task.reward(problem, task.tokenizer.encode("#### 999", False)) == 0.0
    ids, labels, mask = task.supervised_batch(first[:2], 64)
    n = len(first[0].prompt) + len(first[0].answer)
    assert labels[0, n - 1] == task.eos_id and ids[0, n] == task.pad_id
    assert mask[0].sum() == len(first[0].answer) + 1


def test_dataset_errors_name_the_record_or_tokenizer(tmp_path):
    from pr2_megatron.rl.config import ConfigError, load_config

    with pytest.raises(DataError, match=r"data.jsonl:\d: the prompt is \d+ tokens long; with "):
        build_task(_config(tmp_path, "model.max_sequence_length=20"))
    with pytest.raises(DataError, match=r"has \d+ tokens, more than model.vocab_size=32"):
        build_task(_config(tmp_path, "model.vocab_size=32"))
    with pytest.raises(DataError, match=r"data.jsonl:\d: prompt .* for the warm start"):
        build_task(_config(tmp_path, "model.max_sequence_length=48", "rollout.max_new_tokens=2"))
    with pytest.raises(ConfigError, match=r"task.dataset=.* needs tokenizer.path"):
        load_config(None, ["task.dataset=x.jsonl"])
    with pytest.raises(ConfigError, match=r"tokenizer.path=.* is set but task.dataset is not"):
        load_config(None, ["tokenizer.path=tok"])
    no_number = _write_jsonl(tmp_path / "nonum.jsonl", [{"question": "Why?", "answer": "none"}])
    with pytest.raises(DataError, match=r"nonum.jsonl:1: the reference answer 'none' has no num"):
        build_task(_config(tmp_path, f"task.dataset={no_number}"))


# ------------------------------------------------------------------------ warm-start task
def _tiny(*overrides):
    from pr2_megatron.rl.config import load_config

    return load_config("configs/tiny.yaml", list(overrides))  # task: reverse, 2-4 digits


def test_warm_start_task_is_the_rl_task_by_default(tmp_path):
    from pr2_megatron.rl.tasks import Task

    cfg = _tiny()
    task = build_task(cfg)
    assert build_warm_start_task(cfg, task) is task  # the same problems for any generator
    drawn = build_warm_start_task(cfg, task).sample(64, torch.Generator().manual_seed(11))
    assert drawn == Task("reverse", 2, 4).sample(64, torch.Generator().manual_seed(11))
    assert all(p.answer == p.prompt[1:-1][::-1] for p in drawn)
    # Keys naming the RL task's own digit task: the RL task itself as well.
    same = _tiny("warm_start.task=reverse", "warm_start.min_digits=2", "warm_start.max_digits=4")
    task = build_task(same)
    assert build_warm_start_task(same, task) is task
    # A dataset: its own task (the config rejects the warm-start task keys there).
    dataset = _config(tmp_path)
    task = build_task(dataset)
    assert isinstance(task, DatasetTask) and build_warm_start_task(dataset, task) is task


def test_warm_start_on_copy_while_rl_reverses():
    from pr2_megatron.rl.tasks import EOS, Task

    cfg = _tiny("warm_start.task=copy")
    task = build_task(cfg)
    warm = build_warm_start_task(cfg, task)
    assert isinstance(warm, Task) and warm is not task and task.name == "reverse"
    assert (warm.name, warm.min_digits, warm.max_digits) == ("copy", 2, 4)
    copies = warm.sample(32, torch.Generator().manual_seed(5))
    reversals = task.sample(32, torch.Generator().manual_seed(5))
    assert [p.prompt for p in copies] == [p.prompt for p in reversals]  # the same digit strings
    assert [p.answer for p in copies] == [p.prompt[1:-1] for p in copies]
    assert [p.answer for p in reversals] == [p.prompt[1:-1][::-1] for p in reversals]
    assert sum(c.answer != r.answer for c, r in zip(copies, reversals)) > 16  # few palindromes
    ids, labels, mask = warm.supervised_batch(copies, 11)
    for row, problem in enumerate(copies):
        assert ids[row, : len(problem.prompt)].tolist() == list(problem.prompt)
        assert labels[row][mask[row] == 1].tolist() == [*problem.prompt[1:-1], EOS]


def test_sequence_length_holds_a_longer_warm_start_task():
    from pr2_megatron.rl.config import ConfigError
    from pr2_megatron.rl.tasks import BOS, EOS, EQUALS, PLUS, Problem, decode, encode_digits
    from pr2_megatron.rl.train import sequence_length

    rl_only = _tiny()
    task = build_task(rl_only)
    assert sequence_length(rl_only, task, task) == 11  # ^dddd= and 6 new tokens, the last unfed
    keys = ["warm_start.task=add", "warm_start.min_digits=5", "warm_start.max_digits=6"]
    cfg = _tiny(*keys)
    warm = build_warm_start_task(cfg, task)
    # ^dddddd+dddddd= (15), a 7-digit sum and eos, the last one unfed.
    assert sequence_length(cfg, task, warm) == 22
    assert sequence_length(_tiny(*keys, "warm_start.steps=0"), task, warm) == 11  # no warm start
    with pytest.raises(
        ConfigError,
        match=r"model.max_sequence_length=21 is shorter than the task's and the warm-start "
        r"task's sequences \(22 tokens\)",
    ):
        sequence_length(_tiny(*keys, "model.max_sequence_length=21"), task, warm)
    with pytest.raises(ConfigError, match=r"model.vocab_size=14 is smaller than the task's and"):
        sequence_length(_tiny(*keys, "model.vocab_size=14"), task, warm)
    # The longest sum fits 22 positions whole, and 21 raise rather than cut it.
    nines = encode_digits("999999")
    longest = Problem((BOS, *nines, PLUS, *nines, EQUALS), tuple(encode_digits("1999998")))
    ids, labels, mask = warm.supervised_batch([longest], 22)
    assert labels[0][mask[0] == 1].tolist() == [*encode_digits("1999998"), EOS]
    assert PLUS in ids[0].tolist() and int(ids.max()) < warm.vocab_size
    with pytest.raises(ValueError, match="of 23 tokens does not fit seq_len=21"):
        warm.supervised_batch([longest], 21)
    # Every drawn problem: two 5-6 digit operands and their sum.
    for problem in warm.sample(64, torch.Generator().manual_seed(2)):
        a, b = decode(problem.prompt[1:-1]).split("+")
        assert 5 <= len(a) <= 6 and 5 <= len(b) <= 6
        assert decode(problem.answer) == str(int(a) + int(b))


def _train_on_dataset(overrides):
    from pr2_megatron.rl.config import load_config
    from pr2_megatron.rl.train import Trainer
    from pr2_megatron.runtime.parallel import destroy_parallel

    trainer = Trainer(load_config("configs/tiny.yaml", overrides))
    code = trainer.run()
    responses = trainer.task.sample(2, torch.Generator().manual_seed(0))
    destroy_parallel()
    return code, trainer.step, [p.source for p in responses]


@pytest.mark.slow
def test_trainer_runs_grpo_on_a_jsonl_task_with_a_local_tokenizer(tmp_path):
    tokenizer = _train_tokenizer(tmp_path / "tok")
    overrides = [
        "steps=2",
        "model.num_layers=2",
        "model.vocab_size=96",
        "model.max_sequence_length=64",
        f"task.dataset={_dataset(tmp_path)}",
        "task.prompt_field=question",
        "task.reward=final_number",
        f"tokenizer.path={tokenizer}",
        "tokenizer.chat_template=true",
        "warm_start.steps=5",
        "rollout.prompts_per_step=4",
        "rollout.group_size=2",
        "rollout.max_new_tokens=12",
        "replay.off_n=2",
        "logging.tensorboard=false",
        f"logging.dir={tmp_path / 'run'}",
    ]
    results = run_distributed(_train_on_dataset, 2, overrides)
    assert [r[:2] for r in results] == [(0, 2), (0, 2)]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    rollouts = [r for r in records if r["event"] == "rollout"]
    minis = [r for r in records if r["event"] == "mini_step"]
    assert len(rollouts) == 2 and len(minis) == 4
    assert all(0.0 <= r["reward/mean"] <= 1.0 and r["response/length"] >= 1 for r in rollouts)
    assert minis[0]["ppo/ratio_max_abs_dev"] < 1e-5  # mini-step 1 at the rollout weights
    assert minis[0]["rollout_vs_train/zero_deviation_ratio"] == 1.0  # pr2 replays the rollout
