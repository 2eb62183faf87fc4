"""Prometheus metrics of the server, served at GET /metrics in the text exposition format.

Each server gets its own registry (not the process-global default), so several servers in one process,
as in the tests, count separately.
"""

from __future__ import annotations

import time
from collections.abc import Collection

import prometheus_client as prom

from llm.serve.errors import CLIENT_CLOSED

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServeMetrics:
    """Requests, tokens, queue depth, request latency and time to first token."""

    def __init__(self):
        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter(
            "llm_requests", "HTTP requests by endpoint and status code.", ["endpoint", "status"], registry=self.registry
        )
        self.prompt_tokens = prom.Counter("llm_prompt_tokens", "Prompt tokens prefilled.", registry=self.registry)
        self.completion_tokens = prom.Counter("llm_completion_tokens", "Tokens generated.", registry=self.registry)
        self.waiting = prom.Gauge("llm_queue_depth", "Requests waiting for a free decode slot.", registry=self.registry)
        self.active = prom.Gauge("llm_active_slots", "Decode slots in use.", registry=self.registry)
        self.latency = prom.Histogram(
            "llm_request_latency_seconds",
            "Time from request to last byte, by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = prom.Histogram(
            "llm_time_to_first_token_seconds",
            "Time from submission to the first token.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    # The engine's hooks (llm.serve.engine.Engine calls these from its thread; prometheus_client is thread-safe).
    def queue(self, waiting: int, active: int) -> None:
        self.waiting.set(waiting)
        self.active.set(active)

    def tokens(self, prompt: int, completion: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.completion_tokens.inc(completion)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    # The HTTP layer's hook.
    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def exposition(self) -> bytes:
        return prom.generate_latest(self.registry)


class RequestMetricsMiddleware:
    """ASGI middleware: counts every HTTP request by endpoint and status, and times it to its last byte (streams
    included, which a route handler could not see). A request whose client disconnected before the response was
    complete counts as 499, whatever was sent to nobody. Paths not in `endpoints` count as "other", so clients
    probing arbitrary paths cannot grow the label set."""

    def __init__(self, app, metrics: ServeMetrics, endpoints: Collection[str]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # No response at all (the app was cancelled, e.g. at shutdown) counts as 500.
        start, status, complete, gone = time.perf_counter(), 500, False, False

        async def receive_and_note_disconnect():
            nonlocal gone
            message = await receive()
            # After the last byte the server reports a disconnect to any late reader: that is no early leave.
            gone = gone or (message["type"] == "http.disconnect" and not complete)
            return message

        async def send_and_note_status(message):
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        try:
            await self.app(scope, receive_and_note_disconnect, send_and_note_status)
        finally:
            endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
            self.metrics.request(endpoint, CLIENT_CLOSED if gone else status, time.perf_counter() - start)
