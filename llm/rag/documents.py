"""Documents to split into passages: the corpus pipeline's JSONL shards, plain text files and Markdown.

A shard line is {"id", "text", "metadata": {"source", ...}} (the corpus pipeline's documented format, read
here directly: the library does not import the pipeline). A text or Markdown file is one document whose id
is its path. Sections are (start, end, heading path) spans of a document's text: the whole text for plain
text, the body under each heading for Markdown (headings outside code fences, "#" to "######").
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator

MARKDOWN_SUFFIXES = (".md", ".markdown")
JSONL_SUFFIX = ".jsonl"
DOCUMENT_SUFFIXES = (JSONL_SUFFIX, ".txt", *MARKDOWN_SUFFIXES)  # What a directory is read for.
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.*?)[ \t#]*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


@dataclasses.dataclass(frozen=True)
class SourceDocument:
    """A document with where it came from: `source` is "file" or "file:line" (a shard's line, from 1)."""

    id: str
    text: str
    source: str
    markdown: bool = False


@dataclasses.dataclass(frozen=True)
class Section:
    start: int
    end: int
    headings: tuple[str, ...]


def read_jsonl_documents(path: str) -> Iterator[SourceDocument]:
    """The documents of one corpus shard; a malformed line is an error naming the file and line."""
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
                identifier, text = record["id"], record["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{where}: not a corpus document {{'id', 'text', ...}}: {error!r}") from error
            if not isinstance(identifier, str) or not isinstance(text, str):
                raise ValueError(f"{where}: 'id' and 'text' must be strings")
            yield SourceDocument(identifier, text, where)


def read_documents(path: str) -> Iterator[SourceDocument]:
    """The documents of a file, or of every document file under a directory (sorted; hidden files and files of
    other kinds, such as a data directory's tokenizer and packed rows, skipped): JSONL shards by record, and
    Markdown and plain text files as one document each. A file named directly is read whatever its name."""
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(name for name in dirs if not name.startswith("."))
            for name in sorted(files):
                if not name.startswith(".") and name.lower().endswith(DOCUMENT_SUFFIXES):
                    yield from read_documents(os.path.join(root, name))
        return
    if not os.path.exists(path):
        raise FileNotFoundError(f"No such document file or directory: {path!r}")
    if path.endswith(JSONL_SUFFIX):
        yield from read_jsonl_documents(path)
        return
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not a UTF-8 text document ({error})") from None
    yield SourceDocument(path, text, path, markdown=path.lower().endswith(MARKDOWN_SUFFIXES))


def sections(document: SourceDocument) -> list[Section]:
    """The spans passages are cut from: the heading path of Markdown travels with every passage of a
    section, and no passage crosses a heading."""
    if not document.markdown:
        return [Section(0, len(document.text), ())]
    found: list[Section] = []
    path: list[tuple[int, str]] = []  # (level, title) of the open headings
    start = offset = 0
    fenced = False
    for line in document.text.splitlines(keepends=True):
        if _FENCE.match(line):
            fenced = not fenced
        heading = None if fenced else _HEADING.match(line.rstrip("\r\n"))
        if heading:
            found.append(Section(start, offset, tuple(title for _, title in path)))
            level = len(heading.group(1))
            path = [(lvl, title) for lvl, title in path if lvl < level] + [(level, heading.group(2))]
            start = offset + len(line)
        offset += len(line)
    found.append(Section(start, offset, tuple(title for _, title in path)))
    return [section for section in found if document.text[section.start : section.end].strip()]
