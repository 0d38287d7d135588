"""Read and validate a dataset file (a JSON array or JSONL) of alpaca records or conversations.

    records, report = read_records("data/huanhuan.json")
    print(summarise(report))

This is the reading half of the dataset stage; prompt.py turns Records into token ids with the chat
template (data.py applies data.max_length / data.overlong, since lengths exist only after
tokenisation, and names a record by `Record.where` when it drops or rejects one). Batch inference and
`make eval` read their files here too (`require_answer=False` lets a record end on the user's turn).

Formats, detected from the file's first record and named in the report (one format per file)
- alpaca: `instruction` and `output` (strings, not blank); optional `input` (default ""), `system`
  (absent or null: the config's system_prompt applies) and `history` (earlier turns as a list of
  [user, assistant] pairs, LLaMA-Factory's layout). The user turn is instruction, then input on a new
  line when there is one.
- OpenAI `messages`: a list of {"role": "system" | "user" | "assistant", "content": "..."}; an optional
  system message first, then user and assistant alternating, ending with the assistant.
- ShareGPT `conversations`: a list of {"from": "system" | "human" | "gpt", "value": "..."}, the same
  order. In both, the system prompt may instead be a top-level `system` field (not both).
An assistant turn may start with a reasoning trace `<think>...</think>`; it must be closed.
Tool calls and tool/observation turns are not supported and are rejected.

The file
- UTF-8 without a byte-order mark. A BOM is rejected, with the command that strips it: the project
  hashes the data file for provenance, so the bytes we read should be the bytes the user keeps.
- LF or CRLF line endings. CR is JSON whitespace, so CRLF yields exactly the records LF does: it is
  accepted, with a warning. A lone CR (classic Mac) is rejected, because line numbers would be wrong.
  A carriage return *inside* a text field is a control character and is rejected (see below).

What is rejected
Every problem is a UserError naming the file, the line, the record (numbered from 1, in file
order), the field (and the turn), and giving the fix. A file-level problem (missing, empty, not UTF-8,
not JSON, wrong top-level type) stops reading at once. Record-level problems are collected over the
whole file and raised together (the first 10 shown, then "and N more"), so one run lists them all.
A syntax error inside a JSON array ends the walk (nothing after it can be parsed) but keeps the
problems found before it. In JSONL every bad line is reported.

Duplicates (the same system prompt and turns) are counted, and all but the first are dropped. Note
that the tutorial's huanhuan.json has 112 repeats among its 3,729 records and trained on all of them
(233 steps): pass drop_duplicates=False to reproduce that.
"""

from __future__ import annotations

import bisect
import codecs
import difflib
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .errors import UserError

ALPACA_REQUIRED = ("instruction", "output")
ALPACA_FIELDS = ALPACA_REQUIRED + ("input", "system", "history")
MAX_SHOWN = 10  # problems spelled out in one error; the rest are counted

# Each format: the field that holds the turns, the key naming a turn's speaker and its text, and
# the speaker names mapped to the chat template's roles.
ALPACA, MESSAGES, SHAREGPT = "alpaca", "OpenAI messages", "ShareGPT conversations"


class _Chat(NamedTuple):
    field: str
    role_key: str
    text_key: str
    roles: dict[str, str]
    example: str


_CHATS = {
    MESSAGES: _Chat(
        "messages",
        "role",
        "content",
        {"system": "system", "user": "user", "assistant": "assistant"},
        '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
    ),
    SHAREGPT: _Chat(
        "conversations",
        "from",
        "value",
        {"system": "system", "human": "user", "gpt": "assistant"},
        '{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}',
    ),
}
_FIELDS = {ALPACA: ALPACA_FIELDS, MESSAGES: ("messages", "system"), SHAREGPT: ("conversations", "system")}
_UNSUPPORTED_ROLES = ("tool", "function", "function_call", "observation", "ipython")

# Names that other instruction formats use for our fields, offered as a rename in the fix.
_ALIASES = {
    "instruction": ("prompt", "question", "query", "human"),
    "output": ("response", "answer", "completion", "assistant"),
}

# Characters that must not reach the tokenizer: C0 controls except tab and newline, DEL, C1 controls
# (in Chinese text these usually point to mojibake), and lone surrogates from broken \uD8xx escapes.
_BAD_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
_JSON_WS = " \t\r\n"  # the only whitespace JSON allows between tokens
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# Fixes for the JSON parser's messages that users run into most often.
_SYNTAX_FIXES = {
    "Invalid control character": "escape it inside the string (\\n for a line break, \\t for a tab) or delete it",
    "Expecting property name enclosed in double quotes": (
        "JSON needs double quotes around keys and strings and allows no trailing comma before '}'; "
        "a file written with Python's print() or str() is not JSON, so write it with json.dump"
    ),
    "Extra data": "put exactly one JSON object on each line, with no comma after it",
}
_SYNTAX_FIX = "correct the JSON at that position (`python -m json.tool FILE` reports the same place)"


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant"
    content: str


@dataclass(frozen=True)
class Record:
    """One conversation: user and assistant turns alternating, starting with the user; it ends with
    the assistant (the answer), or with the user when read with require_answer=False."""

    system: str | None  # None: the config's system_prompt applies; "" means no system prompt
    turns: tuple[Turn, ...]
    where: str  # "file:line N" (JSONL) or "file:line N, record #i" (JSON array), for messages

    @property
    def answer(self) -> str | None:
        """The last assistant turn's content, when the record ends with one."""
        return self.turns[-1].content if self.turns[-1].role == "assistant" else None


def alpaca_user_message(instruction: str, input: str) -> str:
    """The user turn of an alpaca record. The tutorial writes `instruction + input`; we put a newline
    between them when `input` is not empty, so that "Translate:" and "Hello" do not run together. With
    an empty input, as in every huanhuan.json record, the result is the tutorial's text exactly."""
    return f"{instruction}\n{input}" if input else instruction


@dataclass
class ReadReport:
    path: str
    format: str  # "JSON array" or "JSONL"
    schema: str  # ALPACA, MESSAGES or SHAREGPT
    sha256: str  # of the file's bytes, for the run's provenance
    records: int  # records returned
    duplicates: int  # records that repeat an earlier one
    dropped: int  # duplicates removed (0 with drop_duplicates=False)
    multi_turn: int = 0  # records with more than one assistant turn
    reasoning: int = 0  # assistant turns that carry a <think> trace
    warnings: list[str] = field(default_factory=list)


class _Problem(NamedTuple):
    loc: str  # inside the file: "line 812, record #203, field 'output'"
    what: str
    fix: str


class _Object(dict):
    """A JSON object that remembers keys given twice: `json` silently keeps only the last one."""

    repeated: tuple[str, ...] = ()


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    if len(obj) < len(pairs):
        obj.repeated = tuple(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_object)


def read_records(
    path: str | Path, *, drop_duplicates: bool = True, require_answer: bool = True
) -> tuple[list[Record], ReadReport]:
    """Read every record of a JSON array or JSONL file; raise one UserError listing every problem
    found. See the module docstring for what is accepted and what is rejected. With
    require_answer=False a record may end on the user's turn (prompts for inference)."""
    path = Path(path)
    raw = _read_bytes(path)
    text, warnings = _decode(raw, path)

    # ---- structure: JSON array or JSONL -----------------------------------------------------
    problems: list[_Problem] = []
    first = text.lstrip(_JSON_WS)[:1]
    try:
        if first == "[":
            fmt, values = "JSON array", _walk_array(text, problems)
        elif first == "{":
            _check_jsonl_shape(text, path)
            fmt, values = "JSONL", _parse_lines(text, problems)
        else:
            raise _not_records(text, path)
    except RecursionError as e:  # Python's JSON reader recurses once per level of [ or {
        raise UserError(
            "the JSON is nested deeper than Python's JSON reader can follow (thousands of levels of "
            "[ or {); a record is an object of strings and lists of turns",
            where=str(path),
            fix="check how the file was made: a dataset record is never nested this deeply",
        ) from e

    # ---- records ----------------------------------------------------------------------------
    schema = next((_schema_of(v) for v, _ in values if isinstance(v, dict)), ALPACA)
    first_loc = next((loc for v, loc in values if isinstance(v, dict)), "")
    unknown: dict[str, list[str]] = {}  # unknown field -> locations, so that one warning names it
    records = []
    for value, loc in values:
        record = _check_record(value, loc, path, schema, first_loc, require_answer, problems, unknown)
        if record is not None:
            records.append(record)
    if problems:
        # In file order: a syntax error is found before the record checks of the lines above it.
        problems.sort(key=lambda p: int(re.match(r"line (\d+)", p.loc)[1]))
        raise _combined(problems, path)
    if not records:
        raise UserError(
            "the array holds no records",
            where=str(path),
            fix='put the records inside the brackets: [{"instruction": ..., "output": ...}, ...]',
        )
    for key, locs in unknown.items():
        near = difflib.get_close_matches(key, _FIELDS[schema], n=1, cutoff=0.6)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        warnings.append(f"unknown field '{key}' in {len(locs):,} record(s), first at {locs[0]}: ignored{hint}")

    # ---- duplicates: keep the first of each ---------------------------------------------------
    first_seen: dict[tuple, Record] = {}
    repeats: list[tuple[Record, Record]] = []  # (repeat, the record it repeats)
    for r in records:
        key = (r.system, r.turns)
        if key in first_seen:
            repeats.append((r, first_seen[key]))
        else:
            first_seen[key] = r
    if repeats:
        repeat, original = repeats[0]
        fate = "dropped (the first of each kept)" if drop_duplicates else "kept (drop_duplicates=False)"
        warnings.append(
            f"{len(repeats):,} duplicate record(s) {fate}; the first repeat is {repeat.where}, same as {original.where}"
        )
        if drop_duplicates:
            records = list(first_seen.values())

    answers = [t for r in records for t in r.turns if t.role == "assistant"]
    report = ReadReport(
        path=str(path),
        format=fmt,
        schema=schema,
        sha256=hashlib.sha256(raw).hexdigest(),
        records=len(records),
        duplicates=len(repeats),
        dropped=len(repeats) if drop_duplicates else 0,
        multi_turn=sum(sum(t.role == "assistant" for t in r.turns) > 1 for r in records),
        reasoning=sum(t.content.startswith(THINK_OPEN) for t in answers),
        warnings=warnings,
    )
    return records, report


def check_sha256(path: Path, expected: str | None, source: str) -> None:
    """Refuse a data file whose bytes are not the ones the config pins (data.sha256)."""
    if not expected:
        return
    actual = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if actual != expected:
        raise UserError(
            f"sha256 is {actual}, the config pins {expected}",
            where=source,
            fix="use the pinned file (data.url), or set data.sha256 to null to accept this one",
        )


def summarise(report: ReadReport) -> str:
    """A few lines for the dataset stage to print."""
    lines = [
        f"read {report.records:,} records from {report.path} ({report.schema}, {report.format}, "
        f"sha256 {report.sha256[:12]}); {report.multi_turn:,} multi-turn, {report.reasoning:,} answer(s) "
        f"with a <think> trace, {report.dropped:,} duplicate(s) dropped"
    ]
    lines += [f"WARNING: {w}" for w in report.warnings]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# file level: these stop at the first problem


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise UserError(
            f"dataset file {path} does not exist",
            fix=(
                "set data.path in the config or pass DATA=path/to/file.json; `make dataset` downloads the "
                "tutorial's huanhuan.json"
            ),
        )
    if not path.is_file():
        raise UserError(f"dataset path {path} is not a file", fix="point data.path at a .json or .jsonl file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"dataset file {path} cannot be read ({e.strerror})", fix="check its permissions") from e
    if not raw:
        raise UserError(
            "the file is empty (0 bytes)",
            where=str(path),
            fix="write the records into it; an interrupted download leaves an empty file, so download it again",
        )
    if not raw.strip():
        raise UserError(
            f"the file contains only whitespace ({len(raw):,} bytes)", where=str(path), fix="write the records into it"
        )
    return raw


# what a compressed file starts with, and the command that unpacks it
_COMPRESSED = {
    b"\x1f\x8b": ("gzip", "gunzip -c {path} > {stem}.json"),
    b"PK\x03\x04": ("zip", "unzip {path}"),
    b"BZh": ("bzip2", "bunzip2 -c {path} > {stem}.json"),
    b"\xfd7zXZ\x00": ("xz", "unxz -c {path} > {stem}.json"),
    b"\x28\xb5\x2f\xfd": ("zstd", "zstd -d {path} -o {stem}.json"),
}


def _decode(raw: bytes, path: Path) -> tuple[str, list[str]]:
    """UTF-8 without BOM; returns the text and the warnings (CRLF)."""
    for magic, (kind, command) in _COMPRESSED.items():
        if raw.startswith(magic):
            raise UserError(
                f"the file is {kind}-compressed (it starts with the bytes {magic.hex(' ').upper()}), not JSON text",
                where=str(path),
                fix="unpack it and use the unpacked file: " + command.format(path=path, stem=path.with_suffix("")),
            )
    if raw.startswith(codecs.BOM_UTF8):
        raise UserError(
            "the file starts with a UTF-8 byte-order mark (bytes EF BB BF), which JSON does not allow",
            where=f"{path}:line 1",
            fix=f"save it as UTF-8 without BOM, or strip the mark: sed -i '1s/^\\xEF\\xBB\\xBF//' {path}",
        )
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise UserError(
            "the file is UTF-16 (it starts with a UTF-16 byte-order mark), not UTF-8; "
            "Windows PowerShell's `>` and Out-File write UTF-16",
            where=f"{path}:line 1",
            fix=f"convert it: iconv -f UTF-16 -t UTF-8 {path} > {path}.utf8",
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        bad = raw[e.start : e.start + 4].hex(" ").upper()
        fix = f"save it as UTF-8, e.g. iconv -f <its encoding> -t UTF-8 {path} > {path}.utf8"
        try:
            raw.decode("gb18030")
            fix = (
                f"it decodes as GB18030/GBK, so it was probably saved in that encoding (common for Chinese "
                f"text): convert it with "
                f"iconv -f GB18030 -t UTF-8 {path} > {path}.utf8"
            )
        except UnicodeDecodeError:
            pass
        raise UserError(
            f"not valid UTF-8 at byte offset {e.start:,} (bytes {bad}: {e.reason})",
            where=f"{path}:line {line}",
            fix=fix,
        ) from e

    crlf = text.count("\r\n")
    if text.count("\r") > crlf:
        lone = re.search("\r(?!\n)", text).start()
        line = text.count("\n", 0, lone) + 1
        raise UserError(
            "a carriage return (CR) not followed by a line feed: the file uses classic Mac (CR) or mixed line endings",
            where=f"{path}:line {line}",
            fix=f"convert the line endings to LF: sed -i 's/\\r$//; s/\\r/\\n/g' {path}",
        )
    warnings = []
    if crlf:
        warnings.append(
            f"{crlf:,} line(s) end in CRLF (Windows); accepted: CR is JSON whitespace, "
            "so the records are the same as with LF"
        )
    return text, warnings


def _check_jsonl_shape(text: str, path: Path) -> None:
    """A file that starts with '{' is JSONL, unless its first object spans several lines. Then the file is
    one JSON object, or pretty-printed objects one after another. Either way it is not JSONL. A single-line
    object that wraps the records (e.g. {"data": [...]}) is the wrong top-level type too."""
    start = len(text) - len(text.lstrip(_JSON_WS))
    try:
        value, end = _DECODER.raw_decode(text, start)
    except json.JSONDecodeError:
        return  # the first line's own problem is reported with the other lines
    first_line = text.count("\n", 0, start) + 1
    last_line = first_line + text.count("\n", start, end)
    alone = not text[end:].strip(_JSON_WS)
    holders = [
        k
        for k, v in value.items()
        if isinstance(v, list)
        and v
        and all(isinstance(x, dict) for x in v)
        and k not in (c.field for c in _CHATS.values())
    ]
    if last_line > first_line and not alone:
        raise UserError(
            f"the first record spans lines {first_line}-{last_line}: the file holds pretty-printed JSON objects "
            "one after another, which is not JSONL (one object per line) and not a JSON array",
            where=f"{path}:line {first_line}",
            fix=f"write one record per line, e.g. jq -c . {path} > records.jsonl, or put the records in an array",
        )
    if alone and (last_line > first_line or (holders and "instruction" not in value)):
        held = f", whose field '{holders[0]}' holds a list of objects" if holders else ""
        raise UserError(
            f"the top level is a JSON object{held}; expected an array of records or JSONL (one object per line)",
            where=f"{path}:line {first_line}",
            fix=(
                "write the records as a top-level array [{...}, {...}]"
                + (f", e.g. the list under '{holders[0]}'" if holders else ", e.g. wrap a single record in [ ]")
                + ", or as JSONL with each record on one line"
            ),
        )


def _not_records(text: str, path: Path) -> UserError:
    """The error for a file that starts with neither '[' nor '{'."""
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as e:
        p = _syntax_problem(e)
        return UserError(
            f"neither a JSON array nor JSONL: {p.what}",
            where=f"{path}:{p.loc}",
            fix='a dataset is a JSON array of records [{"instruction": ..., "output": ...}, ...] '
            '(or {"messages": [...]} / {"conversations": [...]} records), or JSONL, one record '
            "per line",
        )
    return UserError(
        f"the top level is {_kind(value)}; expected an array of records or JSONL (one object per line)",
        where=f"{path}:line 1",
        fix='write the records as [{"instruction": ..., "input": "", "output": ...}, ...]',
    )


# ---------------------------------------------------------------------------------------------
# structure: each returns (value, location) pairs and adds its problems to `problems`


def _walk_array(text: str, problems: list[_Problem]) -> list[tuple[Any, str]]:
    """Decode the array one element at a time, so that each record knows the line it starts on."""
    newlines = [m.start() for m in re.finditer("\n", text)]

    def line(pos: int) -> int:
        return bisect.bisect_left(newlines, pos) + 1

    def skip_ws(pos: int) -> int:
        while pos < len(text) and text[pos] in _JSON_WS:
            pos += 1
        return pos

    values: list[tuple[Any, str]] = []
    pos = skip_ws(text.index("[") + 1)
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            n, start = len(values) + 1, pos
            try:
                value, pos = _DECODER.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                problem = _syntax_problem(e, f"in record #{n}")
                # A string can only be unterminated at the end of the file.
                if e.msg.startswith("Unterminated string") or not text[e.pos :].strip(_JSON_WS):
                    problem = problem._replace(
                        what=problem.what + "; the file ends inside this record (truncated?)",
                        fix="download or export the file again",
                    )
                problems.append(problem)
                return values
            values.append((value, f"line {line(start)}, record #{n}"))
            pos = skip_ws(pos)
            sep = text[pos : pos + 1]
            if sep == ",":
                after = skip_ws(pos + 1)
                if text.startswith("]", after):
                    problems.append(
                        _Problem(
                            f"line {line(pos)}",
                            f"a comma after the last record (#{n}), which JSON does not allow",
                            "delete that comma",
                        )
                    )
                    return values
                pos = after
            elif sep == "]":
                pos += 1
                break
            elif sep == "":
                problems.append(
                    _Problem(
                        f"line {line(pos)}",
                        f"the array is not closed: the file ends after record #{n} without ']' (is it truncated?)",
                        "add the closing ']' or download the file again",
                    )
                )
                return values
            elif sep in "{[":
                problems.append(
                    _Problem(
                        f"line {line(pos)}",
                        f"no comma between record #{n} and the next record",
                        "separate the records in an array with commas",
                    )
                )
                return values
            else:
                problems.append(
                    _Problem(
                        f"line {line(pos)}",
                        f"expected ',' or ']' after record #{n}, found {_snippet(text, pos)}",
                        _SYNTAX_FIX,
                    )
                )
                return values

    rest = skip_ws(pos)
    if rest < len(text):
        if text[rest] in "{[":
            what = (
                "more JSON follows the array that ends on line "
                f"{line(pos - 1)}: the file mixes a JSON array with JSONL lines (or holds two arrays)"
            )
            fix = "use one format: put every record inside the one array, or write JSONL only"
        else:
            what = f"text after the end of the array (line {line(pos - 1)}): {_snippet(text, rest)}"
            fix = "delete everything after the closing ']'"
        problems.append(_Problem(f"line {line(rest)}", what, fix))
    return values


def _parse_lines(text: str, problems: list[_Problem]) -> list[tuple[Any, str]]:
    values: list[tuple[Any, str]] = []
    for n, line in enumerate(text.split("\n"), start=1):
        body = line.strip(_JSON_WS)
        if not body:
            continue
        try:
            value = _DECODER.decode(line)
        except json.JSONDecodeError as e:
            problems.append(_line_problem(e, line, n))
            continue
        if isinstance(value, list):
            problems.append(
                _Problem(
                    f"line {n}",
                    "is a JSON array, not one object: the file mixes JSONL with a JSON array",
                    "use one format: JSONL (one object per line) or one array",
                )
            )
            continue
        values.append((value, f"line {n}"))
    return values


def _line_problem(e: json.JSONDecodeError, line: str, n: int) -> _Problem:
    """A JSONL line that does not parse, with the likeliest cause when there is a clear one."""
    body = line.strip(_JSON_WS)
    if line.startswith("\ufeff"):
        return _Problem(
            f"line {n}",
            "starts with a UTF-8 byte-order mark (were files with BOMs concatenated?)",
            "strip the marks: sed -i 's/\\xEF\\xBB\\xBF//g' <file>",
        )
    if body[:1] in "[]":
        return _Problem(
            f"line {n}",
            f"starts a JSON array ({body[:20]!r}) among JSONL lines: the file mixes JSONL with a JSON array",
            "use one format: JSONL (one object per line) or one array",
        )
    if e.pos >= len(line.rstrip(_JSON_WS)) or e.msg.startswith("Unterminated string"):
        return _Problem(
            f"line {n}",
            f"the line ends before its JSON object is complete ({_msg(e)}, near "
            f"{_snippet(line, e.pos)}); in JSONL each record must be on one line",
            "write each record on a single line, e.g. with json.dumps(record, ensure_ascii=False); "
            "if this is the last line, the file may be truncated",
        )
    return _syntax_problem(e, line=n)


# ---------------------------------------------------------------------------------------------
# records


def _schema_of(value: dict) -> str:
    return next((name for name, chat in _CHATS.items() if chat.field in value), ALPACA)


def _check_record(
    value: Any,
    loc: str,
    path: Path,
    schema: str,
    first_loc: str,
    require_answer: bool,
    problems: list[_Problem],
    unknown: dict[str, list[str]],
) -> Record | None:
    """A Record, or None after adding every problem of this record to `problems`."""
    if not isinstance(value, dict):
        problems.append(
            _Problem(
                loc,
                f"the record is {_kind(value)}, not an object",
                f"write each record as an object like the first one ({first_loc})",
            )
        )
        return None
    if _schema_of(value) != schema:
        problems.append(
            _Problem(
                loc,
                f"is a {_schema_of(value)} record, but the file's first record ({first_loc}) "
                f"is {schema}: one format per file",
                "convert the records to one format, or split the file and tokenize each",
            )
        )
        return None
    found = [
        _Problem(f"{loc}, field '{k}'", "appears twice in the record; JSON keeps only the last one", "keep one of them")
        for k in value.repeated
    ]
    extra = [k for k in value if k not in _FIELDS[schema]]
    if schema == ALPACA:
        system, turns = _alpaca_turns(value, loc, extra, require_answer, found)
    else:
        system, turns = _chat_turns(value, loc, _CHATS[schema], require_answer, found)
    for k in extra:
        unknown.setdefault(k, []).append(f"{path}:{loc}")
    if found:
        problems += found
        return None
    return Record(system=system, turns=tuple(turns), where=f"{path}:{loc}")


def _text_problem(v: Any, floc: str, required: bool, nullable: bool = False) -> _Problem | None:
    """The problem with one text field's value, if any."""
    if not isinstance(v, str):
        or_null = " or null" if nullable else ""
        return _Problem(
            floc, f"is {_kind(v)}, expected a string", f"write it as a JSON string in double quotes{or_null}"
        )
    if required and not v.strip():
        return _Problem(
            floc, "is empty" if not v else f"is only whitespace ({v[:20]!r})", "write the text, or delete the record"
        )
    if m := _BAD_CHARS.search(v):
        return _bad_char(v, m, floc)
    return None


def _think_problem(answer: str, floc: str) -> _Problem | None:
    """A reasoning trace must open the answer and be closed: an unclosed <think> would train the model
    to never leave thinking mode."""
    if answer.startswith(THINK_OPEN) and THINK_CLOSE not in answer:
        return _Problem(
            floc,
            "starts a <think> reasoning trace that is never closed",
            "end the reasoning with </think> before the answer, e.g. <think>\\n...\\n</think>\\n<answer>",
        )
    if THINK_CLOSE in answer and not answer.startswith(THINK_OPEN):
        return _Problem(
            floc,
            "contains </think> but does not start with <think> (a reasoning trace must open the answer)",
            "move the <think>...</think> block to the very start of the answer, or delete it",
        )
    return None


def _alpaca_turns(
    value: dict, loc: str, extra: list[str], require_answer: bool, found: list[_Problem]
) -> tuple[str | None, list[Turn]]:
    required = ALPACA_REQUIRED if require_answer else ALPACA_REQUIRED[:1]
    found += [_missing(name, value, loc, extra) for name in required if name not in value]
    for name in ("instruction", "output", "input", "system"):
        v = value.get(name)
        if name not in value or (v is None and name not in required):
            continue  # absent (a missing required field is reported above) or an optional null
        floc = f"{loc}, field '{name}'"
        problem = _text_problem(v, floc, name in ALPACA_REQUIRED, nullable=name not in required)
        if problem is None and name == "output":
            problem = _think_problem(v, floc)
        if problem:
            found.append(problem)
    turns: list[Turn] = []
    history = value.get("history")
    if history is not None:
        if not isinstance(history, list):
            found.append(
                _Problem(
                    f"{loc}, field 'history'",
                    f"is {_kind(history)}, expected a list of [user, assistant] pairs",
                    'write it as [["earlier question", "earlier answer"], ...]',
                )
            )
        for i, pair in enumerate(history if isinstance(history, list) else [], 1):
            floc = f"{loc}, field 'history', pair #{i}"
            if not (isinstance(pair, list) and len(pair) == 2):
                found.append(
                    _Problem(
                        floc,
                        f"is {_kind(pair)}, expected a [user, assistant] pair of two strings",
                        'write each earlier turn as ["question", "answer"]',
                    )
                )
                continue
            for role, text in (("user", pair[0]), ("assistant", pair[1])):
                problem = _text_problem(text, f"{floc} ({role} turn)", required=True)
                if problem is None and role == "assistant":
                    problem = _think_problem(text, f"{floc} ({role} turn)")
                if problem:
                    found.append(problem)
                turns.append(Turn(role, text))
    if found:
        return None, []
    turns.append(Turn("user", alpaca_user_message(value["instruction"], value.get("input") or "")))
    if value.get("output") is not None:
        turns.append(Turn("assistant", value["output"]))
    return value.get("system"), turns


def _chat_turns(
    value: dict, loc: str, chat: _Chat, require_answer: bool, found: list[_Problem]
) -> tuple[str | None, list[Turn]]:
    items = value[chat.field]
    floc = f"{loc}, field '{chat.field}'"
    if not isinstance(items, list) or not items:
        what = "is an empty list" if isinstance(items, list) else f"is {_kind(items)}, expected a list of turns"
        found.append(_Problem(floc, what, f"write the record as {chat.example}"))
        return None, []
    system = value.get("system")
    if system is not None and (p := _text_problem(system, f"{loc}, field 'system'", required=False, nullable=True)):
        found.append(p)
    turns: list[Turn] = []
    names = "/".join(chat.roles)
    for i, item in enumerate(items, 1):
        tloc = f"{floc}, turn #{i}"
        if not isinstance(item, dict):
            found.append(_Problem(tloc, f"is {_kind(item)}, not an object", f"write each turn like {chat.example}"))
            continue
        speaker = item.get(chat.role_key)
        if chat.role_key not in item or chat.text_key not in item:
            missing = [k for k in (chat.role_key, chat.text_key) if k not in item]
            has = ", ".join(item) or "no fields"
            other = next((c for c in _CHATS.values() if c is not chat and c.role_key in item), None)
            fix = (
                f"this turn is written as {next(n for n, c in _CHATS.items() if c is other)}: use "
                f"'{chat.role_key}' / '{chat.text_key}' like the rest of the file"
                if other
                else f"give every turn '{chat.role_key}' ({names}) and '{chat.text_key}'"
            )
            found.append(_Problem(tloc, f"has no '{missing[0]}' (the turn has: {has})", fix))
            continue
        if speaker in _UNSUPPORTED_ROLES or "tool_calls" in item or "function_call" in item:
            found.append(
                _Problem(
                    tloc,
                    f"is a tool / function turn ({chat.role_key} {speaker!r}); tool use is not supported by this kit",
                    "delete the tool turns, or the record",
                )
            )
            continue
        if speaker not in chat.roles:
            this = next(n for n, c in _CHATS.items() if c is chat)
            other = next((n for n, c in _CHATS.items() if c is not chat and speaker in c.roles), None)
            if other:  # the other format's name for a role: name ours for the same role
                ours = next(k for k, v in chat.roles.items() if v == _CHATS[other].roles[speaker])
                fix = f"this file is {this}: write '{ours}' ('{speaker}' is the {other} name)"
            else:
                near = difflib.get_close_matches(str(speaker), list(chat.roles), n=1, cutoff=0.5)
                fix = f"this file is {this}: write " + (f"'{near[0]}'" if near else f"one of {names}")
            found.append(
                _Problem(f"{tloc}, field '{chat.role_key}'", f"is {_kind(speaker)}, expected one of {names}", fix)
            )
            return None, []  # the order of the turns after it cannot be judged
        role = chat.roles[speaker]
        text = item[chat.text_key]
        if isinstance(text, list):
            found.append(
                _Problem(
                    f"{tloc}, field '{chat.text_key}'",
                    f"is {_kind(text)} (content parts); only text is supported",
                    "join the text parts into one string",
                )
            )
            continue
        problem = _text_problem(text, f"{tloc}, field '{chat.text_key}'", required=role != "system")
        if problem is None and role == "assistant":
            problem = _think_problem(text, f"{tloc}, field '{chat.text_key}'")
        if problem:
            found.append(problem)
            continue
        if role == "system":
            if i != 1:
                found.append(_Problem(tloc, "is a system turn after turn #1", "put the system prompt first, once"))
            elif system is not None:
                found.append(
                    _Problem(tloc, "gives a system prompt, and so does the record's field 'system'", "keep one of them")
                )
            else:
                system = text
            continue
        expected = "user" if not turns or turns[-1].role == "assistant" else "assistant"
        if role != expected:
            speaker_name = {v: k for k, v in chat.roles.items()}
            found.append(
                _Problem(
                    tloc,
                    f"is a {speaker_name[role]!r} turn where a {speaker_name[expected]!r} turn "
                    "belongs: turns must alternate, starting with the user",
                    "merge consecutive turns of one speaker, or add the missing turn",
                )
            )
            continue
        turns.append(Turn(role, text))
    if found:
        return None, []
    if not turns:
        found.append(_Problem(floc, "has no user turn", f"write the record as {chat.example}"))
    elif require_answer and turns[-1].role != "assistant":
        found.append(
            _Problem(
                f"{floc}, turn #{len(items)}",
                "the conversation ends with the user's turn: there is no answer to train on",
                "add the assistant's reply, or delete the last turn",
            )
        )
    return system, turns


def _missing(name: str, value: dict, loc: str, extra: list[str]) -> _Problem:
    renames = [k for k in extra if k.lower() in _ALIASES[name] or difflib.get_close_matches(name, [k], cutoff=0.6)]
    if renames:
        fix = f"rename '{renames[0]}' to '{name}'"
    else:
        fix = (
            f"add '{name}' (every alpaca record needs 'instruction' and 'output'; conversations go in "
            "'messages' or 'conversations')"
        )
    has = ", ".join(value) or "no fields"
    return _Problem(f"{loc}, field '{name}'", f"is missing (the record has: {has})", fix)


def _bad_char(text: str, m: re.Match, floc: str) -> _Problem:
    c, count, at = m.group(), len(_BAD_CHARS.findall(text)), m.start() + 1
    what = f"contains the control character U+{ord(c):04X} at character {at}"
    if c == "\r":
        fix = "replace \\r\\n with \\n inside the text (a Windows line break)"
    elif "\ud800" <= c <= "\udfff":
        what = f"contains a lone surrogate U+{ord(c):04X} (a \\uD8xx escape without its pair) at character {at}"
        fix = "re-export the text so that characters outside the BMP are written whole (or as UTF-8)"
    else:
        fix = "delete it (write a line break as \\n and a tab as \\t)"
    if count > 1:
        what += f" ({count} such characters in this field)"
    return _Problem(floc, what, fix)


# ---------------------------------------------------------------------------------------------
# messages


def _syntax_problem(e: json.JSONDecodeError, context: str = "", line: int | None = None) -> _Problem:
    fix = next((f for msg, f in _SYNTAX_FIXES.items() if e.msg.startswith(msg)), _SYNTAX_FIX)
    ctx = f" {context}" if context else ""
    return _Problem(
        f"line {line or e.lineno}, column {e.colno}",
        f"invalid JSON{ctx}: {_msg(e)}, near {_snippet(e.doc, e.pos)}",
        fix,
    )


def _msg(e: json.JSONDecodeError) -> str:
    """The parser's message without its dangling "at" ("Unterminated string starting at")."""
    return e.msg.removesuffix(" at").removesuffix(" starting")


def _snippet(text: str, pos: int, width: int = 30) -> str:
    """Up to `width` characters either side of `pos` on its line, with <HERE> at `pos`."""
    start = max(text.rfind("\n", 0, pos) + 1, pos - width)
    end = text.find("\n", pos)
    end = min(len(text) if end < 0 else end, pos + width)
    return repr(text[start:pos] + "<HERE>" + text[pos:end].rstrip("\r"))


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"a boolean ({json.dumps(v)})"
    if isinstance(v, (int, float)):
        return f"a number ({v!r})"
    if isinstance(v, str):
        return f"a string ({v[:30]!r})"
    if isinstance(v, list):
        return f"an array of {len(v)} item(s)"
    return "an object"


def _combined(problems: list[_Problem], path: Path) -> UserError:
    """One UserError for all problems: the first MAX_SHOWN spelt out, the rest counted."""
    if len(problems) == 1:
        p = problems[0]
        return UserError(p.what, where=f"{path}:{p.loc}", fix=p.fix)
    shown = problems[:MAX_SHOWN]
    listing = "; ".join(f"{p.loc}: {p.what}" for p in shown)
    more = f"; and {len(problems) - len(shown):,} more" if len(problems) > len(shown) else ""
    fixes = "; ".join(dict.fromkeys(p.fix for p in shown))  # each distinct fix once, in order
    return UserError(f"{len(problems):,} problems: {listing}{more}", where=str(path), fix=fixes)
