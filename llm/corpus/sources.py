"""Corpus sources: local text, JSONL and Parquet files, TFDS, Hugging Face datasets, the Debian default.

Every reader yields `Document(id, text, metadata)` with a stable id, or `Dropped(id, reason)` for input it
cannot use, so that the pipeline's report accounts for every input document. What counts as unusable:

  source.invalid_utf8    bytes that are not UTF-8
  source.empty           an empty file, or a record whose text is empty
  source.bad_json        a JSONL line that is not a JSON object
  source.missing_field   a record without the text field (or with a non-string one)
  source.too_large       a document (or JSONL line) over `max_document_bytes`
  source.bad_parquet     a file pyarrow cannot read as Parquet

With `on_error="raise"` the first of these stops the run with a `SourceError` that names the file and line
(or row); with `on_error="skip"` it becomes a counted drop. Lines are read with a size bound, so a 50 MB
line costs at most `max_document_bytes` of memory before it is recognised and skipped.

Ids: "<relative path>" for a whole text file, "<relative path>:<paragraph index>" (0-based) for a
paragraph, "<relative path>:<line>" (1-based, as editors number them) for JSONL, "<relative path>:<row>"
(0-based) for Parquet, "<name>/<split>:<index>" for TFDS and Hugging Face. Paths are relative to the
deepest directory holding all the input files, so ids do not depend on the working directory.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from llm.corpus.debian_corpus import load_debian_corpus
from llm.corpus.document import Document, Dropped
from llm.io import ON_ERROR, SourceError

FORMATS = ("auto", "text", "jsonl", "parquet")
TEXT_MODES = ("file", "paragraph")
# Larger than any real document of a web or book corpus; a bigger one is almost surely a data bug (a dump
# without newlines, a binary file), and the cleaning stages would hold it whole in memory several times.
DEFAULT_MAX_DOCUMENT_BYTES = 8 * 1024 * 1024

_EXTENSIONS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}
_SKIP_HINT = " (set sources.on_error=skip to drop and count it instead)"


@dataclasses.dataclass(frozen=True)
class _Options:
    """What every reader needs: where the text is, and what to do with input it cannot use."""

    text_field: str = "text"
    on_error: str = "skip"
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES
    licence: str = "unknown"

    def __post_init__(self) -> None:
        _check_choice("sources.on_error", self.on_error, ON_ERROR)
        if self.max_document_bytes <= 0:
            raise ValueError(f"sources.max_document_bytes={self.max_document_bytes}: must be positive")

    def drop(self, doc_id: str, reason: str, message: str) -> Dropped:
        """Returns the drop for `skip`; raises `SourceError(message)` for `raise`."""
        if self.on_error == "raise":
            raise SourceError(message + _SKIP_HINT)
        return Dropped(doc_id, reason)


def _check_choice(key: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r}: expected one of {list(allowed)}")


def _split(value: str | Iterable[str]) -> list[str]:
    """A comma-separated string (the command-line form) or a sequence, as a list without empty items."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [item.strip() for item in items if item.strip()]


# -------------------------------------------------------------------------------------------------- records
def _plain(value: Any) -> Any:
    """A JSON-serializable value for metadata (the pipeline writes documents as JSONL).

    TFDS records hold bytes and NumPy values; Parquet rows may hold dates and decimals, kept as strings.
    """
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, (np.ndarray, np.generic)):
        return _plain(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def _record(doc_id: str, where: str, record: Any, source: str, opts: _Options) -> Document | Dropped:
    """A document from one record (JSONL object, Parquet row, TFDS/HF example): text field + metadata."""
    if not isinstance(record, dict):
        return opts.drop(doc_id, "source.bad_json", f"{where}: expected a JSON object, got {type(record).__name__}")
    text = record.get(opts.text_field)
    if isinstance(text, bytes):  # TFDS Text features
        if len(text) > opts.max_document_bytes:
            return _too_large(doc_id, where, opts)
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            return opts.drop(
                doc_id, "source.invalid_utf8", f"{where}: field {opts.text_field!r}: invalid UTF-8 at byte {e.start}"
            )
    if text is None or not isinstance(text, str):
        found = "missing" if text is None else f"a {type(text).__name__}, not a string"
        return opts.drop(
            doc_id,
            "source.missing_field",
            f"{where}: text field {opts.text_field!r} is {found}; fields: {sorted(record)} (set sources.text_field)",
        )
    if not text.strip():
        return opts.drop(doc_id, "source.empty", f"{where}: text field {opts.text_field!r} is empty")
    if len(text.encode("utf-8")) > opts.max_document_bytes:
        return _too_large(doc_id, where, opts)
    metadata = {k: _plain(v) for k, v in record.items() if k != opts.text_field}
    # A record's own `source`/`licence` (e.g. per-document licences of a mixed dataset) win over ours.
    metadata.setdefault("source", source)
    metadata.setdefault("licence", opts.licence)
    return Document(doc_id, text, metadata)


def _too_large(doc_id: str, where: str, opts: _Options) -> Dropped:
    return opts.drop(
        doc_id, "source.too_large", f"{where}: larger than sources.max_document_bytes={opts.max_document_bytes}"
    )


# ---------------------------------------------------------------------------------------------------- files
def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _lines(stream: IO[bytes], max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, line without its newline), or None for a line longer than `max_bytes`.

    An over-long line is read past in 1 MiB chunks and never held whole. A UTF-8 byte-order mark (files
    saved by Windows editors) is removed from the first line.
    """
    number = 0
    while line := stream.readline(max_bytes + 2):  # +2: room for a maximal line and its "\r\n"
        number += 1
        if len(line) == max_bytes + 2 and not line.endswith(b"\n"):  # cut short: the line goes on
            while (chunk := stream.readline(1 << 20)) and not chunk.endswith(b"\n"):
                pass
            yield number, None
            continue
        content = line.removesuffix(b"\n").removesuffix(b"\r")
        if number == 1:
            content = content.removeprefix(b"\xef\xbb\xbf")
        yield number, None if len(content) > max_bytes else content


def _read_text_file(path: Path, name: str, opts: _Options) -> Iterator[Document | Dropped]:
    """The whole file as one document."""
    with _open(path) as stream:
        data = stream.read(opts.max_document_bytes + 1)
    if len(data) > opts.max_document_bytes:
        yield _too_large(name, str(path), opts)
        return
    try:
        text = data.decode("utf-8").removeprefix("\ufeff").replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        yield opts.drop(name, "source.invalid_utf8", f"{path}:{line}: invalid UTF-8 at byte {e.start}")
        return
    if not text.strip():
        yield opts.drop(name, "source.empty", f"{path}: empty file")
        return
    yield Document(name, text, {"source": name, "licence": opts.licence})


def _paragraph(
    doc_id: str, lines: list[str], problem: tuple[str, str] | None, name: str, opts: _Options
) -> Document | Dropped:
    if problem:
        return opts.drop(doc_id, *problem)
    return Document(doc_id, "\n".join(lines), {"source": name, "licence": opts.licence})


def _read_paragraphs(path: Path, name: str, opts: _Options) -> Iterator[Document | Dropped]:
    """One document per paragraph: runs of non-blank lines separated by blank lines."""
    index, lines, size = 0, [], 0
    problem = None  # (reason, message) of the first defect of the current paragraph: it is dropped whole
    with _open(path) as stream:
        for number, raw in _lines(stream, opts.max_document_bytes):
            if raw is not None and not raw.strip():
                if lines or problem:
                    yield _paragraph(f"{name}:{index}", lines, problem, name, opts)
                    index, lines, size, problem = index + 1, [], 0, None
                continue
            size += opts.max_document_bytes + 1 if raw is None else len(raw) + 1
            if problem is None and size > opts.max_document_bytes:
                problem = (
                    "source.too_large",
                    f"{path}:{number}: paragraph {index} is larger than "
                    f"sources.max_document_bytes={opts.max_document_bytes}",
                )
            if problem is None:
                try:
                    lines.append(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    problem = ("source.invalid_utf8", f"{path}:{number}: invalid UTF-8 at byte {e.start}")
            if problem and opts.on_error == "raise":
                opts.drop(f"{name}:{index}", *problem)  # raises here, naming the line
    if lines or problem:
        yield _paragraph(f"{name}:{index}", lines, problem, name, opts)
    elif index == 0:
        yield opts.drop(name, "source.empty", f"{path}: empty file")


def _read_jsonl(path: Path, name: str, opts: _Options) -> Iterator[Document | Dropped]:
    """One document per JSON object line; blank lines are ignored; the other fields become metadata."""
    records = 0
    with _open(path) as stream:
        for number, raw in _lines(stream, opts.max_document_bytes):
            doc_id, where = f"{name}:{number}", f"{path}:{number}"
            if raw is None:
                records += 1
                yield _too_large(doc_id, where, opts)
                continue
            if not raw.strip():
                continue
            records += 1
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield opts.drop(doc_id, "source.invalid_utf8", f"{where}: invalid UTF-8 at byte {e.start}")
                continue
            except json.JSONDecodeError as e:
                yield opts.drop(doc_id, "source.bad_json", f"{where}: invalid JSON: {e.msg} at column {e.colno}")
                continue
            yield _record(doc_id, where, record, name, opts)
    if records == 0:
        yield opts.drop(name, "source.empty", f"{path}: empty file")


def _read_parquet(path: Path, name: str, opts: _Options) -> Iterator[Document | Dropped]:
    """One document per row, streamed in batches; the other columns become metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        yield opts.drop(name, "source.bad_parquet", f"{path}: not a readable Parquet file: {e}")
        return
    columns = parquet.schema_arrow.names
    if opts.text_field not in columns:
        raise SourceError(f"{path}: no column {opts.text_field!r}; columns: {columns} (set sources.text_field)")
    if parquet.metadata.num_rows == 0:
        yield opts.drop(name, "source.empty", f"{path}: empty file (no rows)")
        return
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield _record(f"{name}:{row}", f"{path}: row {row}", record, name, opts)
            row += 1


_READERS = {"jsonl": _read_jsonl, "parquet": _read_parquet}


def _format_of(path: Path) -> str | None:
    suffixes = path.suffixes[-2:] if path.suffix == ".gz" else path.suffixes[-1:]
    return _EXTENSIONS.get(suffixes[0].lower()) if suffixes else None


def expand_paths(paths: Sequence[str], format: str = "auto") -> list[tuple[Path, str]]:
    """Files named by `paths` (files, directories walked recursively, globs) as (path, id name), sorted.

    In a directory, hidden files are skipped and, with `format="auto"`, so are files whose extension names
    no known format (a README, a licence file); they are logged.
    """
    files: list[Path] = []
    for entry in paths:
        expanded = os.path.expanduser(entry)
        matches = sorted(glob.glob(expanded, recursive=True)) if glob.has_magic(expanded) else [expanded]
        if not matches or not os.path.exists(matches[0]):
            raise SourceError(f"sources.paths: {entry!r} matches no file or directory")
        for match in map(Path, matches):
            if not match.is_dir():
                files.append(match)
                continue
            walked = sorted(
                p
                for p in match.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(match).parts)
            )
            known = [p for p in walked if format != "auto" or _format_of(p)]
            if len(known) < len(walked):
                logging.warning(
                    "%s: skipped %d files of unknown format (set sources.format to read them)",
                    match,
                    len(walked) - len(known),
                )
            files.extend(known)
    files = sorted({Path(os.path.abspath(p)) for p in files})
    if not files:
        raise SourceError(f"sources.paths: {list(paths)} hold no input files")
    root = os.path.commonpath([p.parent for p in files])
    return [(p, os.path.relpath(p, root)) for p in files]


def read_files(
    paths: Sequence[str],
    *,
    format: str = "auto",
    text_mode: str = "file",
    text_field: str = "text",
    on_error: str = "skip",
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
    licence: str = "unknown",
) -> Iterator[Document | Dropped]:
    """Reads local text (.txt/.md), JSONL and Parquet files, optionally gzipped (not Parquet).

    Args:
      paths: files, directories (walked recursively) or glob patterns.
      format: "auto" (by extension) or one of "text", "jsonl", "parquet" for every file.
      text_mode: for text files, "file" (one document per file) or "paragraph" (per blank-line paragraph).
      text_field: the JSONL field / Parquet column that holds the text; other fields become metadata.
      on_error: "raise" a SourceError naming file and line on malformed input, or "skip" it as a Dropped.
      max_document_bytes: larger documents (and JSONL lines) are malformed input (`source.too_large`).
      licence: recorded in each document's metadata (unless a record carries its own).
    """
    _check_choice("sources.format", format, FORMATS)
    _check_choice("sources.text_mode", text_mode, TEXT_MODES)
    opts = _Options(text_field, on_error, max_document_bytes, licence)
    text_reader = _read_paragraphs if text_mode == "paragraph" else _read_text_file
    for path, name in expand_paths(paths, format):
        kind = format if format != "auto" else _format_of(path)
        if kind is None:
            raise SourceError(
                f"{path}: cannot tell the format from the extension; set sources.format to one of {list(FORMATS[1:])}"
            )
        yield from _READERS.get(kind, text_reader)(path, name, opts)


# ------------------------------------------------------------------------------------------- TFDS and HF
def read_indexed(
    data_source: Any,
    name: str,
    *,
    text_field: str = "text",
    on_error: str = "skip",
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
    licence: str = "unknown",
) -> Iterator[Document | Dropped]:
    """Reads any random-access source of records (`len()` and `[i]`, e.g. a TFDS data source) in order.

    `name` ("dataset/split") prefixes the ids and is the documents' `source`.
    """
    opts = _Options(text_field, on_error, max_document_bytes, licence)
    for index in range(len(data_source)):
        yield _record(f"{name}:{index}", f"{name}: example {index}", data_source[index], name, opts)


def read_tfds(
    name: str, split: str = "train", data_dir: str | None = None, **kwargs: Any
) -> Iterator[Document | Dropped]:
    """Reads a prepared TFDS dataset with `tfds.data_source` (ArrayRecord; no TensorFlow needed).

    `kwargs` are those of `read_indexed`.
    """
    import tensorflow_datasets as tfds  # deferred: a second of import time that most runs do not need

    data_source = tfds.data_source(name, split=split, data_dir=data_dir or None)
    yield from read_indexed(data_source, f"{name}/{split}", **kwargs)


def read_hf(
    name: str,
    config_name: str | None = None,
    split: str = "train",
    *,
    text_field: str = "text",
    on_error: str = "skip",
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
    licence: str = "unknown",
) -> Iterator[Document | Dropped]:
    """Streams a Hugging Face dataset (optional extra `hf`; needs network unless it is in the HF cache)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("Reading Hugging Face datasets needs the optional extra: pip install '.[hf]'") from e
    opts = _Options(text_field, on_error, max_document_bytes, licence)
    rows = datasets.load_dataset(name, config_name or None, split=split, streaming=True)
    for index, record in enumerate(rows):
        yield _record(f"{name}/{split}:{index}", f"{name}/{split}: row {index}", record, name, opts)


# ---------------------------------------------------------------------------------------------- the config
def read_sources(config: Any) -> Iterator[Document | Dropped]:
    """Yields the documents named by the `sources` section of the pipeline config.

    Paths, a TFDS dataset and a Hugging Face dataset may be combined and are read in that order; with none
    of them, the embedded Debian corpus is read.
    """
    s = config.sources
    common = dict(
        text_field=s.text_field, on_error=s.on_error, max_document_bytes=s.max_document_bytes, licence=s.licence
    )
    _Options(**common)  # validates on_error and max_document_bytes before any download or file access
    paths = _split(s.paths)
    if not (paths or s.tfds_name or s.hf_name):
        yield from load_debian_corpus(s.debian_cache_dir, _split(s.debian_packages))
        return
    if paths:
        yield from read_files(paths, format=s.format, text_mode=s.text_mode, **common)
    if s.tfds_name:
        yield from read_tfds(s.tfds_name, s.tfds_split, s.tfds_data_dir, **common)
    if s.hf_name:
        yield from read_hf(s.hf_name, s.hf_config, s.hf_split, **common)
