"""Grounded prompts: a question with ranked passages, fitted to a token budget, and the answer's sources.

Budgeting (`fit_passages`) is shared by every prompt style: a `render` function turns the chosen passages
into the prompt text, and passages are added best first while the whole rendered prompt still fits the budget
(the model's context minus the answer's tokens), counted on the full text because tokens of joined pieces
need not add up. The first passage that does not fit whole is cut at the last sentence end that fits (its
`end` and `text` shortened, its id kept), and nothing after it is added: rank order is kept, so a shorter,
worse passage never takes the place of a better one (on the quickstart model, whose 256-token context often
holds less than one XQuAD paragraph, skipping to shorter passages put the gold passage in 59% of prompts
against BM25's 92% recall@1). A prompt that does not fit without any passage is a ValueError giving its
length and the budget.

Two styles use it: `grounded_prompt`, the instruction prompt of ask.py and the server ("Responde ...", the
passages numbered [1]..[n] with their source, then "Pregunta: ...\nRespuesta:"), and any few-shot frame a
caller renders itself (the `rag` evaluation uses XQuAD's "Contexto: ...\nPregunta: ...\nRespuesta:").
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

from llm.rag.passages import Counter, Passage, token_counter
from llm.rag.sentences import sentence_spans
from llm.tokenizer import AnyTokenizer

INSTRUCTION = "Responde a la pregunta con la información de los pasajes. Cita los pasajes que uses como [1], [2]…"
# "[2]" and "[1, 3]" cite passages 2, and 1 and 3.
_CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")

Render = Callable[[Sequence[Passage]], str]


@dataclasses.dataclass(frozen=True)
class GroundedPrompt:
    """The prompt text, the passages in it (`passages[i]` is number i + 1), its length and the budget."""

    text: str
    passages: tuple[Passage, ...]
    tokens: int
    budget: int

    def cited(self, answer: str) -> set[int]:
        """The passage numbers an answer cites ("[2]", "[1, 3]"); numbers with no passage are ignored."""
        numbers = {int(n) for group in _CITATION.findall(answer) for n in group.split(",")}
        return {n for n in numbers if 1 <= n <= len(self.passages)}

    def sources(self, answer: str) -> list[dict[str, Any]]:
        """Every passage of the prompt, in number order, with where it comes from and whether `answer` cites it."""
        cited = self.cited(answer)
        return [
            {
                "number": number,
                "passage_id": passage.id,
                "document_id": passage.document_id,
                "source": passage.source,
                "start": passage.start,
                "end": passage.end,
                "cited": number in cited,
            }
            for number, passage in enumerate(self.passages, start=1)
        ]

    def answer(self, answer: str) -> dict[str, Any]:
        """{"answer", "sources"}: what ask.py prints and the server returns."""
        return {"answer": answer, "sources": self.sources(answer)}


def _counter(tokens: AnyTokenizer | Counter) -> Counter:
    return tokens if callable(tokens) and not hasattr(tokens, "encode") else token_counter(tokens)


def _cut_to_fit(render: Render, used: list[Passage], passage: Passage, count: Counter, budget: int) -> Passage | None:
    """The longest start of `passage` ending at a sentence end whose prompt (after `used`) fits, or None
    (binary search: the prompt grows with the cut)."""
    ends = [end for _, end in sentence_spans(passage.text)]
    low, high, best = 0, len(ends) - 1, None
    while low <= high:
        middle = (low + high) // 2
        cut = dataclasses.replace(passage, end=passage.start + ends[middle], text=passage.text[: ends[middle]])
        if count(render([*used, cut])) <= budget:
            best, low = cut, middle + 1
        else:
            high = middle - 1
    return best


def fit_passages(
    render: Render, ranked: Sequence[Passage], tokens: AnyTokenizer | Counter, budget: int
) -> GroundedPrompt:
    """The prompt `render` makes of the best passages that fit `budget` tokens (see the module docstring).

    `tokens` is the generating model's tokenizer (counts without BOS) or any text -> length function."""
    count = _counter(tokens)
    bare = count(render([]))
    if bare > budget:
        raise ValueError(
            f"The question alone makes a prompt of {bare} tokens, over the budget of {budget} tokens "
            "(the model's context minus the answer's tokens): shorten the question or generate fewer tokens."
        )
    used: list[Passage] = []
    for passage in ranked:
        if count(render([*used, passage])) <= budget:
            used.append(passage)
            continue
        cut = _cut_to_fit(render, used, passage, count, budget)
        used += [cut] if cut else []
        break
    text = render(used)
    return GroundedPrompt(text, tuple(used), count(text), budget)


def render_grounded(question: str, passages: Sequence[Passage], instruction: bool = True) -> str:
    """The grounded prompt: the instruction (for chat runs; a pretrained run continues the text and has no use
    for one), the passages numbered with their source, the question."""
    numbered = [f"[{n}] ({passage.source}) {passage.text}" for n, passage in enumerate(passages, start=1)]
    return "\n\n".join([*([INSTRUCTION] if instruction else []), *numbered, f"Pregunta: {question}\nRespuesta:"])


def grounded_prompt(
    question: str, ranked: Sequence[Passage], tokens: AnyTokenizer | Counter, budget: int
) -> GroundedPrompt:
    """The instruction prompt for `question` with the best of `ranked` (best first) that fit `budget`."""
    if not question.strip():
        raise ValueError("The question is empty.")
    return fit_passages(lambda passages: render_grounded(question, passages), ranked, tokens, budget)
