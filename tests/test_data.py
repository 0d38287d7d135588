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
    return config.load(REPO / "configs/demo.yaml", [f"data.system_prompt={SYSTEM}", *overrides],
                       model_dir=str(stand_in_dir), data=str(path), output_dir=str(tmp_path / "run"))


def _built(cfg):
    from datasets import load_from_disk

    out = data.run(cfg)
    return out, load_from_disk(str(out))["train"], json.loads((out / "stats.json").read_text())


def test_prompt_is_exactly_what_inference_feeds_and_labels_cover_answer_and_eos(stand_in_dir, tmp_path, tokenizer):
    cfg = _cfg(stand_in_dir, tmp_path, [{"instruction": "你父亲是谁？", "input": "", "output": "家父是大理寺少卿甄远道。"}])
    _, ds, _ = _built(cfg)
    ex = ds[0]
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "你父亲是谁？"}], enable_thinking=False)
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
    assert len(long["input_ids"]) == 48 and long["labels"][-1] == tokenizer.eos_token_id
    assert stats["truncated"] == 1 and stats["examples"] == 2
    _, ds, stats = _built(_cfg(stand_in_dir, tmp_path, records, "data.max_length=48", "data.overlong=drop"))
    assert len(ds) == 1 and stats["dropped_overlong"] == 1
    with pytest.raises(UserError, match=r"record #1.*over data.max_length=48"):
        data.run(_cfg(stand_in_dir, tmp_path, records, "data.max_length=48", "data.overlong=error"))


def test_stats_describe_the_saved_set(stand_in_dir, tmp_path):
    sample = REPO / "src/hunyuan_lora/assets/zhenhuan_sample.json"
    records = json.loads(sample.read_text(encoding="utf-8"))
    cfg = _cfg(stand_in_dir, tmp_path, records + records[:3], "data.eval_ratio=0.25")
    out, ds, stats = _built(cfg)
    assert stats["records"] == 43 and stats["duplicates_dropped"] == 3 and stats["examples"] == 40
    assert stats["splits"] == {"train": 30, "eval": 10}
    lengths = sorted(len(x) for x in ds["input_ids"])
    assert stats["tokens"]["min"] <= lengths[0] and stats["tokens"]["max"] >= lengths[-1]
    assert stats["sha256"] == hashlib.sha256(Path(cfg.data.path).read_bytes()).hexdigest()
    assert not any(p.name.startswith(".data-") for p in out.parent.iterdir())  # no temp folder left


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
        assert len(ds) == 1 and Path(cfg.data.path).read_bytes() == payload
        cfg.data.path, cfg.data.sha256 = str(tmp_path / "dl2/huanhuan.json"), "f" * 64
        with pytest.raises(UserError, match="sha256"):
            data.run(cfg)
        assert not Path(cfg.data.path).exists() and not list((tmp_path / "dl2").iterdir())
    finally:
        server.shutdown()


@pytest.mark.skipif(not (REPO.parent / "shared/data/huanhuan.json").exists(), reason="shared data not present")
def test_real_huanhuan_dataset_tokenizes(stand_in_dir, tmp_path):
    cfg = config.load(REPO / "configs/huanhuan.yaml", model_dir=str(stand_in_dir),
                      data=str(REPO.parent / "shared/data/huanhuan.json"), output_dir=str(tmp_path / "run"))
    cfg.data.drop_duplicates = False
    _, ds, stats = _built(cfg)
    assert stats["examples"] == len(ds) == 3729
