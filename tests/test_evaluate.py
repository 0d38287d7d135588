"""make eval: base vs adapter on the held-out split or an EVAL file, LLaMA-Factory's metrics, the three
output files, SwanLab, and the refusals (no split, a stale split)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from hunyuan_lora import data, evaluate, generation, modeling, prompt, runtime, tracking
from hunyuan_lora.errors import UserError
from hunyuan_lora.records import read_records

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cfg(lora_run, tmp_path):
    """The run with its adapter, its own output folder, a quarter of the sample data held out, answered
    three records at a time (a batch of three, left-padded, and one alone)."""
    return dataclasses.replace(
        lora_run,
        run=dataclasses.replace(lora_run.run, output_dir=str(tmp_path / "run")),
        infer=dataclasses.replace(lora_run.infer, adapter=str(lora_run.output_dir / "adapter")),
        data=dataclasses.replace(lora_run.data, eval_ratio=0.25),
        eval=dataclasses.replace(lora_run.eval, max_new_tokens=8, limit=4, report_samples=3, batch_size=3),
    )


def test_scores_are_llama_factorys():
    same = evaluate.scores("臣妾甄嬛", "臣妾甄嬛")
    assert same["rouge-1"] == same["rouge-l"] == same["exact_match"] == 100.0
    assert evaluate.scores("", "臣妾甄嬛") == {
        "bleu-4": 0.0,
        "rouge-1": 0.0,
        "rouge-2": 0.0,
        "rouge-l": 0.0,
        "exact_match": 0.0,
    }
    # characters for BLEU (nltk, smoothing method 3), jieba words for ROUGE (rouge-chinese)
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    pred, ref = "臣妾甄嬛，入宫侍奉。", "臣妾甄嬛，蒙皇上恩典，入宫侍奉左右。"
    got = evaluate.scores(pred, ref)
    assert got["bleu-4"] == round(
        100 * sentence_bleu([list(ref)], list(pred), smoothing_function=SmoothingFunction().method3), 4
    )
    assert 0 < got["rouge-2"] < got["rouge-1"] < 100
    assert got["exact_match"] == 0


def test_eval_on_the_held_out_split_writes_scores_answers_report_and_swanlab(cfg, capsys):
    data.run(cfg)
    import swanlab  # noqa: F401  (its import sets the default hosts; init must add nothing after it)

    environ = dict(os.environ)
    out = evaluate.run(cfg)
    assert dict(os.environ) == environ  # swanlab.init's SWANLAB_* variables do not outlive the eval
    summary = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text(encoding="utf-8").splitlines()]
    held = [json.loads(line) for line in (cfg.output_dir / "data/eval.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(held) == 10
    assert summary["records"] == len(rows) == 4
    assert [r["reference"] for r in rows] == [h["messages"][-1]["content"] for h in held[:4]]
    assert set(summary["metrics"]) == {"adapter", "base"}
    for side in ("adapter", "base"):  # the means of the rows' own scores, each from its answer
        assert summary["metrics"][side] == evaluate.mean_scores(rows, side)
        assert all(r[f"{side}_scores"] == evaluate.scores(r[side], r["reference"]) for r in rows)
    assert any(r["adapter"] != r["base"] for r in rows)  # the adapter changes the answers
    # each side is its model's own greedy answer to the record alone: the base side, the model without
    # any adapter loaded
    loaded, tokenizer = modeling.load_for_generation(cfg)
    plain = modeling.load_base_model(cfg, runtime.placement(cfg)).model.eval()
    greedy = generation.Sampling(max_new_tokens=cfg.eval.max_new_tokens, do_sample=False)
    records_, _ = read_records(cfg.output_dir / "data/eval.jsonl", drop_duplicates=False)
    for row, record in zip(rows, records_):
        messages = prompt.prompt_messages(record, cfg)
        for side, model in (("adapter", loaded.model), ("base", plain)):
            text = generation.answer(
                model, tokenizer, messages, thinking=prompt.is_thinking(record.answer), sampling=greedy
            )
            assert row[f"{side}_raw"] == text
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| metric | adapter | base |" in report
    assert f"| rouge-l | {summary['metrics']['adapter']['rouge-l']:.2f}" in report
    assert report.count(rows[0]["reference"]) >= 1
    assert rows[3]["reference"] not in report.split("answers")[-1]
    assert "adapter: bleu-4" in capsys.readouterr().out
    (experiment,) = [e for e in tracking.local_experiments(cfg.output_dir / "swanlog") if e["name"] == "demo-eval"]
    assert experiment["status"] == "finished"


def test_eval_file_in_another_format(cfg, tmp_path):
    test_file = tmp_path / "test.json"
    test_file.write_text(
        json.dumps(
            [{"conversations": [{"from": "human", "value": "你是谁？"}, {"from": "gpt", "value": "臣妾甄嬛。"}]}],
            ensure_ascii=False,
        ),
        encoding="utf-8",
    )
    cfg = dataclasses.replace(
        cfg,
        eval=dataclasses.replace(cfg.eval, compare_base=False),
        swanlab=dataclasses.replace(cfg.swanlab, mode="disabled"),
    )
    out = evaluate.run(cfg, eval_file=str(test_file))  # make eval EVAL=test.json
    summary = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert summary["source"] == str(test_file)
    assert summary["records"] == 1
    assert list(summary["metrics"]) == ["adapter"]
    (row,) = [json.loads(line) for line in (out / "answers.jsonl").read_text(encoding="utf-8").splitlines()]
    assert (row["prompt"], row["reference"]) == ("你是谁？", "臣妾甄嬛。")


def test_no_split_and_a_stale_split_are_refused(cfg):
    """Before `make dataset` the fix is to run it (it said "set data.eval_ratio"); after one without a
    held-out split, to set data.eval_ratio; after a changed setting, to rerun it."""
    with pytest.raises(UserError, match=r"no tokenized dataset in .*Fix: run `make dataset` first"):
        evaluate.run(cfg)
    no_split = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_ratio=0.0))
    data.run(no_split)
    with pytest.raises(UserError, match=r"no held-out records.*Fix: set data.eval_ratio"):
        evaluate.run(no_split)
    data.run(cfg)
    stale = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_length=64))
    with pytest.raises(UserError, match="stale: data.max_length was 256 .* rerun `make dataset`"):
        evaluate.run(stale)


def test_a_missing_eval_file_names_eval(cfg, tmp_path):
    """EVAL=<missing> named data.path and DATA= in its fix."""
    for path in (tmp_path / "missing.jsonl", tmp_path):
        with pytest.raises(UserError) as e:
            evaluate.run(cfg, eval_file=str(path))
        assert str(e.value).startswith(f"EVAL (eval.input): the evaluation file {path} ")
        assert "data.path" not in str(e.value)
        assert "DATA=" not in str(e.value)
