"""Stage: serve, an OpenAI-compatible HTTP server over the base model + adapter (or a merged folder).

    make serve [CONFIG=...] [SET="serve.port=8000"]     # http://127.0.0.1:8000/v1

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="huanhuan", messages=[{"role": "user", "content": "你是谁？"}],
                                   stream=True, extra_body={"enable_thinking": False})

POST /v1/chat/completions (streamed as server-sent events with "stream": true, or not): messages
(an optional system message first, then user and assistant alternating, ending with the user; without a
system message the config's data.system_prompt applies, as in training), temperature (0: greedy),
top_p, seed, max_tokens (at most serve.max_new_tokens), stop (a string or up to 4),
stream_options.include_usage, and thinking by `enable_thinking` (or vLLM's
`chat_template_kwargs.enable_thinking`, or /think or /no_think at the start of the last user message,
as the model's template reads them; default serve.thinking). The reply's content is the text the model
wrote (its <think> block included when thinking is on). GET /v1/models lists the one model; GET /health
says how many requests are being generated and how many wait.

Requests are generated together: whatever waits when the model is free forms the next batch (up to
serve.max_batch_size, generation.Scheduler); at most serve.max_queue wait, more get 429. A client that
goes away cancels its generation within a token. Bad requests get OpenAI-shaped JSON errors (4xx), never a
traceback: an unsupported parameter is named, a prompt + max_tokens over the context is OpenAI's
context_length_exceeded, a body over serve.max_request_bytes is 413. SIGTERM and Ctrl-C cancel what
runs and stop the server within seconds. There is no authentication: the server binds 127.0.0.1
unless serve.host says otherwise.
"""

import asyncio
import contextlib
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Literal

from .config import Config
from .errors import UserError
from .generation import Completion, QueueFull, Sampling, Scheduler
from .modeling import load_for_generation
from .prompt import conversation, prompt_ids
from .records import Record, Turn

MAX_STOP = 4  # as OpenAI's API
SHUTDOWN_GRACE_S = 3  # after SIGTERM / Ctrl-C, connections still open after this are closed
BODY_BYTES_PER_TOKEN = 16  # the default body cap per prompt token: JSON-escaped CJK is about 8
BODY_BYTES_EXTRA = 65536

# OpenAI chat parameters this server does not implement, with the values that ask for nothing (those
# are accepted): anything else is refused with a 400 naming the parameter, never silently ignored.
UNSUPPORTED = {
    "logprobs": (None, False),
    "top_logprobs": (None,),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "store": (None, False),
}
# OpenAI parameters that do not change the answer here.
NO_EFFECT = ("user", "metadata", "service_tier", "parallel_tool_calls")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def _error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def context_of(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def body_limit(cfg: Config, model) -> int:
    """serve.max_request_bytes, else 16 bytes per token of the longest prompt accepted (+ 64 KiB)."""
    if cfg.serve.max_request_bytes:
        return cfg.serve.max_request_bytes
    return BODY_BYTES_PER_TOKEN * (cfg.serve.max_prompt_tokens or context_of(model) or 32768) + BODY_BYTES_EXTRA


def create_app(cfg: Config, model, tokenizer, scheduler: Scheduler):
    # No `from __future__ import annotations` in this module: FastAPI reads the request model from
    # the endpoint's annotation at runtime, and the model classes are local to this function.
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException

    name = cfg.serve.model_name or cfg.run.name
    created = int(time.time())
    context = context_of(model)
    max_prompt = cfg.serve.max_prompt_tokens or context

    class Message(BaseModel):
        role: Literal["system", "user", "assistant"]
        content: str

    class TemplateKwargs(BaseModel):
        enable_thinking: bool | None = None

    class StreamOptions(BaseModel):
        model_config = ConfigDict(extra="forbid")
        include_usage: bool = False

    class ChatRequest(BaseModel):
        model_config = ConfigDict(extra="allow")  # checked against UNSUPPORTED / NO_EFFECT, to name them
        model: str
        messages: list[Message] = Field(min_length=1)
        stream: bool = False
        stream_options: StreamOptions | None = None
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        seed: int | None = None
        max_tokens: int | None = Field(None, ge=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        stop: str | list[str] | None = None
        n: int = 1
        enable_thinking: bool | None = None
        chat_template_kwargs: TemplateKwargs | None = None

    app = FastAPI(title="hunyuan-lora", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        return JSONResponse(_error_body(e.message, e.kind, e.param, e.code), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError):
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        return JSONResponse(
            _error_body(f"{param or 'body'}: {first['msg']}", "invalid_request_error", param), status_code=400
        )

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException):
        return JSONResponse(
            _error_body(str(e.detail), "invalid_request_error", code=str(e.status_code)), status_code=e.status_code
        )

    @app.exception_handler(Exception)
    async def server_error(_: Request, e: Exception):
        return JSONResponse(_error_body(f"the server failed: {type(e).__name__}: {e}", "server_error"), status_code=500)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": "hunyuan-lora"}],
        }

    @app.get("/health")
    async def health():
        running, waiting = scheduler.load()
        return {"status": "ok", "running": running, "waiting": waiting}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        if req.model != name:
            raise APIError(
                404, f"the model '{req.model}' does not exist; this server serves '{name}'", "model", "model_not_found"
            )
        _refuse_unsupported(req)
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")
        ids, _ = _prompt(
            cfg,
            tokenizer,
            req.messages,
            req.enable_thinking
            if req.enable_thinking is not None
            else req.chat_template_kwargs.enable_thinking
            if req.chat_template_kwargs
            else None,
        )
        sampling = _sampling(cfg, req.temperature, req.top_p, req.max_completion_tokens or req.max_tokens, req.seed)
        _fit_context(
            sampling,
            len(ids),
            requested=req.max_completion_tokens or req.max_tokens,
            context=context,
            max_prompt=max_prompt,
        )
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOP:
            raise APIError(400, f"at most {MAX_STOP} stop sequences", "stop")
        completion = Completion(ids, sampling, stop)
        wake = _wake_on_update(completion)
        try:
            scheduler.submit(completion)
        except QueueFull as e:
            raise APIError(
                429,
                f"the server is busy ({e}; serve.max_queue is {scheduler.max_queue}): retry later",
                code="rate_limit_exceeded",
                kind="rate_limit_error",
            ) from e
        reply_id, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def usage() -> dict:
            return {
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "total_tokens": completion.prompt_tokens + completion.completion_tokens,
            }

        if not req.stream:
            await _until_finished(completion, wake, request)
            _raise_if_failed(completion)
            return {
                "id": reply_id,
                "object": "chat.completion",
                "created": now,
                "model": name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": completion.text},
                        "finish_reason": completion.finish_reason,
                    }
                ],
                "usage": usage(),
            }

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: dict | None, finish: str | None = None) -> str:
            body = {
                "id": reply_id,
                "object": "chat.completion.chunk",
                "created": now,
                "model": name,
                "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            if include_usage:  # as OpenAI: null on every chunk but the last, which has no choices
                body["usage"] = usage() if delta is None else None
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    ended = completion.finished  # read first: every piece is queued before it is set
                    for piece in completion.pending():
                        yield chunk({"content": piece})
                    if ended:
                        break
                    await wake.wait()
                    wake.clear()
                try:
                    _raise_if_failed(completion)
                except APIError as e:  # the response has started: the error goes in the stream, as OpenAI's
                    yield f"data: {json.dumps(_error_body(e.message, e.kind), ensure_ascii=False)}\n\n"
                    return
                yield chunk({}, completion.finish_reason)
                if include_usage:
                    yield chunk(None)
                yield "data: [DONE]\n\n"
            finally:  # the client went away (Starlette cancels this generator) or it ended
                completion.cancel()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _wake_on_update(completion: Completion) -> asyncio.Event:
    """An event the generating thread sets (through the event loop) whenever the completion moves on."""
    loop, wake = asyncio.get_running_loop(), asyncio.Event()

    def on_update():
        with contextlib.suppress(RuntimeError):  # the loop has closed: the server is gone, nobody reads
            loop.call_soon_threadsafe(wake.set)

    completion.on_update = on_update
    return wake


async def _until_finished(completion: Completion, wake: asyncio.Event, request) -> None:
    """Wait for a non-streamed completion; a client that disconnects meanwhile cancels it."""

    async def watch_disconnect():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        completion.cancel()

    watcher = asyncio.create_task(watch_disconnect())
    try:
        while not completion.finished:
            await wake.wait()
            wake.clear()
    finally:
        watcher.cancel()
        completion.cancel()  # no-op once finished; ends it when this request itself is cancelled


def _raise_if_failed(completion: Completion) -> None:
    if completion.finish_reason == "error":
        e = completion.error
        raise APIError(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error")
    if completion.finish_reason == "cancelled":  # by the server: a client that left reads nothing
        raise APIError(503, "the server is shutting down", kind="server_error")


def _refuse_unsupported(req) -> None:
    for key, value in (req.model_extra or {}).items():
        if key in NO_EFFECT:
            continue
        if key not in UNSUPPORTED:
            raise APIError(400, f"unrecognized request argument supplied: {key}", key, "unknown_parameter")
        if value not in UNSUPPORTED[key]:
            raise APIError(
                400,
                f"{key} is not supported by this server (it answers in plain text only, without "
                "logprobs, tools, penalties or output formats)",
                key,
                "unsupported_parameter",
            )
    if req.n != 1:
        raise APIError(400, "only n=1 is supported", "n", "unsupported_parameter")


def _prompt(cfg: Config, tokenizer, messages, enable_thinking: bool | None) -> tuple[list[int], bool]:
    """Prompt tokens for the conversation, through prompt.py like training; APIError when malformed."""
    system, turns = None, []
    for i, m in enumerate(messages):
        if m.role == "system":
            if i != 0:
                raise APIError(400, "a system message may only come first", f"messages[{i}]")
            system = m.content
            continue
        expected = "user" if not turns or turns[-1].role == "assistant" else "assistant"
        if m.role != expected:
            raise APIError(
                400,
                f"messages[{i}] is a {m.role} message where a {expected} message belongs: "
                "user and assistant must alternate, starting with the user",
                f"messages[{i}]",
            )
        turns.append(Turn(m.role, m.content))
    if not turns or turns[-1].role != "user":
        raise APIError(400, "the last message must be the user's", "messages")
    thinking = cfg.serve.thinking if enable_thinking is None else enable_thinking
    record = Record(system=system, turns=tuple(turns), where="request")
    return prompt_ids(tokenizer, conversation(record, cfg), thinking), thinking


def _sampling(
    cfg: Config, temperature: float | None, top_p: float | None, max_tokens: int | None, seed: int | None
) -> Sampling:
    limit = cfg.serve.max_new_tokens
    if max_tokens is not None and max_tokens > limit:
        raise APIError(
            400, f"max_tokens {max_tokens} is over this server's limit of {limit} (serve.max_new_tokens)", "max_tokens"
        )
    if temperature == 0:
        return Sampling(max_new_tokens=max_tokens or limit, do_sample=False)
    return Sampling(
        max_new_tokens=max_tokens or limit,
        do_sample=True if temperature or top_p else None,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )


def _fit_context(
    sampling: Sampling, prompt_tokens: int, *, requested: int | None, context: int | None, max_prompt: int | None
) -> None:
    """Refuse a prompt over serve.max_prompt_tokens, or a prompt + max_tokens over the model's context,
    with OpenAI's context_length_exceeded; without max_tokens the answer gets what the context leaves."""
    if max_prompt and prompt_tokens > max_prompt:
        raise APIError(
            400,
            f"the messages are {prompt_tokens:,} tokens, over this server's limit of {max_prompt:,} "
            "(serve.max_prompt_tokens): shorten them",
            "messages",
            "context_length_exceeded",
        )
    if not context or prompt_tokens + sampling.max_new_tokens <= context:
        return
    if requested is None and prompt_tokens < context:
        sampling.max_new_tokens = context - prompt_tokens
        return
    raise APIError(
        400,
        f"This model's maximum context length is {context:,} tokens. However, you requested "
        f"{prompt_tokens + sampling.max_new_tokens:,} tokens ({prompt_tokens:,} in the messages, "
        f"{sampling.max_new_tokens:,} in the completion). Please reduce the length of the messages or "
        "completion.",
        "messages",
        "context_length_exceeded",
    )


class BodyLimit:
    """ASGI middleware: a request body over max_bytes gets 413 before the app reads it (by its
    Content-Length, or counted as it arrives); the body is read here and handed on whole."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send, int(length))
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._refuse(send, len(body))
            more = message.get("more_body", False)
        handed = False

        async def replay():
            nonlocal handed
            if handed:
                return await receive()
            handed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send, size: int) -> None:
        body = json.dumps(
            _error_body(
                f"the request body is {size:,} bytes or more, over this server's limit of "
                f"{self.max_bytes:,} (serve.max_request_bytes)",
                "invalid_request_error",
                code="request_too_large",
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def run(cfg: Config) -> Path:
    import socket

    import uvicorn

    with socket.socket() as probe:  # before minutes of loading weights
        try:
            probe.bind((cfg.serve.host, cfg.serve.port))
        except OSError as e:
            raise UserError(
                f"cannot listen on {cfg.serve.host}:{cfg.serve.port} ({e.strerror or e})",
                where="serve.host / serve.port",
                fix="stop what uses that port, or pick another: SET=serve.port=8001",
            ) from e
    loaded, tokenizer = load_for_generation(cfg)
    model, adapter = loaded.model, loaded.adapter
    context = context_of(model)
    if cfg.serve.max_prompt_tokens and context and cfg.serve.max_prompt_tokens >= context:
        raise UserError(
            f"serve.max_prompt_tokens is {cfg.serve.max_prompt_tokens:,}, but the model's context is "
            f"{context:,} tokens (max_position_embeddings) and leaves no room for an answer",
            where="serve.max_prompt_tokens",
            fix=f"set it below {context:,}, or leave it out",
        )
    scheduler = Scheduler(model, tokenizer, max_batch_size=cfg.serve.max_batch_size, max_queue=cfg.serve.max_queue)
    app = BodyLimit(create_app(cfg, model, tokenizer, scheduler), body_limit(cfg, model))

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # Cancel what runs and waits, so open streams end now; from a thread, as the signal may
            # have interrupted this thread while it held the scheduler's lock.
            threading.Thread(target=scheduler.stop, daemon=True).start()
            super().handle_exit(sig, frame)

    name = cfg.serve.model_name or cfg.run.name
    weights = f"{cfg.model.dir} + adapter {adapter}" if adapter else f"{cfg.model.dir} (merged)"
    if cfg.serve.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"WARNING: serve.host {cfg.serve.host} is reachable from other machines and has no authentication")
    print(
        f"serving '{name}' ({weights}) at http://{cfg.serve.host}:{cfg.serve.port}/v1 — batches of up to "
        f"{cfg.serve.max_batch_size}, {cfg.serve.max_queue} more may wait; Ctrl-C stops",
        flush=True,
    )
    server = Server(
        uvicorn.Config(
            app, host=cfg.serve.host, port=cfg.serve.port, log_level="info", timeout_graceful_shutdown=SHUTDOWN_GRACE_S
        )
    )
    try:
        with contextlib.suppress(KeyboardInterrupt):  # uvicorn raises the signal again once it has stopped
            server.run()
    finally:
        scheduler.stop(timeout=SHUTDOWN_GRACE_S)
    return cfg.output_dir
