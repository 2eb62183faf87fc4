"""vLLM's tokenizer endpoints, so that clients written for vLLM find the served model's tokenizer on the server.

    GET  /tokenizer_info   the special tokens (as text), the chat template and the context length
    POST /tokenize         {"prompt", "add_special_tokens"=true} or {"messages", "add_generation_prompt"=true}
                           -> {"count", "max_model_len", "tokens", "token_strs"}
    POST /detokenize       {"tokens"} -> {"prompt"}

lm-evaluation-harness's `local-completions` asks for them first (`tokenizer_backend="auto"`) and, finding them,
tokenizes every request here instead of downloading a tokenizer named after the model. It learns the eos and bos
ids by sending their text ("</s>") to /tokenize, so a text is read as Hugging Face tokenizers read it: a special
token spelled in it is that token (llm/hf/tokenizer_export.special_token_encoder); other texts get the ids
`Tokenizer.encode` gives. `add_special_tokens` puts the BOS in front, as /v1/completions does with a text prompt;
a conversation is `chat_template.render`'s ids, which carry the template's own BOS.

Errors are the API's (llm/serve/errors.py): 422 for a body that does not match the schema, 400 for token ids
outside the vocabulary or a conversation the chat template refuses, 404 for another model's name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

from fastapi import FastAPI, Request
from fastapi.params import Depends
from pydantic import Field

from llm import chat_template
from llm.hf.tokenizer_export import special_token_encoder
from llm.serve import admission, schemas
from llm.serve.errors import APIError
from llm.tokenizer import AnyTokenizer

if TYPE_CHECKING:
    from llm.serve.api import ServeSettings

ENDPOINTS = ("/tokenizer_info", "/tokenize", "/detokenize")


class TokenizeCompletionRequest(schemas.Strict):
    model: schemas.Text | None = None
    prompt: schemas.Text
    add_special_tokens: bool = True  # The BOS in front, as a text prompt of /v1/completions gets it.
    return_token_strs: bool = False  # Also the vocabulary piece of each id.


class TokenizeChatRequest(schemas.Strict):
    model: schemas.Text | None = None
    messages: Annotated[list[schemas.ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool = True  # End where the assistant's answer starts.
    continue_final_message: bool = False  # End inside the last message, for the model to continue it.
    add_special_tokens: bool = False  # Another BOS in front of the template's own.
    return_token_strs: bool = False


class DetokenizeRequest(schemas.Strict):
    model: schemas.Text | None = None
    tokens: list[int]


class TokenizeAPI:
    """The three endpoints for one served tokenizer."""

    def __init__(self, tokenizer: AnyTokenizer, settings: ServeSettings, max_model_len: int):
        self.tokenizer, self.settings, self.max_model_len = tokenizer, settings, max_model_len
        self.encode_text = special_token_encoder(tokenizer)

    async def tokenizer_info(self) -> dict:
        tokenizer = self.tokenizer
        return {
            "tokenizer_class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
            "bos_token": tokenizer.piece(tokenizer.bos_id),
            "eos_token": tokenizer.piece(tokenizer.eos_id),
            "pad_token": tokenizer.piece(tokenizer.pad_id),
            "unk_token": None if tokenizer.unk_id is None else tokenizer.piece(tokenizer.unk_id),
            "chat_template": chat_template.template_source(tokenizer),
            "model_max_length": self.max_model_len,
            "vocab_size": tokenizer.vocab_size,
        }

    async def tokenize(self, request: Request) -> dict:
        raw = await self._read(request)
        chat = isinstance(raw, dict) and "messages" in raw
        body = schemas.parse(TokenizeChatRequest if chat else TokenizeCompletionRequest, raw, self.settings.model_name)
        ids = self._render(body) if chat else self.encode_text(body.prompt)
        if body.add_special_tokens:
            ids = [self.tokenizer.bos_id, *ids]
        pieces = [self.tokenizer.piece(token) for token in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": pieces}

    async def detokenize(self, request: Request) -> dict:
        body = schemas.parse(DetokenizeRequest, await self._read(request), self.settings.model_name)
        _check_ids(body.tokens, self.tokenizer.vocab_size)
        return {"prompt": self.tokenizer.decode(body.tokens)}

    async def _read(self, request: Request) -> dict:
        return await admission.read_json(request, self.settings.max_body_bytes, self.settings.body_timeout_s)

    def _render(self, body: TokenizeChatRequest) -> list[int]:
        if body.add_generation_prompt and body.continue_final_message:
            raise APIError(
                400, "add_generation_prompt and continue_final_message exclude each other.", param="messages"
            )
        messages = [{"role": message.role, "content": message.text()} for message in body.messages]
        try:
            if body.continue_final_message:  # Only a text can be cut inside the last message.
                return self.encode_text(
                    chat_template.render_text(self.tokenizer, messages, continue_final_message=True)
                )
            return chat_template.render(self.tokenizer, messages, body.add_generation_prompt)[0]
        except chat_template.ChatFormatError as error:
            raise APIError(400, str(error), param="messages") from None


def _check_ids(tokens: Sequence[int], vocab_size: int) -> None:
    for index, token in enumerate(tokens):
        if not 0 <= token < vocab_size:
            raise APIError(
                400, f"Token id {token} (tokens[{index}]) is outside the vocabulary of {vocab_size}.", param="tokens"
            )


def add_routes(
    app: FastAPI, tokenizer: AnyTokenizer, settings: ServeSettings, max_model_len: int, dependencies: Sequence[Depends]
) -> None:
    """The endpoints on `app`, behind the same dependencies (API key, rate limit) as the /v1 routes."""
    api = TokenizeAPI(tokenizer, settings, max_model_len)
    app.add_api_route("/tokenizer_info", api.tokenizer_info, methods=["GET"], dependencies=dependencies)
    app.add_api_route("/tokenize", api.tokenize, methods=["POST"], dependencies=dependencies)
    app.add_api_route("/detokenize", api.detokenize, methods=["POST"], dependencies=dependencies)
