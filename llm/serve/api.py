"""The OpenAI-compatible HTTP API (FastAPI) in front of the continuous-batching engine.

    POST /v1/completions        text (or token-id) prompts; logprobs, echo, n, stop, seed, stream
    POST /v1/chat/completions   messages through the chat template (llm/chat_template.py); stream; with an index,
                                retrieves first and returns the passages as "sources" (llm/serve/rag_chat.py)
    POST /v1/embeddings         sentence embeddings of texts or token ids (llm/serve/embeddings_api.py)
    GET  /v1/models             the one served model (and GET /v1/models/{id} its card)
    /tokenize, /detokenize, /tokenizer_info   vLLM's tokenizer endpoints (llm/serve/tokenize_api.py)
    GET  /health                200 while the decode loop runs, 503 otherwise; the embedder and the index
    GET  /tokenizer_info        vLLM's tokenizer description (special tokens, chat template, context length)
    POST /tokenize, /detokenize vLLM's token endpoints (text or messages <-> ids), which lm-eval's API models use
    GET  /metrics               Prometheus text format (needs a key when the server has keys, unless public)
    GET  /                      the chat page (its script and icon under /static, and /favicon.ico)

Every error is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 malformed JSON (bad
syntax, nesting deeper than 32, text with an unpaired surrogate) or a request that cannot be served (context
too long, bad conversation), 401 missing or unknown API key, 404 unknown model or path, 408 body not received
within `body_timeout_s`, 413 body too large, 422 a body that does not match the schema (unknown field, wrong
type, value out of range), 429 rate limit or too many concurrent requests, 499 (only in /metrics) the client
disconnected before its answer was complete, 500 an internal error (its message names the request id, which
every response carries in X-Request-Id, and the server logs one line with it), 504 request timeout.

A request takes one of the `max_concurrent_requests` places only once its body has arrived and been checked,
so clients that upload slowly cannot lock others out; each of those is cut off after `body_timeout_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from configs import base
from llm import sharding
from llm.infer.watermark import WatermarkParams
from llm.rag.embeddings import Embedder
from llm.serve import admission, completions, embeddings_api, errors, rag_chat, schemas, tokenize_api
from llm.serve.engine import Engine
from llm.serve.errors import APIError
from llm.serve.jobs import Job
from llm.serve.metrics import RequestMetricsMiddleware, ServeMetrics
from llm.tokenizer import Tokenizer

CHAT_PAGE = os.path.join(os.path.dirname(__file__), "static", "chat.html")
ENDPOINTS = (
    "/",
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/static/chat.js",
    "/favicon.ico",
    *tokenize_api.ENDPOINTS,  # vLLM's tokenizer endpoints
    *embeddings_api.ENDPOINTS,
)


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
    body_timeout_s: float = 10.0  # A request body not fully received after this is refused (408).
    max_body_bytes: int = 1 << 20  # Larger request bodies get 413.
    api_keys: frozenset[str] = frozenset()  # Empty: no key needed.
    metrics_public: bool = False  # GET /metrics without a key even when the server has keys.
    rate_limit_per_minute: float = 0.0  # Requests per minute per API key (or client address); 0: off.
    rate_limit_burst: int = 20  # Requests a client may send at once before the rate applies.
    warmup: bool = False  # Compile every prompt bucket before accepting requests.
    watermark: WatermarkParams | None = None  # Watermark every completion with this (secret) key; None: off.
    rules: sharding.Rules = base.DEFAULT_LOGICAL_AXIS_RULES  # The run's sharding table: where the KV cache lives.


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


class Server:
    """One served model: the engine and everything the endpoints share, with one method per endpoint."""

    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        settings: ServeSettings,
        embeddings: embeddings_api.EmbeddingModel,
        retrieval: rag_chat.Retrieval | None = None,
    ):
        self.settings, self.tokenizer, self.embeddings, self.retrieval = settings, tokenizer, embeddings, retrieval
        self.worker = embeddings_api.forward_worker()  # Embedding forward passes: /v1/embeddings and retrieval.
        self.metrics = ServeMetrics()
        self.engine = Engine(
            model,
            tokenizer,
            settings.max_batch_size,
            settings.max_cache_len,
            self.metrics,
            settings.watermark,
            settings.rules,
        )
        self.limits = completions.Limits(
            self.engine.max_cache_len,
            settings.max_prompt_tokens or self.engine.max_cache_len,
            settings.max_tokens,
            settings.max_choices,
        )
        self.gate = admission.Gate(settings.api_keys, settings.rate_limit_per_minute, settings.rate_limit_burst)
        self.in_flight = admission.InFlight(settings.max_concurrent_requests)
        with open(CHAT_PAGE, encoding="utf-8") as f:
            self.page = f.read()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        if self.settings.warmup:
            await asyncio.to_thread(self.engine.warmup)
        self.engine.start()
        yield
        self.engine.stop()

    async def create_completion(self, request: Request) -> Response:
        return await self._generate(request, schemas.CompletionRequest, self._plan_completion)

    async def create_chat_completion(self, request: Request) -> Response:
        return await self._generate(request, schemas.ChatCompletionRequest, self._plan_chat)

    async def _plan_completion(self, body: schemas.CompletionRequest) -> completions.Plan:
        return completions.plan_completion(body, self.tokenizer, self.limits)

    async def _plan_chat(self, body: schemas.ChatCompletionRequest) -> completions.Plan:
        """A chat request's plan: grounded in retrieved passages when the server has an index (unless the request
        says `"retrieval": false`), else rendered as it is."""
        if self.retrieval is None or body.retrieval is False:
            if body.retrieval:
                raise completions.RequestError(
                    'This server has no retrieval index (start it with --index=DIR); leave out "retrieval".',
                    "retrieval",
                )
            return completions.plan_chat(body, self.tokenizer, self.limits)
        question = rag_chat.question(body)
        # The search holds a request place while it waits for the forward-pass worker. It gives it back just before
        # `_generate` takes the place the generation holds, with no await in between, so no other request gets it.
        slot = self.in_flight.enter()
        try:
            hits = await embeddings_api.off_loop(self.worker, self.retrieval.search, question)
        finally:
            slot.release()
        return rag_chat.plan_grounded(body, self.tokenizer, self.limits, hits)

    async def list_models(self) -> dict:
        return {"object": "list", "data": [self._model_card()]}

    async def get_model(self, model_id: str) -> dict:
        if model_id != self.settings.model_name:
            raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
        return self._model_card()

    async def health(self) -> JSONResponse:
        alive = self.engine.running
        return JSONResponse(
            {
                "status": "ok" if alive else "unavailable",
                "model": self.settings.model_name,
                "active_slots": self.engine.num_active,
                "queue_depth": self.engine.num_waiting,
                "max_batch_size": self.engine.max_batch_size,
                "in_flight_requests": self.in_flight.count,
                "last_error": self.engine.error,
                "embeddings": self.embeddings.describe(),
                "index": self.retrieval.describe() if self.retrieval is not None else None,
            },
            status_code=200 if alive else 503,
        )

    async def prometheus(self) -> Response:
        return Response(self.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def chat_page(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    def _model_card(self) -> dict:
        return {
            "id": self.settings.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "llm",
            "max_model_len": self.engine.max_cache_len,
        }

    async def _generate(
        self,
        request: Request,
        schema: type[schemas.CompletionRequest | schemas.ChatCompletionRequest],
        plan_request: Callable[[schemas.Strict], Awaitable[completions.Plan]],
    ) -> Response:
        """A completion or chat request: the JSON answer once all choices finish, or a stream of its tokens."""
        deadline = time.monotonic() + self.settings.request_timeout_s
        plan = await self._plan(request, schema, plan_request)
        slot = self.in_flight.enter()  # Only now: a slow or invalid upload holds no place.
        try:
            job = Job(self.engine, plan)
        except BaseException:
            slot.release()
            raise
        answer = completions.Answer(plan, self.tokenizer, self.settings.model_name)
        if plan.stream:  # Starlette's streaming response notices a disconnect and cancels `_stream`.
            return StreamingResponse(
                self._stream(job, answer, deadline, slot, request),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        job.watch(request.receive)
        try:
            async for index, event in job.events(deadline):
                answer.choices[index].add(event)
        finally:
            job.cancel()
            slot.release()
        return JSONResponse(answer.whole())

    async def _plan(
        self,
        request: Request,
        schema: type[schemas.CompletionRequest | schemas.ChatCompletionRequest],
        plan_request: Callable[[schemas.Strict], Awaitable[completions.Plan]],
    ) -> completions.Plan:
        """The request's body checked (400, 413, 422; 404 for another model) and turned into engine requests."""
        raw = await admission.read_json(request, self.settings.max_body_bytes, self.settings.body_timeout_s)
        body = schemas.parse(schema, raw, self.settings.model_name)
        try:
            return await plan_request(body)
        except completions.RequestError as error:
            raise APIError(400, str(error), param=error.param, code=error.code) from None

    async def _stream(
        self, job: Job, answer: completions.Answer, deadline: float, slot: admission.Slot, request: Request
    ) -> AsyncIterator[str]:
        try:
            for choice in answer.choices:
                if (opening := choice.opening()) is not None:
                    yield _sse(answer.chunk([opening]))
            async for index, event in job.events(deadline):
                if (delta := answer.choices[index].add(event)) is not None:
                    yield _sse(answer.chunk([delta]))
            if answer.plan.include_usage:
                yield _sse(answer.chunk([], usage=True))
            yield _sse("[DONE]")
        except APIError as error:  # The status line is sent already: the error goes in the stream.
            yield _sse(errors.error_body(error))
        except Exception as error:
            failure = errors.internal_error(errors.request_id(request), request.method, request.url.path, error)
            yield _sse(errors.error_body(failure))
        finally:  # Also on client disconnect (the task is cancelled): free the slots at once.
            job.cancel()
            slot.release()


def create_app(
    model,
    tokenizer: Tokenizer,
    settings: ServeSettings,
    embeddings: embeddings_api.EmbeddingModel | None = None,
    retrieval: rag_chat.Retrieval | None = None,
) -> FastAPI:
    """The server for one loaded model (any module with the Transformer interface, quantized or not);
    `embeddings` is what POST /v1/embeddings embeds with (default: this model, mean pooling, no prefixes), and
    `retrieval` the index chat completions are grounded in (default: none)."""
    embeddings = embeddings or embeddings_api.EmbeddingModel(Embedder(model, tokenizer))
    server = Server(model, tokenizer, settings, embeddings, retrieval)
    app = FastAPI(title="Spanish LLM", lifespan=server.lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.settings = server.engine, server.metrics, settings
    app.state.embeddings = embeddings
    # The last added runs first: metrics see the 500 that the request-id middleware makes of an exception.
    app.add_middleware(errors.RequestIdMiddleware)
    app.add_middleware(RequestMetricsMiddleware, metrics=server.metrics, endpoints=ENDPOINTS)
    errors.install_handlers(app)
    # The API routes need a key (when the server has any) and count against the rate limit; the metrics need a
    # key unless `metrics_public` (and are not rate limited: scrapers poll); the health check and chat page need
    # none (the page's own API calls do).
    keyed = [Depends(server.gate.authorize)]
    scraped = [] if settings.metrics_public else [Depends(server.gate.authenticate)]
    app.add_api_route("/v1/completions", server.create_completion, methods=["POST"], dependencies=keyed)
    app.add_api_route("/v1/chat/completions", server.create_chat_completion, methods=["POST"], dependencies=keyed)
    app.add_api_route("/v1/models", server.list_models, methods=["GET"], dependencies=keyed)
    app.add_api_route("/v1/models/{model_id}", server.get_model, methods=["GET"], dependencies=keyed)
    tokenize_api.add_routes(app, tokenizer, settings, server.engine.max_cache_len, keyed)
    embeddings_api.add_routes(app, embeddings, settings, server.in_flight, server.worker, keyed)
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.prometheus, methods=["GET"], dependencies=scraped)
    app.add_api_route("/", server.chat_page, methods=["GET"], response_class=HTMLResponse)
    app.mount("/static", StaticFiles(directory=os.path.dirname(CHAT_PAGE)), name="static")  # chat.js, favicon.svg
    app.add_api_route(
        "/favicon.ico", lambda: FileResponse(os.path.dirname(CHAT_PAGE) + "/favicon.svg"), methods=["GET"]
    )
    return app
