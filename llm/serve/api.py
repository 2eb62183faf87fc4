"""The OpenAI-compatible HTTP API (FastAPI) in front of the continuous-batching engine.

    POST /v1/completions        text (or token-id) prompts; logprobs, echo, n, stop, seed, stream
    POST /v1/chat/completions   messages through the chat template (llm/chat_template.py); stream
    GET  /v1/models             the one served model
    GET  /health                200 while the decode loop runs, 503 otherwise
    GET  /metrics               Prometheus text format
    GET  /                      the chat page

Every error is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 malformed JSON or a
request that cannot be served (context too long, bad conversation), 401 missing or unknown API key, 404
unknown model or path, 413 body too large, 422 a body that does not match the schema (unknown field,
wrong type, value out of range), 429 rate limit or too many concurrent requests, 504 request timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from llm.serve import auth, completions, schemas
from llm.serve.engine import Engine, Finished
from llm.serve.metrics import ServeMetrics
from llm.tokenizer import Tokenizer

CHAT_PAGE = os.path.join(os.path.dirname(__file__), "static", "chat.html")
ENDPOINTS = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
_POLL_S = 1.0  # How often a waiting non-streaming request checks whether its client has gone.


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    model_name: str  # The id clients pass as `model` and GET /v1/models lists.
    max_batch_size: int = 8  # Decode slots: requests generating at once (the KV cache has this many rows).
    max_cache_len: int | None = None  # Positions per KV-cache row, prompt + completion (default: model context).
    max_prompt_tokens: int | None = None  # Longest prompt accepted (default: the cache length).
    max_tokens: int = 1024  # Most completion tokens one choice may ask for.
    max_choices: int = 64  # Most choices (prompts x n) in one request.
    max_concurrent_requests: int = 64  # HTTP requests in progress (running or queued); more get 429.
    request_timeout_s: float = 300.0  # A request still unfinished after this is cancelled (504).
    max_body_bytes: int = 1 << 20  # Larger request bodies get 413.
    api_keys: frozenset[str] = frozenset()  # Empty: no key needed.
    rate_limit_per_minute: float = 0.0  # Requests per minute per API key (or client address); 0: off.
    rate_limit_burst: int = 20  # Requests a client may send at once before the rate applies.
    warmup: bool = False  # Compile every prompt bucket before accepting requests.


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def _error_body(error: APIError) -> dict:
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(_error_body(error), status_code=error.status, headers=error.headers)


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


class _Job:
    """The engine requests of one HTTP request; their events arrive on an asyncio queue as (choice, event)."""

    def __init__(self, engine: Engine, plan: completions.Plan):
        loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
        emit = lambda index: lambda event: loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
        self.tickets = []
        try:
            for index, request in enumerate(plan.requests):
                self.tickets.append(engine.submit(request, emit(index)))
        except ValueError as error:
            self.cancel()
            raise APIError(400, str(error)) from None

    def cancel(self) -> None:
        for ticket in self.tickets:
            ticket.cancel()

    async def events(
        self, deadline: float, disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> AsyncIterator[tuple[int, object]]:
        remaining = len(self.tickets)
        while remaining:
            wait = deadline - time.monotonic()
            if wait <= 0:
                raise APIError(504, "The request timed out before the model finished.", "timeout", code="timeout")
            try:
                index, event = await asyncio.wait_for(self.queue.get(), min(wait, _POLL_S))
            except TimeoutError:
                if disconnected is not None and await disconnected():
                    # 499 (nginx's "client closed request"): nobody reads it, but /metrics counts it.
                    raise APIError(499, "The client disconnected.", code="client_disconnected") from None
                continue
            if isinstance(event, Finished):
                remaining -= 1
                if event.reason == "error":
                    raise APIError(500, f"Generation failed: {event.error}", "server_error")
                if event.reason == "cancelled":
                    raise APIError(503, "The server is shutting down.", "server_error")
            yield index, event


class _MetricsMiddleware:
    """Counts every HTTP request by endpoint and status, and times it to its last byte (streams included)."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_and_note_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.metrics.request(endpoint, status, time.perf_counter() - start)


def create_app(model, tokenizer: Tokenizer, settings: ServeSettings) -> FastAPI:
    """The server for one loaded model (any module with the Transformer interface, quantized or not)."""
    metrics = ServeMetrics()
    engine = Engine(model, tokenizer, settings.max_batch_size, settings.max_cache_len, metrics)
    limits = completions.Limits(
        engine.max_cache_len,
        settings.max_prompt_tokens or engine.max_cache_len,
        settings.max_tokens,
        settings.max_choices,
    )
    limiter = (
        auth.RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst)
        if settings.rate_limit_per_minute > 0
        else None
    )
    with open(CHAT_PAGE, encoding="utf-8") as f:
        chat_page = f.read()
    in_flight = 0

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.warmup:
            await asyncio.to_thread(engine.warmup)
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="Spanish LLM", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.settings = engine, metrics, settings
    app.add_middleware(_MetricsMiddleware, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return _error_response(
            APIError(
                error.status_code,
                f"{request.method} {request.url.path}: {error.detail}",
                headers=getattr(error, "headers", None),
            )
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        return _error_response(APIError(500, f"Internal error: {type(error).__name__}: {error}", "server_error"))

    def authorize(request: Request) -> str:
        """The client's identity for rate limiting: its API key, or its address on an open server."""
        client = request.client.host if request.client else "unknown"
        if settings.api_keys:
            key = auth.check_key(settings.api_keys, request.headers.get("authorization"))
            if key is None:
                raise APIError(
                    401, "Missing or invalid API key: send 'Authorization: Bearer YOUR_KEY'.", code="invalid_api_key"
                )
            client = key
        if limiter is not None:
            wait = limiter.acquire(client)
            if wait:
                raise APIError(
                    429,
                    f"Rate limit of {settings.rate_limit_per_minute:g} requests per minute "
                    f"reached; retry in {wait:.1f} s.",
                    "rate_limit_error",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(max(1, round(wait)))},
                )
        return client

    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > settings.max_body_bytes):
            raise APIError(
                413, f"The request body is larger than {settings.max_body_bytes} bytes.", code="request_too_large"
            )
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > settings.max_body_bytes:
                raise APIError(
                    413, f"The request body is larger than {settings.max_body_bytes} bytes.", code="request_too_large"
                )
        try:
            parsed = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise APIError(400, f"The request body is not valid JSON: {error}.", code="invalid_json") from None
        if not isinstance(parsed, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
        return parsed

    async def serve(
        request: Request,
        schema: type[schemas.CompletionRequest | schemas.ChatCompletionRequest],
        plan_request: Callable,
    ) -> Response:
        nonlocal in_flight
        deadline = time.monotonic() + settings.request_timeout_s
        authorize(request)
        if in_flight >= settings.max_concurrent_requests:
            raise APIError(
                429,
                f"The server is busy ({settings.max_concurrent_requests} requests in progress); retry shortly.",
                "rate_limit_error",
                code="server_busy",
                headers={"Retry-After": "1"},
            )
        in_flight += 1
        released = False

        def release() -> None:
            nonlocal in_flight, released
            if not released:
                in_flight, released = in_flight - 1, True

        try:
            raw = await read_json(request)
            try:
                body = schema.model_validate(raw)
            except pydantic.ValidationError as error:
                message, param = schemas.describe(error, raw)
                raise APIError(422, message, param=param) from None
            if body.model != settings.model_name:
                raise APIError(
                    404,
                    f"The model '{body.model}' does not exist; this server serves '{settings.model_name}'.",
                    param="model",
                    code="model_not_found",
                )
            try:
                plan = plan_request(body, tokenizer, limits)
            except completions.RequestError as error:
                raise APIError(400, str(error), param=error.param, code=error.code) from None
            job = _Job(engine, plan)
        except BaseException:
            release()
            raise
        header = {
            "id": f"{'chatcmpl' if plan.chat else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": settings.model_name,
        }
        choices = [completions.Choice(i, plan, tokenizer) for i in range(len(plan.requests))]
        if plan.stream:
            return StreamingResponse(
                stream(job, plan, choices, header, deadline, release),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        try:
            async for index, event in job.events(deadline, request.is_disconnected):
                choices[index].add(event)
        finally:
            job.cancel()
            release()
        return JSONResponse(
            {
                **header,
                "object": "chat.completion" if plan.chat else "text_completion",
                "choices": [c.final() for c in choices],
                "usage": usage(plan, choices),
            }
        )

    def usage(plan: completions.Plan, choices: list[completions.Choice]) -> dict:
        completion_tokens = sum(c.finished.completion_tokens for c in choices if c.finished)
        return {
            "prompt_tokens": plan.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": plan.prompt_tokens + completion_tokens,
        }

    async def stream(
        job: _Job,
        plan: completions.Plan,
        choices: list[completions.Choice],
        header: dict,
        deadline: float,
        release: Callable[[], None],
    ) -> AsyncIterator[str]:
        chunk = lambda delta: _sse(
            {**header, "object": "chat.completion.chunk" if plan.chat else "text_completion", "choices": [delta]}
        )
        try:
            for choice in choices:
                if (opening := choice.opening()) is not None:
                    yield chunk(opening)
            async for index, event in job.events(deadline):
                if (delta := choices[index].add(event)) is not None:
                    yield chunk(delta)
            if plan.include_usage:
                yield _sse(
                    {
                        **header,
                        "object": "chat.completion.chunk" if plan.chat else "text_completion",
                        "choices": [],
                        "usage": usage(plan, choices),
                    }
                )
            yield _sse("[DONE]")
        except APIError as error:  # The status line is sent already: the error goes in the stream.
            yield _sse(_error_body(error))
        finally:  # Also on client disconnect (the task is cancelled): free the slots at once.
            job.cancel()
            release()

    @app.post("/v1/completions")
    async def create_completion(request: Request) -> Response:
        return await serve(request, schemas.CompletionRequest, completions.plan_completion)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: Request) -> Response:
        return await serve(request, schemas.ChatCompletionRequest, completions.plan_chat)

    def model_card() -> dict:
        return {
            "id": settings.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "llm",
            "max_model_len": engine.max_cache_len,
        }

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str, request: Request) -> dict:
        authorize(request)
        if model_id != settings.model_name:
            raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
        return model_card()

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = engine.running
        return JSONResponse(
            {
                "status": "ok" if alive else "unavailable",
                "model": settings.model_name,
                "active_slots": engine.num_active,
                "queue_depth": engine.num_waiting,
                "max_batch_size": engine.max_batch_size,
                "in_flight_requests": in_flight,
                "last_error": engine.error,
            },
            status_code=200 if alive else 503,
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def chat() -> HTMLResponse:
        return HTMLResponse(chat_page)

    return app
