"""Passages: documents cut by paragraph and sentence into pieces that fit a token budget, with overlap.

Each passage is an exact slice of its document: `document.text[start:end] == passage.text`, so a citation
can point back into the source. Sentences are packed greedily within a section (a Markdown heading's body,
or the whole text) and may cross paragraph breaks; a sentence never crosses a paragraph (a blank line), so
a title line without a full stop stays its own sentence. Consecutive passages of a document repeat the last
`overlap` sentences of the previous one (fewer when they and the next sentence would not fit the budget).
A sentence longer than the budget is cut at word boundaries (at characters for a single overlong word),
never dropped. The budget counts tokens of the project's tokenizer, or whitespace-separated words.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Iterator

from llm.io import write_text
from llm.rag.documents import SourceDocument, read_documents, sections
from llm.rag.sentences import sentence_spans
from llm.tokenizer import AnyTokenizer

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r]*\n")
_WORD = re.compile(r"\S+")

Counter = Callable[[str], int]
Span = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Passage:
    """One passage: `id` is "<document_id>#<index>", `index` its position in the document, `start`/`end`
    its character span in the document text, `source` the file (and line of a shard), `headings` the
    Markdown heading path above it."""

    id: str
    document_id: str
    index: int
    start: int
    end: int
    source: str
    text: str
    headings: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str, where: str) -> Passage:
        try:
            record = json.loads(line)
            return cls(**{**record, "headings": tuple(record.get("headings", ()))})
        except (json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"{where}: not a passage record: {error}") from error


def token_counter(tokenizer: AnyTokenizer | None) -> Counter:
    """Length in the tokenizer's tokens (no BOS/EOS), or in whitespace-separated words without one."""
    if tokenizer is None:
        return lambda text: len(text.split())
    return lambda text: len(tokenizer.encode(text))


def _paragraph_spans(text: str, start: int, end: int) -> Iterator[Span]:
    for match in _PARAGRAPH_BREAK.finditer(text, start, end):
        yield start, match.start()
        start = match.end()
    yield start, end


def _largest_fitting(text: str, start: int, cuts: list[int], budget: int, count: Counter) -> int | None:
    """The largest cut in `cuts` (ascending) with count(text[start:cut]) <= budget (binary search: counts
    grow with the slice), or None when even the first does not fit."""
    low, high, best = 0, len(cuts) - 1, None
    while low <= high:
        middle = (low + high) // 2
        if count(text[start : cuts[middle]]) <= budget:
            best, low = cuts[middle], middle + 1
        else:
            high = middle - 1
    return best


def _split_long(text: str, span: Span, budget: int, count: Counter) -> Iterator[Span]:
    """Cuts an overlong sentence into pieces within the budget: at word ends, else at characters."""
    start, end = span
    while count(text[start:end]) > budget:
        word_ends = [match.end() for match in _WORD.finditer(text, start, end)]
        cut = _largest_fitting(text, start, word_ends, budget, count)
        if cut is None:
            cut = _largest_fitting(text, start, list(range(start + 1, word_ends[0] + 1)), budget, count)
            cut = start + 1 if cut is None else cut  # one character over the budget is the least possible
        yield start, cut
        start = cut
        while start < end and text[start].isspace():
            start += 1
    if start < end:
        yield start, end


def _pack(text: str, units: list[Span], budget: int, overlap: int, count: Counter) -> list[Span]:
    passages: list[Span] = []
    current: list[int] = []  # indices of the units of the passage being built
    i = 0
    while i < len(units):
        if not current or count(text[units[current[0]][0] : units[i][1]]) <= budget:
            current.append(i)
            i += 1
            continue
        passages.append((units[current[0]][0], units[current[-1]][1]))
        keep = current[-overlap:] if overlap else []
        while keep and count(text[units[keep[0]][0] : units[i][1]]) > budget:
            keep = keep[1:]  # the overlap gives way so that the next sentence fits
        current = keep
    if current:
        passages.append((units[current[0]][0], units[current[-1]][1]))
    return passages


def split_document(
    document: SourceDocument, budget: int = 256, overlap: int = 1, tokenizer: AnyTokenizer | None = None
) -> list[Passage]:
    """The passages of one document, in order (see the module docstring for the rules)."""
    if budget < 1 or overlap < 0:
        raise ValueError(f"budget must be >= 1 and overlap >= 0, got budget={budget}, overlap={overlap}")
    count = token_counter(tokenizer)
    passages: list[Passage] = []
    for section in sections(document):
        units = [
            piece
            for paragraph in _paragraph_spans(document.text, section.start, section.end)
            for sentence in sentence_spans(document.text, *paragraph)
            for piece in _split_long(document.text, sentence, budget, count)
        ]
        for start, end in _pack(document.text, units, budget, overlap, count):
            index = len(passages)
            passages.append(
                Passage(
                    id=f"{document.id}#{index}",
                    document_id=document.id,
                    index=index,
                    start=start,
                    end=end,
                    source=document.source,
                    text=document.text[start:end],
                    headings=section.headings,
                )
            )
    return passages


def split_documents(
    documents: Iterable[SourceDocument], budget: int = 256, overlap: int = 1, tokenizer: AnyTokenizer | None = None
) -> Iterator[Passage]:
    for document in documents:
        yield from split_document(document, budget, overlap, tokenizer)


def passages_from_path(
    path: str, budget: int = 256, overlap: int = 1, tokenizer: AnyTokenizer | None = None
) -> list[Passage]:
    """The passages of every document in a file or directory (see `documents.read_documents`)."""
    return list(split_documents(read_documents(path), budget, overlap, tokenizer))


def write_passages(path: str, passages: Iterable[Passage]) -> None:
    """One JSON object per line, written atomically."""
    write_text(path, "".join(passage.to_json() + "\n" for passage in passages))


def read_passages(path: str) -> list[Passage]:
    with open(path, encoding="utf-8") as file:
        return [Passage.from_json(line, f"{path}:{n}") for n, line in enumerate(file, start=1) if line.strip()]
