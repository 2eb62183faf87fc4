"""Packing tokenized documents into fixed-length rows, a deterministic train/validation split, and shards.

Rows follow llm/data/records.py: tokens, segment_ids (1, 2, ... per piece of document in the row, 0 on
padding), positions (restarting at 0 in every segment) and loss_mask (1 on every real token except the
first of each segment, which nothing in its segment predicts).

Packing is greedy and sequential, so the same documents in the same order always give the same rows:
a document that fits in the row's free space goes there; one that does not but fits in an empty row
closes the row (padding the rest) and starts the next; one longer than a row fills the free space and
continues at the start of the following rows, each piece its own segment with positions from 0.

Fine-tuning data brings its own loss mask per document (SFT trains on the assistant's tokens only):
`pack_masked_documents` places such documents whole, by the same greedy rule, and keeps their masks.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import heapq
import itertools
import os
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from llm.data import records

# A fine-tuning document: its tokens and its own loss mask (1 on the tokens the model is trained to predict).
MaskedDocument = tuple[Sequence[int], Sequence[int]]


def pack_documents(
    docs: Iterable[Sequence[int]],
    seq_len: int,
    *,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields packed rows (the four records.FIELDS, int32 of shape (seq_len,)).

    With `bos_id`/`eos_id` set, every document is wrapped `bos ... eos` before packing (a split document
    has bos on its first piece and eos on its last). Empty documents are skipped.
    """

    def wrapped() -> Iterator[tuple[np.ndarray, None]]:
        for doc in docs:
            tokens = np.asarray(doc, dtype=np.int32).reshape(-1)
            if bos_id is not None:
                tokens = np.concatenate([[bos_id], tokens]).astype(np.int32)
            if eos_id is not None:
                tokens = np.concatenate([tokens, [eos_id]]).astype(np.int32)
            yield tokens, None

    return _pack(wrapped(), seq_len, pad_id)


def pack_masked_documents(
    docs: Iterable[MaskedDocument],
    seq_len: int,
    *,
    pad_id: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields rows of `(tokens, loss_mask)` documents, each placed whole with its own loss mask.

    A document is never split across rows (a split would cut a conversation or a preference pair from
    its prompt), so one longer than `seq_len` raises: truncate it first. The first token of a segment
    still gets loss_mask 0, as nothing in its segment predicts it. Empty documents are skipped.
    """

    def checked() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for index, (doc, mask) in enumerate(docs):
            tokens = np.asarray(doc, dtype=np.int32).reshape(-1)
            loss_mask = np.asarray(mask, dtype=np.int32).reshape(-1)
            if len(loss_mask) != len(tokens):
                raise ValueError(f"Document {index}: {len(tokens)} tokens but a loss mask of {len(loss_mask)}.")
            if len(tokens) > seq_len:
                raise ValueError(
                    f"Document {index} has {len(tokens)} tokens, more than seq_len={seq_len}; "
                    "masked documents are packed whole, so truncate it first."
                )
            yield tokens, loss_mask

    return _pack(checked(), seq_len, pad_id)


def _pack(
    docs: Iterable[tuple[np.ndarray, np.ndarray | None]], seq_len: int, pad_id: int
) -> Iterator[dict[str, np.ndarray]]:
    """The greedy packing of the module docstring; a mask of None means "every token is a target"."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (one context token and one target), got {seq_len}.")
    segments: list[tuple[np.ndarray, np.ndarray | None]] = []  # the pieces placed in the current row
    free = seq_len
    for tokens, mask in docs:
        if len(tokens) > free and len(tokens) <= seq_len:
            yield _row(segments, seq_len, pad_id)
            segments, free = [], seq_len
        while len(tokens) > 0:
            piece, tokens = tokens[:free], tokens[free:]
            piece_mask, mask = (None, None) if mask is None else (mask[:free], mask[free:])
            segments.append((piece, piece_mask))
            free -= len(piece)
            if free == 0:
                yield _row(segments, seq_len, pad_id)
                segments, free = [], seq_len
    if segments:
        yield _row(segments, seq_len, pad_id)


def _row(segments: list[tuple[np.ndarray, np.ndarray | None]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    row = {
        "tokens": np.full(seq_len, pad_id, dtype=np.int32),
        "segment_ids": np.zeros(seq_len, dtype=np.int32),
        "positions": np.zeros(seq_len, dtype=np.int32),
        "loss_mask": np.zeros(seq_len, dtype=np.int32),
    }
    start = 0
    for segment_id, (piece, mask) in enumerate(segments, start=1):
        end = start + len(piece)
        row["tokens"][start:end] = piece
        row["segment_ids"][start:end] = segment_id
        row["positions"][start:end] = np.arange(len(piece))
        row["loss_mask"][start + 1 : end] = 1 if mask is None else mask[1:]
        start = end
    return row


def _split_score(doc_id: str) -> float:
    """A stable pseudo-random number in [0, 1) derived from the document id alone."""
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_train_validation(
    doc_lengths: Iterable[tuple[str, int]],
    seq_len: int,
    validation_fraction: float = 0.005,
    min_validation_rows: int = 1,
) -> set[str]:
    """Ids of the validation documents; every other document is for training.

    A document is in validation when a hash of its id falls below `validation_fraction`, so the decision
    never depends on order or on other documents, and a re-run gives the same split. If those documents
    hold fewer than `min_validation_rows * seq_len` tokens, the documents with the next-lowest hashes are
    added until they do, which guarantees at least that many packed rows. `doc_lengths` is streamed;
    memory holds only the validation ids and the few extra candidates the minimum may need.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}.")
    target = min_validation_rows * seq_len
    chosen: set[str] = set()
    chosen_tokens = 0
    # Max-heap (by score) of the lowest-score documents not chosen, trimmed to what the minimum can need.
    reserve: list[tuple[float, str, int]] = []
    reserve_tokens = 0
    total = 0
    for doc_id, length in doc_lengths:
        total += 1
        score = _split_score(doc_id)
        if score < validation_fraction:
            chosen.add(doc_id)
            chosen_tokens += length
            continue
        heapq.heappush(reserve, (-score, doc_id, length))
        reserve_tokens += length
        # The highest-score reserve document is never needed if the others already cover the shortfall.
        while reserve and reserve_tokens - reserve[0][2] >= target - chosen_tokens:
            reserve_tokens -= heapq.heappop(reserve)[2]
    for _, doc_id, length in sorted(reserve, reverse=True):  # ascending score
        if chosen_tokens >= target:
            break
        chosen.add(doc_id)
        chosen_tokens += length
    if chosen_tokens < target or len(chosen) == total:
        raise ValueError(
            f"The corpus ({total} documents) is too small for min_validation_rows={min_validation_rows} of "
            f"{seq_len} tokens while keeping documents for training; lower pack.min_validation_rows."
        )
    return chosen


@dataclasses.dataclass
class SplitStats:
    """What was written for one split."""

    seq_len: int
    documents: int = 0
    rows: int = 0
    tokens: int = 0  # real (non-pad) tokens
    target_tokens: int = 0  # tokens with loss_mask 1 (in SFT, the assistant's share of `tokens`)
    shards: list[str] = dataclasses.field(default_factory=list)

    @property
    def efficiency(self) -> float:
        """Packing efficiency: the fraction of row positions holding real tokens rather than padding."""
        return self.tokens / (self.rows * self.seq_len) if self.rows else 0.0

    def as_dict(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "packing_efficiency": self.efficiency}


def _write_split(
    docs: Iterable[Sequence[int] | MaskedDocument],
    pack: Callable[[Iterable[Any]], Iterator[dict[str, np.ndarray]]],
    split_dir: str,
    num_shards: int,
    stats: SplitStats,
) -> None:
    rows = pack(docs)
    first = next(rows, None)
    if first is None:  # checked before writing, so no empty shards are left behind
        raise ValueError(f"No tokens for {split_dir!r}: the split is empty; check the validation ids.")

    def counted() -> Iterator[dict[str, np.ndarray]]:
        for row in itertools.chain([first], rows):
            stats.rows += 1
            stats.tokens += int(np.count_nonzero(row["segment_ids"]))
            stats.target_tokens += int(np.count_nonzero(row["loss_mask"]))
            yield row

    stats.shards = records.write_shards(counted(), split_dir, num_shards)


def write_packed_splits(
    docs: Iterable[tuple[str, Sequence[int] | MaskedDocument]],
    output_dir: str,
    seq_len: int,
    validation_ids: Container[str],
    *,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    train_shards: int = 1,
    validation_shards: int = 1,
    masked: bool = False,
) -> dict[str, SplitStats]:
    """Packs `(doc_id, tokens)` documents into `output_dir/train/` and `output_dir/validation/` shards.

    With `masked`, documents are `(doc_id, (tokens, loss_mask))` and go through `pack_masked_documents`
    (placed whole, masks kept; bos/eos are then part of the tokens, so `bos_id`/`eos_id` must stay None).
    Training rows are streamed to disk; validation documents (a small share) are held in memory until the
    training split is written. Returns the statistics of both splits, packing efficiency included.
    """
    if masked and (bos_id is not None or eos_id is not None):
        raise ValueError("Masked documents carry their own bos/eos: leave bos_id and eos_id unset.")
    if masked:
        pack = functools.partial(pack_masked_documents, seq_len=seq_len, pad_id=pad_id)
    else:
        pack = functools.partial(pack_documents, seq_len=seq_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    train, validation = SplitStats(seq_len), SplitStats(seq_len)
    held_out: list[Sequence[int] | MaskedDocument] = []

    def train_docs() -> Iterator[Sequence[int] | MaskedDocument]:
        for doc_id, doc in docs:
            if doc_id in validation_ids:
                held_out.append(doc)
            else:
                train.documents += 1
                yield doc

    _write_split(train_docs(), pack, os.path.join(output_dir, "train"), train_shards, train)
    validation.documents = len(held_out)
    _write_split(held_out, pack, os.path.join(output_dir, "validation"), validation_shards, validation)
    return {"train": train, "validation": validation}
