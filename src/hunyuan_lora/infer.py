"""Stage 5, infer: answer prompts with the base model + the trained LoRA adapter (or a merged folder).

    make infer PROMPT="你是谁？"                           # one prompt
    make infer SET="infer.input_jsonl=q.jsonl"             # batch: any dataset format, answers optional

Prompts are built by prompt.py exactly as training builds them (alpaca `instruction` + `input`,
history, system prompts, conversations up to their last user turn), thinking off unless
infer.thinking, with the model folder's generation_config.json. The answer is the <answer>...</answer>
content when the model writes one, else the text after </think>, else the whole text.

Prompts are answered infer.batch_size at a time, longest first (generation.generate_batches). Writes
<output_dir>/infer/answers.jsonl (or infer.output_jsonl), one line per answer as it finishes, and puts
the lines in the input's order once all are there. A run killed part-way is resumed by the next run
with the same prompts, adapter and settings (it answers only what is missing); any other earlier
answers file (another PROMPT, a finished run) is first moved aside to answers.<its time>.jsonl, never
overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from .atomic import aside_path, write_text
from .config import Config
from .errors import UserError
from .generation import Completion, generate_batches, infer_sampling
from .modeling import adapter_dir, is_merged, load_for_generation
from .prompt import extract_answer, prompt_ids, prompt_messages
from .records import Record, Turn, read_records


def read_prompts(cfg: Config) -> list[Record]:
    """infer.input_jsonl's records (any dataset format; a record's own answer is kept as the reference),
    else infer.prompts. An empty input file gives no prompts, with a warning."""
    if not cfg.infer.input_jsonl:
        return [
            Record(system=None, turns=(Turn("user", p),), where=f"infer.prompts[{i}]")
            for i, p in enumerate(cfg.infer.prompts)
        ]
    path = Path(cfg.infer.input_jsonl)
    if path.is_file() and not path.read_bytes().strip():
        print(f"WARNING: {path} is empty: no prompts to answer")
        return []
    records, _ = read_records(path, drop_duplicates=False, require_answer=False)
    return records


def output_path(cfg: Config) -> Path:
    """The answers file, checked to be writable before any weights load."""
    out = Path(cfg.infer.output_jsonl) if cfg.infer.output_jsonl else cfg.output_dir / "infer" / "answers.jsonl"
    if out.is_dir():
        raise UserError(f"{out} is a folder", where="infer.output_jsonl", fix="give a file path, e.g. answers.jsonl")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out.parent).close()
        if out.exists() and not os.access(out, os.W_OK):
            raise PermissionError(13, "Permission denied", str(out))
    except OSError as e:
        raise UserError(
            f"cannot write the answers to {out} ({e.strerror or e})",
            where="infer.output_jsonl",
            fix="choose a writable path with SET=infer.output_jsonl=<file>, or fix the permissions",
        ) from e
    return out


def _run_key(cfg: Config, messages: list[dict]) -> str:
    """What an answer depends on: the prompt, the thinking and sampling settings, the weights."""
    weights = Path(cfg.model.dir).resolve()
    if not is_merged(cfg.model.dir):
        weights = adapter_dir(cfg).resolve() / "adapter_model.safetensors"
    stat = weights.stat()
    key = [
        messages,
        cfg.infer.thinking,
        cfg.infer.max_new_tokens,
        cfg.infer.do_sample,
        str(weights),
        stat.st_size,
        stat.st_mtime_ns,
    ]
    return hashlib.sha256(json.dumps(key, ensure_ascii=False).encode()).hexdigest()[:16]


def _earlier_answers(out: Path, keys: list[str]) -> list[int]:
    """The prompts (indices into keys) an interrupted earlier run of this same run answered in `out`,
    in any order (resume with the others); [] after moving any other earlier file aside, by name. A last
    line cut off by a kill is dropped."""
    if not out.exists() or out.stat().st_size == 0:
        return []
    lines = out.read_bytes().splitlines(keepends=True)
    unanswered: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        unanswered.setdefault(key, []).append(i)
    done, ours = [], True
    for n, line in enumerate(lines):
        if not line.endswith(b"\n") and n == len(lines) - 1 and done:
            break  # cut off by a kill
        try:
            done.append(unanswered[json.loads(line)["key"]].pop(0))
        except (ValueError, KeyError, TypeError, IndexError):
            ours = False
            break
    if ours and 0 < len(done) < len(keys):
        with open(out, "r+b") as f:
            f.truncate(sum(len(line) for line in lines[: len(done)]))
        print(f"resuming: {len(done)} of {len(keys)} answers already in {out}")
        return done
    aside = aside_path(out, time.strftime("%Y%m%d-%H%M%S", time.localtime(out.stat().st_mtime)))
    os.replace(out, aside)
    print(f"the earlier answers in {out} were moved to {aside} (kept: this run answers anew)")
    return []


def _put_in_order(out: Path, keys: list[str]) -> None:
    """Rewrite the answers file (all answers there, in the order they finished) in the input's order."""
    by_key: dict[str, list[bytes]] = {}
    for line in out.read_bytes().splitlines(keepends=True):
        by_key.setdefault(json.loads(line)["key"], []).append(line)
    write_text(out, b"".join(by_key[key].pop(0) for key in keys).decode("utf-8"))


def add_arguments(parser) -> None:
    # make infer PROMPT=... arrives as HL_PROMPT, exactly as typed
    parser.add_argument(
        "--prompt",
        default=os.environ.get("HL_PROMPT") or None,
        help="answer this one prompt instead of infer.prompts / infer.input_jsonl",
    )


def run(cfg: Config, prompt: str | None = None) -> Path:
    if prompt:
        cfg.infer.prompts, cfg.infer.input_jsonl = [prompt], None
    records = read_prompts(cfg)
    out = output_path(cfg)
    if not records:
        return out
    asked = [prompt_messages(r, cfg) for r in records]
    keys = [_run_key(cfg, m) for m in asked]
    done = set(_earlier_answers(out, keys))
    loaded, tokenizer = load_for_generation(cfg)
    model = loaded.model
    sampling = infer_sampling(cfg)
    todo = {
        Completion(prompt_ids(tokenizer, asked[i], cfg.infer.thinking), sampling): i
        for i in range(len(records))
        if i not in done
    }
    with open(out, "a", encoding="utf-8") as f:
        for completion in generate_batches(model, tokenizer, list(todo), cfg.infer.batch_size):
            i = todo[completion]
            text = completion.text
            row = {
                "instruction": asked[i][-1]["content"],
                "answer": extract_answer(text),
                "raw": text,
                "reference": records[i].answer,
                "where": records[i].where,
                "key": keys[i],
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())  # an answer written is an answer kept, whatever happens next
            print(f"Q: {row['instruction']}\nA: {row['answer']}\n", flush=True)
    _put_in_order(out, keys)
    print(f"answers written to {out}")
    return out
