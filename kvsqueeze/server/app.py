"""The FastAPI application: OpenAI-compatible endpoints in front of one :class:`Engine`.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both streaming over SSE or not),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus). Errors use the OpenAI error schema
(:mod:`kvsqueeze.server.errors`). With an API key set, ``/v1/*`` needs ``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvsqueeze.server.engine.request import Event, GenerationRequest, RequestHandle
from kvsqueeze.server.engine.scheduler import Engine
from kvsqueeze.server.errors import APIError, bad_request
from kvsqueeze.server.prepare import RequestBuilder
from kvsqueeze.server.schemas import ChatCompletionRequest, CompletionRequest, first_error

log = logging.getLogger("kvsqueeze.server")


@dataclass
class HTTPLimits:
    """What the HTTP layer enforces before a request is parsed."""

    api_key: str | None = None
    max_request_bytes: int = 4 * 1024 * 1024
    shutdown_timeout: float = 30.0


def create_app(engine: Engine, builder: RequestBuilder, limits: HTTPLimits | None = None) -> FastAPI:
    """The server's app; the engine starts with the app and drains when it shuts down."""
    limits = limits or HTTPLimits()
    name = builder.defaults.model_name

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.stop, limits.shutdown_timeout)
        log.warning("kvsqueeze: engine stopped (%d requests completed)", engine.completed)

    app = FastAPI(title="kvsqueeze", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        error = APIError(err.status_code, str(err.detail))
        return JSONResponse(error.body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error")
        error = APIError(500, f"internal error: {type(err).__name__}")
        return JSONResponse(error.body(), status_code=500)

    def authorize(request: Request) -> None:
        if limits.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), limits.api_key.encode()):
            raise APIError(
                401, "missing or invalid API key (send Authorization: Bearer KEY)", code="invalid_api_key"
            )

    async def read_body(request: Request, schema: type[BaseModel]) -> Any:
        authorize(request)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_request_bytes:
            raise APIError(
                413, f"request body over the {limits.max_request_bytes}-byte limit", code="request_too_large"
            )
        raw = await request.body()
        if len(raw) > limits.max_request_bytes:
            raise APIError(
                413, f"request body over the {limits.max_request_bytes}-byte limit", code="request_too_large"
            )
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise bad_request(f"request body is not valid JSON: {err}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise bad_request("request body must be a JSON object", code="invalid_json")
        try:
            return schema.model_validate(data)
        except ValidationError as err:
            raise bad_request(first_error(err)) from None

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.alive
        return JSONResponse(
            {"status": "ok" if ok else "stopped", **engine.stats()}, status_code=200 if ok else 503
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type=engine.metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        card = {"id": name, "object": "model", "created": 0, "owned_by": "kvsqueeze"}
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await read_body(request, ChatCompletionRequest)
        return await run(body, builder.chat(body), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_body(request, CompletionRequest)
        return await run(body, builder.completion(body), chat=False)

    async def run(body: Any, greq: GenerationRequest, chat: bool) -> Response:
        handle = RequestHandle(greq, asyncio.get_running_loop())
        engine.submit(handle)
        reply = _Reply(name, greq, chat, body.kvsqueeze.return_token_ids)
        try:
            first = await handle.next_event()
        except BaseException:
            handle.cancel()
            raise
        if first.kind == "error":
            raise first.error
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                reply.stream(handle, first, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            event = first
            while event.kind == "token":
                reply.add(event)
                event = await handle.next_event()
        finally:
            if not handle.finished.is_set():
                handle.cancel()
        if event.kind == "error":
            raise event.error
        return JSONResponse(reply.complete(event))

    return app


class _Reply:
    """Builds one request's OpenAI response objects from engine events."""

    def __init__(self, model: str, request: GenerationRequest, chat: bool, token_ids: bool) -> None:
        self.model = model
        self.request = request
        self.chat = chat
        self.token_ids = token_ids
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.text: list[str] = []
        self.tokens: list[int] = []

    def add(self, event: Event) -> None:
        self.text.append(event.text)
        self.tokens.append(event.token)

    def _extra(self, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        extra: dict[str, Any] = {"method": self.request.method.name, "budget": str(self.request.budget)}
        if usage is not None and "prefix_cached_tokens" in usage:
            extra["prefix_cached_tokens"] = usage["prefix_cached_tokens"]
        if self.token_ids:
            extra["token_ids"] = list(self.tokens)
        return extra

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def complete(self, done: Event) -> dict[str, Any]:
        """The non-streaming response."""
        text = "".join(self.text)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
            out = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
            out = self._head("text_completion")
        choice["finish_reason"] = done.finish_reason
        return {**out, "choices": [choice], "usage": done.usage, "kvsqueeze": self._extra(done.usage)}

    def _chunk(self, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    async def stream(self, handle: RequestHandle, first: Event, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: one chunk per token with text, a last chunk with the finish reason, usage."""
        try:
            if self.chat:
                yield _sse(self._chunk("", None, role=True))
            event = first
            while event.kind == "token":
                self.add(event)
                if event.text or self.token_ids:
                    chunk = self._chunk(event.text, None)
                    if self.token_ids:
                        chunk["kvsqueeze"] = {"token_ids": [event.token]}
                    yield _sse(chunk)
                event = await handle.next_event()
            if event.kind == "error":
                yield _sse(event.error.body())
            else:
                last = self._chunk(None if self.chat else "", event.finish_reason)
                last["kvsqueeze"] = {**self._extra(event.usage), "usage": event.usage}
                yield _sse(last)
                if include_usage:
                    yield _sse({**self._head(last["object"]), "choices": [], "usage": event.usage})
            yield "data: [DONE]\n\n"
        finally:
            if not handle.finished.is_set():
                handle.cancel()


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
