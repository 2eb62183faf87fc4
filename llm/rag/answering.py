"""Grounded answering with a run: retrieve passages for a question, fit them into the run's own prompt format,
and say how the answer ends. Shared by scripts/ask.py and the server's chat completions with --index.

A chat-tuned run (config `chat=True`, or an imported run with a chat template) gets the grounded prompt
(llm/rag/grounded.py: instruction, numbered passages, question) as the last user message of its conversation,
rendered by its chat template, and answers until its end-of-turn token. A pretrained run continues the same
prompt without the instruction (it was never trained to follow one, and in a small context the passages need
the room) as plain text after BOS, and its answer ends at a blank line or where it starts a new question. The
passages are budgeted on the exact token ids the model will see: the whole rendered conversation or text, BOS
included, must leave `max_new_tokens` of the context for the answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from llm import chat_template
from llm.rag.grounded import GroundedPrompt, fit_passages, render_grounded
from llm.rag.index import Hit
from llm.tokenizer import AnyTokenizer

# Where a pretrained run's answer ends: the prompt's own structure ("\n\nPregunta: ...") starting again.
PLAIN_STOP_STRINGS = ("\n\n", "\nPregunta:")


@dataclasses.dataclass(frozen=True)
class GroundedRequest:
    """What to generate from: the prompt ids, how the answer stops, and where the passages came from."""

    prompt: GroundedPrompt  # The passages in the prompt (number i + 1 is passages[i]) and the budget.
    ids: list[int]
    hits: tuple[Hit, ...]  # Every retrieved hit, including those that did not fit.
    stop_strings: tuple[str, ...]
    stop_token_ids: tuple[int, ...] | None  # None: the tokenizer's EOS.

    def result(self, answer: str) -> dict:
        """{"answer", "sources"}: each source numbered as in the prompt, with its text and retrieval score."""
        scores = {hit.passage.id: hit.score for hit in self.hits}
        sources = self.prompt.sources(answer)
        for source, passage in zip(sources, self.prompt.passages, strict=True):
            source.update(text=passage.text, score=scores[passage.id])
        return {"answer": answer, "sources": sources}


def is_chat_run(config_chat: bool, tokenizer: AnyTokenizer) -> bool:
    """Whether a run answers through its chat template (as scripts/chat.py decides)."""
    return bool(config_chat) or tokenizer.chat_template is not None


def grounded_request(
    tokenizer: AnyTokenizer,
    chat: bool,
    question: str,
    hits: Sequence[Hit],
    context_length: int,
    max_new_tokens: int,
    history: Sequence[Mapping[str, str]] = (),
) -> GroundedRequest:
    """The prompt for `question` with the best `hits` that fit, in the run's format (see the module docstring).

    `history` is the conversation before the question (chat runs only: system, user and assistant turns).
    Raises ValueError when the question (with its history) leaves no room for the answer.
    """
    if not question.strip():
        raise ValueError("The question is empty.")
    if history and not chat:
        raise ValueError("A conversation history needs a chat-tuned run; a pretrained run answers one question.")
    budget = context_length - max_new_tokens
    if budget <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no prompt room in a context of {context_length}.")

    def encode(text: str) -> list[int]:
        if chat:
            messages = [*history, {"role": "user", "content": text}]
            return chat_template.render(tokenizer, messages, add_generation_prompt=True)[0]
        return tokenizer.encode(text, add_bos=True)

    render = lambda passages: render_grounded(question, passages, instruction=chat)
    prompt = fit_passages(render, [hit.passage for hit in hits], lambda text: len(encode(text)), budget)
    if chat:
        stops: dict = {"stop_strings": (), "stop_token_ids": chat_template.stop_token_ids(tokenizer)}
    else:
        stops = {"stop_strings": PLAIN_STOP_STRINGS, "stop_token_ids": None}
    return GroundedRequest(prompt, encode(prompt.text), tuple(hits), **stops)
