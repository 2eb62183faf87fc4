"""The on-disk format of packed token rows: ArrayRecord shards of fixed-length int32 rows.

A dataset directory holds one sub-directory per split (`train/`, `validation/`), each with shards named
`NAME-00000-of-00004.array_record`. Every record is one packed row of `seq_len` positions, stored as the
raw little-endian bytes of an int32 array of shape (4, seq_len) whose rows are, in order:

  tokens       token ids
  segment_ids  1, 2, 3, ... for each document packed in the row; 0 marks padding
  positions    position of each token inside its own document (restarts at 0 per document)
  loss_mask    1 where the token is a prediction *target* (the model is trained to predict it from the
               tokens before it), 0 elsewhere: padding, prompts in SFT, the first token of a document

The trainer predicts token t+1 from tokens <= t, and counts that prediction only where
`loss_mask[t+1] == 1` and `segment_ids[t+1] == segment_ids[t]`, so no loss crosses a document boundary.
The format needs no header: the row length is the record size / 16.

Preference data for DPO stores one record per pair: the chosen and the rejected row stacked as an int32
array of shape (8, seq_len), rows `chosen_tokens`, ..., `chosen_loss_mask`, `rejected_tokens`, ...,
`rejected_loss_mask` (PAIR_FIELDS), so the two completions of a prompt always travel in the same batch.
Its record size is 32 * seq_len bytes.

Contrastive data (a sentence embedder) stores one record per example: the query, its positive passage and
an optional hard negative, three rows stacked as (12, seq_len), rows `query_tokens`, ..., `positive_...`,
`negative_...` (TRIPLE_FIELDS). Each row holds one text (segment id 1 on its tokens, 0 on padding); a missing
negative is a row of padding only. Its record size is 48 * seq_len bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from array_record.python import array_record_module

FIELDS = ("tokens", "segment_ids", "positions", "loss_mask")
PAIR_FIELDS = tuple(f"chosen_{name}" for name in FIELDS) + tuple(f"rejected_{name}" for name in FIELDS)
CONTRASTIVE_SIDES = ("query", "positive", "negative")
TRIPLE_FIELDS = tuple(f"{side}_{name}" for side in CONTRASTIVE_SIDES for name in FIELDS)
SHARD_SUFFIX = ".array_record"


def encode_row(row: Mapping[str, np.ndarray]) -> bytes:
    """Serializes one packed row (a mapping with the four FIELDS, each of shape (seq_len,))."""
    stacked = np.stack([np.asarray(row[name], dtype="<i4") for name in FIELDS])
    return stacked.tobytes()


def decode_row(record: bytes) -> dict[str, np.ndarray]:
    """Inverse of `encode_row`."""
    return decode_fields(record, FIELDS, "packed row")


def decode_fields(record: bytes, fields: tuple[str, ...], what: str = "record") -> dict[str, np.ndarray]:
    """A record of stacked int32 rows as {field: (seq_len,) int32}: FIELDS, PAIR_FIELDS or TRIPLE_FIELDS."""
    flat = np.frombuffer(record, dtype="<i4")
    if flat.size % len(fields):
        raise ValueError(f"Record of {len(record)} bytes is not a {what} of {len(fields)} int32 fields.")
    stacked = flat.reshape(len(fields), -1)
    return {name: stacked[i].astype(np.int32) for i, name in enumerate(fields)}


def encode_pair(chosen_row: Mapping[str, np.ndarray], rejected_row: Mapping[str, np.ndarray]) -> bytes:
    """Serializes a DPO preference pair: two packed rows of the same length (each with the four FIELDS)."""
    chosen, rejected = encode_row(chosen_row), encode_row(rejected_row)
    if len(chosen) != len(rejected):
        raise ValueError(
            f"The chosen row has {len(chosen) // 16} positions and the rejected row "
            f"{len(rejected) // 16}; a pair needs rows of the same length."
        )
    return chosen + rejected


def decode_pair(record: bytes) -> dict[str, np.ndarray]:
    """Inverse of `encode_pair`: the eight PAIR_FIELDS, each int32 of shape (seq_len,)."""
    return decode_fields(record, PAIR_FIELDS, "preference pair")


def encode_triple(
    query_row: Mapping[str, np.ndarray],
    positive_row: Mapping[str, np.ndarray],
    negative_row: Mapping[str, np.ndarray] | None = None,
) -> bytes:
    """Serializes a contrastive example: three rows of the same length (each with the four FIELDS); without
    a hard negative its row is padding only (segment ids 0), which the loss leaves out."""
    if negative_row is None:
        negative_row = {name: np.zeros_like(np.asarray(query_row[name])) for name in FIELDS}
    rows = [encode_row(row) for row in (query_row, positive_row, negative_row)]
    if len({len(row) for row in rows}) != 1:
        lengths = dict(zip(CONTRASTIVE_SIDES, (len(row) // 16 for row in rows)))
        raise ValueError(f"A contrastive example needs rows of one length, got {lengths} positions.")
    return b"".join(rows)


def decode_triple(record: bytes) -> dict[str, np.ndarray]:
    """Inverse of `encode_triple`: the twelve TRIPLE_FIELDS, each int32 of shape (seq_len,)."""
    return decode_fields(record, TRIPLE_FIELDS, "contrastive example")


# The fields a record holds -> its decoder: what the loader reads for an objective's `fields`.
DECODERS = {FIELDS: decode_row, PAIR_FIELDS: decode_pair, TRIPLE_FIELDS: decode_triple}


def shard_paths(split_dir: str) -> list[str]:
    """Sorted ArrayRecord shard paths of one split directory (complete shards only)."""
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"Data split directory {split_dir!r} does not exist.")
    paths = sorted(os.path.join(split_dir, name) for name in os.listdir(split_dir) if name.endswith(SHARD_SUFFIX))
    if not paths:
        raise FileNotFoundError(f"No *{SHARD_SUFFIX} shards in {split_dir!r}.")
    return paths


def write_shards(
    rows: Iterable[Mapping[str, np.ndarray]],
    split_dir: str,
    num_shards: int,
    name: str = "data",
    encode: Callable[[Any], bytes] = encode_row,
) -> list[str]:
    """Writes rows round-robin into `num_shards` ArrayRecord shards and returns their paths.

    `encode` turns each item into its record (`encode_row` for packed rows; preference data passes
    `(chosen, rejected)` tuples with `lambda pair: encode_pair(*pair)`). Each shard is written under a
    temporary name and renamed when complete, so a crash never leaves a half-written file that
    `shard_paths` would pick up.
    """
    os.makedirs(split_dir, exist_ok=True)
    final = [os.path.join(split_dir, f"{name}-{i:05d}-of-{num_shards:05d}{SHARD_SUFFIX}") for i in range(num_shards)]
    temporary = [path + ".tmp" for path in final]
    # group_size:1 keeps every record independently addressable, which Grain's random access needs.
    writers = [array_record_module.ArrayRecordWriter(path, "group_size:1") for path in temporary]
    try:
        for index, row in enumerate(rows):
            writers[index % num_shards].write(encode(row))
    finally:
        for writer in writers:
            writer.close()
    for tmp, path in zip(temporary, final):
        os.replace(tmp, path)
    return final


def iterate_shard(
    path: str,
    decode: Callable[[bytes], dict[str, np.ndarray]] = decode_row,
) -> Iterator[dict[str, np.ndarray]]:
    """Reads every record of one shard in order, decoded with `decode` (`decode_pair`, `decode_triple`).

    For inspection and tests; training uses the Grain loader.
    """
    reader = array_record_module.ArrayRecordReader(path)
    try:
        for index in range(reader.num_records()):
            yield decode(reader.read([index])[0])
    finally:
        reader.close()
