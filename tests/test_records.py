"""records.py: the malformed-input corpus (each file must give its own UserError), the real dataset,
JSON/JSONL equivalence, duplicates, and a seeded fuzz run over truncations and byte flips."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from hunyuan_lora.errors import UserError
from hunyuan_lora.records import MAX_SHOWN, Record, Turn, read_records, summarise

HUANHUAN = Path("/work/shared/data/huanhuan.json")  # the shared copy; never copied into the repo

OK = '{"instruction": "你是谁？", "input": "", "output": "家父是大理寺少卿甄远道。"}'
OK2 = '{"instruction": "hi", "output": "there"}'


def array(*lines: str) -> bytes:
    """A JSON array with '[' on line 1 and one record per line from line 2 on."""
    return ("[\n" + ",\n".join(lines) + "\n]\n").encode()


def jsonl(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n").encode()


# (file name, bytes, fragments the message must contain). The file name is always checked as well.
CORPUS: list[tuple[str, bytes | None, list[str]]] = [
    # --- file level
    ("gzip.json", gzip.compress(array(OK)), ["gzip-compressed", "1F 8B", "gunzip -c"]),
    ("zip.json", b"PK\x03\x04" + bytes(40), ["zip-compressed", "unzip"]),
    ("nested.json", b"[" * 100_000, ["nested deeper than Python's JSON reader can follow"]),
    ("nested_record.jsonl", b'{"instruction": ' + b"[" * 100_000 + b"\n", ["nested deeper"]),
    ("missing.json", None, ["does not exist", "make dataset"]),
    ("empty.json", b"", ["empty (0 bytes)"]),
    ("blank.json", b"  \n\t\n", ["only whitespace"]),
    ("bom.json", b"\xef\xbb\xbf" + array(OK), ["byte-order mark", "EF BB BF", ":line 1", "sed -i"]),
    ("utf16.json", array(OK).decode().encode("utf-16"), ["UTF-16", "iconv -f UTF-16"]),
    ("gbk.json", array(OK2, OK).decode().encode("gbk"), ["not valid UTF-8", "byte offset 61", ":line 3", "GB18030"]),
    (
        "bad_utf8.jsonl",
        jsonl(OK2, OK2) + b'{"instruction": "a\xff", "output": "b"}\n',
        ["not valid UTF-8 at byte offset 100", "FF", ":line 3"],
    ),
    ("cr_only.json", array(OK2, OK2).replace(b"\n", b"\r"), ["carriage return", "classic Mac", ":line 1"]),
    (
        "yaml.json",
        b"instruction: hi\noutput: there\n",
        ["neither a JSON array nor JSONL", "line 1, column 1", "<HERE>instruction"],
    ),
    ("csv.jsonl", b"instruction,output\nhi,there\n", ["neither a JSON array nor JSONL", "line 1, column 1"]),
    (
        "object.json",
        b'{\n  "instruction": "hi",\n  "output": "there"\n}\n',
        ["top level is a JSON object", ":line 1", "wrap a single record in [ ]"],
    ),
    ("wrapper.json", b'{"data": [' + OK2.encode() + b"]}\n", ["field 'data' holds a list", "top level"]),
    ("string.json", b'"just a string"\n', ["top level is a string", "'just a string'"]),
    ("number.json", b"42\n", ["top level is a number (42)"]),
    ("empty_array.json", b"[ ]\n", ["holds no records"]),
    # --- JSON array structure
    ("trailing_comma.json", array(OK2, OK2 + ","), [":line 3", "comma after the last record (#2)"]),
    ("no_comma.json", b"[\n" + OK2.encode() + b"\n" + OK2.encode() + b"\n]", [":line 3", "no comma between record #1"]),
    ("unclosed.json", b"[\n" + OK2.encode() + b",\n" + OK2.encode() + b"\n", ["not closed", "record #2", "truncated"]),
    ("garbage.json", array(OK2) + b"oops\n", [":line 4", "text after the end of the array (line 3)", "'<HERE>oops'"]),
    ("array_then_jsonl.json", array(OK2) + jsonl(OK2), [":line 4", "mixes a JSON array with JSONL"]),
    (
        "python_repr.json",
        b"[\n{'instruction': 'hi', 'output': 'there'}\n]\n",
        ["line 2, column 2", "in record #1", "double quotes"],
    ),
    (
        "syntax_mid.json",
        array(OK2, OK2, '{"instruction": "x" "output": "y"}'),
        ["line 4, column 21", "in record #3", "Expecting ',' delimiter"],
    ),
    (
        "raw_control.json",
        array(OK2, '{"instruction": "a\tb", "output": "y"}'),
        ["line 3, column 19", "Invalid control character", "escape it"],
    ),
    ("truncated.json", array(OK2, OK2)[:60], ["line 3, column 17", "in record #2", "Expecting value", "truncated"]),
    ("truncated_string.json", array(OK2, OK2)[:63], ["line 3, column 17", "Unterminated string, near", "truncated"]),
    # --- JSONL structure
    (
        "bad_line.jsonl",
        jsonl(OK2, OK2, '{"instruction": "x", output: "y"}'),
        [":line 3, column 22", "invalid JSON", "double quotes"],
    ),
    ("comma_lines.jsonl", jsonl(OK2 + ",", OK2), [":line 1", "Extra data", "one JSON object on each line"]),
    (
        "pretty.jsonl",
        b'{\n "instruction": "a",\n "output": "b"\n}\n{\n "instruction": "c",\n "output": "d"\n}\n',
        [":line 1", "the first record spans lines 1-4", "pretty-printed", "jq -c ."],
    ),
    ("truncated.jsonl", jsonl(OK2, OK2)[:-8], [":line 2", "ends before its JSON object is complete", "truncated"]),
    ("jsonl_then_array.jsonl", jsonl(OK2, "[", OK2, "]"), ["line 2: starts a JSON array", "mixes JSONL"]),
    ("array_line.jsonl", jsonl(OK2, "[" + OK2 + "]"), [":line 2", "is a JSON array, not one object"]),
    (
        "concatenated_bom.jsonl",
        jsonl(OK2, OK2) + b"\xef\xbb\xbf" + jsonl(OK2),
        [":line 3", "byte-order mark", "concatenated"],
    ),
    # --- records
    ("not_object.json", array(OK2, '"just text"'), ["line 3, record #2", "record is a string ('just text')"]),
    ("string_line.jsonl", jsonl(OK2, '"x"'), [":line 2", "record is a string ('x')"]),
    (
        "no_instruction.json",
        array('{"output": "y"}'),
        ["line 2, record #1, field 'instruction'", "is missing", "the record has: output"],
    ),
    ("no_output.jsonl", jsonl(OK2, '{"instruction": "x"}'), [":line 2, field 'output'", "is missing", "add 'output'"]),
    ("typo.json", array('{"instruction": "x", "ouput": "y"}'), ["field 'output'", "rename 'ouput' to 'output'"]),
    (
        "alias.jsonl",
        jsonl('{"prompt": "x", "response": "y"}'),
        [
            "2 problems",
            "line 1, field 'instruction'",
            "rename 'prompt' to 'instruction'",
            "rename 'response' to 'output'",
        ],
    ),
    (
        "sharegpt_no_answer.json",
        array('{"conversations": [{"from": "human", "value": "x"}]}'),
        ["record #1, field 'conversations', turn #1", "ends with the user's turn", "add the assistant's reply"],
    ),
    (
        "instruction_number.json",
        array('{"instruction": 42, "output": "y"}'),
        ["record #1, field 'instruction'", "is a number (42), expected a string"],
    ),
    (
        "output_list.jsonl",
        jsonl('{"instruction": "x", "output": ["a", "b"]}'),
        [":line 1, field 'output'", "is an array of 2 item(s)"],
    ),
    (
        "input_bool.json",
        array(OK2, '{"instruction": "x", "input": false, "output": "y"}'),
        ["line 3, record #2, field 'input'", "a boolean (false)", "or null"],
    ),
    (
        "system_number.jsonl",
        jsonl('{"instruction": "x", "output": "y", "system": 1}'),
        ["field 'system'", "is a number (1)"],
    ),
    ("nan_output.json", array('{"instruction": "x", "output": NaN}'), ["field 'output'", "a number (nan)"]),
    (
        "empty_output.json",
        array(OK2, OK2, '{"instruction": "x", "output": ""}'),
        ["line 4, record #3, field 'output'", "is empty", "delete the record"],
    ),
    (
        "blank_output.jsonl",
        jsonl('{"instruction": "x", "output": " \\n "}'),
        [":line 1, field 'output'", "is only whitespace"],
    ),
    (
        "empty_instruction.json",
        array('{"instruction": "", "output": "y"}'),
        ["record #1, field 'instruction'", "is empty"],
    ),
    ("nul.json", array('{"instruction": "x", "output": "ab\\u0000c"}'), ["field 'output'", "U+0000 at character 3"]),
    (
        "cr_in_text.jsonl",
        jsonl('{"instruction": "x", "output": "a\\r\\nb\\r\\nc"}'),
        ["field 'output'", "U+000D", "2 such characters", "replace \\r\\n with \\n"],
    ),
    ("c1_control.json", array('{"instruction": "x\\u0085", "output": "y"}'), ["field 'instruction'", "U+0085"]),
    ("surrogate.json", array('{"instruction": "x", "output": "\\ud83d"}'), ["field 'output'", "lone surrogate U+D83D"]),
    (
        "repeated_key.json",
        array('{"instruction": "x", "output": "y", "output": "z"}'),
        ["record #1, field 'output'", "appears twice"],
    ),
    (
        "many.json",
        array(*['{"instruction": "x", "output": ""}'] * 25),
        ["25 problems", "line 2, record #1, field 'output'", f"record #{MAX_SHOWN}, field", "and 15 more"],
    ),
    (
        "mixed.jsonl",
        jsonl(OK2, '{"instruction": 1, "output": "y"}', "{bad", '{"instruction": "x"}'),
        [
            "3 problems: line 2, field 'instruction': is a number",
            "; line 3, column 2: invalid JSON",
            "; line 4, field 'output': is missing",
        ],
    ),
    # --- conversations: alpaca history, OpenAI messages, ShareGPT
    (
        "history_not_list.json",
        array('{"instruction": "x", "output": "y", "history": "a"}'),
        ["record #1, field 'history'", "a string ('a')", "[user, assistant] pairs"],
    ),
    (
        "history_pair.jsonl",
        jsonl('{"instruction": "x", "output": "y", "history": [["q", "a"], ["q"]]}'),
        [":line 1, field 'history', pair #2", "an array of 1 item(s)", '["question", "answer"]'],
    ),
    (
        "history_blank.jsonl",
        jsonl('{"instruction": "x", "output": "y", "history": [["q", " "]]}'),
        ["field 'history', pair #1 (assistant turn)", "only whitespace"],
    ),
    (
        "messages_empty.jsonl",
        jsonl('{"messages": []}'),
        [":line 1, field 'messages'", "is an empty list", '"role": "user"'],
    ),
    (
        "messages_role.jsonl",
        jsonl('{"messages": [{"role": "human", "content": "x"}, {"role": "assistant", "content": "y"}]}'),
        [
            "field 'messages', turn #1, field 'role'",
            "expected one of system/user/assistant",
            "'human' is the ShareGPT conversations name",
        ],
    ),
    (
        "messages_order.jsonl",
        jsonl(
            '{"messages": [{"role": "user", "content": "x"}, '
            '{"role": "user", "content": "y"}, {"role": "assistant", "content": "z"}]}'
        ),
        ["turn #2", "'user' turn where a 'assistant' turn belongs", "alternate"],
    ),
    (
        "messages_late_system.jsonl",
        jsonl(
            '{"messages": [{"role": "user", "content": "x"}, {"role": "system", '
            '"content": "s"}, {"role": "assistant", "content": "z"}]}'
        ),
        ["turn #2", "system turn after turn #1", "put the system prompt first"],
    ),
    (
        "messages_no_answer.json",
        array(
            '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", '
            '"content": "y"}, {"role": "user", "content": "z"}]}'
        ),
        ["record #1, field 'messages', turn #3", "ends with the user's turn"],
    ),
    (
        "messages_parts.jsonl",
        jsonl(
            '{"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}, '
            '{"role": "assistant", "content": "y"}]}'
        ),
        ["turn #1, field 'content'", "content parts", "join the text parts"],
    ),
    (
        "messages_tool.jsonl",
        jsonl('{"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]}'),
        ["turn #2", "tool / function turn", "not supported"],
    ),
    (
        "messages_sharegpt_keys.jsonl",
        jsonl('{"messages": [{"from": "human", "value": "x"}]}'),
        ["turn #1", "has no 'role'", "written as ShareGPT conversations"],
    ),
    (
        "messages_blank_answer.jsonl",
        jsonl('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}'),
        ["turn #2, field 'content'", "is empty"],
    ),
    (
        "think_unclosed.jsonl",
        jsonl(
            '{"messages": [{"role": "user", "content": "x"}, '
            '{"role": "assistant", "content": "<think>\\nhmm\\nthe answer"}]}'
        ),
        ["turn #2, field 'content'", "never closed", "</think>"],
    ),
    (
        "think_late.json",
        array('{"instruction": "x", "output": "ok</think>y"}'),
        ["field 'output'", "does not start with <think>"],
    ),
    (
        "sharegpt_role.json",
        array('{"conversations": [{"from": "user", "value": "x"}, {"from": "gpt", "value": "y"}]}'),
        [
            "turn #1, field 'from'",
            "expected one of system/human/gpt",
            "write 'human'",
            "'user' is the OpenAI messages name",
        ],
    ),
    (
        "sharegpt_two_systems.json",
        array(
            '{"system": "a", "conversations": [{"from": "system", "value": "b"}, '
            '{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}'
        ),
        ["turn #1", "so does the record's field 'system'", "keep one"],
    ),
    (
        "mixed_formats.jsonl",
        jsonl(OK2, '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}'),
        [":line 2", "is a OpenAI messages record", "first record (line 1) is alpaca", "one format per file"],
    ),
    (
        "after_problems.json",
        array('{"instruction": "", "output": "y"}', '{"instruction": "x" "output": "y"}'),
        ["2 problems: line 2, record #1, field 'instruction': is empty; line 3, column 21: invalid JSON in record #2"],
    ),
]


def _write(tmp_path: Path, name: str, content: bytes | None) -> Path:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    return path


def test_corpus_is_large_and_names_are_unique():
    assert len(CORPUS) >= 35
    assert len({name for name, _, _ in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize(("name", "content", "fragments"), CORPUS, ids=[c[0] for c in CORPUS])
def test_malformed_file_gives_its_own_user_error(tmp_path, name, content, fragments):
    path = _write(tmp_path, name, content)
    with pytest.raises(UserError) as info:
        read_records(path)
    message = info.value.paragraph()
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert info.value.fix  # every error says how to fix it


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(UserError, match="is not a file"):
        read_records(tmp_path)


def test_a_compressed_file_is_named_as_such_not_as_another_encoding(tmp_path):
    """A gzip file named .json was taken for GBK text: the fix suggested iconv."""
    path = _write(tmp_path, "data.json", gzip.compress(array(OK)))
    with pytest.raises(UserError) as info:
        read_records(path)
    assert "iconv" not in str(info.value)
    assert "GB18030" not in str(info.value)


@pytest.mark.parametrize(
    "name", ["missing.json", "gbk.json", "many.json", "mixed.jsonl", "surrogate.json", "nested.json", "gzip.json"]
)
def test_script_wrapper_exits_2_without_traceback(tmp_path, name):
    _, content, fragments = next(c for c in CORPUS if c[0] == name)
    path = _write(tmp_path, name, content)
    code = (
        "import sys; from hunyuan_lora.errors import exit_on_user_error; "
        "from hunyuan_lora.records import read_records; exit_on_user_error(read_records)(sys.argv[1])"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ")
    assert fragments[0] in " ".join(proc.stderr.split())  # the wrapper re-wraps lines at 100 columns


# ---------------------------------------------------------------------------------------------
# valid files


@pytest.mark.skipif(not HUANHUAN.is_file(), reason="shared/data/huanhuan.json not present")
def test_real_dataset():
    records, report = read_records(HUANHUAN, drop_duplicates=False)
    assert len(records) == report.records == 3729  # what the tutorial trained on (233 steps of 16)
    assert report.format == "JSON array"
    assert report.duplicates == 112
    assert report.dropped == 0
    assert all(len(r.turns) == 2 and r.turns[0].content.strip() and r.answer.strip() for r in records)
    assert all(r.system is None for r in records)
    assert records[0].where == f"{HUANHUAN}:line 2, record #1"
    assert records[2].where == f"{HUANHUAN}:line 12, record #3"  # 4-space pretty print: 5 lines a record
    raw = json.loads(HUANHUAN.read_text(encoding="utf-8"))[0]
    # the tutorial's text exactly
    assert records[0].turns == (Turn("user", raw["instruction"]), Turn("assistant", raw["output"]))

    deduped, report = read_records(HUANHUAN)
    assert len(deduped) == report.records == 3729 - 112
    assert report.dropped == 112
    assert "112 duplicate record(s) dropped" in summarise(report)


@pytest.mark.skipif(not HUANHUAN.is_file(), reason="shared/data/huanhuan.json not present")
def test_real_dataset_as_jsonl_gives_the_same_records(tmp_path):
    data = json.loads(HUANHUAN.read_text(encoding="utf-8"))
    path = tmp_path / "huanhuan.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data), encoding="utf-8")
    from_json, _ = read_records(HUANHUAN, drop_duplicates=False)
    from_jsonl, report = read_records(path, drop_duplicates=False)
    assert report.format == "JSONL"
    assert [_fields(r) for r in from_jsonl] == [_fields(r) for r in from_json]
    assert from_jsonl[2].where == f"{path}:line 3"


SMALL = [
    {"instruction": "你是谁？", "input": "", "output": "家父是大理寺少卿甄远道。"},
    {"instruction": "Translate:", "input": "Hello", "output": "Bonjour", "system": "You translate."},
    {"instruction": "no input field", "output": "fine"},
    {"instruction": "nulls", "input": None, "output": "ok", "system": None},
]


def _fields(r: Record) -> tuple:
    """(user, answer, system) of a one-turn record."""
    user, answer = r.turns
    assert (user.role, answer.role) == ("user", "assistant")
    return user.content, answer.content, r.system


def test_json_jsonl_and_crlf_give_identical_records(tmp_path):
    as_json = tmp_path / "small.json"
    as_json.write_text(json.dumps(SMALL, ensure_ascii=False, indent=2), encoding="utf-8")
    as_jsonl = tmp_path / "small.jsonl"
    as_jsonl.write_text("\n\n".join(json.dumps(r, ensure_ascii=False) for r in SMALL) + "\n", encoding="utf-8")
    crlf = tmp_path / "small_crlf.jsonl"
    crlf.write_bytes(as_jsonl.read_bytes().replace(b"\n", b"\r\n"))

    records, report = read_records(as_json)
    assert report.warnings == []
    assert [_fields(r) for r in records] == [
        ("你是谁？", "家父是大理寺少卿甄远道。", None),
        ("Translate:\nHello", "Bonjour", "You translate."),  # input on its own line after the instruction
        ("no input field", "fine", None),
        ("nulls", "ok", None),
    ]
    for other in (as_jsonl, crlf):
        assert [_fields(r) for r in read_records(other)[0]] == [_fields(r) for r in records]
    jsonl_records, _ = read_records(as_jsonl)
    # blank lines are skipped but counted
    assert [r.where for r in jsonl_records] == [f"{as_jsonl}:line {n}" for n in (1, 3, 5, 7)]
    crlf_report = read_records(crlf)[1]
    assert any("CRLF" in w for w in crlf_report.warnings)
    assert "WARNING: 7 line(s) end in CRLF" in summarise(crlf_report)


def test_duplicates_are_counted_and_the_first_kept(tmp_path):
    a = {"instruction": "a", "output": "1"}
    b = {"instruction": "b", "output": "2"}
    a_system = {**a, "system": "s"}  # a different system prompt: not a duplicate
    a_input = {**a, "input": ""}  # an explicit empty input is the same record as no input
    path = tmp_path / "dups.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [a, b, a, a_system, b, a_input]), encoding="utf-8")

    records, report = read_records(path)
    assert [_fields(r) for r in records] == [("a", "1", None), ("b", "2", None), ("a", "1", "s")]
    assert [r.where for r in records] == [f"{path}:line 1", f"{path}:line 2", f"{path}:line 4"]
    assert (report.records, report.duplicates, report.dropped) == (3, 3, 3)
    assert f"first repeat is {path}:line 3, same as {path}:line 1" in report.warnings[0]

    kept, report = read_records(path, drop_duplicates=False)
    assert len(kept) == 6
    assert (report.duplicates, report.dropped) == (3, 0)


def test_unknown_fields_warn_once_per_field(tmp_path):
    path = tmp_path / "extra.json"
    path.write_text(json.dumps([{**r, "histroy": [], "inputs": "x"} for r in SMALL[:3]]), encoding="utf-8")
    records, report = read_records(path)
    assert len(records) == 3
    assert report.warnings == [
        f"unknown field 'histroy' in 3 record(s), first at {path}:line 1, record #1: ignored (did you mean 'history'?)",
        f"unknown field 'inputs' in 3 record(s), first at {path}:line 1, record #1: ignored (did you mean 'input'?)",
    ]


CONVERSATION = [
    ("system", "你是甄嬛"),
    ("user", "你是谁？"),
    ("assistant", "<think>\n想一想\n</think>\n臣妾甄嬛。"),
    ("user", "你父亲是谁？"),
    ("assistant", "家父是大理寺少卿甄远道。"),
]


def test_the_three_formats_give_the_same_conversation(tmp_path):
    alpaca = {
        "instruction": "你父亲是谁？",
        "output": CONVERSATION[4][1],
        "system": CONVERSATION[0][1],
        "history": [[CONVERSATION[1][1], CONVERSATION[2][1]]],
    }
    messages = {"messages": [{"role": r, "content": c} for r, c in CONVERSATION]}
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = {
        "conversations": [{"from": names[r], "value": c} for r, c in CONVERSATION[1:]],
        "system": CONVERSATION[0][1],
    }
    seen = []
    for name, record, schema in [
        ("a.json", alpaca, "alpaca"),
        ("m.jsonl", messages, "OpenAI messages"),
        ("s.json", sharegpt, "ShareGPT conversations"),
    ]:
        path = tmp_path / name
        body = json.dumps(record, ensure_ascii=False)
        path.write_text(body + "\n" if name.endswith("l") else f"[{body}]", encoding="utf-8")
        records, report = read_records(path)
        assert report.schema == schema
        assert report.multi_turn == 1
        assert report.reasoning == 1
        assert f"({schema}, " in summarise(report)
        seen.append((records[0].system, records[0].turns))
    assert seen[0] == seen[1] == seen[2]
    assert seen[0] == ("你是甄嬛", tuple(Turn(r, c) for r, c in CONVERSATION[1:]))


def test_prompts_may_end_with_the_user_only_when_asked(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        '{"instruction": "翻译", "input": "你好"}\n{"messages": [{"role": "user", "content": "x"}]}\n', encoding="utf-8"
    )
    with pytest.raises(UserError, match="one format per file"):
        read_records(path, require_answer=False)
    path.write_text('{"instruction": "翻译", "input": "你好"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="field 'output'.*is missing"):
        read_records(path)
    records, _ = read_records(path, require_answer=False)
    assert records[0].turns == (Turn("user", "翻译\n你好"),)
    assert records[0].answer is None


# ---------------------------------------------------------------------------------------------
# fuzz: damaged files give a UserError or valid records, never anything else


def test_truncations_and_byte_flips_never_crash(tmp_path):
    rng = random.Random(1234)
    sources = [
        json.dumps(SMALL, ensure_ascii=False, indent=2).encode(),
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in SMALL).encode(),
    ]
    outcomes = {"records": 0, "user_error": 0}
    for case in range(200):
        data = bytearray(rng.choice(sources))
        kind = case % 4
        if kind == 0:
            data = data[: rng.randrange(len(data))]
        elif kind == 1:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 2:
            data.insert(rng.randrange(len(data)), rng.choice(b'[]{}",:\\\n\r \x00\xe4\xff'))
        else:
            del data[rng.randrange(len(data))]
        path = tmp_path / f"fuzz{case}.json"
        path.write_bytes(bytes(data))
        try:
            records, _ = read_records(path)
        except UserError as e:
            assert str(path) in e.paragraph(), e.paragraph()  # noqa: PT017 (a fuzz case parses or is refused)
            outcomes["user_error"] += 1
        else:
            assert records
            assert all(isinstance(r, Record) and r.turns[0].content.strip() and r.answer.strip() for r in records)
            outcomes["records"] += 1
    assert min(outcomes.values()) > 10, outcomes  # both paths are exercised
