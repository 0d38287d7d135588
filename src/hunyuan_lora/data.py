"""Stage 3, dataset: records or conversations -> tokenized training examples in the model's own chat format.

    make dataset [CONFIG=configs/huanhuan.yaml] [DATA=my.jsonl]

The file may hold alpaca records (with `history` for earlier turns), OpenAI `messages` or ShareGPT
`conversations` (records.py). Each example is exactly what inference will feed the model, plus the
answer (prompt.py holds the rule, shared with every stage that generates):
    prompt   = apply_chat_template(conversation up to the answer, enable_thinking=<answer has <think>?>)
               <|startoftext|>{system}<|extra_4|>{user}<|extra_0|><think>\n\n</think>\n     labels -100
    response = {answer}<|eos|>   (or <answer>\n{answer}\n</answer><|eos|> with data.answer_tags)
Unlike the tutorial: no Qwen `<|im_start|>` text markers (plain characters for this tokenizer),
the target ends in <|eos|> (not <|pad|>), and truncation never cuts the <|eos|> off.
data.eval_ratio holds out whole records (all samples of a conversation stay on one side).
Writes <output_dir>/data/{train,eval}/ (datasets.save_to_disk), data/eval.jsonl (the held-out
records, for `make eval`) and data/stats.json (counts, lengths, and what made it, which
prompt.dataset_mismatch compares with the config).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import urllib.request
from pathlib import Path

import numpy as np

from .atomic import check_replaceable, staging_dir, temp_file, write_json, write_text
from .config import Config
from .errors import UserError
from .modeling import load_tokenizer
from .prompt import IGNORE_INDEX, dataset_provenance, training_samples
from .records import Record, check_sha256, read_records, summarise


def fetch_dataset(cfg: Config) -> Path:
    """The dataset file; downloaded from data.url when missing, checked against data.sha256."""
    path = Path(cfg.data.path)
    if not path.exists():
        if not cfg.data.url:
            raise UserError(
                f"dataset file {path} does not exist",
                where="data.path",
                fix="set DATA=/path/to/file.json(l) or data.url in the config",
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"downloading {cfg.data.url} -> {path}")
        tmp = temp_file(path)
        try:
            with urllib.request.urlopen(cfg.data.url, timeout=60) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise UserError(
                f"could not download the dataset ({e})",
                where=cfg.data.url,
                fix=f"download it by hand to {path}, or set DATA= to a local file",
            ) from e
        try:
            check_sha256(tmp, cfg.data.sha256, cfg.data.url)
        except UserError:
            tmp.unlink()
            raise
        os.replace(tmp, path)
    else:
        check_sha256(path, cfg.data.sha256, str(path))
    return path


def split_records(records: list[Record], cfg: Config) -> tuple[list[Record], list[Record]]:
    """(train, eval): a seeded draw of ceil(eval_ratio * n) whole records held out, both in file order."""
    if cfg.data.eval_ratio <= 0:
        return records, []
    n_eval = math.ceil(cfg.data.eval_ratio * len(records))
    if n_eval >= len(records):
        raise UserError(
            f"data.eval_ratio={cfg.data.eval_ratio} holds out {n_eval} of {len(records)} record(s), "
            "leaving none to train on",
            where="data.eval_ratio",
            fix="lower data.eval_ratio or add records (0 turns the held-out split off)",
        )
    held = set(np.random.default_rng(cfg.run.seed).permutation(len(records))[:n_eval].tolist())
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def as_messages(record: Record) -> dict:
    """A record in OpenAI messages form (its own system prompt only: the config's applies to the rest)."""
    system = [{"role": "system", "content": record.system}] if record.system is not None else []
    return {"messages": system + [{"role": t.role, "content": t.content} for t in record.turns]}


def _length_stats(lengths: list[int]) -> dict:
    a = np.asarray(lengths)
    return {
        "min": int(a.min()),
        "mean": round(float(a.mean()), 1),
        "p95": int(np.percentile(a, 95)),
        "max": int(a.max()),
    }


def run(cfg: Config) -> Path:
    from datasets import Dataset, DatasetDict

    out = cfg.output_dir / "data"
    check_replaceable(out, where="run.output_dir")
    tokenizer = load_tokenizer(cfg.model.dir)  # before a download: `make dataset` needs the model folder's tokenizer
    path = fetch_dataset(cfg)
    records, report = read_records(path, drop_duplicates=cfg.data.drop_duplicates)
    print(summarise(report))
    train_records, eval_records = split_records(records, cfg)

    splits: dict[str, list[dict]] = {}
    dropped = 0
    for name, part in (("train", train_records), ("eval", eval_records)):
        examples = []
        for record in part:
            samples, n = training_samples(tokenizer, record, cfg)
            examples += samples
            dropped += n
        if part and not examples:
            raise UserError(
                f"every {name} record is longer than data.max_length={cfg.data.max_length}",
                where=str(path),
                fix="raise data.max_length or set data.overlong: truncate",
            )
        if examples:
            splits[name] = examples

    examples = [ex for part in splits.values() for ex in part]
    truncated = sum(ex.pop("truncated") for ex in examples)
    lengths = [len(ex["input_ids"]) for ex in examples]
    stats = {
        "source": str(path),
        "sha256": report.sha256,
        "format": report.format,
        "schema": report.schema,
        "records": len(records) + report.dropped,
        "duplicates_dropped": report.dropped,
        "multi_turn_records": report.multi_turn,
        "reasoning_answers": report.reasoning,
        "examples": len(examples),
        "dropped_overlong": dropped,
        "truncated": truncated,
        "max_length": cfg.data.max_length,
        "answer_tags": cfg.data.answer_tags,
        "system_prompt": cfg.data.system_prompt,
        "train_on": cfg.data.train_on,
        "splits": {name: len(part) for name, part in splits.items()},
        "eval_records": len(eval_records),
        "tokens": _length_stats(lengths),
        "label_tokens": _length_stats([sum(t != IGNORE_INDEX for t in ex["labels"]) for ex in examples]),
        "warnings": report.warnings,
        "made_from": dataset_provenance(cfg, path, report.sha256),
    }

    with staging_dir(out) as tmp:  # a killed run leaves the previous dataset, never half of one
        DatasetDict({name: Dataset.from_list(part) for name, part in splits.items()}).save_to_disk(str(tmp))
        write_text(
            tmp / "eval.jsonl", "".join(json.dumps(as_messages(r), ensure_ascii=False) + "\n" for r in eval_records)
        )
        write_json(tmp / "stats.json", stats)
    print(
        f"wrote {out}: {len(examples):,} examples from {len(records):,} records ({report.schema}, labels on "
        f"{cfg.data.train_on.replace('_', ' ')} turns), tokens min/mean/p95/max "
        f"{stats['tokens']['min']}/{stats['tokens']['mean']}/{stats['tokens']['p95']}/{stats['tokens']['max']}, "
        f"{truncated} truncated, {dropped} dropped"
    )
    return out
