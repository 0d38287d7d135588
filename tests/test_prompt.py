"""prompt.py: the one prompt format, token for token against the stand-in's chat template (the real
model's rendering rules): multi-turn, thinking on and off, mixed, expansion into samples, answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from hunyuan_lora import config, prompt
from hunyuan_lora.errors import UserError
from hunyuan_lora.records import Record, Turn, read_records

REPO = Path(__file__).resolve().parents[1]
S = "你是甄嬛"


@pytest.fixture(scope="module")
def tokenizer(stand_in_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stand_in_dir, trust_remote_code=True)


def _cfg(*overrides):
    return config.load(REPO / "configs/demo.yaml", [f"data.system_prompt={S}", *overrides])


def _record(*turns, system=None):
    return Record(system=system, turns=tuple(Turn(r, c) for r, c in turns), where="t.json:line 1")


def _span_ids(sample):
    """(tokens before, tokens of) each labelled stretch of a sample."""
    ids, labels = sample["input_ids"], sample["labels"]
    spans, i = [], 0
    while i < len(labels):
        if labels[i] == prompt.IGNORE_INDEX:
            i += 1
            continue
        j = i
        while j < len(labels) and labels[j] != prompt.IGNORE_INDEX:
            j += 1
        assert labels[i:j] == ids[i:j]
        spans.append((ids[:i], ids[i:j]))
        i = j
    return spans


def _spans(tokenizer, sample):
    return [(tokenizer.decode(before), tokenizer.decode(label)) for before, label in _span_ids(sample)]


def test_thinking_off_conversation_expands_into_one_sample_per_answer(tokenizer):
    record = _record(
        ("user", "你是谁？"),
        ("assistant", "臣妾甄嬛。"),
        ("user", "你父亲是谁？"),
        ("assistant", "家父是大理寺少卿甄远道。"),
    )
    samples, dropped = prompt.training_samples(tokenizer, record, _cfg())
    assert dropped == 0
    assert len(samples) == 2
    assert _spans(tokenizer, samples[0]) == [
        (f"<|startoftext|>{S}<|extra_4|>你是谁？<|extra_0|><think>\n\n</think>\n", "臣妾甄嬛。<|eos|>")
    ]
    # the earlier answer as the template renders history: no think block before it
    assert _spans(tokenizer, samples[1]) == [
        (
            f"<|startoftext|>{S}<|extra_4|>你是谁？<|extra_0|>臣妾甄嬛。<|eos|><|startoftext|>你父亲是谁？<|extra_0|>"
            "<think>\n\n</think>\n",
            "家父是大理寺少卿甄远道。<|eos|>",
        )
    ]
    messages = prompt.conversation(record, _cfg())
    for sample, upto in zip(samples, (2, 4)):  # the prompt is the template's own tokens, with the generation prompt
        want = tokenizer.apply_chat_template(
            messages[:upto], tokenize=True, add_generation_prompt=True, enable_thinking=False
        )
        assert sample["input_ids"][: len(want)] == want
        assert sample["labels"][len(want) - 1] == prompt.IGNORE_INDEX != sample["labels"][len(want)]


def test_thinking_on_turns_share_one_sample_and_reasoning_is_trained(tokenizer):
    a1, a2 = "<think>\n她问我是谁\n</think>\n臣妾甄嬛。", "<think>\n家父\n</think>\n甄远道。"
    record = _record(("user", "你是谁？"), ("assistant", a1), ("user", "你父亲是谁？"), ("assistant", a2))
    samples, _ = prompt.training_samples(tokenizer, record, _cfg())
    assert len(samples) == 1
    head = f"<|startoftext|>{S}<|extra_4|>你是谁？<|extra_0|>"
    assert _spans(tokenizer, samples[0]) == [
        (head, a1 + "<|eos|>"),
        (head + a1 + "<|eos|><|startoftext|>你父亲是谁？<|extra_0|>", a2 + "<|eos|>"),
    ]
    assert tokenizer.decode(samples[0]["input_ids"]) == (
        head + a1 + "<|eos|><|startoftext|>你父亲是谁？<|extra_0|>" + a2 + "<|eos|>"
    )


def test_mixed_modes_and_last_assistant(tokenizer):
    on, off = "<think>\n想\n</think>\n甲", "乙"
    turns = [("user", "一"), ("assistant", on), ("user", "二"), ("assistant", off)]
    samples, _ = prompt.training_samples(tokenizer, _record(*turns, system=""), _cfg())
    # thinking-on then off: the second prompt starts with the first sample, so one sample
    assert len(samples) == 1
    assert [a for _, a in _spans(tokenizer, samples[0])] == [on + "<|eos|>", off + "<|eos|>"]
    assert _spans(tokenizer, samples[0])[1][0].endswith("<|startoftext|>二<|extra_0|><think>\n\n</think>\n")
    assert not _spans(tokenizer, samples[0])[0][0].count("<|extra_4|>")  # system "" in the record: none at all
    samples, _ = prompt.training_samples(tokenizer, _record(*turns[2:], *turns[:2]), _cfg())
    assert len(samples) == 2  # off then on: the first prompt's think block is not in the second's
    samples, _ = prompt.training_samples(tokenizer, _record(*turns), _cfg("data.train_on=last_assistant"))
    assert len(samples) == 1
    assert [a for _, a in _spans(tokenizer, samples[0])] == [off + "<|eos|>"]
    assert on + "<|eos|>" in tokenizer.decode(samples[0]["input_ids"])  # the earlier turn as context


def test_empty_think_block_trains_thinking_off_without_repeating_it(tokenizer):
    samples, _ = prompt.training_samples(
        tokenizer, _record(("user", "q"), ("assistant", "<think>\n\n</think>\na")), _cfg()
    )
    assert _spans(tokenizer, samples[0]) == [
        (f"<|startoftext|>{S}<|extra_4|>q<|extra_0|><think>\n\n</think>\n", "a<|eos|>")
    ]


def test_answer_tags_wrap_the_answer_after_the_reasoning(tokenizer):
    cfg = _cfg("data.answer_tags=true")
    samples, _ = prompt.training_samples(
        tokenizer, _record(("user", "q"), ("assistant", "<think>\nr\n</think>\na")), cfg
    )
    assert _spans(tokenizer, samples[0])[0][1] == "<think>\nr\n</think>\n<answer>\na\n</answer><|eos|>"
    assert prompt.extract_answer("<think>\nr\n</think>\n<answer>\na\n</answer>") == "a"


@pytest.mark.parametrize(
    ("user", "answer", "switch"),
    [("/think 你好", "好", "/think"), ("/no_think 你好", "<think>\n想\n</think>\n好", "/no_think")],
)
def test_a_user_switch_that_contradicts_the_answer_is_refused(tokenizer, user, answer, switch):
    with pytest.raises(UserError, match=rf"t.json:line 1, turn #2: the user turn before it starts with {switch}"):
        prompt.training_samples(tokenizer, _record(("user", user), ("assistant", answer)), _cfg())


def test_inference_prompt_of_an_alpaca_record_with_input_is_the_training_prompt(tokenizer, tmp_path):
    train_file, ask_file = tmp_path / "train.jsonl", tmp_path / "ask.jsonl"
    train_file.write_text('{"instruction": "翻译", "input": "你好", "output": "hello"}\n', encoding="utf-8")
    ask_file.write_text('{"instruction": "翻译", "input": "你好"}\n', encoding="utf-8")
    (train,), _ = read_records(train_file)
    (ask,), _ = read_records(ask_file, require_answer=False)
    cfg = _cfg()
    (sample,), _ = prompt.training_samples(tokenizer, train, cfg)
    ids = prompt.prompt_ids(tokenizer, prompt.conversation(ask, cfg), thinking=False)
    assert _span_ids(sample)[0][0] == ids
    assert "翻译\n你好" in tokenizer.decode(ids)


def test_every_labelled_span_follows_its_own_inference_prompt(tokenizer):
    """The invariant over a spread of conversations: what precedes each labelled span is exactly the
    template's prompt for the conversation up to that turn, in that turn's mode."""
    import random

    rng = random.Random(7)
    words = ["你好", "皇上", "甄嬛", "华妃", "安陵容", "hello", "1 2 3"]
    for _ in range(40):
        turns = []
        for _ in range(rng.randint(1, 4)):
            turns.append(("user", rng.choice(words) + rng.choice(words)))
            answer = rng.choice(words)
            turns.append(
                ("assistant", f"<think>\n{rng.choice(words)}\n</think>\n{answer}" if rng.random() < 0.5 else answer)
            )
        record = _record(*turns, system=rng.choice([None, "", "S"]))
        cfg = _cfg(f"data.train_on={rng.choice(['all_assistant', 'last_assistant'])}")
        messages = prompt.conversation(record, cfg)
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if cfg.data.train_on == "last_assistant":
            answers = answers[-1:]
        samples, _ = prompt.training_samples(tokenizer, record, cfg)
        spans = [s for sample in samples for s in _span_ids(sample)]
        assert len(spans) == len(answers)
        for (before, label), i in zip(spans, answers):
            thinking = prompt.is_thinking(messages[i]["content"])
            assert before == prompt.prompt_ids(tokenizer, messages[:i], thinking)
            assert tokenizer.decode(label) == messages[i]["content"] + "<|eos|>"


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("<think>\nhm\n</think>\n<answer>\n家父是甄远道。\n</answer>", "家父是甄远道。"),
        ("<answer>\n没有收尾", "没有收尾"),
        ("<think>\n\n</think>\n臣妾甄嬛。", "臣妾甄嬛。"),
        ("臣妾甄嬛。", "臣妾甄嬛。"),
        ("", ""),
    ],
)
def test_answer_extraction_never_raises(text, answer):
    assert prompt.extract_answer(text) == answer
