"""Read and validate an alpaca instruction dataset (a JSON array or JSONL) into Records.

    records, report = read_records("data/huanhuan.json")
    print(summarise(report))

This is the reading half of the dataset stage. data.py turns Records into token ids with the chat
template. It also applies cfg.data.max_length / cfg.data.overlong, because lengths exist only
after tokenisation, and it names a record by `Record.where` when it drops or rejects one.

What is accepted
- Alpaca JSON: one top-level array of objects. JSONL: one object per line; blank lines are skipped.
- Each object has `instruction` and `output` (strings, not blank), and may have `input` (string,
  default "") and `system` (string; absent or null means that the config's system_prompt applies).
  Optional fields may be null or left out. Other fields are ignored with a warning.
- UTF-8 without a byte-order mark. A BOM is rejected, with the command that strips it: the project
  hashes the data file for provenance, so the bytes we read should be the bytes the user keeps.
- LF or CRLF line endings. CR is JSON whitespace, so CRLF yields exactly the records LF does: it is
  accepted, with a warning. A lone CR (classic Mac) is rejected, because line numbers would be wrong.
  A carriage return *inside* a text field is a control character and is rejected (see below).

What is rejected
Every problem is a UserError naming the file, the line, the record (numbered from 1, in file
order) and the field, and giving the fix. A file-level problem (missing, empty, not UTF-8, not
JSON, wrong top-level type) stops reading at once. Record-level problems are collected over the
whole file and raised together (the first 10 shown, then "and N more"), so one run lists them all.
A syntax error inside a JSON array ends the walk (nothing after it can be parsed) but keeps the
problems found before it. In JSONL every bad line is reported.

`Record.user_message` is the user turn: instruction, then input on a new line when there is one.

Duplicates (the same instruction, input, output and system) are counted, and all but the first are
dropped. Note that the tutorial's huanhuan.json has 112 repeats among its 3,729 records and trained
on all of them (233 steps): pass drop_duplicates=False to reproduce that.
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

REQUIRED = ("instruction", "output")
OPTIONAL = ("input", "system")
FIELDS = REQUIRED + OPTIONAL
MAX_SHOWN = 10  # problems spelled out in one error; the rest are counted

# Names that other instruction formats use for our fields, offered as a rename in the fix.
_ALIASES = {
    "instruction": ("prompt", "question", "query", "human"),
    "output": ("response", "answer", "completion", "assistant"),
}
_CHAT_KEYS = ("conversations", "messages")  # ShareGPT / OpenAI chat formats, not alpaca

# Characters that must not reach the tokenizer: C0 controls except tab and newline, DEL, C1 controls
# (in Chinese text these usually point to mojibake), and lone surrogates from broken \uD8xx escapes.
_BAD_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
_JSON_WS = " \t\r\n"  # the only whitespace JSON allows between tokens

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
class Record:
    instruction: str
    input: str
    output: str
    system: str | None  # None: the config's system_prompt applies
    where: str  # "file:line N" (JSONL) or "file:line N, record #i" (JSON array), for messages

    @property
    def user_message(self) -> str:
        """The user turn. The tutorial writes `instruction + input`. We put a newline between them
        when `input` is not empty, so that "Translate:" and "Hello" do not run together. With an empty
        input, as in every huanhuan.json record, the result is the tutorial's text exactly."""
        return f"{self.instruction}\n{self.input}" if self.input else self.instruction


@dataclass
class ReadReport:
    path: str
    format: str  # "JSON array" or "JSONL"
    sha256: str  # of the file's bytes, for the run's provenance
    records: int  # records returned
    duplicates: int  # records that repeat an earlier one
    dropped: int  # duplicates removed (0 with drop_duplicates=False)
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


def read_records(path: str | Path, *, drop_duplicates: bool = True) -> tuple[list[Record], ReadReport]:
    """Read every record of an alpaca JSON array or JSONL file; raise one UserError listing every
    problem found. See the module docstring for what is accepted and what is rejected."""
    path = Path(path)
    raw = _read_bytes(path)
    text, warnings = _decode(raw, path)

    # ---- structure: JSON array or JSONL -----------------------------------------------------
    problems: list[_Problem] = []
    first = text.lstrip(_JSON_WS)[:1]
    if first == "[":
        fmt, values = "JSON array", _walk_array(text, problems)
    elif first == "{":
        _check_jsonl_shape(text, path)
        fmt, values = "JSONL", _parse_lines(text, problems)
    else:
        raise _not_records(text, path)

    # ---- records ----------------------------------------------------------------------------
    unknown: dict[str, list[str]] = {}  # unknown field -> locations, so that one warning names it
    records = []
    for value, loc in values:
        record = _check_record(value, loc, path, problems, unknown)
        if record is not None:
            records.append(record)
    if problems:
        # In file order: a syntax error is found before the record checks of the lines above it.
        problems.sort(key=lambda p: int(re.match(r"line (\d+)", p.loc)[1]))
        raise _combined(problems, path)
    if not records:
        raise UserError("the array holds no records", where=str(path),
                        fix='put the records inside the brackets: [{"instruction": ..., "output": ...}, ...]')
    for key, locs in unknown.items():
        near = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.6)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        warnings.append(f"unknown field '{key}' in {len(locs):,} record(s), first at {locs[0]}: ignored{hint}")

    # ---- duplicates: keep the first of each ---------------------------------------------------
    first_seen: dict[tuple, Record] = {}
    repeats: list[tuple[Record, Record]] = []  # (repeat, the record it repeats)
    for r in records:
        key = (r.instruction, r.input, r.output, r.system)
        if key in first_seen:
            repeats.append((r, first_seen[key]))
        else:
            first_seen[key] = r
    if repeats:
        repeat, original = repeats[0]
        fate = "dropped (the first of each kept)" if drop_duplicates else "kept (drop_duplicates=False)"
        warnings.append(f"{len(repeats):,} duplicate record(s) {fate}; the first repeat is {repeat.where}, "
                        f"same as {original.where}")
        if drop_duplicates:
            records = list(first_seen.values())

    report = ReadReport(path=str(path), format=fmt, sha256=hashlib.sha256(raw).hexdigest(),
                        records=len(records), duplicates=len(repeats),
                        dropped=len(repeats) if drop_duplicates else 0, warnings=warnings)
    return records, report


def summarise(report: ReadReport) -> str:
    """A few lines for the dataset stage to print."""
    lines = [f"read {report.records:,} records from {report.path} ({report.format}, sha256 {report.sha256[:12]}); "
             f"{report.dropped:,} duplicate(s) dropped"]
    lines += [f"WARNING: {w}" for w in report.warnings]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# file level: these stop at the first problem


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise UserError(f"dataset file {path} does not exist", fix=(
            "set data.path in the config or pass DATA=path/to/file.json; `make dataset` downloads the "
            "tutorial's huanhuan.json"))
    if not path.is_file():
        raise UserError(f"dataset path {path} is not a file", fix="point data.path at a .json or .jsonl file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"dataset file {path} cannot be read ({e.strerror})",
                        fix="check its permissions") from e
    if not raw:
        raise UserError("the file is empty (0 bytes)", where=str(path),
                        fix="write the records into it; an interrupted download leaves an empty file, "
                            "so download it again")
    if not raw.strip():
        raise UserError(f"the file contains only whitespace ({len(raw):,} bytes)", where=str(path),
                        fix="write the records into it")
    return raw


def _decode(raw: bytes, path: Path) -> tuple[str, list[str]]:
    """UTF-8 without BOM; returns the text and the warnings (CRLF)."""
    if raw.startswith(codecs.BOM_UTF8):
        raise UserError(
            "the file starts with a UTF-8 byte-order mark (bytes EF BB BF), which JSON does not allow",
            where=f"{path}:line 1",
            fix=f"save it as UTF-8 without BOM, or strip the mark: sed -i '1s/^\\xEF\\xBB\\xBF//' {path}")
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise UserError(
            "the file is UTF-16 (it starts with a UTF-16 byte-order mark), not UTF-8; "
            "Windows PowerShell's `>` and Out-File write UTF-16",
            where=f"{path}:line 1", fix=f"convert it: iconv -f UTF-16 -t UTF-8 {path} > {path}.utf8")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        bad = raw[e.start:e.start + 4].hex(" ").upper()
        fix = f"save it as UTF-8, e.g. iconv -f <its encoding> -t UTF-8 {path} > {path}.utf8"
        try:
            raw.decode("gb18030")
            fix = (f"it decodes as GB18030/GBK, so it was probably saved in that encoding (common for Chinese "
                   f"text): convert it with "
                   f"iconv -f GB18030 -t UTF-8 {path} > {path}.utf8")
        except UnicodeDecodeError:
            pass
        raise UserError(f"not valid UTF-8 at byte offset {e.start:,} (bytes {bad}: {e.reason})",
                        where=f"{path}:line {line}", fix=fix) from e

    crlf = text.count("\r\n")
    if text.count("\r") > crlf:
        lone = re.search("\r(?!\n)", text).start()
        line = text.count("\n", 0, lone) + 1
        raise UserError(
            "a carriage return (CR) not followed by a line feed: the file uses classic Mac (CR) or mixed "
            "line endings",
            where=f"{path}:line {line}",
            fix=f"convert the line endings to LF: sed -i 's/\\r$//; s/\\r/\\n/g' {path}")
    warnings = []
    if crlf:
        warnings.append(f"{crlf:,} line(s) end in CRLF (Windows); accepted: CR is JSON whitespace, "
                        "so the records are the same as with LF")
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
    holders = [k for k, v in value.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
    if last_line > first_line and not alone:
        raise UserError(
            f"the first record spans lines {first_line}-{last_line}: the file holds pretty-printed JSON objects "
            "one after another, which is not JSONL (one object per line) and not a JSON array",
            where=f"{path}:line {first_line}",
            fix=f"write one record per line, e.g. jq -c . {path} > records.jsonl, or put the records in an array")
    if alone and (last_line > first_line or (holders and "instruction" not in value)):
        held = f", whose field '{holders[0]}' holds a list of objects" if holders else ""
        raise UserError(
            f"the top level is a JSON object{held}; expected an array of records or JSONL (one object per line)",
            where=f"{path}:line {first_line}",
            fix=("write the records as a top-level array [{...}, {...}]" +
                 (f", e.g. the list under '{holders[0]}'" if holders else ", e.g. wrap a single record in [ ]") +
                 ", or as JSONL with each record on one line"))


def _not_records(text: str, path: Path) -> UserError:
    """The error for a file that starts with neither '[' nor '{'."""
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as e:
        p = _syntax_problem(e)
        return UserError(f"neither a JSON array nor JSONL: {p.what}", where=f"{path}:{p.loc}",
                         fix='alpaca data is a JSON array [{"instruction": ..., "output": ...}, ...] '
                             "or JSONL, one such object per line")
    return UserError(
        f"the top level is {_kind(value)}; expected an array of records or JSONL (one object per line)",
        where=f"{path}:line 1", fix='write the records as [{"instruction": ..., "input": "", "output": ...}, ...]')


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
                if e.msg.startswith("Unterminated string") or not text[e.pos:].strip(_JSON_WS):
                    problem = problem._replace(
                        what=problem.what + "; the file ends inside this record (truncated?)",
                        fix="download or export the file again")
                problems.append(problem)
                return values
            values.append((value, f"line {line(start)}, record #{n}"))
            pos = skip_ws(pos)
            sep = text[pos:pos + 1]
            if sep == ",":
                after = skip_ws(pos + 1)
                if text.startswith("]", after):
                    problems.append(_Problem(f"line {line(pos)}", f"a comma after the last record (#{n}), "
                                             "which JSON does not allow", "delete that comma"))
                    return values
                pos = after
            elif sep == "]":
                pos += 1
                break
            elif sep == "":
                problems.append(_Problem(f"line {line(pos)}", f"the array is not closed: the file ends after "
                                         f"record #{n} without ']' (is it truncated?)",
                                         "add the closing ']' or download the file again"))
                return values
            elif sep in "{[":
                problems.append(_Problem(f"line {line(pos)}", f"no comma between record #{n} and the next "
                                         "record", "separate the records in an array with commas"))
                return values
            else:
                problems.append(_Problem(f"line {line(pos)}", f"expected ',' or ']' after record #{n}, "
                                         f"found {_snippet(text, pos)}", _SYNTAX_FIX))
                return values

    rest = skip_ws(pos)
    if rest < len(text):
        if text[rest] in "{[":
            what = ("more JSON follows the array that ends on line "
                    f"{line(pos - 1)}: the file mixes a JSON array with JSONL lines (or holds two arrays)")
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
            problems.append(_Problem(f"line {n}", "is a JSON array, not one object: the file mixes JSONL with "
                                     "a JSON array", "use one format: JSONL (one object per line) or one array"))
            continue
        values.append((value, f"line {n}"))
    return values


def _line_problem(e: json.JSONDecodeError, line: str, n: int) -> _Problem:
    """A JSONL line that does not parse, with the likeliest cause when there is a clear one."""
    body = line.strip(_JSON_WS)
    if line.startswith("\ufeff"):
        return _Problem(f"line {n}", "starts with a UTF-8 byte-order mark (were files with BOMs concatenated?)",
                        "strip the marks: sed -i 's/\\xEF\\xBB\\xBF//g' <file>")
    if body[:1] in "[]":
        return _Problem(f"line {n}", f"starts a JSON array ({body[:20]!r}) among JSONL lines: the file mixes "
                        "JSONL with a JSON array", "use one format: JSONL (one object per line) or one array")
    if e.pos >= len(line.rstrip(_JSON_WS)) or e.msg.startswith("Unterminated string"):
        return _Problem(f"line {n}", f"the line ends before its JSON object is complete ({_msg(e)}, near "
                        f"{_snippet(line, e.pos)}); in JSONL each record must be on one line",
                        "write each record on a single line, e.g. with json.dumps(record, ensure_ascii=False); "
                        "if this is the last line, the file may be truncated")
    return _syntax_problem(e, line=n)


# ---------------------------------------------------------------------------------------------
# records


def _check_record(value: Any, loc: str, path: Path, problems: list[_Problem],
                  unknown: dict[str, list[str]]) -> Record | None:
    """A Record, or None after adding every problem of this record to `problems`."""
    if not isinstance(value, dict):
        problems.append(_Problem(loc, f"the record is {_kind(value)}, not an object",
                                 'write each record as {"instruction": ..., "input": "", "output": ...}'))
        return None
    found = [_Problem(f"{loc}, field '{k}'", "appears twice in the record; JSON keeps only the last one",
                      "keep one of them") for k in value.repeated]
    extra = [k for k in value if k not in FIELDS]
    found += [_missing(name, value, loc, extra) for name in REQUIRED if name not in value]
    for name in FIELDS:
        v = value.get(name)
        if name not in value or (v is None and name in OPTIONAL):
            continue  # absent (a missing required field is reported above) or an optional null
        floc = f"{loc}, field '{name}'"
        if not isinstance(v, str):
            or_null = " or null" if name in OPTIONAL else ""
            found.append(_Problem(floc, f"is {_kind(v)}, expected a string",
                                  f"write it as a JSON string in double quotes{or_null}"))
        elif name in REQUIRED and not v.strip():
            found.append(_Problem(floc, "is empty" if not v else f"is only whitespace ({v[:20]!r})",
                                  "write the text, or delete the record"))
        elif m := _BAD_CHARS.search(v):
            found.append(_bad_char(v, m, floc))
    for k in extra:
        unknown.setdefault(k, []).append(f"{path}:{loc}")
    if found:
        problems += found
        return None
    return Record(instruction=value["instruction"], input=value.get("input") or "", output=value["output"],
                  system=value.get("system"), where=f"{path}:{loc}")


def _missing(name: str, value: dict, loc: str, extra: list[str]) -> _Problem:
    renames = [k for k in extra if k.lower() in _ALIASES[name] or difflib.get_close_matches(name, [k], cutoff=0.6)]
    if renames:
        fix = f"rename '{renames[0]}' to '{name}'"
    elif any(k in value for k in _CHAT_KEYS):
        fix = ("this is a chat (ShareGPT / messages) record; convert it to alpaca: the user's turn as "
               "'instruction', the assistant's reply as 'output'")
    else:
        fix = f"add '{name}' (every record needs 'instruction' and 'output')"
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
    return _Problem(f"line {line or e.lineno}, column {e.colno}",
                    f"invalid JSON{ctx}: {_msg(e)}, near {_snippet(e.doc, e.pos)}", fix)


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
