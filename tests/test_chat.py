"""make chat in a real pseudo-terminal (pexpect): streamed answers that are the training prompt's
greedy answers, history, /think /base /adapter /reset /exit, and Ctrl-C stopping an answer only."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from hunyuan_lora import generation, modeling, prompt, runtime
from hunyuan_lora.records import Record, Turn

REPO = Path(__file__).resolve().parents[1]
pexpect = pytest.importorskip("pexpect")


def _spawn(cfg, tmp_path, settings: str):
    env = {
        **os.environ,
        "HL_CONFIG": str(REPO / "configs/demo.yaml"),
        "HL_MODEL_DIR": cfg.model.dir,
        "HL_OUTPUT_DIR": str(tmp_path / "run"),
        "HL_SET": f"infer.adapter={cfg.output_dir / 'adapter'} chat.do_sample=false {settings}",
    }
    child = pexpect.spawn(
        sys.executable,
        [str(REPO / "scripts/chat.py")],
        env=env,
        cwd=str(REPO),
        encoding="utf-8",
        timeout=180,
        dimensions=(50, 400),
    )
    child.expect("thinking off")
    child.expect(">>> ")
    return child


def _say(child, line: str) -> str:
    """What the session printed in answer to `line`, up to its next prompt."""
    child.sendline(line)
    child.expect(">>> ")
    return child.before.replace("\r\n", "\n").split("\n", 1)[1]  # the echoed line first


@pytest.fixture(scope="module")
def local(lora_run):
    """The answers chat must print: base + adapter, or (base=True) a model loaded without any adapter."""
    loaded, tokenizer = modeling.load_for_generation(lora_run)
    plain = modeling.load_base_model(lora_run, runtime.placement(lora_run)).model.eval()

    def answer(messages, thinking=False, base=False):
        return generation.answer(
            plain if base else loaded.model,
            tokenizer,
            messages,
            thinking=thinking,
            sampling=generation.Sampling(max_new_tokens=8, do_sample=False),
        )

    return answer


def test_a_conversation_with_history_modes_and_commands(lora_run, tmp_path, local):
    child = _spawn(lora_run, tmp_path, "chat.max_new_tokens=8")
    first = _say(child, "你是谁？")
    second = _say(child, "你父亲是谁？")
    assert "thinking on" in _say(child, "/think")
    third = _say(child, "你喜欢什么花？")
    assert "base model (adapter off)" in _say(child, "/base")
    fourth = _say(child, "你是谁？")
    assert "conversation cleared" in _say(child, "/reset")
    assert "base model + adapter" in _say(child, "/adapter")
    fifth = _say(child, "你是谁？")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    (transcript,) = (tmp_path / "run/chat").glob("*.jsonl")
    rows = [json.loads(line) for line in transcript.read_text(encoding="utf-8").splitlines()]
    assert [(r["user"], r["thinking"], r["adapter"]) for r in rows] == [
        ("你是谁？", False, True),
        ("你父亲是谁？", False, True),
        ("你喜欢什么花？", True, True),
        ("你是谁？", True, False),
        ("你是谁？", True, True),
    ]
    replies = [r["reply"] for r in rows]
    for printed, reply in zip((first, second, third, fourth, fifth), replies):
        assert reply in printed  # streamed to the terminal as generated
    assert sum(bool(r.strip()) for r in replies) >= 3, replies

    def ask(*turns):
        return prompt.conversation(Record(system=None, turns=tuple(Turn(r, c) for r, c in turns), where="t"), lora_run)

    u1, u2, u3 = ("user", "你是谁？"), ("user", "你父亲是谁？"), ("user", "你喜欢什么花？")
    a1, a2, a3 = (("assistant", r) for r in replies[:3])
    assert replies[0] == local(ask(u1))
    assert replies[1] == local(ask(u1, a1, u2))
    assert replies[2] == local(ask(u1, a1, u2, a2, u3), thinking=True)
    assert replies[3] == local(ask(u1, a1, u2, a2, u3, a3, u1), thinking=True, base=True)
    assert replies[3] != local(ask(u1, a1, u2, a2, u3, a3, u1), thinking=True)  # /base made a difference
    assert replies[4] == local(ask(("user", "你是谁？")), thinking=True)  # after /reset: no history


def test_ctrl_c_stops_the_answer_and_the_session_goes_on(lora_run, tmp_path):
    child = _spawn(lora_run, tmp_path, "chat.max_new_tokens=4000")  # long, within the stand-in's context
    child.sendline("你是谁？")
    child.expect("你是谁？")  # the echo
    child.expect(r"\S")  # the answer has started streaming
    child.sendintr()
    child.expect(r"\[stopped: this answer is not kept\]")
    child.expect(">>> ")
    assert "thinking on" in _say(child, "/think")
    child.sendintr()  # at the prompt: a hint, not an exit
    child.expect(r"/exit or Ctrl-D leaves")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    transcripts = list((tmp_path / "run/chat").glob("*.jsonl"))
    assert all(not t.read_text(encoding="utf-8").strip() for t in transcripts)  # the stopped answer: not kept


def test_unknown_commands_are_refused_and_ctrl_c_at_the_prompt_leaves_make_chat_alone(lora_run, tmp_path):
    """Through `make chat`, as a user runs it. `/bogus` and `/` were sent to the model as prompts; and a
    Ctrl-C at the prompt reached make too, which waited for the chat and then exited 130 (Interrupt)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HL_")}
    child = pexpect.spawn(
        "make",
        [
            "--no-print-directory",
            "chat",
            "CONFIG=configs/demo.yaml",
            f"MODEL_DIR={lora_run.model.dir}",
            f"OUTPUT_DIR={tmp_path / 'run'}",
            f"SET=infer.adapter={lora_run.output_dir / 'adapter'} chat.max_new_tokens=8",
        ],
        env=env,
        cwd=str(REPO),
        encoding="utf-8",
        timeout=180,
        dimensions=(50, 400),
    )
    child.expect(">>> ")
    for line in ("/bogus", "/", "/bogus with words"):
        printed = _say(child, line)
        assert (
            f"unknown command {line.split()[0]!r}; the commands are /think /no_think /base /adapter /reset "
            "/exit" in printed
        ), printed
    child.sendintr()  # at the prompt
    child.expect(r"/exit or Ctrl-D leaves")
    child.expect(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert "Interrupt" not in child.before
    assert all(not t.read_text(encoding="utf-8").strip() for t in (tmp_path / "run/chat").glob("*.jsonl"))
