"""Request bodies of the OpenAI-compatible API, validated strictly: unknown fields and wrong types are errors.

Fields follow OpenAI's API reference (same names, defaults and ranges). Three sampling extensions, as in
vLLM: `top_k`, `min_p`, `repetition_penalty` and `ignore_eos`. OpenAI's presence and frequency penalties are accepted
only at their neutral value 0, so that clients that always send them keep working.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_STRINGS = 4  # OpenAI's limit.
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions; chat's top_logprobs goes to 20.

TokenIds = list[Annotated[int, Field(ge=0)]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False  # A last chunk (with empty choices) carries the token usage.


class _Sampling(_Strict):
    model: str
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=16)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0, lt=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    ignore_eos: bool | None = None  # Generate max_tokens whatever the model says (benchmarks, as in vLLM).

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _neutral_only(cls, value: float | None) -> float | None:
        if value not in (None, 0, 0.0):
            raise ValueError("only 0 is supported; use repetition_penalty to discourage repetition")
        return value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value is not None and "" in ([value] if isinstance(value, str) else value):
            raise ValueError("stop strings must not be empty")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Sampling):
    """POST /v1/completions. `prompt` is text, a list of texts, token ids or a list of token-id lists."""

    prompt: (
        str
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[TokenIds, Field(min_length=1)]
        | Annotated[list[Annotated[TokenIds, Field(min_length=1)]], Field(min_length=1)]
    )
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    echo: bool | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # OpenAI's newer name for max_tokens.
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


def describe(error: ValidationError, body: object) -> tuple[str, str | None]:
    """An OpenAI-style message and the offending parameter (e.g. 'messages.0.role') for the first problem
    in `error`, raised while validating `body`."""
    first = error.errors(include_url=False)[0]
    path, node = [], body
    for part in first["loc"]:  # Keep the part of the location that exists in the body (drop union-member tags).
        if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int):
            path.append(str(part))
            node = node[part] if isinstance(node, dict) or part < len(node) else None
        elif first["type"] in ("extra_forbidden", "missing") and isinstance(node, dict):
            path.append(str(part))
            break
        else:
            break
    param = ".".join(path) or None
    if first["type"] == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if first["type"] == "missing":
        return f"Missing required parameter: '{param}'.", param
    return f"Invalid value for '{param}': {first['msg']} (got {first.get('input')!r:.100}).", param
