"""What a request must pass before it reaches the model: API key (401), rate limit and server load (429),
body size (413), body upload time (408) and JSON syntax (400)."""

from __future__ import annotations

import asyncio
import json

from fastapi import Request
from starlette.requests import ClientDisconnect

from llm.serve import auth, errors
from llm.serve.errors import APIError


class Gate:
    """API keys and the per-client rate limit; `authorize` (key and rate) and `authenticate` (key only) are
    FastAPI dependencies of the guarded routes."""

    def __init__(self, api_keys: frozenset[str], rate_limit_per_minute: float, rate_limit_burst: int):
        self.api_keys, self.rate = api_keys, rate_limit_per_minute
        self.limiter = auth.RateLimiter(rate_limit_per_minute, rate_limit_burst) if rate_limit_per_minute > 0 else None

    # Async so that FastAPI runs these on the event loop rather than sending them to its thread pool.
    async def authenticate(self, request: Request) -> str:
        """The client's identity: its API key (401 without a valid one), or its address on an open server."""
        if not self.api_keys:
            return request.client.host if request.client else "unknown"
        key = auth.check_key(self.api_keys, request.headers.get("authorization"))
        if key is None:
            raise APIError(
                401, "Missing or invalid API key: send 'Authorization: Bearer YOUR_KEY'.", code="invalid_api_key"
            )
        return key

    async def authorize(self, request: Request) -> str:
        """`authenticate`, then the client's rate limit (429)."""
        client = await self.authenticate(request)
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


MAX_JSON_DEPTH = 32  # Arrays and objects inside one another; a real request nests about 5 deep.


def _depth_at_most(value: object, limit: int) -> bool:
    """Whether `value` nests no deeper than `limit` (level by level: a deep value must not exhaust the stack)."""
    level = [value]  # The arrays and objects at one depth, starting with the body at depth 1.
    for _ in range(limit):
        level = [
            child
            for node in level
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, dict | list)
        ]
        if not level:
            return True
    return False


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


def parse_json(body: bytes) -> dict:
    """The body as a JSON object (400 for anything else: bad syntax or UTF-8, NaN/Infinity, too deep nesting)."""
    too_deep = APIError(400, f"The request body nests deeper than {MAX_JSON_DEPTH} levels.", code="invalid_json")
    try:
        # Python's parser rejects >4300-digit integers with a plain ValueError, and NaN and Infinity (which strict
        # JSON has not) on request; it recurses per level, so a deep enough body exhausts the stack.
        parsed = json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise too_deep from None
    except ValueError as error:
        raise APIError(400, f"The request body is not valid JSON: {str(error)[:200]}.", code="invalid_json") from None
    if not isinstance(parsed, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    if not _depth_at_most(parsed, MAX_JSON_DEPTH):
        raise too_deep
    return parsed


async def read_json(request: Request, max_bytes: int, timeout_s: float) -> dict:
    """The body as a JSON object, read no further than `max_bytes` (a declared or actual larger body: 413) and
    within `timeout_s` (408), so a client that stalls mid-upload cannot hold the connection's task forever."""
    # The body is left unread: the connection cannot carry another request, so ask the server to close it.
    close = {"Connection": "close"}
    too_large = APIError(
        413, f"The request body is larger than {max_bytes} bytes.", code="request_too_large", headers=close
    )
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise too_large
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:
                    raise too_large
    except TimeoutError:
        raise APIError(
            408, f"The request body did not arrive within {timeout_s:g} s.", code="request_timeout", headers=close
        ) from None
    except ClientDisconnect:
        raise errors.client_disconnected() from None
    return parse_json(bytes(body))
