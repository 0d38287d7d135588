"""make infer: the training prompt (input field included), answers written as they come, resume after
a kill, earlier answers moved aside rather than overwritten, bad paths and files refused up front."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from generation_helpers import greedy_text_alone

from hunyuan_lora import generation, infer, modeling, prompt
from hunyuan_lora.errors import UserError


@pytest.fixture
def cfg(lora_run, tmp_path):
    return dataclasses.replace(
        lora_run,
        infer=dataclasses.replace(
            lora_run.infer, max_new_tokens=6, do_sample=False, output_jsonl=str(tmp_path / "answers.jsonl")
        ),
    )


def _questions(tmp_path: Path, rows: list[dict], name="q.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_batch_uses_the_training_prompt_with_the_input_field(cfg, tmp_path, capsys):
    cfg.infer.input_jsonl = _questions(
        tmp_path, [{"instruction": "翻译", "input": "你好"}, {"instruction": "你是谁？", "output": "臣妾甄嬛。"}]
    )
    rows = _rows(infer.run(cfg))
    assert [r["instruction"] for r in rows] == ["翻译\n你好", "你是谁？"]
    assert [r["reference"] for r in rows] == [None, "臣妾甄嬛。"]
    loaded, tokenizer = modeling.load_for_generation(cfg)
    model = loaded.model
    direct = greedy_text_alone(
        model, tokenizer, prompt.prompt_ids(tokenizer, prompt.ask("翻译\n你好", cfg), False), cfg.infer.max_new_tokens
    )
    assert rows[0]["raw"] == direct
    assert rows[0]["answer"] == prompt.extract_answer(direct)
    assert "Q: 翻译\n你好\nA: " in capsys.readouterr().out


def test_a_killed_batch_resumes_and_another_run_moves_the_answers_aside(cfg, tmp_path, capsys):
    cfg.infer.input_jsonl = _questions(tmp_path, [{"instruction": q} for q in ("一", "二", "三")])
    out = infer.run(cfg)
    full = out.read_text(encoding="utf-8")
    first, second, _ = full.splitlines(keepends=True)
    out.write_text(first + second[: len(second) // 2], encoding="utf-8")  # killed while writing line 2
    infer.run(cfg)
    assert "resuming: 1 of 3 answers already in" in capsys.readouterr().out
    assert out.read_text(encoding="utf-8") == full  # greedy: the same answers, line 1 kept as it was

    cfg.infer.input_jsonl, cfg.infer.prompts = None, ["四"]  # make infer PROMPT=四
    infer.run(cfg)
    printed = capsys.readouterr().out
    (aside,) = list(tmp_path.glob("answers.*.jsonl"))
    assert f"the earlier answers in {out} were moved to {aside}" in printed
    assert aside.read_text(encoding="utf-8") == full
    assert [r["instruction"] for r in _rows(out)] == ["四"]


def test_batches_resume_from_answers_in_any_order_and_end_in_the_inputs_order(cfg, tmp_path, capsys):
    questions = ["一", "你喜欢什么花？请详细地说一说", "三", "皇上驾到，甄嬛该怎么回答"]
    cfg.infer.batch_size = 2  # two batches of two, each left-padded
    cfg.infer.input_jsonl = _questions(tmp_path, [{"instruction": q} for q in questions])
    out = infer.run(cfg)
    full = out.read_text(encoding="utf-8")
    assert [r["instruction"] for r in _rows(out)] == questions
    loaded, tokenizer = modeling.load_for_generation(cfg)
    for row, question in zip(_rows(out), questions):  # each the answer it gets alone
        assert row["raw"] == generation.answer(
            loaded.model, tokenizer, prompt.ask(question, cfg), thinking=False, sampling=generation.infer_sampling(cfg)
        )
    lines = full.splitlines(keepends=True)
    # killed after two answers were written in the order they finished, and while writing a third
    out.write_text(lines[3] + lines[1] + lines[0][: len(lines[0]) // 2], encoding="utf-8")
    infer.run(cfg)
    assert "resuming: 2 of 4 answers already in" in capsys.readouterr().out
    assert out.read_text(encoding="utf-8") == full


@pytest.mark.parametrize("case", ["folder", "under_a_file"])
def test_an_unusable_output_path_is_refused_before_anything_loads(cfg, tmp_path, case):
    (tmp_path / "f").write_text("x")
    cfg.infer.output_jsonl = str(tmp_path if case == "folder" else tmp_path / "f" / "a.jsonl")
    with pytest.raises(UserError, match="is a folder" if case == "folder" else "cannot write the answers"):
        infer.run(cfg)


def test_gbk_input_is_refused_and_an_empty_one_warns(cfg, tmp_path, capsys):
    gbk = tmp_path / "gbk.jsonl"
    gbk.write_bytes('{"instruction": "你是谁？"}\n'.encode("gbk"))
    cfg.infer.input_jsonl = str(gbk)
    with pytest.raises(UserError, match="GB18030"):
        infer.run(cfg)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg.infer.input_jsonl = str(empty)
    out = infer.run(cfg)
    assert "WARNING: " in capsys.readouterr().out
    assert not out.exists()


@pytest.mark.parametrize("broken", ["empty", "no_weights", "truncated_shard"])
def test_a_broken_model_folder_is_reported_in_words(cfg, model_copy, broken):
    import shutil

    if broken == "empty":
        shutil.rmtree(model_copy)
        model_copy.mkdir()
    for shard in model_copy.glob("*.safetensors"):
        if broken == "no_weights":
            shard.unlink()
        else:
            shard.write_bytes(shard.read_bytes()[:100])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dir=str(model_copy)))
    with pytest.raises(UserError, match="make download"):
        infer.run(cfg)


def test_a_prompt_over_the_models_context_warns(lora_run, capsys):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(lora_run.model.dir, trust_remote_code=True)
    model = type("Model", (), {"config": config})  # what warn_if_too_long reads of a model: its config
    generation.warn_if_too_long(model, config.max_position_embeddings - 4, 4)
    assert capsys.readouterr().out == ""
    generation.warn_if_too_long(model, config.max_position_embeddings - 4, 5)
    assert f"over the model's context of {config.max_position_embeddings:,}" in capsys.readouterr().out
