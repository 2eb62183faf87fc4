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
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
from array_record.python import array_record_module

FIELDS = ("tokens", "segment_ids", "positions", "loss_mask")
SHARD_SUFFIX = ".array_record"


def encode_row(row: Mapping[str, np.ndarray]) -> bytes:
    """Serializes one packed row (a mapping with the four FIELDS, each of shape (seq_len,))."""
    stacked = np.stack([np.asarray(row[name], dtype="<i4") for name in FIELDS])
    return stacked.tobytes()


def decode_row(record: bytes) -> dict[str, np.ndarray]:
    """Inverse of `encode_row`."""
    flat = np.frombuffer(record, dtype="<i4")
    if flat.size % len(FIELDS):
        raise ValueError(f"Record of {len(record)} bytes is not a packed row of {len(FIELDS)} int32 fields.")
    stacked = flat.reshape(len(FIELDS), -1)
    return {name: stacked[i].astype(np.int32) for i, name in enumerate(FIELDS)}


def shard_paths(split_dir: str) -> list[str]:
    """Sorted ArrayRecord shard paths of one split directory (complete shards only)."""
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"Data split directory {split_dir!r} does not exist.")
    paths = sorted(
        os.path.join(split_dir, name) for name in os.listdir(split_dir) if name.endswith(SHARD_SUFFIX)
    )
    if not paths:
        raise FileNotFoundError(f"No *{SHARD_SUFFIX} shards in {split_dir!r}.")
    return paths


def write_shards(
    rows: Iterable[Mapping[str, np.ndarray]],
    split_dir: str,
    num_shards: int,
    name: str = "data",
) -> list[str]:
    """Writes rows round-robin into `num_shards` ArrayRecord shards and returns their paths.

    Each shard is written under a temporary name and renamed when complete, so a crash never leaves a
    half-written file that `shard_paths` would pick up.
    """
    os.makedirs(split_dir, exist_ok=True)
    final = [
        os.path.join(split_dir, f"{name}-{i:05d}-of-{num_shards:05d}{SHARD_SUFFIX}") for i in range(num_shards)
    ]
    temporary = [path + ".tmp" for path in final]
    # group_size:1 keeps every record independently addressable, which Grain's random access needs.
    writers = [array_record_module.ArrayRecordWriter(path, "group_size:1") for path in temporary]
    try:
        for index, row in enumerate(rows):
            writers[index % num_shards].write(encode_row(row))
    finally:
        for writer in writers:
            writer.close()
    for tmp, path in zip(temporary, final):
        os.replace(tmp, path)
    return final


def iterate_shard(path: str) -> Iterator[dict[str, np.ndarray]]:
    """Reads every row of one shard in order (for inspection and tests; training uses the Grain loader)."""
    reader = array_record_module.ArrayRecordReader(path)
    try:
        for index in range(reader.num_records()):
            yield decode_row(reader.read([index])[0])
    finally:
        reader.close()
