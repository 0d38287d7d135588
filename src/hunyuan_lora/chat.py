"""Stage: chat, an interactive terminal conversation with the base model + adapter (or a merged folder).

    make chat [CONFIG=...] [MODEL_DIR=<base folder, or the make merge output>]

Tokens are printed as they are generated; the conversation is kept and each turn's prompt is built
by prompt.py exactly as training builds it (the config's data.system_prompt, earlier answers as the
template renders them). Commands:
    /think  /no_think   switch thinking mode for the next answers (chat.thinking is the start)
    /base   /adapter    answer with the adapter switched off / on (not for a merged folder)
    /reset              forget the conversation        /exit (or Ctrl-D)   leave
Any other line starting with / is refused as an unknown command (a space before it sends it).
Ctrl-C while an answer is streaming stops that answer (it is not kept); the session goes on.
Every exchange is appended to <output_dir>/chat/<start time>.jsonl.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .atomic import check_writable
from .config import Config
from .generation import Completion, Sampling, generate_in_thread
from .modeling import load_for_generation
from .prompt import conversation, prompt_ids
from .records import Record, Turn

COMMANDS = ("/think", "/no_think", "/base", "/adapter", "/reset", "/exit")
HELP = " ".join(COMMANDS) + " — Ctrl-C stops an answer"


@contextlib.contextmanager
def own_terminal() -> Iterator[None]:
    """Make this process the terminal's foreground process group while the chat runs.

    The terminal sends Ctrl-C's SIGINT to its foreground group. Under `make chat` that group holds make
    too, which then waits for the chat and exits 130 ("Interrupt") however the chat went on; in a group
    of its own the chat alone gets Ctrl-C. A process that already leads its group (a shell's job, a
    pseudo-terminal's session) or has no terminal stays as it is."""
    try:
        fd = sys.stdin.fileno()
        foreground = os.tcgetpgrp(fd)
    except (OSError, ValueError):
        yield
        return
    if os.getpgrp() != foreground or os.getpgrp() == os.getpid():
        yield
        return
    os.setpgid(0, 0)
    ttou = signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # taking the terminal from a background group
    try:
        os.tcsetpgrp(fd, os.getpgrp())
        yield
    finally:
        os.tcsetpgrp(fd, foreground)
        signal.signal(signal.SIGTTOU, ttou)


def run(cfg: Config) -> Path:
    with own_terminal():
        return talk(cfg)


def talk(cfg: Config) -> Path:
    import readline  # noqa: F401  (line editing and history for input())

    transcript = cfg.output_dir / "chat" / f"{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    check_writable(transcript.parent)  # before the weights load, not at the first answer
    loaded, tokenizer = load_for_generation(cfg)
    model, adapter = loaded.model, loaded.adapter
    sampling = Sampling(max_new_tokens=cfg.chat.max_new_tokens, do_sample=cfg.chat.do_sample)
    thinking, use_adapter = cfg.chat.thinking, adapter is not None
    history: list[Turn] = []
    transcript.parent.mkdir(parents=True, exist_ok=True)
    weights = f"{cfg.model.dir} + adapter {adapter}" if adapter else f"{cfg.model.dir} (merged: adapter inside)"
    print(f"chatting with {weights}; thinking {'on' if thinking else 'off'}\n{HELP}", flush=True)

    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            break
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D leaves)")
            continue
        command = line.strip()
        if not command:
            continue
        if command == "/exit":
            break
        if command in ("/think", "/no_think"):
            thinking = command == "/think"
            print(f"thinking {'on' if thinking else 'off'}")
            continue
        if command == "/reset":
            history = []
            print("conversation cleared")
            continue
        if command in ("/base", "/adapter"):
            if adapter is None:
                print(
                    f"{cfg.model.dir} is a merged folder (the adapter is in its weights): {command} is not "
                    "available; chat with MODEL_DIR=<the base folder> to compare"
                )
            else:
                use_adapter = command == "/adapter"
                print("answering with " + ("base model + adapter" if use_adapter else "the base model (adapter off)"))
            continue
        if line.startswith("/") and line.split()[0] not in COMMANDS:
            print(
                f"unknown command {line.split()[0]!r}; the commands are {' '.join(COMMANDS)} (a line that starts "
                "with a space is sent as it is)"
            )
            continue

        turns = (*history, Turn("user", line))
        messages = conversation(Record(system=None, turns=turns, where="chat"), cfg)
        off = model.disable_adapter() if adapter is not None and not use_adapter else contextlib.nullcontext()
        completion = Completion(prompt_ids(tokenizer, messages, thinking), sampling)
        with off:  # the whole answer, generated in another thread, with the adapter as chosen
            worker = generate_in_thread(model, tokenizer, [completion])
            try:
                for piece in completion:
                    print(piece, end="", flush=True)
            except KeyboardInterrupt:
                completion.cancel()
            finally:
                worker.join()
        if completion.finish_reason == "cancelled":  # interrupted
            print("\n[stopped: this answer is not kept]", flush=True)
            continue
        print(flush=True)
        history = [*turns, Turn("assistant", completion.text)]
        with open(transcript, "a", encoding="utf-8") as f:
            f.write(
                json.dumps(
                    {
                        "user": line,
                        "reply": completion.text,
                        "thinking": thinking,
                        "adapter": use_adapter,
                        "finish_reason": completion.finish_reason,
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
    return transcript
