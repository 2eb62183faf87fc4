"""Chat completions grounded in a retrieval index: `scripts/serve.py --index=DIR`.

With an index, POST /v1/chat/completions retrieves before it generates. The query is the last message, which
must be the user's; the best `k` passages that fit go into that message as llm/rag/answering.py builds the
grounded prompt (instruction, numbered passages, question), and the earlier messages are the history, so the chat
template renders the whole conversation. The response is OpenAI's plus a top-level "sources" list (number,
passage_id, document_id, source, start, end, text, score, cited); a stream sends it in its first chunk, with
`cited` null (not known yet), and again in the chunk that ends the last choice, with `cited` computed from the
answers (completions.Answer). A request with `"retrieval": false` is an ordinary chat completion.

The prompt format is the route's own, index or not: a tokenizer with a chat format (the project's role markers,
or an imported run's template) renders a conversation whatever the run was trained for, as chat completions
always do. A run with neither (an imported base model, whose chat completions are refused without an index) is
grounded as plain text, as scripts/ask.py grounds a pretrained run: one question, answered until a blank line;
a conversation with earlier messages cannot be grounded that way and is a 400 saying so.

The answer's budget is the request's `max_tokens` (or `max_completion_tokens`). Without one, the route's default
(all the room the prompt leaves, up to the server's --max_tokens) would take the room the passages need, so it is
capped at the room left by the prompt holding the best passage whole, or at half the room the bare question
leaves when the best passage alone takes more than the other half (it is then cut at a sentence end): at least
one passage always fits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from llm import chat_template
from llm.rag import answering
from llm.rag.index import Hit, RetrievalIndex
from llm.serve import completions
from llm.serve.completions import Limits, Plan, RequestError
from llm.serve.schemas import ChatCompletionRequest
from llm.tokenizer import Tokenizer

# A context no prompt reaches: `grounded_request` with it measures prompts with their passages whole.
_UNBOUNDED = 1 << 40


class Retrieval:
    """The server's index and how it searches: `k` passages per question in `mode` (None: the index's first
    mode, hybrid when it has vectors, else BM25)."""

    def __init__(self, index: RetrievalIndex, k: int = 5, mode: str | None = None, directory: str | None = None):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if mode is not None and mode not in index.modes:
            raise ValueError(f"search mode {mode!r} needs vectors, but this index is BM25 only (modes: {index.modes})")
        self.index, self.k, self.mode, self.directory = index, k, mode or index.modes[0], directory

    def search(self, question: str) -> list[Hit]:
        """The best `k` hits for `question` (embeds it for dense and hybrid search: run it off the event loop)."""
        return self.index.search(question, self.k, self.mode)

    def describe(self) -> dict:
        """What GET /health reports of the index."""
        index = self.index
        return {
            "directory": self.directory,
            "passages": len(index.passages),
            "modes": list(index.modes),
            "mode": self.mode,
            "k": self.k,
            "vector_kind": index.vectors.kind if index.vectors is not None else None,
            "embedder": index.identity["workdir"] if index.identity else None,
        }


def question(body: ChatCompletionRequest) -> str:
    """The text retrieval searches with: the last message, which must be the user's and not empty (else 400)."""
    last = len(body.messages) - 1
    message = body.messages[last]
    if message.role != "user":
        raise RequestError(
            f"With retrieval the last message is the question, so it must be the user's; message {last} is the "
            f'{message.role}\'s. Send "retrieval": false to generate without retrieving.',
            f"messages.{last}",
        )
    if not message.text().strip():
        raise RequestError(f"Message {last}, the question retrieval searches with, is empty.", f"messages.{last}")
    return message.text()


def plan_grounded(body: ChatCompletionRequest, tokenizer: Tokenizer, limits: Limits, hits: Sequence[Hit]) -> Plan:
    """The engine requests of a chat request whose last message is grounded in `hits` (see the module docstring)."""
    *history, last = completions.chat_messages(body)
    param = f"messages.{len(history)}"
    chat = chat_template.has_chat_format(tokenizer)
    if history and not chat:
        raise RequestError(
            "This model has no chat format (role markers or a chat template), so retrieval grounds one question as "
            f"plain text; this conversation has {len(history)} earlier message(s). Send the question alone, or "
            '"retrieval": false.',
            "messages",
        )
    completions.check_choices([[]], body.n or 1, limits)
    try:
        bare = _prompt_length(tokenizer, chat, last["content"], (), history)
        best = _prompt_length(tokenizer, chat, last["content"], hits[:1], history)
    except chat_template.ChatFormatError as error:
        raise RequestError(str(error), "messages") from None
    max_tokens = _answer_tokens(body, limits, bare, best, param)
    # The prompt must fit the server's prompt limit and leave max_tokens of the cache row for the answer.
    context = min(limits.cache_len, limits.max_prompt_tokens + max_tokens)
    grounded = answering.grounded_request(tokenizer, chat, last["content"], hits, context, max_tokens, history)
    stop_ids = () if body.ignore_eos else grounded.stop_token_ids or (tokenizer.eos_id,)
    stop_strings = (*grounded.stop_strings, *body.stop_strings())
    return completions.chat_plan(body, tokenizer, grounded.ids, max_tokens, stop_strings, stop_ids, grounded)


def _prompt_length(
    tokenizer: Tokenizer, chat: bool, text: str, hits: Sequence[Hit], history: Sequence[Mapping[str, str]]
) -> int:
    """Tokens of the grounded prompt holding `hits` whole (measured, not fitted: the context is unbounded)."""
    return len(answering.grounded_request(tokenizer, chat, text, hits, _UNBOUNDED, 1, history).ids)


def _answer_tokens(body: ChatCompletionRequest, limits: Limits, bare: int, best: int, param: str) -> int:
    """The answer's budget: the request's, or the default of the module docstring; `bare` and `best` are the
    prompt's tokens without passages and with the best one whole."""
    if bare > limits.max_prompt_tokens or bare >= limits.cache_len:
        raise RequestError(
            f"The question ({param}) makes a prompt of {bare} tokens before any passage, which leaves no room for "
            f"passages and an answer: this server takes prompts of at most {limits.max_prompt_tokens} tokens in a "
            f"context of {limits.cache_len}. Shorten the question.",
            param,
            "context_length_exceeded",
        )
    requested = completions.requested_tokens(body)
    if requested is None:
        room = limits.cache_len - bare
        requested = min(limits.max_tokens, max(limits.cache_len - best, room // 2, 1))
    return completions.check_max_tokens(requested, bare, limits, default=None)
