"""The one prompt format: a conversation -> chat-template tokens (+ labels for training), and
generated text -> the answer. Training (data.py) and every way of generating (infer, chat, eval,
serve) go through here, so the prompt a model is trained on is the prompt it is asked with.

    samples, dropped = training_samples(tokenizer, record, cfg)   # make dataset
    ids = prompt_ids(tokenizer, conversation(record, cfg)[:-1], thinking=...)   # generation
    answer = extract_answer(generated_text)

The invariant: for every assistant turn that carries labels, the tokens before it are exactly
`apply_chat_template(prefix, add_generation_prompt=True, enable_thinking=<that turn's mode>)`, what
inference feeds the model for that prefix, and its labels are the turn's content + <|eos|>.
An assistant content that starts with a non-empty `<think>...</think>` trains in thinking mode (the
template adds nothing); any other trains thinking-off (the template appends `<think>\n\n</think>\n`
to the prompt, so an empty think block in the data is left out of the labels, never trained twice).
The template renders an earlier assistant turn as `{content}<|eos|>` with no think block, unlike a
fresh thinking-off answer: a turn is added to the sample before it only when that sample's tokens
are a prefix of the turn's own prompt (thinking-on turns after each other); otherwise the
conversation is expanded into one sample per turn.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from .config import Config
from .errors import UserError
from .records import THINK_CLOSE, THINK_OPEN, Record, Turn

IGNORE_INDEX = -100
EMPTY_THINK = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n"  # what enable_thinking=False appends to the prompt
_REASONING = re.compile(rf"{THINK_OPEN}(.*?){THINK_CLOSE}\n?", re.S)
_ANSWER = re.compile(r"<answer>\s*(.*?)\s*(?:</answer>|$)", re.S)

# Files of a model folder that decide how text becomes tokens (the chat template is in tokenizer_config.json).
FINGERPRINT_FILES = (
    "tokenizer_config.json",
    "hy.tiktoken",
    "tokenization_hy.py",
    "special_tokens_map.json",
    "tokenizer.json",
)
# data.* settings (and the seed of the split) that change the tokenized examples.
TOKEN_SETTINGS = ("system_prompt", "max_length", "answer_tags", "overlong", "eval_ratio", "drop_duplicates", "train_on")


def is_thinking(content: str) -> bool:
    """True for an answer that opens with a non-empty reasoning trace."""
    m = _REASONING.match(content)
    return bool(m and m.group(1).strip())


def trained_content(content: str, cfg: Config) -> str:
    """An assistant turn as the model is trained to write it: an empty think block dropped (the
    thinking-off prompt already ends with one), the answer wrapped in <answer> with data.answer_tags."""
    m = _REASONING.match(content)
    if m and m.group(1).strip():
        head, answer = content[: m.end()], content[m.end() :]
    else:  # no reasoning, or an empty think block (thinking off)
        head, answer = "", content[m.end() :] if m else content
    if cfg.data.answer_tags and not answer.lstrip().startswith("<answer>"):
        answer = f"<answer>\n{answer}\n</answer>"
    return head + answer


def system_prompt(record_system: str | None, cfg: Config) -> str | None:
    """The record's own system prompt when it has one ("" included: none at all), else the config's."""
    return record_system if record_system is not None else cfg.data.system_prompt


def conversation(record: Record, cfg: Config) -> list[dict]:
    """The chat-template messages of a record: its system prompt, then every turn (assistant turns as trained)."""
    system = system_prompt(record.system, cfg)
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": t.role, "content": trained_content(t.content, cfg) if t.role == "assistant" else t.content}
        for t in record.turns
    ]


def ask(user: str, cfg: Config, system: str | None = None) -> list[dict]:
    """The messages of a one-turn question (the config's system prompt unless `system` is given)."""
    return conversation(Record(system=system, turns=(Turn("user", user),), where="prompt"), cfg)


def prompt_messages(record: Record, cfg: Config) -> list[dict]:
    """The conversation a record asks the model to continue: everything up to its last user turn."""
    messages = conversation(record, cfg)
    return messages[:-1] if record.answer is not None else messages


def prompt_ids(tokenizer, messages: list[dict], thinking: bool) -> list[int]:
    """The tokens the model sees before it answers the last user turn of `messages`."""
    return tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, enable_thinking=thinking)


def prompt_is_thinking(tokenizer, messages: list[dict], thinking: bool) -> bool:
    """Whether the template leaves the prompt in thinking mode (a /think or /no_think at the start of
    the last user message overrides `thinking`)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
    return not text.endswith(EMPTY_THINK)


def training_samples(tokenizer, record: Record, cfg: Config) -> tuple[list[dict], int]:
    """The samples of one record (input_ids, attention_mask, labels, truncated) and how many of its
    turns were dropped as over data.max_length."""
    messages = conversation(record, cfg)
    first = len(messages) - len(record.turns)  # index of the first turn in `messages` (after a system prompt)
    answers = [first + i for i, t in enumerate(record.turns) if t.role == "assistant"]
    if cfg.data.train_on == "last_assistant":
        answers = answers[-1:]
    limit, eos = cfg.data.max_length, tokenizer.eos_token_id
    samples: list[dict] = []
    open_sample: dict | None = None  # the last sample, while a later turn may still extend it
    dropped = 0
    for i in answers:
        where = f"{record.where}, turn #{i - first + 1}"
        content = messages[i]["content"]
        thinking = is_thinking(content)
        if prompt_is_thinking(tokenizer, messages[:i], thinking) != thinking:
            raise UserError(
                f"the user turn before it starts with {'/think' if not thinking else '/no_think'}, which switches "
                f"the prompt to thinking {'on' if not thinking else 'off'}, but this answer "
                f"{'has no' if not thinking else 'has a'} <think> reasoning trace",
                where=where,
                fix="remove the /think or /no_think from the user turn, or make the answer match it",
            )
        prompt = prompt_ids(tokenizer, messages[:i], thinking)
        answer = tokenizer(content, add_special_tokens=False)["input_ids"] + [eos]
        if (
            open_sample
            and prompt[: len(open_sample["input_ids"])] == open_sample["input_ids"]
            and len(prompt) + len(answer) <= limit
        ):
            added = prompt[len(open_sample["input_ids"]) :]
            open_sample["input_ids"] += added + answer
            open_sample["labels"] += [IGNORE_INDEX] * len(added) + answer
            open_sample["attention_mask"] = [1] * len(open_sample["input_ids"])
            continue
        truncated = False
        if len(prompt) + len(answer) > limit:
            if cfg.data.overlong == "error":
                raise UserError(
                    f"{len(prompt) + len(answer)} tokens, over data.max_length={limit}",
                    where=where,
                    fix="raise data.max_length, shorten the record, or set data.overlong to truncate/drop",
                )
            room = limit - len(prompt) - 1  # answer tokens that fit before the final <|eos|>
            if cfg.data.overlong == "drop" or room < 1:
                dropped += 1
                open_sample = None
                continue
            answer, truncated = answer[:room] + [eos], True  # keep the stop token
        sample = {
            "input_ids": prompt + answer,
            "attention_mask": [1] * (len(prompt) + len(answer)),
            "labels": [IGNORE_INDEX] * len(prompt) + answer,
            "truncated": truncated,
        }
        samples.append(sample)
        open_sample = None if truncated else sample
    return samples, dropped


def extract_answer(text: str) -> str:
    """<answer> content if present (closed or not), else what follows </think>, else the text."""
    match = _ANSWER.search(text)
    if match:
        return match.group(1).strip()
    if THINK_CLOSE in text:
        return text.rsplit(THINK_CLOSE, 1)[1].strip()
    return text.strip()


# ---------------------------------------------------------------------------------------------
# what made a tokenized dataset, so a stale one is refused


def tokenizer_fingerprint(model_dir: str | Path) -> str:
    """sha256 over the tokenizer files of a model folder (their names and bytes), not its path."""
    digest = hashlib.sha256()
    for name in FINGERPRINT_FILES:
        path = Path(model_dir) / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_provenance(cfg: Config, source: Path, sha256: str) -> dict:
    """What `make dataset` records in stats.json["made_from"]: everything that changes its tokens."""
    return {
        "source": str(Path(source).resolve()),
        "sha256": sha256,
        "tokenizer": tokenizer_fingerprint(cfg.model.dir),
        "seed": cfg.run.seed,
        "settings": {k: getattr(cfg.data, k) for k in TOKEN_SETTINGS},
    }


def dataset_mismatch(cfg: Config, stats: dict) -> list[str]:
    """Why the tokenized dataset described by `stats` (its stats.json) is not what `make dataset` would
    write with this config now; empty when it matches. Callers refuse with "rerun `make dataset`"."""
    made = stats.get("made_from")
    if not isinstance(made, dict):
        return ["it was written by an older version of `make dataset`, which did not record what made it"]
    problems = []
    source = Path(cfg.data.path).resolve()
    if made.get("source") != str(source):
        problems.append(f"it was made from {made.get('source')}, the config's data.path is {source}")
    elif not source.is_file():
        problems.append(f"its source {source} no longer exists")
    elif _file_sha256(source) != made.get("sha256"):
        problems.append(
            f"{source} has changed since it was tokenized (sha256 "
            f"{str(made.get('sha256'))[:12]} then, {_file_sha256(source)[:12]} now)"
        )
    if made.get("tokenizer") != tokenizer_fingerprint(cfg.model.dir):
        problems.append(f"the tokenizer files in {cfg.model.dir} differ from the ones it was tokenized with")
    if made.get("seed") != cfg.run.seed and cfg.data.eval_ratio > 0:
        problems.append(f"run.seed was {made.get('seed')!r} when it was split, the config now says {cfg.run.seed!r}")
    settings = made.get("settings") or {}
    for key in TOKEN_SETTINGS:
        if settings.get(key) != getattr(cfg.data, key):
            problems.append(
                f"data.{key} was {settings.get(key)!r} when tokenized, the config now says {getattr(cfg.data, key)!r}"
            )
    return problems
