"""make serve: the real server process (scripts/serve.py) on 127.0.0.1, driven by OpenAI's own client;
its answers are checked against the same generation done in this process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hunyuan_lora import generation, modeling, prompt

REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """scripts/serve.py in its own process on a free port of 127.0.0.1; its output is kept in `log`."""

    def __init__(self, cfg, settings: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        env = {
            **os.environ,
            "HL_CONFIG": str(REPO / "configs/demo.yaml"),
            "HL_MODEL_DIR": cfg.model.dir,
            "HL_OUTPUT_DIR": str(cfg.output_dir),
            "HL_SET": f"serve.port={self.port} {settings}",
        }
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "scripts/serve.py")],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.log: list[str] = []
        for line in self.proc.stdout:  # uvicorn says when it listens
            self.log.append(line)
            if "Uvicorn running on" in line:
                break
        else:
            pytest.fail(f"the server exited with {self.proc.wait()}: {''.join(self.log)}")
        # keep reading, so a full pipe never stalls the server
        threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True).start()

    def health(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=30) as answer:
            return json.loads(answer.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server(lora_run):
    running = Server(lora_run, f"serve.max_new_tokens={MAX_NEW} serve.max_batch_size=4 serve.max_queue=64")
    try:
        yield running.url
    finally:
        running.stop()


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
        return generation.answer(
            model,
            tokenizer,
            messages,
            thinking=thinking,
            sampling=generation.Sampling(max_new_tokens=max_new_tokens, do_sample=False),
        )

    return answer


QUESTION = [{"role": "user", "content": "你是谁？"}]


def test_models_lists_the_run(client):
    assert [m.id for m in client.models.list().data] == ["demo"]


def test_greedy_completion_is_the_training_prompt_answer(client, local, lora_run):
    reply = client.chat.completions.create(model="demo", messages=QUESTION, temperature=0)
    assert reply.choices[0].message.content == local(prompt.ask("你是谁？", lora_run))
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens > 0
    history = [
        *QUESTION,
        {"role": "assistant", "content": "臣妾甄嬛。"},
        {"role": "user", "content": "你父亲呢？"},
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
    assert "".join(pieces) == local(prompt.ask("你是谁？", lora_run))
    assert finish in ("stop", "length")
    assert len([p for p in pieces if p]) > 1


def test_stop_max_tokens_and_thinking(client, local, lora_run):
    full = local(prompt.ask("你是谁？", lora_run))
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    reply = client.chat.completions.create(model="demo", messages=QUESTION, temperature=0, stop=[stop])
    assert reply.choices[0].message.content == full[: full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    reply = client.chat.completions.create(model="demo", messages=QUESTION, temperature=0, max_tokens=3)
    assert reply.usage.completion_tokens == 3
    assert reply.choices[0].finish_reason == "length"
    thinking = client.chat.completions.create(
        model="demo", messages=QUESTION, temperature=0, extra_body={"enable_thinking": True}
    )
    assert thinking.choices[0].message.content == local(prompt.ask("你是谁？", lora_run), thinking=True)
    sampled = client.chat.completions.create(model="demo", messages=QUESTION, temperature=0.7, top_p=0.9)
    assert isinstance(sampled.choices[0].message.content, str)


@pytest.mark.parametrize(
    ("kwargs", "status", "fragment"),
    [
        ({"model": "demo", "messages": QUESTION, "logprobs": True}, 400, "logprobs is not supported"),
        ({"model": "demo", "messages": QUESTION, "top_logprobs": 2}, 400, "top_logprobs is not supported"),
        (
            {"model": "demo", "messages": QUESTION, "response_format": {"type": "json_object"}},
            400,
            "response_format is not supported",
        ),
        ({"model": "demo", "messages": QUESTION, "presence_penalty": 0.5}, 400, "presence_penalty is not supported"),
        (
            {"model": "demo", "messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f"}}]},
            400,
            "tools is not supported",
        ),
        (
            {"model": "demo", "messages": QUESTION, "extra_body": {"top_k": 5}},
            400,
            "unrecognized request argument supplied: top_k",
        ),
        (
            {"model": "demo", "messages": QUESTION, "stream_options": {"include_usage": True}},
            400,
            "only allowed with stream: true",
        ),
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
    ],
)
def test_bad_requests_get_openai_shaped_errors(client, kwargs, status, fragment):
    import openai

    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**kwargs)
    assert info.value.status_code == status
    error = info.value.body
    assert fragment in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [("/chat/completions", b"{not json", 400), ("/chat/completions", b'["a list"]', 400), ("/nowhere", b"{}", 404)],
)
def test_malformed_bodies_and_unknown_routes_are_json_errors(server, path, body, status):
    request = urllib.request.Request(server + path, data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    assert info.value.code == status
    error = json.loads(info.value.read())["error"]
    assert error["message"]
    assert "Traceback" not in error["message"]


def test_refused_parameters_are_named_and_their_off_values_accepted(client):
    import openai

    for param, value in [("logprobs", True), ("response_format", {"type": "json_schema"}), ("seed", "x")]:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="demo", messages=QUESTION, extra_body={param: value})
        assert info.value.body["param"] == param
    reply = client.chat.completions.create(
        model="demo",
        messages=QUESTION,
        temperature=0,
        max_tokens=2,
        user="u",
        logprobs=False,
        response_format={"type": "text"},
        presence_penalty=0,
    )
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_a_seed_gives_the_same_sample(client):
    def sample(seed):
        return (
            client.chat.completions.create(model="demo", messages=QUESTION, temperature=1.0, top_p=1.0, seed=seed)
            .choices[0]
            .message.content
        )

    first = sample(5)
    assert sample(5) == first
    assert sample(6) != first


def test_include_usage_adds_a_last_chunk_with_the_usage(client):
    chunks = list(
        client.chat.completions.create(
            model="demo", messages=QUESTION, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    whole = client.chat.completions.create(model="demo", messages=QUESTION, temperature=0)
    assert chunks[-1].choices == []
    assert chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == whole.choices[0].message.content
    plain = list(client.chat.completions.create(model="demo", messages=QUESTION, temperature=0, stream=True))
    assert all(c.choices and c.usage is None for c in plain)


def _until(check, what: str, seconds: float = 60) -> None:
    """Poll check() until it holds; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"still not {what} after {seconds} s"
        time.sleep(0.1)


def test_parallel_streams_equal_the_sequential_answers(client, local, lora_run):
    questions = ["你是谁？", "你喜欢什么花？", "一", "皇上驾到，甄嬛应该怎么回答才好呢？", "你父亲是谁？", "华妃"]
    sequential = [local(prompt.ask(q, lora_run)) for q in questions]

    def stream(question):
        events = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": question}], temperature=0, stream=True, timeout=120
        )
        return "".join(e.choices[0].delta.content or "" for e in events)

    with ThreadPoolExecutor(len(questions)) as pool:
        assert list(pool.map(stream, questions, timeout=300)) == sequential


def test_sixty_mixed_requests_with_ten_streams_all_complete(client, local, lora_run, server):
    questions = ["你是谁？", "你喜欢什么花？", "一", "你父亲是谁？", "华妃", "皇上"]
    expected = {q: local(prompt.ask(q, lora_run), max_new_tokens=4) for q in questions}

    def ask(i):
        question = questions[i % len(questions)]
        kwargs = {
            "model": "demo",
            "messages": [{"role": "user", "content": question}],
            "temperature": 0,
            "max_tokens": 4,
            "timeout": 120,
        }
        if i % 6 == 0:  # 10 of the 60 stream
            text = "".join(
                e.choices[0].delta.content or "" for e in client.chat.completions.create(stream=True, **kwargs)
            )
        else:
            text = client.chat.completions.create(**kwargs).choices[0].message.content
        return text == expected[question]

    with ThreadPoolExecutor(60) as pool:
        assert all(pool.map(ask, range(60), timeout=600))
    with urllib.request.urlopen(server.removesuffix("/v1") + "/health", timeout=30) as answer:
        assert json.loads(answer.read()) == {"status": "ok", "running": 0, "waiting": 0}


def test_a_prompt_over_the_context_and_a_body_over_the_cap_are_refused(client, server, lora_run):
    import openai
    from transformers import AutoConfig, AutoTokenizer

    context = AutoConfig.from_pretrained(lora_run.model.dir, trust_remote_code=True).max_position_embeddings
    tokenizer = AutoTokenizer.from_pretrained(lora_run.model.dir, trust_remote_code=True)

    def messages(chars):
        return [{"role": "user", "content": "皇" * chars}]

    def tokens(chars):
        return len(prompt.prompt_ids(tokenizer, prompt.ask("皇" * chars, lora_run), False))

    low, high = 1, context  # the longest message whose prompt leaves 4 tokens of the context
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if tokens(mid) <= context - 4 else (low, mid - 1)
    near = tokens(low)
    assert context - MAX_NEW < near <= context - 4
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="demo", messages=messages(low), max_tokens=MAX_NEW)
    assert info.value.body["code"] == "context_length_exceeded"
    assert info.value.body["param"] == "messages"
    assert f"maximum context length is {context:,} tokens" in info.value.body["message"]
    fitted = client.chat.completions.create(model="demo", messages=messages(low), temperature=0)  # no max_tokens
    assert fitted.usage.prompt_tokens == near
    assert fitted.usage.completion_tokens <= context - near
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="demo", messages=messages(2 * low), max_tokens=1)
    assert info.value.body["code"] == "context_length_exceeded"
    assert "serve.max_prompt_tokens" in info.value.body["message"]

    cap = 16 * context + 65536  # serve.max_request_bytes' default
    body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "x" * cap}]}).encode()
    request = urllib.request.Request(
        server + "/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413
    error = json.loads(refused.value.read())["error"]
    assert error["code"] == "request_too_large"
    assert f"limit of {cap:,}" in error["message"]
    assert client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=1).usage.completion_tokens == 1


# A generation that outlasts any test here (greedy, the stand-in answers 你是谁？ for over 3,000 tokens
# without an end; its context is 4,096).
LONG = 4000
LONG_REQUEST = {"model": "demo", "messages": QUESTION, "temperature": 0, "max_tokens": LONG}


def _hang_up_after(port: int, payload: dict, body_bytes: int = 50) -> socket.socket:
    """A request sent by hand, as `curl -sN ... | head -c 50` does: its socket once body_bytes of the
    answer's body came (0: as soon as it is sent). Close it to hang up."""
    body = json.dumps(payload).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    got = b""
    while body_bytes and (b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) < body_bytes):
        chunk = sock.recv(4096)
        assert chunk, f"the server closed the connection: {got!r}"
        got += chunk
    return sock


@pytest.fixture(scope="module")
def one_slot(lora_run):
    """A server that generates one request at a time and lets one more wait."""
    running = Server(lora_run, f"serve.max_new_tokens={LONG} serve.max_batch_size=1 serve.max_queue=1")
    try:
        yield running
    finally:
        running.stop()


def test_a_client_gone_mid_request_frees_its_slot(one_slot, local, lora_run):
    from openai import OpenAI

    expected = local(prompt.ask("你是谁？", lora_run))
    client = OpenAI(base_url=one_slot.url, api_key="unused", max_retries=0, timeout=60)
    for payload, body_bytes in (({**LONG_REQUEST, "stream": True}, 50), (LONG_REQUEST, 0)):
        sock = _hang_up_after(one_slot.port, payload, body_bytes)
        if not body_bytes:  # a non-streamed request says nothing until it ends
            _until(lambda: one_slot.health()["running"] == 1, "generating")
        sock.close()  # gone mid-answer: its generation must stop and free the one slot
        reply = client.chat.completions.create(model="demo", messages=QUESTION, temperature=0, max_tokens=MAX_NEW)
        assert reply.choices[0].message.content == expected
        assert one_slot.health() == {"status": "ok", "running": 0, "waiting": 0}


def test_a_full_queue_answers_429_and_the_waiting_request_is_served(one_slot, local, lora_run):
    import openai

    client = openai.OpenAI(base_url=one_slot.url, api_key="unused", max_retries=0, timeout=120)
    holder = _hang_up_after(one_slot.port, {**LONG_REQUEST, "stream": True})  # the one slot, for long
    answers: dict[str, object] = {}

    def ask(name):
        try:
            answers[name] = (
                client.chat.completions.create(model="demo", messages=QUESTION, temperature=0, max_tokens=MAX_NEW)
                .choices[0]
                .message.content
            )
        except openai.RateLimitError as e:
            answers[name] = e

    askers = [threading.Thread(target=ask, args=(name,)) for name in ("b", "c")]
    for a in askers:
        a.start()
    _until(lambda: len(answers) == 1, "refused")  # the later one, at once; the other waits for the slot
    (refused,) = answers.values()
    assert isinstance(refused, openai.RateLimitError)
    assert refused.status_code == 429
    assert refused.body["code"] == "rate_limit_exceeded"
    assert "serve.max_queue is 1" in refused.body["message"]
    assert one_slot.health() == {"status": "ok", "running": 1, "waiting": 1}
    holder.close()
    for a in askers:
        a.join(timeout=120)
    assert len(answers) == 2
    assert local(prompt.ask("你是谁？", lora_run)) in answers.values()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_sigterm_and_ctrl_c_stop_the_server_within_seconds_whatever_it_is_doing(lora_run, sig):
    busy = Server(lora_run, f"serve.max_new_tokens={LONG} serve.max_batch_size=1 serve.max_queue=4")
    try:
        _hang_up_after(busy.port, {**LONG_REQUEST, "stream": True}).close()  # a client gone mid-stream
        streaming = _hang_up_after(busy.port, {**LONG_REQUEST, "stream": True})  # one still reading
        waiting = _hang_up_after(busy.port, LONG_REQUEST, 0)  # one waiting for its answer
        busy.proc.send_signal(sig)
        assert busy.proc.wait(timeout=30) in (-signal.SIGTERM, 0)  # SIGTERM ends it as SIGTERM does
        for sock in (streaming, waiting):  # their connections end with the server (recv times out if not)
            # with an end of stream, or a reset when the kernel closes a socket whose bytes nobody read
            with contextlib.suppress(ConnectionResetError):
                while sock.recv(65536):
                    pass
    finally:
        busy.stop()
