"""POST /v1/embeddings in OpenAI's format: sentence embeddings (llm/rag/embeddings.py) of the served run, or of
another run served beside it (e.g. a contrastively trained embedder).

    {"model", "input": text | [texts] | [ids] | [[ids]], "dimensions"?, "encoding_format"="float"|"base64", "user"?}
    -> {"object": "list", "data": [{"object": "embedding", "index", "embedding": [floats] | base64}], "model",
        "usage": {"prompt_tokens", "total_tokens"}}

A text is embedded as `Embedder.embed` embeds it: BOS, the input kind's prefix, the text. OpenAI's API has no
query/passage distinction, so every input is embedded as one kind (passage unless the server says query). Token
ids are the text's ids as the tokenizer gives them (without BOS): they get the BOS and the prefix in front, so
that ids and their text embed alike. `dimensions` keeps the first coordinates and re-normalises them (the
Matryoshka way); base64 is the little-endian float32 bytes, which the `openai` client decodes.

OpenAI refuses rather than truncates: an empty text or an input longer than the embedding model's context is a
400 naming its index (`input.3`); a body that does not match the schema is a 422 (llm/serve/schemas.py), a
surrogate in a text a 400, token ids outside the vocabulary a 400, another model's name a 404.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.params import Depends

from llm.model.pooling import truncate
from llm.rag.embeddings import KINDS, Embedder
from llm.serve import admission, schemas
from llm.serve.errors import APIError

if TYPE_CHECKING:
    from llm.serve.api import ServeSettings

ENDPOINTS = ("/v1/embeddings",)
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class EmbeddingModel:
    """What POST /v1/embeddings embeds with."""

    embedder: Embedder
    kind: str = "passage"  # Every input is embedded as this kind (its prefix): "passage" or "query".
    run: str | None = None  # The embedder's run directory, for /health; None: the served model itself.

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"The embedding input kind must be one of {KINDS}, got {self.kind!r}.")

    def describe(self) -> dict:
        embedder = self.embedder
        return {
            "run": self.run or "served model",
            "pooling": embedder.pooling,
            "input_kind": self.kind,
            "dimensions": embedder.dim,
            "max_input_tokens": embedder.max_len,
        }


def _encoded(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # Explicitly little-endian: what the client's np.frombuffer(float32) reads.
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def forward_worker() -> ThreadPoolExecutor:
    """The one thread that runs the server's embedding forward passes: those of POST /v1/embeddings and the query
    embeddings of retrieval (llm/serve/rag_chat.py), so that the event loop keeps answering (and streaming).

    They run beside the engine's decode thread on the same devices, which is safe: JAX allows jitted calls from
    several threads, and they share only the parameters, which are read-only (the engine's programs donate nothing
    but its own KV cache and sampling state, which an embedder never sees). One worker, not a pool, runs one
    request's batches at a time: at most one batch of activations sits beside the KV cache, the decode steps
    interleave with its batches rather than with a crowd of them, and requests waiting their turn queue in the
    executor without holding a thread.
    """
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-serve-embed")


async def off_loop(worker: ThreadPoolExecutor, function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` run on `worker`, awaited without blocking the event loop."""
    return await asyncio.get_running_loop().run_in_executor(worker, function, *args)


class EmbeddingsAPI:
    """The endpoint for one embedding model; its forward passes run on the server's `forward_worker`."""

    def __init__(
        self,
        model: EmbeddingModel,
        settings: ServeSettings,
        in_flight: admission.InFlight,
        worker: ThreadPoolExecutor,
    ):
        self.model, self.settings, self.in_flight, self.worker = model, settings, in_flight, worker

    async def create_embeddings(self, request: Request) -> dict:
        raw = await admission.read_json(request, self.settings.max_body_bytes, self.settings.body_timeout_s)
        body = schemas.parse(schemas.EmbeddingRequest, raw, self.settings.model_name)
        dim = self.model.embedder.dim
        if body.dimensions is not None and body.dimensions > dim:
            raise APIError(
                400,
                f"dimensions must be at most {dim} (the size of this model's embeddings), got {body.dimensions}.",
                param="dimensions",
            )
        single = isinstance(body.input, str) or isinstance(body.input[0], int)  # The schema allows no empty list.
        inputs = [body.input] if single else body.input
        rows = [self._row(item, f"input.{index}" if not single else "input") for index, item in enumerate(inputs)]
        slot = self.in_flight.enter()  # Only now: a slow or invalid upload holds no place.
        try:
            vectors = await off_loop(self.worker, self._embed, inputs, rows)
        finally:
            slot.release()
        if body.dimensions is not None:
            vectors = np.asarray(truncate(vectors, body.dimensions))  # the Matryoshka way
        tokens = sum(len(row) for row in rows)
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": index, "embedding": _encoded(vector, body.encoding_format)}
                for index, vector in enumerate(vectors)
            ],
            "model": self.settings.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def _row(self, item: str | list[int], param: str) -> list[int]:
        """The token ids `item` is embedded from (checked: not empty, in the vocabulary, within the context)."""
        embedder = self.model.embedder
        tokenizer, prefix = embedder.tokenizer, embedder.prefixes[self.model.kind]
        if isinstance(item, str):
            if not item:
                raise APIError(400, f"'{param}' is an empty string; there is nothing to embed.", param=param)
            # Embedder.encode's ids, before it cuts them to the context: OpenAI refuses a long input.
            row = [tokenizer.bos_id, *tokenizer.encode(prefix + item)]
        else:
            if bad := [token for token in item if token >= tokenizer.vocab_size]:
                message = f"Token id {bad[0]} in '{param}' is outside the vocabulary of {tokenizer.vocab_size}."
                raise APIError(400, message, param=param)
            row = [tokenizer.bos_id, *tokenizer.encode(prefix), *item]
        if len(row) > embedder.max_len:
            raise APIError(
                400,
                f"'{param}' has {len(row)} tokens (with BOS and prefix); this model embeds at most {embedder.max_len}.",
                param=param,
                code="context_length_exceeded",
            )
        return row

    def _embed(self, inputs: Sequence[str | list[int]], rows: list[list[int]]) -> np.ndarray:
        """(len(inputs), dim) embeddings, on the worker thread: texts through `Embedder.embed`, token ids as rows."""
        embedder = self.model.embedder
        if isinstance(inputs[0], str):
            return embedder.embed(inputs, self.model.kind)
        return embedder.embed_ids(rows)


def add_routes(
    app: FastAPI,
    model: EmbeddingModel,
    settings: ServeSettings,
    in_flight: admission.InFlight,
    worker: ThreadPoolExecutor,
    dependencies: Sequence[Depends],
) -> None:
    """The endpoint on `app`, behind the same dependencies (API key, rate limit) and request places as the others,
    its forward passes on `worker` (`forward_worker`)."""
    api = EmbeddingsAPI(model, settings, in_flight, worker)
    app.add_api_route("/v1/embeddings", api.create_embeddings, methods=["POST"], dependencies=dependencies)
