"""Stage: serve, an OpenAI-compatible HTTP server over the base model + adapter (or a merged folder).

    make serve [CONFIG=...] [SET="serve.port=8000"]     # http://127.0.0.1:8000/v1

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="huanhuan", messages=[{"role": "user", "content": "你是谁？"}],
                                   stream=True, extra_body={"enable_thinking": False})

POST /v1/chat/completions (streamed as server-sent events with "stream": true, or not): messages
(an optional system message first, then user and assistant alternating, ending with the user; without a
system message the config's data.system_prompt applies, as in training), temperature (0: greedy),
top_p, max_tokens (at most serve.max_new_tokens), stop (a string or up to 4), and thinking by
`enable_thinking` (or vLLM's `chat_template_kwargs.enable_thinking`, or /think or /no_think at the start
of the last user message, as the model's template reads them; default serve.thinking). The reply's
content is the text the model wrote (its <think> block included when thinking is on).
GET /v1/models lists the one model. Bad requests get OpenAI-shaped JSON errors (4xx), never a
traceback. One request is generated at a time; others wait for it. There is no authentication:
the server binds 127.0.0.1 unless serve.host says otherwise.
"""

import contextlib
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Literal

from .config import Config
from .errors import UserError
from .generation import Generation, Sampling
from .modeling import load_for_generation
from .prompt import conversation, prompt_ids
from .records import Record, Turn

MAX_STOP = 4  # as OpenAI's API


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def _error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def create_app(cfg: Config, model, tokenizer):
    # No `from __future__ import annotations` in this module: FastAPI reads the request model from
    # the endpoint's annotation at runtime, and the model classes are local to this function.
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException

    name = cfg.serve.model_name or cfg.run.name
    created = int(time.time())
    one_at_a_time = threading.Lock()

    class Message(BaseModel):
        role: Literal["system", "user", "assistant"]
        content: str

    class TemplateKwargs(BaseModel):
        enable_thinking: bool | None = None

    class ChatRequest(BaseModel):
        model_config = ConfigDict(extra="allow")  # OpenAI fields this server does not use are ignored
        model: str
        messages: list[Message] = Field(min_length=1)
        stream: bool = False
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        max_tokens: int | None = Field(None, ge=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        stop: str | list[str] | None = None
        n: int = 1
        enable_thinking: bool | None = None
        chat_template_kwargs: TemplateKwargs | None = None

    app = FastAPI(title="hunyuan-lora", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        return JSONResponse(_error_body(e.message, e.kind, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError):
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        return JSONResponse(_error_body(f"{param or 'body'}: {first['msg']}", "invalid_request_error", param),
                            status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException):
        return JSONResponse(_error_body(str(e.detail), "invalid_request_error", code=str(e.status_code)),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(_: Request, e: Exception):
        return JSONResponse(_error_body(f"the server failed: {type(e).__name__}: {e}", "server_error"), status_code=500)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "hunyuan-lora"}]}

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest):
        if req.model != name:
            raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{name}'", "model",
                           "model_not_found")
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", "n")
        if "tools" in (req.model_extra or {}) or "functions" in (req.model_extra or {}):
            raise APIError(400, "tools / function calling are not supported", "tools")
        ids, thinking = _prompt(cfg, tokenizer, req.messages, req.enable_thinking if req.enable_thinking is not None
                                else req.chat_template_kwargs.enable_thinking if req.chat_template_kwargs
                                else None)
        sampling = _sampling(cfg, req.temperature, req.top_p, req.max_completion_tokens or req.max_tokens)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOP:
            raise APIError(400, f"at most {MAX_STOP} stop sequences", "stop")
        reply_id, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        if not req.stream:
            with one_at_a_time:
                gen = Generation(model, tokenizer, ids, sampling, stop)
                for _ in gen:
                    pass
            return {"id": reply_id, "object": "chat.completion", "created": now, "model": name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text},
                                 "finish_reason": gen.finish_reason}],
                    "usage": {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
                              "total_tokens": gen.prompt_tokens + gen.completion_tokens}}

        def chunk(delta: dict, finish: str | None = None) -> str:
            body = {"id": reply_id, "object": "chat.completion.chunk", "created": now, "model": name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def events():
            with one_at_a_time:
                gen = Generation(model, tokenizer, ids, sampling, stop)
                try:
                    yield chunk({"role": "assistant", "content": ""})
                    for piece in gen:
                        yield chunk({"content": piece})
                    yield chunk({}, gen.finish_reason)
                    yield "data: [DONE]\n\n"
                finally:
                    if gen.finish_reason is None:  # the client went away: stop generating for it
                        gen.cancel()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


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
            raise APIError(400, f"messages[{i}] is a {m.role} message where a {expected} message belongs: "
                           "user and assistant must alternate, starting with the user", f"messages[{i}]")
        turns.append(Turn(m.role, m.content))
    if not turns or turns[-1].role != "user":
        raise APIError(400, "the last message must be the user's", "messages")
    thinking = cfg.serve.thinking if enable_thinking is None else enable_thinking
    record = Record(system=system, turns=tuple(turns), where="request")
    return prompt_ids(tokenizer, conversation(record, cfg), thinking), thinking


def _sampling(cfg: Config, temperature: float | None, top_p: float | None, max_tokens: int | None) -> Sampling:
    limit = cfg.serve.max_new_tokens
    if max_tokens is not None and max_tokens > limit:
        raise APIError(400, f"max_tokens {max_tokens} is over this server's limit of {limit} (serve.max_new_tokens)",
                       "max_tokens")
    if temperature == 0:
        return Sampling(max_new_tokens=max_tokens or limit, do_sample=False)
    return Sampling(max_new_tokens=max_tokens or limit, do_sample=True if temperature or top_p else None,
                    temperature=temperature, top_p=top_p)


def run(cfg: Config) -> Path:
    import socket

    import uvicorn

    with socket.socket() as probe:  # before minutes of loading weights
        try:
            probe.bind((cfg.serve.host, cfg.serve.port))
        except OSError as e:
            raise UserError(f"cannot listen on {cfg.serve.host}:{cfg.serve.port} ({e.strerror or e})",
                            where="serve.host / serve.port",
                            fix="stop what uses that port, or pick another: SET=serve.port=8001") from e
    loaded, tokenizer = load_for_generation(cfg)
    model, adapter = loaded.model, loaded.adapter
    app = create_app(cfg, model, tokenizer)
    name = cfg.serve.model_name or cfg.run.name
    weights = f"{cfg.model.dir} + adapter {adapter}" if adapter else f"{cfg.model.dir} (merged)"
    if cfg.serve.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"WARNING: serve.host {cfg.serve.host} is reachable from other machines and has no authentication")
    print(f"serving '{name}' ({weights}) at http://{cfg.serve.host}:{cfg.serve.port}/v1 — one request at a time; "
          "Ctrl-C stops", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.run(app, host=cfg.serve.host, port=cfg.serve.port, log_level="info")
    return cfg.output_dir
