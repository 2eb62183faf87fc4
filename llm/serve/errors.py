"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` for every failure the server answers.

Handlers added by `install_handlers` turn `APIError` and Starlette's own HTTP errors (unknown path, wrong
method) into that shape, so a client never sees FastAPI's default error bodies. `RequestIdMiddleware` gives
every request an id (the `X-Request-Id` response header) and answers anything unexpected itself: a 500 in
that shape naming the id, one log line with the id, and the connection kept open. (Starlette's own last-resort
handler would log a traceback per request and re-raise, which makes the server close the connection.)
"""

from __future__ import annotations

import logging
import re
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

REQUEST_ID_HEADER = "x-request-id"
# A client's own X-Request-Id (e.g. from a proxy) is kept when it is this tame; otherwise the server makes one.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
logger = logging.getLogger("llm.serve")


class APIError(Exception):
    """An error answered with HTTP `status` and OpenAI's error body; `headers` e.g. Retry-After."""

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


def _utf8(text: str | None) -> str | None:
    """`text` with anything UTF-8 cannot carry (a lone surrogate from a client's JSON) written as an escape, so
    that echoing a client's input in a message can never break the response."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


CLIENT_CLOSED = 499  # nginx's "client closed request": the client left before its response was complete.


def client_disconnected() -> APIError:
    """What a request whose client left ends with: nobody reads it, but /metrics counts it."""
    return APIError(CLIENT_CLOSED, "The client disconnected.", code="client_disconnected")


def error_body(error: APIError) -> dict:
    return {
        "error": {"message": _utf8(error.message), "type": error.type, "param": _utf8(error.param), "code": error.code}
    }


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.status, headers=error.headers)


def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "-")


def internal_error(request_id: str, method: str, path: str, error: BaseException) -> APIError:
    """Logs an unexpected failure in one line and returns the 500 to answer; the details stay in the log."""
    logger.error("Request %s (%s %s) failed: %s: %s", request_id, method, path, type(error).__name__, error)
    return APIError(
        500,
        f"The server had an error while processing your request (request id {request_id}); its log has the details.",
        "server_error",
    )


async def _api_error(request: Request, error: APIError) -> JSONResponse:
    if error.status >= 500:  # E.g. a failed decode step: the id lets an operator find it in the log.
        message = f"{error.message} (request id {request_id(request)})"
        error = APIError(error.status, message, error.type, error.param, error.code, error.headers)
    return error_response(error)


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    message = f"{request.method} {request.url.path}: {error.detail}"
    return error_response(APIError(error.status_code, message, headers=getattr(error, "headers", None)))


class RequestIdMiddleware:
    """ASGI middleware: an id per HTTP request (the client's tame X-Request-Id or a new one), in
    `scope["state"]["request_id"]` and the response's X-Request-Id header; an exception that escapes the app is
    answered here (see the module docstring) and never reaches the server."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        rid = given if _CLIENT_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        started = complete = False

        async def send_with_id(message):
            nonlocal started, complete
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as error:
            answer = internal_error(rid, scope["method"], scope["path"], error)
            if not started:
                await error_response(answer)(scope, receive, send_with_id)
            elif not complete:  # Part of the response is out: end it cleanly (the client sees a short stream).
                await send({"type": "http.response.body", "body": b"", "more_body": False})


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
