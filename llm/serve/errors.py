"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` for every failure the server answers.

Handlers added by `install_handlers` turn `APIError`, Starlette's own HTTP errors (unknown path, wrong
method) and anything unexpected into that shape, so a client never sees FastAPI's default error bodies.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


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


def error_body(error: APIError) -> dict:
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.status, headers=error.headers)


async def _api_error(request: Request, error: APIError) -> JSONResponse:
    return error_response(error)


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    message = f"{request.method} {request.url.path}: {error.detail}"
    return error_response(APIError(error.status_code, message, headers=getattr(error, "headers", None)))


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    return error_response(APIError(500, f"Internal error: {type(error).__name__}: {error}", "server_error"))


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
