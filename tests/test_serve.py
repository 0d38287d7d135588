"""make serve: the real server process (scripts/serve.py) on 127.0.0.1, driven by OpenAI's own client;
its answers are checked against the same generation done in this process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from hunyuan_lora import generation, modeling, prompt

REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(lora_run):
    port = _free_port()
    env = {**os.environ, "HL_CONFIG": str(REPO / "configs/demo.yaml"), "HL_MODEL_DIR": lora_run.model.dir,
           "HL_OUTPUT_DIR": str(lora_run.output_dir), "HL_SET": f"serve.port={port} serve.max_new_tokens={MAX_NEW}"}
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts/serve.py")], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:  # uvicorn says when it listens
            if "Uvicorn running on" in line:
                break
        else:
            pytest.fail(f"the server exited with {proc.wait()}")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def local(lora_run):
    """The same model in this process, to say what the server must answer."""
    loaded, tokenizer = modeling.load_for_generation(lora_run)
    model = loaded.model

    def answer(messages, thinking=False, max_new_tokens=MAX_NEW):
        return generation.answer(model, tokenizer, messages, thinking=thinking,
                                sampling=generation.Sampling(max_new_tokens=max_new_tokens, do_sample=False))
    return answer


QUESTION = [{"role": "user", "content": "你是谁？"}]


def test_models_lists_the_run(client):
    assert [m.id for m in client.models.list().data] == ["demo"]


def test_greedy_completion_is_the_training_prompt_answer(client, local, lora_run):
    reply = client.chat.completions.create(model="demo", messages=QUESTION, temperature=0)
    assert reply.choices[0].message.content == local(prompt.ask("你是谁？", lora_run))
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens > 0
    history = [*QUESTION, {"role": "assistant", "content": "臣妾甄嬛。"}, {"role": "user", "content": "你父亲呢？"},
               ]
    with_system = [{"role": "system", "content": "S"}, *history]
    reply = client.chat.completions.create(model="demo", messages=with_system, temperature=0)
    messages = [{"role": "system", "content": "S"}, *history]
    assert reply.choices[0].message.content == local(messages)


def test_streaming_gives_the_same_text_in_pieces(client, local, lora_run):
    pieces, finish = [], None
    for event in client.chat.completions.create(model="demo", messages=QUESTION, temperature=0, stream=True):
        pieces += [event.choices[0].delta.content or ""]
        finish = event.choices[0].finish_reason or finish
    assert "".join(pieces) == local(prompt.ask("你是谁？", lora_run)) and finish in ("stop", "length")
    assert len([p for p in pieces if p]) > 1


def test_stop_max_tokens_and_thinking(client, local, lora_run):
    full = local(prompt.ask("你是谁？", lora_run))
    stop = full[len(full) // 2:len(full) // 2 + 2]
    reply = client.chat.completions.create(model="demo", messages=QUESTION, temperature=0, stop=[stop])
    assert reply.choices[0].message.content == full[:full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    reply = client.chat.completions.create(model="demo", messages=QUESTION, temperature=0, max_tokens=3)
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"
    thinking = client.chat.completions.create(model="demo", messages=QUESTION, temperature=0,
                                              extra_body={"enable_thinking": True})
    assert thinking.choices[0].message.content == local(prompt.ask("你是谁？", lora_run), thinking=True)
    sampled = client.chat.completions.create(model="demo", messages=QUESTION, temperature=0.7, top_p=0.9)
    assert isinstance(sampled.choices[0].message.content, str)


@pytest.mark.parametrize("kwargs, status, fragment", [
    ({"model": "gpt-4o", "messages": QUESTION}, 404, "does not exist"),
    ({"model": "demo", "messages": []}, 400, "messages"),
    ({"model": "demo", "messages": [*QUESTION, {"role": "assistant", "content": "x"}]}, 400, "last message"),
    ({"model": "demo", "messages": [{"role": "assistant", "content": "x"}, *QUESTION]}, 400, "alternate"),
    ({"model": "demo", "messages": [*QUESTION, {"role": "system", "content": "x"}]}, 400, "only come first"),
    ({"model": "demo", "messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role"),
    ({"model": "demo", "messages": QUESTION, "temperature": 5}, 400, "temperature"),
    ({"model": "demo", "messages": QUESTION, "max_tokens": MAX_NEW + 1}, 400, "over this server's limit"),
    ({"model": "demo", "messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ({"model": "demo", "messages": QUESTION, "n": 2}, 400, "n=1"),
])
def test_bad_requests_get_openai_shaped_errors(client, kwargs, status, fragment):
    import openai

    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**kwargs)
    assert info.value.status_code == status
    error = info.value.body
    assert fragment in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("path, body, status", [("/chat/completions", b"{not json", 400),
                                                ("/chat/completions", b'["a list"]', 400),
                                                ("/nowhere", b"{}", 404)])
def test_malformed_bodies_and_unknown_routes_are_json_errors(server, path, body, status):
    request = urllib.request.Request(server + path, data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    assert info.value.code == status
    error = json.loads(info.value.read())["error"]
    assert error["message"] and "Traceback" not in error["message"]
