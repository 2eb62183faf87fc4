"""What a request must pass before it reaches the model: API key (401), rate limit and server load (429),
body size (413) and JSON syntax (400)."""

from __future__ import annotations

import json

from fastapi import Request

from llm.serve import auth
from llm.serve.errors import APIError


class Gate:
    """API keys and the per-client rate limit; `authorize` is a FastAPI dependency of the guarded routes."""

    def __init__(self, api_keys: frozenset[str], rate_limit_per_minute: float, rate_limit_burst: int):
        self.api_keys, self.rate = api_keys, rate_limit_per_minute
        self.limiter = auth.RateLimiter(rate_limit_per_minute, rate_limit_burst) if rate_limit_per_minute > 0 else None

    # Async so that FastAPI runs it on the event loop rather than sending it to its thread pool.
    async def authorize(self, request: Request) -> str:
        """The client's identity for rate limiting: its API key, or its address on an open server."""
        client = request.client.host if request.client else "unknown"
        if self.api_keys:
            key = auth.check_key(self.api_keys, request.headers.get("authorization"))
            if key is None:
                raise APIError(
                    401, "Missing or invalid API key: send 'Authorization: Bearer YOUR_KEY'.", code="invalid_api_key"
                )
            client = key
        if self.limiter is not None and (wait := self.limiter.acquire(client)):
            raise APIError(
                429,
                f"Rate limit of {self.rate:g} requests per minute reached; retry in {wait:.1f} s.",
                "rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(max(1, round(wait)))},
            )
        return client


class Slot:
    """One request's place among those in progress; `release` is safe to call more than once."""

    def __init__(self, owner: InFlight):
        self._owner: InFlight | None = owner

    def release(self) -> None:
        if self._owner is not None:
            self._owner.count -= 1
            self._owner = None


class InFlight:
    """HTTP requests in progress (running or queued), capped so that a flood gets 429 instead of an ever
    longer queue. Only the event loop touches it, so a plain counter needs no lock."""

    def __init__(self, limit: int):
        self.limit, self.count = limit, 0

    def enter(self) -> Slot:
        if self.count >= self.limit:
            raise APIError(
                429,
                f"The server is busy ({self.limit} requests in progress); retry shortly.",
                "rate_limit_error",
                code="server_busy",
                headers={"Retry-After": "1"},
            )
        self.count += 1
        return Slot(self)


async def read_json(request: Request, max_bytes: int) -> dict:
    """The body as a JSON object, read no further than `max_bytes` (a declared or actual larger body: 413)."""
    too_large = APIError(413, f"The request body is larger than {max_bytes} bytes.", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise too_large
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"The request body is not valid JSON: {error}.", code="invalid_json") from None
    if not isinstance(parsed, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    return parsed
