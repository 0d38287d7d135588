"""dataset: examples in the model's own chat format, labels on the answer and its <|eos|> only."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from hunyuan_lora import config, data
from hunyuan_lora.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛"


@pytest.fixture(scope="module")
def tokenizer(stand_in_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stand_in_dir, trust_remote_code=True)


def _cfg(stand_in_dir, tmp_path, records, *overrides):
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return config.load(
        REPO / "configs/demo.yaml",
        [f"data.system_prompt={SYSTEM}", *overrides],
        model_dir=str(stand_in_dir),
        data=str(path),
        output_dir=str(tmp_path / "run"),
    )


def _built(cfg):
    from datasets import load_from_disk

    out = data.run(cfg)
    return out, load_from_disk(str(out))["train"], json.loads((out / "stats.json").read_text())


def test_prompt_is_exactly_what_inference_feeds_and_labels_cover_answer_and_eos(stand_in_dir, tmp_path, tokenizer):
    record = {"instruction": "你父亲是谁？", "input": "", "output": "家父是大理寺少卿甄远道。"}
    _, ds, _ = _built(_cfg(stand_in_dir, tmp_path, [record]))
    ex = ds[0]
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "你父亲是谁？"}], enable_thinking=False
    )
    n = len(prompt)
    assert ex["input_ids"][:n] == prompt  # token by token
    assert tokenizer.decode(prompt).endswith("你父亲是谁？<|extra_0|><think>\n\n</think>\n")
    assert ex["labels"][:n] == [-100] * n
    answer = tokenizer("家父是大理寺少卿甄远道。", add_special_tokens=False)["input_ids"]
    assert ex["labels"][n:] == answer + [tokenizer.eos_token_id] == ex["input_ids"][n:]
    assert ex["labels"][-1] == tokenizer.convert_tokens_to_ids("<|eos|>") != tokenizer.pad_token_id
    assert "<|im_start|>" not in tokenizer.decode(ex["input_ids"])


def test_record_system_overrides_config_and_input_joins_instruction(stand_in_dir, tmp_path, tokenizer):
    cfg = _cfg(stand_in_dir, tmp_path, [{"instruction": "翻译：", "input": "hello", "output": "你好", "system": "S"}])
    _, ds, _ = _built(cfg)
    text = tokenizer.decode(ds[0]["input_ids"])
    assert text.startswith("<|startoftext|>S<|extra_4|>翻译：\nhello<|extra_0|>")


def test_answer_tags_wrap_the_target(stand_in_dir, tmp_path, tokenizer):
    cfg = _cfg(stand_in_dir, tmp_path, [{"instruction": "q", "output": "a"}], "data.answer_tags=true")
    _, ds, _ = _built(cfg)
    labels = [t for t in ds[0]["labels"] if t != -100]
    assert tokenizer.decode(labels) == "<answer>\na\n</answer><|eos|>"


def test_truncation_keeps_the_eos_and_policies_drop_or_stop(stand_in_dir, tmp_path, tokenizer):
    records = [{"instruction": "q", "output": "甄嬛" * 200}, {"instruction": "short", "output": "ok"}]
    _, ds, stats = _built(_cfg(stand_in_dir, tmp_path, records, "data.max_length=48"))
    long = ds[0]
    assert len(long["input_ids"]) == 48
    assert long["labels"][-1] == tokenizer.eos_token_id
    assert stats["truncated"] == 1
    assert stats["examples"] == 2
    _, ds, stats = _built(_cfg(stand_in_dir, tmp_path, records, "data.max_length=48", "data.overlong=drop"))
    assert len(ds) == 1
    assert stats["dropped_overlong"] == 1
    with pytest.raises(UserError, match=r"record #1.*over data.max_length=48"):
        data.run(_cfg(stand_in_dir, tmp_path, records, "data.max_length=48", "data.overlong=error"))


def test_stats_describe_the_saved_set(stand_in_dir, tmp_path):
    sample = REPO / "src/hunyuan_lora/assets/zhenhuan_sample.json"
    records = json.loads(sample.read_text(encoding="utf-8"))
    cfg = _cfg(stand_in_dir, tmp_path, records + records[:3], "data.eval_ratio=0.25")
    out, ds, stats = _built(cfg)
    assert stats["records"] == 43
    assert stats["duplicates_dropped"] == 3
    assert stats["examples"] == 40
    assert stats["splits"] == {"train": 30, "eval": 10}
    lengths = sorted(len(x) for x in ds["input_ids"])
    assert stats["tokens"]["min"] <= lengths[0]
    assert stats["tokens"]["max"] >= lengths[-1]
    assert stats["sha256"] == hashlib.sha256(Path(cfg.data.path).read_bytes()).hexdigest()
    assert not any(p.name.startswith(".data.tmp-") for p in out.parent.iterdir())  # no temp folder left


def test_pinned_sha256_mismatch_is_refused_and_the_file_kept(stand_in_dir, tmp_path):
    cfg = _cfg(stand_in_dir, tmp_path, [{"instruction": "q", "output": "a"}])
    cfg.data.sha256 = "0" * 64
    with pytest.raises(UserError, match="sha256 is .* the config pins 0000"):
        data.run(cfg)
    assert Path(cfg.data.path).exists()


def test_download_from_url_is_verified(stand_in_dir, tmp_path):
    """data.url over a real HTTP server on 127.0.0.1, checked against data.sha256."""
    import http.server
    import threading

    payload = json.dumps([{"instruction": "q", "output": "a"}]).encode()
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv/huanhuan.json").write_bytes(payload)
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "srv"))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = _cfg(stand_in_dir, tmp_path, [])
        cfg.data.path = str(tmp_path / "dl/huanhuan.json")
        cfg.data.url = f"http://127.0.0.1:{server.server_address[1]}/huanhuan.json"
        cfg.data.sha256 = hashlib.sha256(payload).hexdigest()
        _, ds, _ = _built(cfg)
        assert len(ds) == 1
        assert Path(cfg.data.path).read_bytes() == payload
        cfg.data.path, cfg.data.sha256 = str(tmp_path / "dl2/huanhuan.json"), "f" * 64
        with pytest.raises(UserError, match="sha256"):
            data.run(cfg)
        assert not Path(cfg.data.path).exists()
        assert not list((tmp_path / "dl2").iterdir())
    finally:
        server.shutdown()


@pytest.mark.skipif(not (REPO.parent / "shared/data/huanhuan.json").exists(), reason="shared data not present")
def test_real_huanhuan_dataset_tokenizes(stand_in_dir, tmp_path):
    cfg = config.load(
        REPO / "configs/huanhuan.yaml",
        model_dir=str(stand_in_dir),
        data=str(REPO.parent / "shared/data/huanhuan.json"),
        output_dir=str(tmp_path / "run"),
    )
    cfg.data.drop_duplicates = False
    _, ds, stats = _built(cfg)
    assert stats["examples"] == len(ds) == 3729


def test_conversation_formats_tokenize_and_are_named_in_the_stats(stand_in_dir, tmp_path, tokenizer):
    path = tmp_path / "chat.jsonl"
    conversations = [
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "你是谁？"},
                {"role": "assistant", "content": "<think>\n想\n</think>\n甄嬛。"},
                {"role": "user", "content": "你父亲呢？"},
                {"role": "assistant", "content": "甄远道。"},
            ]
        },
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
    ]
    path.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations), encoding="utf-8")
    cfg = config.load(
        REPO / "configs/demo.yaml", model_dir=str(stand_in_dir), data=str(path), output_dir=str(tmp_path / "run")
    )
    out, ds, stats = _built(cfg)
    assert (stats["schema"], stats["format"], stats["records"]) == ("OpenAI messages", "JSONL", 2)
    assert stats["multi_turn_records"] == 1
    assert stats["reasoning_answers"] == 1
    # the thinking-on answer is rendered in the history as the template renders it: one sample for both turns
    assert stats["examples"] == len(ds) == 2
    texts = [tokenizer.decode(x) for x in ds["input_ids"]]
    assert texts[0] == (
        "<|startoftext|>S<|extra_4|>你是谁？<|extra_0|><think>\n想\n</think>\n甄嬛。<|eos|>"
        "<|startoftext|>你父亲呢？<|extra_0|><think>\n\n</think>\n甄远道。<|eos|>"
    )


def test_eval_split_holds_out_whole_records_and_keeps_them_for_make_eval(stand_in_dir, tmp_path, tokenizer):
    records = [{"instruction": f"问{i}", "output": f"答{i}", "history": [[f"早{i}", f"晚{i}"]]} for i in range(8)]
    out, ds, stats = _built(_cfg(stand_in_dir, tmp_path, records, "data.eval_ratio=0.25"))
    assert stats["splits"] == {"train": 12, "eval": 4}
    assert stats["eval_records"] == 2
    held = [json.loads(line) for line in (out / "eval.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(held) == 2
    assert all(m["messages"][-1]["content"].startswith("答") for m in held)
    from hunyuan_lora.records import read_records

    back, report = read_records(out / "eval.jsonl")
    assert report.schema == "OpenAI messages"
    assert len(back) == 2
    decoded = [tokenizer.decode(x) for x in ds["input_ids"]]
    for m in held:  # no turn of a held-out record is in the training split
        assert not any(m["messages"][-1]["content"] in t for t in decoded)
    with pytest.raises(UserError, match="leaving none to train on"):
        data.run(_cfg(stand_in_dir, tmp_path, records[:1], "data.eval_ratio=0.5"))


def test_stale_dataset_is_named_by_dataset_mismatch(stand_in_dir, tmp_path, model_copy):
    from hunyuan_lora.prompt import dataset_mismatch

    cfg = _cfg(stand_in_dir, tmp_path, [{"instruction": "q", "output": "a"}, {"instruction": "r", "output": "b"}])
    out, _, stats = _built(cfg)
    assert dataset_mismatch(cfg, stats) == []
    edited = json.loads(Path(cfg.data.path).read_text(encoding="utf-8")) + [{"instruction": "s", "output": "c"}]
    Path(cfg.data.path).write_text(json.dumps(edited), encoding="utf-8")
    assert any("has changed since it was tokenized" in p for p in dataset_mismatch(cfg, stats))
    other = tmp_path / "big.json"
    other.write_text(json.dumps(edited), encoding="utf-8")
    moved = config.load(
        REPO / "configs/demo.yaml",
        [f"data.system_prompt={SYSTEM}"],
        model_dir=str(stand_in_dir),
        data=str(other),
        output_dir=str(tmp_path / "run"),
    )
    assert any(f"config's data.path is {other.resolve()}" in p for p in dataset_mismatch(moved, stats))
    cfg.data.path = str(other)
    cfg.data.max_length, cfg.data.train_on = 64, "last_assistant"
    (model_copy / "tokenizer_config.json").write_text(
        (model_copy / "tokenizer_config.json").read_text(encoding="utf-8").replace("<|extra_4|>", "<|extra_3|>"),
        encoding="utf-8",
    )
    cfg.model.dir = str(model_copy)
    problems = " | ".join(dataset_mismatch(cfg, stats))
    assert "data.max_length was 256 when tokenized, the config now says 64" in problems
    assert "data.train_on was 'all_assistant'" in problems
    assert "tokenizer files" in problems
    assert "older version" in dataset_mismatch(cfg, {"splits": {"train": 2}})[0]


@pytest.mark.parametrize("folder", ["missing", "empty", "config_only"])
def test_no_model_folder_yet_says_run_make_download(stand_in_dir, tmp_path, folder):
    model = tmp_path / "model"
    if folder != "missing":
        model.mkdir()
    if folder == "config_only":
        (model / "config.json").write_text((stand_in_dir / "config.json").read_text())
    cfg = _cfg(model, tmp_path, [{"instruction": "q", "output": "a"}])
    with pytest.raises(
        UserError,
        match=r"no tokenizer in .*run `make download` first \(or use "
        r"CONFIG=configs/demo.yaml",
    ):
        data.run(cfg)
