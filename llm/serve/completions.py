"""From validated API requests to engine requests, and from engine events to OpenAI's response objects.

A request becomes one engine request per choice (prompts x n). `Choice` collects one choice's events and
renders them either as a whole response (`final`) or incrementally as stream chunks (`delta`), in the
shapes of OpenAI's `text_completion`, `chat.completion` and `chat.completion.chunk` objects; `Answer`
wraps a request's choices in the response object (id, model, usage).
"""

from __future__ import annotations

import dataclasses
import secrets
import time
import uuid

from llm import chat_template
from llm.infer.sampling import SamplingParams
from llm.rag.answering import GroundedRequest
from llm.serve import engine as engine_lib
from llm.serve.schemas import ChatCompletionRequest, CompletionRequest
from llm.tokenizer import Tokenizer


class RequestError(ValueError):
    """A request the server cannot serve as asked (HTTP 400), with the parameter and OpenAI's error code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclasses.dataclass(frozen=True)
class Limits:
    cache_len: int  # Prompt plus completion tokens must fit one KV-cache row.
    max_prompt_tokens: int
    max_tokens: int  # Most completion tokens one choice may ask for.
    max_choices: int  # Most choices (prompts x n) one request may ask for.


@dataclasses.dataclass
class Plan:
    """What one HTTP request asks of the engine: one engine request per choice."""

    chat: bool
    requests: list[engine_lib.Request]
    echo: list[str | None]  # Per choice: the prompt text to put before the completion (completions' echo).
    skip_prompt_tokens: list[int]  # Per choice: leading prompt tokens left out of echoed logprobs (an added BOS).
    logprobs: bool
    stream: bool
    include_usage: bool
    prompt_tokens: int  # Counted once per prompt, however many choices it has (as OpenAI's usage does).
    grounding: GroundedRequest | None = None  # The retrieved passages in a grounded chat prompt (rag_chat.py).


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """A token as text in logprobs: the text of its bytes, or 'bytes:\\xNN...' for part of a character."""
    data = tokenizer.token_bytes(token_id)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in data)


def token_bytes(tokenizer: Tokenizer, token_id: int) -> list[int]:
    return list(tokenizer.token_bytes(token_id))


def _sampling(body: CompletionRequest | ChatCompletionRequest, vocab_size: int) -> SamplingParams:
    return SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        # Keeping the top vocab_size tokens keeps all; larger values would overflow the engine's int32 arrays.
        top_k=min(body.top_k or 0, vocab_size),
        top_p=1.0 if body.top_p is None else body.top_p,
        min_p=body.min_p or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
    )


def check_max_tokens(requested: int | None, prompt_len: int, limits: Limits, default: int | None) -> int:
    if prompt_len > limits.max_prompt_tokens:
        raise RequestError(
            f"The prompt has {prompt_len} tokens; this server accepts at most {limits.max_prompt_tokens}.",
            "prompt",
            "context_length_exceeded",
        )
    room = limits.cache_len - prompt_len
    if requested is None:
        requested = default if default is not None else min(limits.max_tokens, room)
        if requested < 1:
            raise RequestError(
                f"The prompt has {prompt_len} tokens and leaves no room for an answer in the "
                f"context of {limits.cache_len} tokens.",
                "messages",
                "context_length_exceeded",
            )
    if requested > limits.max_tokens:
        raise RequestError(
            f"max_tokens={requested} is more than this server allows ({limits.max_tokens}).", "max_tokens"
        )
    if requested > room:
        raise RequestError(
            f"This model's maximum context length is {limits.cache_len} tokens. However, you "
            f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} "
            f"for the completion). Please reduce the prompt or max_tokens.",
            "max_tokens",
            "context_length_exceeded",
        )
    return requested


def check_choices(prompts: list[list[int]], n: int, limits: Limits) -> None:
    if len(prompts) * n > limits.max_choices:
        raise RequestError(
            f"{len(prompts)} prompts x n={n} = {len(prompts) * n} choices; this server allows "
            f"{limits.max_choices} per request.",
            "n",
        )


def _seeds(seed: int | None, count: int) -> list[int]:
    """Choice i uses seed + i, so the n choices of one request differ but the request is reproducible."""
    base = secrets.randbits(31) if seed is None else seed
    return [base + i for i in range(count)]


def plan_completion(body: CompletionRequest, tokenizer: Tokenizer, limits: Limits) -> Plan:
    raw = body.prompt if isinstance(body.prompt, list) else [body.prompt]
    if raw and isinstance(raw[0], int):
        raw = [raw]
    prompts = [tokenizer.encode(p, add_bos=True) if isinstance(p, str) else list(p) for p in raw]
    n = body.n or 1
    check_choices(prompts, n, limits)
    if body.logprobs is not None and body.logprobs > engine_lib.MAX_LOGPROBS:
        raise RequestError(f"logprobs must be at most {engine_lib.MAX_LOGPROBS}.", "logprobs")
    requests, echo, skip = [], [], []
    seeds = _seeds(body.seed, len(prompts) * n)
    for text, ids in zip(raw, prompts):
        if any(token >= tokenizer.vocab_size for token in ids):
            raise RequestError(f"Prompt token ids must be below the vocabulary size {tokenizer.vocab_size}.", "prompt")
        max_tokens = check_max_tokens(body.max_tokens, len(ids), limits, default=16)
        for _ in range(n):
            requests.append(
                engine_lib.Request(
                    ids,
                    max_tokens,
                    _sampling(body, tokenizer.vocab_size),
                    seeds[len(requests)],
                    body.stop_strings(),
                    () if body.ignore_eos else (tokenizer.eos_id,),
                    body.logprobs,
                    prompt_logprobs=bool(body.echo) and body.logprobs is not None,
                )
            )
            echo.append((text if isinstance(text, str) else tokenizer.decode(text)) if body.echo else None)
            skip.append(1 if isinstance(text, str) else 0)  # The BOS the server added is not the user's text.
    return Plan(
        False,
        requests,
        echo,
        skip,
        body.logprobs is not None,
        bool(body.stream),
        bool(body.stream_options and body.stream_options.include_usage),
        sum(map(len, prompts)),
    )


def chat_messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    """The conversation as the chat template takes it: OpenAI's `developer` messages are what templates call
    `system`, and content parts are joined."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]


def requested_tokens(body: ChatCompletionRequest) -> int | None:
    return body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens


def plan_chat(body: ChatCompletionRequest, tokenizer: Tokenizer, limits: Limits) -> Plan:
    try:
        ids, _ = chat_template.render(tokenizer, chat_messages(body), add_generation_prompt=True)
    except chat_template.ChatFormatError as error:
        raise RequestError(str(error), "messages") from None
    check_choices([ids], body.n or 1, limits)
    max_tokens = check_max_tokens(requested_tokens(body), len(ids), limits, default=None)
    stop_ids = () if body.ignore_eos else chat_template.stop_token_ids(tokenizer)
    return chat_plan(body, tokenizer, ids, max_tokens, body.stop_strings(), stop_ids)


def chat_plan(
    body: ChatCompletionRequest,
    tokenizer: Tokenizer,
    ids: list[int],
    max_tokens: int,
    stop_strings: tuple[str, ...],
    stop_ids: tuple[int, ...],
    grounding: GroundedRequest | None = None,
) -> Plan:
    """The engine requests of a chat request (its n choices) that generate from `ids`."""
    n = body.n or 1
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    if body.top_logprobs and not body.logprobs:
        raise RequestError("top_logprobs needs logprobs=true.", "top_logprobs")
    requests = [
        engine_lib.Request(
            ids, max_tokens, _sampling(body, tokenizer.vocab_size), seed, stop_strings, stop_ids, logprobs
        )
        for seed in _seeds(body.seed, n)
    ]
    return Plan(
        True,
        requests,
        [None] * n,
        [0] * n,
        logprobs is not None,
        bool(body.stream),
        bool(body.stream_options and body.stream_options.include_usage),
        len(ids),
        grounding,
    )


class Choice:
    """Collects one choice's events; renders them whole (`final`) or as stream deltas (`delta`)."""

    def __init__(self, index: int, plan: Plan, tokenizer: Tokenizer):
        self.index, self.plan, self.tokenizer = index, plan, tokenizer
        self.request = plan.requests[index]
        self.echo = plan.echo[index]
        self.text: list[str] = [self.echo or ""]
        self.ids: list[int] = []
        self.logprobs: list[float | None] = []
        self.tops: list[list[tuple[int, float]] | None] = []
        self.finished: engine_lib.Finished | None = None
        self._prompt_tokens = 0  # Leading entries of ids/logprobs that belong to the echoed prompt.

    def add(self, event: engine_lib.Event) -> dict | None:
        """Records `event`; returns the stream delta it produces (None when there is nothing to send)."""
        start = len(self.ids)
        if isinstance(event, engine_lib.PromptLogprobs):
            skip = self.plan.skip_prompt_tokens[self.index]
            self.ids += list(self.request.prompt[skip:])
            self.logprobs += event.logprobs[skip:]
            self.tops += event.top[skip:]
            self._prompt_tokens = len(self.ids)
            return self._delta(self.echo, 0, None)  # The echoed prompt, now with its logprobs.
        if isinstance(event, engine_lib.Token):
            self.ids.append(event.token_id)
            self.logprobs.append(event.logprob)
            self.tops.append(event.top)
            self.text.append(event.text)
            if not event.text and not self.plan.logprobs:
                return None
            return self._delta(event.text, start, None)
        self.finished = event
        self.text.append(event.text)
        return self._delta(event.text, len(self.ids), event.reason)

    def opening(self) -> dict | None:
        """The first stream delta: the assistant role (chat) or the echoed prompt (completions)."""
        if self.plan.chat:
            return {
                "index": self.index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        if self.echo is None or self.request.prompt_logprobs:
            return None  # No echo, or the echo waits for the prompt's logprobs (see `add`).
        return self._delta(self.echo, 0, None)

    def _delta(self, text: str, start: int, reason: str | None) -> dict:
        logprobs = self._logprobs(start, len(self.ids)) if self.plan.logprobs else None
        if self.plan.chat:
            delta = {"content": text} if text or reason is None else {}
            return {"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def final(self) -> dict:
        text = "".join(self.text)
        logprobs = self._logprobs(0, len(self.ids)) if self.plan.logprobs else None
        if self.plan.chat:
            return {
                "index": self.index,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": self.finished.reason,
            }
        return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": self.finished.reason}

    def _logprobs(self, start: int, end: int) -> dict:
        tok = self.tokenizer
        if self.plan.chat:
            return {
                "content": [
                    {
                        "token": token_text(tok, i),
                        "logprob": lp,
                        "bytes": token_bytes(tok, i),
                        "top_logprobs": [
                            {"token": token_text(tok, t), "logprob": v, "bytes": token_bytes(tok, t)}
                            for t, v in top or []
                        ],
                    }
                    for i, lp, top in zip(self.ids[start:end], self.logprobs[start:end], self.tops[start:end])
                ]
            }
        offsets = [self._text_offset(position) for position in range(start, end)]
        return {
            "tokens": [self._shown_token(position, offset) for position, offset in zip(range(start, end), offsets)],
            "token_logprobs": self.logprobs[start:end],
            "top_logprobs": [
                None if top is None else {token_text(tok, t): v for t, v in top} for top in self.tops[start:end]
            ],
            "text_offset": offsets,
        }

    def _shown_token(self, position: int, offset: int) -> str:
        """Token `position` as text, such that the echoed prompt's tokens add up to the echoed text: decoding
        drops the space SentencePiece puts before the first word (its dummy prefix: "▁Hola" reads "Hola" at
        the start), so the token is shown without it there, as vLLM and OpenAI do."""
        text = token_text(self.tokenizer, self.ids[position])
        if position < self._prompt_tokens and text.startswith(" "):
            shown = self.echo[offset:]
            if not shown.startswith(text) and shown.startswith(text[1:]):
                return text[1:]
        return text

    def _text_offset(self, position: int) -> int:
        """Where token `position` starts in the returned text (echoed prompt, then completion)."""
        if position < self._prompt_tokens:
            return len(self.tokenizer.decode(self.ids[:position]))
        base = len(self.echo) if self.echo is not None else 0
        return base + len(self.tokenizer.decode(self.ids[self._prompt_tokens : position]))


class Answer:
    """One request's choices, and the response objects around them: whole, or stream chunks."""

    def __init__(self, plan: Plan, tokenizer: Tokenizer, model_name: str):
        self.plan = plan
        self.choices = [Choice(i, plan, tokenizer) for i in range(len(plan.requests))]
        # Every chunk of a stream repeats the response's id, creation time and model.
        self.header = {
            "id": f"{'chatcmpl' if plan.chat else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": model_name,
        }
        # A grounded stream sends the sources twice: in its first chunk, and in the chunk that ends the last choice.
        self._sources_sent = {"first": False, "last": False}

    def usage(self) -> dict:
        completion_tokens = sum(c.finished.completion_tokens for c in self.choices if c.finished)
        return {
            "prompt_tokens": self.plan.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.plan.prompt_tokens + completion_tokens,
        }

    def whole(self) -> dict:
        """The non-streamed response, once every choice has finished."""
        return {
            **self.header,
            "object": "chat.completion" if self.plan.chat else "text_completion",
            "choices": [c.final() for c in self.choices],
            "usage": self.usage(),
            **({"sources": self.sources()} if self.plan.grounding is not None else {}),
        }

    def sources(self, answered: bool = True) -> list[dict]:
        """The passages of a grounded prompt (llm/serve/rag_chat.py), numbered as in the prompt. `cited` says
        whether any choice's answer cites the passage ([1], [2]...); before the answer (`answered` False) it is
        None: not known yet."""
        answers = "\n".join("".join(choice.text) for choice in self.choices)
        sources = self.plan.grounding.result(answers)["sources"]
        return sources if answered else [{**source, "cited": None} for source in sources]

    def chunk(self, deltas: list[dict], usage: bool = False) -> dict:
        """A stream chunk with `deltas`; with `usage`, the closing chunk that carries the token counts. A grounded
        stream's first chunk carries the sources (so that a client can show them while the answer streams) with
        `cited` None, and the chunk that ends the last choice carries them again with `cited` computed."""
        chunk = {**self.header, "object": "chat.completion.chunk" if self.plan.chat else "text_completion"}
        chunk = {**chunk, "choices": deltas, "usage": self.usage()} if usage else {**chunk, "choices": deltas}
        if self.plan.grounding is not None and deltas:
            if not self._sources_sent["first"]:
                chunk["sources"], self._sources_sent["first"] = self.sources(answered=False), True
            elif not self._sources_sent["last"] and all(choice.finished for choice in self.choices):
                chunk["sources"], self._sources_sent["last"] = self.sources(), True
        return chunk
