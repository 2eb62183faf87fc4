"""Grain pipelines over the packed ArrayRecord shards written by the corpus pipeline (llm/data/records.py).

Training reads an endless, per-epoch reshuffled stream of batches; each process of a multi-host run reads
its own share of every global batch, so the data order is the same for any number of processes. The iterator
state goes into every checkpoint, so a resumed run sees exactly the batches an uninterrupted run would have
seen. Validation reads the first N batches of its split, in order, every time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from llm import config_validation
from llm.data import records

Batch = dict[str, np.ndarray]


def _rows(split_dir: str, seq_len: int, fields: tuple[str, ...] = records.FIELDS) -> grain.MapDataset:
    """The decoded records of one split (packed rows, DPO pairs or contrastive triples, as `fields` says: one
    of the keys of records.DECODERS), after checking their rows have length `seq_len`."""
    paths = records.shard_paths(split_dir)
    source = grain.sources.ArrayRecordDataSource(paths)
    if len(source) == 0:
        raise ValueError(f"The shards in {split_dir!r} hold no rows.")
    record_bytes = len(source[0])
    if record_bytes % (4 * len(fields)):
        raise ValueError(
            f"Records in {paths[0]!r} ({record_bytes} bytes) are not {len(fields)} int32 rows: they were prepared "
            "for another train.objective (packed rows, DPO pairs and contrastive triples differ)."
        )
    row_len = record_bytes // (4 * len(fields))
    if row_len != seq_len:
        raise ValueError(
            f"Rows in {paths[0]!r} have length {row_len}, but config.data.seq_len is {seq_len}. "
            "Set --config.data.seq_len to match, re-pack the data, or check it was prepared for this "
            "train.objective."
        )
    return grain.MapDataset.source(source).map(records.DECODERS[fields])


def _process_slice(batches: grain.MapDataset, process_index: int, process_count: int) -> grain.MapDataset:
    """This process's batches: every `process_count`-th batch of `batch_size` rows, starting at its index.

    Global batch k is then local batches k*P ... k*P+P-1 side by side (process order is device order in the
    mesh, see sharding.global_batch), which are the rows of batch k of a single process with a P times larger
    batch: the data order does not depend on the number of processes, and each reads and decodes only its rows.
    """
    return batches[process_index::process_count]


class TrainIterator:
    """Endless batches of training rows with a checkpointable position.

    `get_state()` returns a JSON-serializable dict that records the Grain iterator state together with the
    worker count and process layout, because Grain's state is only meaningful for the same layout: restoring
    it under another one could silently yield other data, so `set_state` refuses. The process index is the
    exception: processes draw their batches in lockstep, so all their Grain states are the same and the one
    process 0 checkpoints serves every process.
    """

    def __init__(
        self,
        split_dir: str,
        *,
        seq_len: int,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
        prefetch_buffer_size: int = 4,
        process_index: int = 0,
        process_count: int = 1,
        fields: tuple[str, ...] = records.FIELDS,
        replay_dir: str = "",
        replay_fraction: float = 0.0,
    ):
        def endless(directory: str, stream_seed: int) -> grain.MapDataset:
            rows = _rows(directory, seq_len, fields)
            if len(rows) < batch_size * process_count:
                raise ValueError(
                    f"{directory!r} holds {len(rows)} rows, fewer than one global batch of "
                    f"{batch_size * process_count}."
                )
            # Shuffle, then repeat with a fresh shuffle every epoch.
            return rows.seed(stream_seed).shuffle().repeat(None)

        dataset = endless(split_dir, seed)
        if replay_fraction > 0:
            # Continued pretraining: a fixed share of rows comes from the earlier corpus, interleaved
            # deterministically, so the mix (and a resume) does not depend on timing.
            dataset = grain.MapDataset.mix(
                [dataset, endless(replay_dir, seed + 1)], [1.0 - replay_fraction, replay_fraction]
            )
        dataset = _process_slice(dataset.batch(batch_size, drop_remainder=True), process_index, process_count)
        dataset = dataset.to_iter_dataset()
        if num_workers > 0:
            dataset = dataset.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch_buffer_size)
            )
        self._iterator = iter(dataset)
        self._layout = {
            "num_workers": num_workers,
            "process_index": process_index,
            "process_count": process_count,
            "batch_size": batch_size,
            "seed": seed,
            "replay_fraction": replay_fraction,
        }

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        return {"layout": self._layout, "grain": self._iterator.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        config_validation.require_same(
            state["layout"],
            self._layout,
            source="the data layout the checkpoint's iterator state was saved with",
            advice="Grain iterator state is only valid for the same worker count, process layout, batch size "
            "and seed: restore the saved value (e.g. --config.data.num_workers).",
            prefix="layout",
            ignore=lambda key: key == "process_index",
        )
        self._iterator.set_state(state["grain"])


def validation_batches(
    split_dir: str,
    seq_len: int,
    batch_size: int,
    num_batches: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    fields: tuple[str, ...] = records.FIELDS,
) -> list[Batch]:
    """This process's part of the first `num_batches` global batches of the validation split (fewer if the split
    is smaller), in order; every process gets the same number of batches."""
    rows = _rows(split_dir, seq_len, fields)
    global_batches = len(rows) // (batch_size * process_count)
    if global_batches == 0:
        raise ValueError(
            f"{split_dir!r} holds {len(rows)} rows, fewer than one global batch of "
            f"{batch_size * process_count}; lower config.train.batch_size or add validation data."
        )
    batches = _process_slice(rows.batch(batch_size, drop_remainder=True), process_index, process_count)
    return [batches[i] for i in range(min(num_batches, global_batches))]


def split_dir(data_path: str, split: str) -> str:
    return os.path.join(data_path, split)
