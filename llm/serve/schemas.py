"""Request bodies of the OpenAI-compatible API, validated strictly: unknown fields and wrong types are errors.

Fields follow OpenAI's API reference (same names, defaults and ranges). Three sampling extensions, as in
vLLM: `top_k`, `min_p`, `repetition_penalty` and `ignore_eos`. OpenAI's presence and frequency penalties are accepted
only at their neutral value 0, so that clients that always send them keep working. Chat requests may also say
`retrieval` (llm/serve/rag_chat.py); every other unknown field is a 422, as before.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError

from llm.serve.errors import APIError

MAX_STOP_STRINGS = 64  # OpenAI allows 4; lm-eval's tasks send 5 plus EOS, and vLLM has no small limit.
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions; chat's top_logprobs goes to 20.
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on the inputs of one /v1/embeddings request.
# Errors of these types are a body that is not proper text (400, like invalid JSON), not a schema mismatch (422).
BAD_TEXT_ERRORS = ("invalid_text", "string_unicode")  # Ours on values; pydantic's on an object's keys.


def _unicode(value: str) -> str:
    """JSON escapes such as \\ud800 can carry half a surrogate pair, which Python keeps but no tokenizer (nor the
    UTF-8 response) can encode: refuse it here, naming the field, rather than fail deep in the tokenizer."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise PydanticCustomError(
            "invalid_text",
            "must be valid Unicode text; it has an unpaired surrogate {char} at index {index}",
            {"char": ascii(value[error.start]), "index": error.start},
        ) from None
    return value


def _token_id(value: int) -> int:
    if value < 0:
        raise PydanticCustomError("invalid_token_id", "token ids must be >= 0")
    return value


def _stop_count(value: list[str]) -> list[str]:
    if len(value) > MAX_STOP_STRINGS:
        raise PydanticCustomError(
            "too_many_stop_strings",
            "at most {limit} stop strings; got {count}",
            {"limit": MAX_STOP_STRINGS, "count": len(value)},
        )
    return value


Text = Annotated[str, AfterValidator(_unicode)]
TokenIds = list[Annotated[int, AfterValidator(_token_id)]]


def _json_shape(value: Any) -> str | None:
    """The JSON shape of a union field's value: 'text', or a non-empty list of 'texts', 'ids' (token ids),
    'id_lists' or 'parts' (objects); None for anything else."""
    if isinstance(value, str):
        return "text"
    if not isinstance(value, list) or not value:
        return None
    for shape, kind in (("texts", str), ("ids", int), ("id_lists", list), ("parts", dict)):
        # bool is an int subclass in Python but not a token id in JSON.
        if all(isinstance(item, kind) and not isinstance(item, bool) for item in value):
            return shape
    return None


def _by_shape(expected: str, empty: str | None = None, **members: Any) -> Any:
    """A union whose member is chosen by the value's shape (`_json_shape`; an empty list goes to `empty`), so
    that an error is that member's ('token ids must be >= 0' at prompt.0) rather than pydantic's report on the
    first member ('Input should be a valid string'); a value of no accepted shape gets 'must be `expected`'."""

    def shape(value: Any) -> str | None:
        return empty if isinstance(value, list) and not value else _json_shape(value)

    union = Union[tuple(Annotated[kind, Tag(tag)] for tag, kind in members.items())]  # noqa: UP007
    return Annotated[
        union, Discriminator(shape, custom_error_type="invalid_type", custom_error_message=f"must be {expected}")
    ]


class Strict(BaseModel):
    """A request body: unknown fields and wrong types are errors (no coercion)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False  # A last chunk (with empty choices) carries the token usage.


class _Sampling(Strict):
    model: Text
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=16)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: (
        _by_shape(
            "a string or a list of strings",
            empty="texts",
            text=Text,
            texts=Annotated[list[Text], AfterValidator(_stop_count)],
        )
        | None
    ) = None
    seed: int | None = None
    user: Text | None = None
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

    prompt: _by_shape(
        "a string, a list of strings, a list of token ids or a list of lists of token ids (none of them empty)",
        text=Text,
        texts=list[Text],
        ids=TokenIds,
        id_lists=list[Annotated[TokenIds, Field(min_length=1)]],
    )
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    echo: bool | None = None


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system.
    content: _by_shape("a string or a list of text parts", empty="parts", text=Text, parts=list[TextPart])
    name: Text | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # OpenAI's newer name for max_tokens.
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    # Ours: on a server started with --index, false answers without retrieving (default: retrieve); true on a
    # server without an index is a 400, so that a client never takes an ungrounded answer for a grounded one.
    retrieval: bool | None = None


class EmbeddingRequest(Strict):
    """POST /v1/embeddings. `input` is text, a list of texts, token ids or a list of token-id lists; an empty text,
    and an input longer than the embedding model's context, are refused by the route (400, as OpenAI does)."""

    model: Text
    input: _by_shape(
        f"a string, a list of strings, a list of token ids or a list of lists of token ids (none of the lists empty, "
        f"at most {MAX_EMBEDDING_INPUTS} inputs)",
        text=Text,
        texts=Annotated[list[Text], Field(max_length=MAX_EMBEDDING_INPUTS)],
        ids=TokenIds,
        id_lists=Annotated[list[Annotated[TokenIds, Field(min_length=1)]], Field(max_length=MAX_EMBEDDING_INPUTS)],
    )
    dimensions: Annotated[int, Field(ge=1)] | None = None  # Keep the first `dimensions` (Matryoshka), re-normalised.
    encoding_format: Literal["float", "base64"] = "float"  # base64: the little-endian float32 bytes.
    user: Text | None = None


def describe(error: ValidationError, body: object) -> tuple[int, str, str | None]:
    """HTTP status (400 for text that is not Unicode, else 422), an OpenAI-style message and the offending
    parameter (e.g. 'messages.0.role') for the first problem in `error`, raised while validating `body`."""
    first = error.errors(include_url=False)[0]
    path, node = [], body
    for part in first["loc"]:  # Keep the parts of the location that exist in the body (not union-member tags).
        if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int):
            path.append(str(part))
            node = node[part] if isinstance(node, dict) or part < len(node) else None
        elif first["type"] in ("extra_forbidden", "missing") and isinstance(node, dict):
            path.append(str(part))
            break
    param = ".".join(path) or None
    if first["type"] == "extra_forbidden":
        return 422, f"Unrecognized request argument supplied: {param}", param
    if first["type"] == "missing":
        return 422, f"Missing required parameter: '{param}'.", param
    status = 400 if first["type"] in BAD_TEXT_ERRORS else 422
    shown = repr(first.get("input"))
    shown = shown if len(shown) <= 100 else shown[:100] + "..."
    where = f"value for '{param}'" if param else "request body"
    return status, f"Invalid {where}: {first['msg']} (got {shown}).", param


def parse(schema: type[Strict], raw: object, model_name: str) -> Strict:
    """`raw` validated as `schema` (400 or 422 naming the field, see `describe`) and addressed to the served
    model `model_name` (404 for another; a body that may leave out `model` means this one)."""
    try:
        body = schema.model_validate(raw)
    except ValidationError as error:
        status, message, param = describe(error, raw)
        raise APIError(status, message, param=param) from None
    if body.model is not None and body.model != model_name:
        raise APIError(
            404,
            f"The model '{body.model}' does not exist; this server serves '{model_name}'.",
            param="model",
            code="model_not_found",
        )
    return body
