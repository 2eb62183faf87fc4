"""The on-disk corpus between pipeline steps: JSONL document shards and their counts, on local paths or object
stores alike (file access through llm/io.py).

A shard `documents-00003-of-00008.jsonl` holds one JSON object {"id", "text", "metadata"} per line; a
document goes to the shard given by a stable hash of its id, and each shard is sorted by id.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterable, Iterator

from llm.corpus.document import Document
from llm.corpus.report import Accounts
from llm.io import beam_filesystems, is_remote, join, read_text, write_text

SHARD_PREFIX = "documents"
SHARD_SUFFIX = ".jsonl"
COUNTS_FILE = "counts.json"


# --- JSONL shards -------------------------------------------------------------------------------------------


def encode_document(document: Document) -> str:
    """One JSONL line (without the newline). Keys sorted so both runners write identical bytes."""
    return json.dumps(
        {"id": document.id, "text": document.text, "metadata": document.metadata},
        ensure_ascii=False,
        sort_keys=True,
    )


def decode_document(line: str, where: str) -> Document:
    """Inverse of `encode_document`; `where` ("file:line") names the line in the error of a bad one."""
    try:
        record = json.loads(line)
        return Document(id=record["id"], text=record["text"], metadata=record["metadata"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{where}: not a corpus document line ({error}).") from error


def iterate_documents(lines: Iterable[str], where: str) -> Iterator[Document]:
    for number, line in enumerate(lines, start=1):
        yield decode_document(line, f"{where}:{number}")


def shard_name(index: int, num_shards: int) -> str:
    return f"{SHARD_PREFIX}-{index:05d}-of-{num_shards:05d}{SHARD_SUFFIX}"


def shard_of(document_id: str, num_shards: int) -> int:
    """The shard a document goes to: a hash of its id that is the same in every process and machine."""
    digest = hashlib.blake2b(document_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_shards


def shard_content(documents: Iterable[Document], where: str) -> str:
    """The text of one shard file: its documents sorted by id, one per line. Ids must be unique."""
    keyed = sorted((document.id, encode_document(document)) for document in documents)
    for (first, _), (second, _) in zip(keyed, keyed[1:]):
        if first == second:
            raise ValueError(f"{where}: document id {first!r} occurs twice; sources must give unique ids.")
    return "".join(line + "\n" for _, line in keyed)


def write_shard(directory: str, index: int, num_shards: int, documents: Iterable[Document]) -> str:
    """Writes shard `index` of a step's output whole (`write_text`: never a partial file); returns its path.

    Both runners write every shard through here, so their shards are the same bytes.
    """
    path = join(directory, shard_name(index, num_shards))
    write_text(path, shard_content(documents, path))
    return path


def shard_pattern(directory: str) -> str:
    """The glob that matches every corpus shard of a step's directory."""
    return join(directory, f"{SHARD_PREFIX}-*{SHARD_SUFFIX}")


def shard_paths(directory: str) -> list[str]:
    """The complete, sorted list of a step's corpus shards; raises if one is missing."""
    pattern = shard_pattern(directory)
    if is_remote(directory):
        paths = sorted(metadata.path for metadata in beam_filesystems().match([pattern])[0].metadata_list)
    else:
        paths = sorted(glob.glob(pattern))
    expected = int(paths[0].rsplit("-of-", 1)[1].removesuffix(SHARD_SUFFIX)) if paths else None
    if expected is None or len(paths) != expected:
        raise FileNotFoundError(f"{directory}: expected a complete set of {pattern} shards, found {len(paths)}.")
    return paths


def read_documents(directory: str) -> Iterator[Document]:
    """Every document of a step's output (local files), shard by shard, in file order."""
    for path in shard_paths(directory):
        with open(path, encoding="utf-8") as lines:
            yield from iterate_documents(lines, path)


def write_counts(directory: str, accounts: Accounts) -> None:
    write_text(join(directory, COUNTS_FILE), json.dumps(accounts.to_json(), indent=1, ensure_ascii=False))


def write_counts_file(accounts: Accounts, directory: str) -> None:
    """`write_counts` with the argument order of a Beam Map."""
    write_counts(directory, accounts)


def read_counts(directory: str) -> Accounts:
    text = read_text(join(directory, COUNTS_FILE))
    if text is None:
        raise FileNotFoundError(f"{join(directory, COUNTS_FILE)} is missing.")
    return Accounts.from_json(json.loads(text))
