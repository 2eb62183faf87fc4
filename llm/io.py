"""Files: atomic writes, the same calls for local paths and object stores (gs://, s3://, hdfs:// through
Apache Beam's FileSystems), and the error for malformed input that names where it is."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from typing import Any

ON_ERROR = ("raise", "skip")  # What a reader does with a malformed record: stop, or drop and count it.


class SourceError(ValueError):
    """Malformed input; the message names the file and line (or key) and what is wrong."""


def is_remote(path: str) -> bool:
    return "://" in path


def beam_filesystems():
    """Apache Beam's FileSystems (the [beam] extra), which reads and writes paths with a scheme."""
    try:
        from apache_beam.io.filesystems import FileSystems
    except ImportError as error:
        raise ImportError(
            "Paths with a scheme (gs://, s3://, ...) are read and written through Apache Beam: "
            "pip install -e '.[beam]'."
        ) from error
    return FileSystems


def join(base: str, *names: str) -> str:
    return beam_filesystems().join(base, *names) if is_remote(base) else os.path.join(base, *names)


def read_text(path: str) -> str | None:
    """The UTF-8 content of a file, or None if it does not exist."""
    if not is_remote(path):
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as file:
            return file.read()
    fs = beam_filesystems()
    if not fs.exists(path):
        return None
    with fs.open(path) as file:
        return file.read().decode("utf-8")


def write_text(path: str, text: str) -> None:
    """Writes a whole file atomically: readers see the old content or the new, never a part."""
    if is_remote(path):  # an object store publishes an object only when it is closed
        with beam_filesystems().create(path) as file:
            file.write(text.encode("utf-8"))
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(path + ".tmp", path)


def remove_tree(path: str) -> None:
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs = beam_filesystems()
    matches = fs.match([join(path, "**")])[0].metadata_list
    if matches:
        fs.delete([metadata.path for metadata in matches])


def replace_dir(staging: str, target: str) -> None:
    """Puts the finished local directory `staging` in place of `target`, replacing an existing one (the
    caller checked that it may): a reader sees the old directory or the new one, never a half-written one."""
    if os.path.exists(target):
        shutil.rmtree(target)
    os.replace(staging, target)


def write_json(path: str, value: Any) -> None:
    """Writes `value` as indented, key-sorted JSON, atomically (see `write_text`)."""
    write_text(path, json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def read_json(path: str) -> Any | None:
    """The JSON value of a local file, or None when there is no such file; invalid JSON is an error naming the
    file and line."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON (line {error.lineno}).") from error


def jsonl_objects(path: str, lines: Sequence[str] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line of a JSONL file, or of its `lines` when already read; a
    line that is not a JSON object is a SourceError naming `path:line`."""
    if lines is None:
        try:
            with open(path, encoding="utf-8") as file:
                lines = file.read().split("\n")  # not splitlines: a JSON string may hold U+2028
        except UnicodeDecodeError as error:
            raise SourceError(f"{path}: not UTF-8 text (byte {error.start}).") from error
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SourceError(f"{path}:{number}: not valid JSON ({error.msg}).") from error
        if not isinstance(record, dict):
            raise SourceError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}.")
        yield number, record
