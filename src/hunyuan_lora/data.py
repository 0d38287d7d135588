"""Stage 3, dataset: alpaca records -> tokenized training examples in the model's own chat format.

    make dataset [CONFIG=configs/huanhuan.yaml] [DATA=my.jsonl]

Each example is exactly what inference will feed the model, plus the answer:
    prompt   = apply_chat_template([system, user], enable_thinking=False)   labels -100
               <|startoftext|>{system}<|extra_4|>{user}<|extra_0|><think>\n\n</think>\n
    response = {output}<|eos|>   (or <answer>\n{output}\n</answer><|eos|> with data.answer_tags)
Unlike the tutorial: no Qwen `<|im_start|>` text markers (plain characters for this tokenizer),
the target ends in <|eos|> (not <|pad|>), and truncation never cuts the <|eos|> off.
Writes <output_dir>/data/{train,eval}/ (datasets.save_to_disk) and <output_dir>/data/stats.json.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
from pathlib import Path

import numpy as np

from .atomic import staging_dir, write_json
from .config import Config
from .errors import UserError
from .records import Record, read_records, summarise

IGNORE_INDEX = -100


def fetch_dataset(cfg: Config) -> Path:
    """The dataset file; downloaded from data.url when missing, checked against data.sha256."""
    path = Path(cfg.data.path)
    if not path.exists():
        if not cfg.data.url:
            raise UserError(f"dataset file {path} does not exist", where="data.path",
                            fix="set DATA=/path/to/file.json(l) or data.url in the config")
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"downloading {cfg.data.url} -> {path}")
        tmp = path.with_name(path.name + ".part")
        try:
            with urllib.request.urlopen(cfg.data.url, timeout=60) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise UserError(f"could not download the dataset ({e})", where=cfg.data.url,
                            fix=f"download it by hand to {path}, or set DATA= to a local file") from e
        try:
            _check_sha256(tmp, cfg.data.sha256, cfg.data.url)
        except UserError:
            tmp.unlink()
            raise
        os.replace(tmp, path)
    else:
        _check_sha256(path, cfg.data.sha256, str(path))
    return path


def _check_sha256(path: Path, expected: str | None, source: str) -> None:
    if not expected:
        return
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise UserError(f"sha256 is {actual}, the config pins {expected}", where=source,
                        fix="use the pinned file (data.url), or set data.sha256 to null to accept this one")


def build_example(tokenizer, record: Record, cfg: Config) -> dict | None:
    """input_ids / labels for one record; None when it is over max_length and the policy drops it."""
    system = record.system if record.system is not None else cfg.data.system_prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": record.user_message}
    ]
    prompt = tokenizer.apply_chat_template(messages, tokenize=True, enable_thinking=False)
    answer = f"<answer>\n{record.output}\n</answer>" if cfg.data.answer_tags else record.output
    response = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    limit = cfg.data.max_length
    truncated = False
    if len(prompt) + len(response) > limit:
        if cfg.data.overlong == "error":
            raise UserError(f"{len(prompt) + len(response)} tokens, over data.max_length={limit}",
                            where=record.where,
                            fix="raise data.max_length, shorten the record, or set data.overlong to truncate/drop")
        room = limit - len(prompt) - 1  # answer tokens that fit before the final <|eos|>
        if cfg.data.overlong == "drop" or room < 1:
            return None
        response = response[:room] + [tokenizer.eos_token_id]  # keep the stop token
        truncated = True
    return {
        "input_ids": prompt + response,
        "attention_mask": [1] * (len(prompt) + len(response)),
        "labels": [IGNORE_INDEX] * len(prompt) + response,
        "truncated": truncated,
    }


def _length_stats(lengths: list[int]) -> dict:
    a = np.asarray(lengths)
    return {"min": int(a.min()), "mean": round(float(a.mean()), 1), "p95": int(np.percentile(a, 95)),
            "max": int(a.max())}


def run(cfg: Config) -> Path:
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    out = cfg.output_dir / "data"
    path = fetch_dataset(cfg)
    records, report = read_records(path, drop_duplicates=cfg.data.drop_duplicates)
    print(summarise(report))
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.dir, trust_remote_code=True)

    examples, dropped = [], 0
    for record in records:
        ex = build_example(tokenizer, record, cfg)
        if ex is None:
            dropped += 1
        else:
            examples.append(ex)
    if not examples:
        raise UserError(f"every record is longer than data.max_length={cfg.data.max_length}", where=str(path),
                        fix="raise data.max_length or set data.overlong: truncate")

    truncated = sum(ex.pop("truncated") for ex in examples)
    full = Dataset.from_list(examples)
    if cfg.data.eval_ratio > 0:
        split = full.train_test_split(test_size=cfg.data.eval_ratio, seed=cfg.run.seed)
        splits = DatasetDict(train=split["train"], eval=split["test"])
    else:
        splits = DatasetDict(train=full)

    lengths = [len(ex["input_ids"]) for ex in examples]
    stats = {
        "source": str(path), "sha256": report.sha256, "format": report.format,
        "records": len(records) + report.dropped, "duplicates_dropped": report.dropped,
        "examples": len(examples), "dropped_overlong": dropped, "truncated": truncated,
        "max_length": cfg.data.max_length, "answer_tags": cfg.data.answer_tags,
        "system_prompt": cfg.data.system_prompt,
        "splits": {name: len(ds) for name, ds in splits.items()},
        "tokens": _length_stats(lengths),
        "label_tokens": _length_stats([sum(t != IGNORE_INDEX for t in ex["labels"]) for ex in examples]),
        "warnings": report.warnings,
    }

    with staging_dir(out) as tmp:  # a killed run leaves the previous dataset, never half of one
        splits.save_to_disk(str(tmp))
        write_json(tmp / "stats.json", stats)
    print(f"wrote {out}: {len(examples):,} examples, tokens min/mean/p95/max "
          f"{stats['tokens']['min']}/{stats['tokens']['mean']}/{stats['tokens']['p95']}/{stats['tokens']['max']}, "
          f"{truncated} truncated, {dropped} dropped")
    return out
