"""The corpus steps on one machine: a pool of worker processes fed in chunks, streaming, in bounded memory.

The main process reads the sources and writes the output; workers run the per-document stages (and the
MinHash signatures) on chunks of `runner.chunk_size` documents. Results come back in input order and at
most two chunks per worker are in flight, so memory does not grow with the corpus, and the output does
not depend on the number of workers. Near dedup keeps one signature per document in memory (no text).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import itertools
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import ml_collections
import numpy as np
import tqdm

from llm.corpus import corpus_io, dedup, pipeline, sources, stages
from llm.corpus.document import Document, Dropped
from llm.corpus.report import Accounts

# Chunks queued per worker: enough to keep every worker busy while the main process reads or writes.
_CHUNKS_PER_WORKER = 2
# State of one worker process, built once by the pool initializer (stages may load models).
_worker: dict[str, Any] = {}


def num_workers(config: ml_collections.ConfigDict) -> int:
    """`runner.num_workers`, where 0 means one per CPU core."""
    return config.runner.num_workers or os.cpu_count() or 1


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


@contextlib.contextmanager
def parallel_map(
    function: Callable[[Any], Any],
    chunks: Iterable[Any],
    workers: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
) -> Iterator[Iterator[Any]]:
    """`function` over `chunks` in `workers` processes; yields the results in input order.

    A chunk is read only when a result is taken, at most two chunks per worker ahead, so memory stays
    bounded. A worker that dies (killed, out of memory) raises `BrokenProcessPool` instead of leaving the
    caller waiting forever, as `multiprocessing.Pool` would; leaving the block early cancels what is queued.
    """
    # forkserver: workers start from a clean single-threaded process; forking this one could inherit
    # locks held by its threads (tqdm, Beam, JAX) and hang.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    executor = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=initializer, initargs=initargs
    )

    def results() -> Iterator[Any]:
        pending: collections.deque[concurrent.futures.Future] = collections.deque()
        for chunk in chunks:
            pending.append(executor.submit(function, chunk))
            if len(pending) >= workers * _CHUNKS_PER_WORKER:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    try:
        yield results()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


class ShardWriter:
    """Writes documents into `num_shards` JSONL shards, each sorted by id (see `corpus_io.shard_content`).

    Documents are appended to an unsorted part per shard; leaving the `with` block sorts one shard at a
    time in memory (the memory bound is one shard) and renames it into place, so a crash leaves no
    complete-looking file (only hidden parts, which the re-run of the unfinished step clears).
    """

    def __init__(self, directory: str, num_shards: int):
        os.makedirs(directory, exist_ok=True)
        self._directory = directory
        self._num_shards = num_shards
        # Open until close(): one file per shard receives documents as they arrive.
        self._parts = [open(self._part_path(i), "w", encoding="utf-8") for i in range(num_shards)]  # noqa: SIM115

    def _part_path(self, index: int) -> str:
        return os.path.join(self._directory, "." + corpus_io.shard_name(index, self._num_shards) + ".unsorted")

    def write(self, document: Document) -> None:
        self._parts[corpus_io.shard_of(document.id, self._num_shards)].write(corpus_io.encode_document(document) + "\n")

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        for part in self._parts:
            part.close()
        if error_type is None:
            self._sort_parts()

    def _sort_parts(self) -> None:
        for index in range(self._num_shards):
            part_path = self._part_path(index)
            with open(part_path, encoding="utf-8") as lines:
                documents = corpus_io.iterate_documents(lines, part_path)
                corpus_io.write_shard(self._directory, index, self._num_shards, documents)
            os.remove(part_path)


def _init_filter_worker(config: ml_collections.ConfigDict, make_stages: pipeline.StageFactory) -> None:
    _worker["stages"] = list(make_stages(config))


def _filter_chunk(items: list[Document | Dropped]) -> tuple[list[Document], Accounts]:
    accounts = Accounts(pipeline.filter_stage_names(_worker["stages"]))
    kept = []
    for item in items:
        document = pipeline.process_item(item, _worker["stages"], accounts)
        if document is not None:
            kept.append(document)
    return kept, accounts


def _init_decontaminate_worker(config: ml_collections.ConfigDict) -> None:
    _worker["decontaminate"] = stages.decontamination_stage(config)


def _decontaminate_chunk(documents: list[Document]) -> tuple[list[Document], Accounts]:
    accounts = Accounts([pipeline.DECONTAMINATE])
    stage = _worker["decontaminate"]
    kept = [pipeline.run_stage(pipeline.DECONTAMINATE, stage, document, accounts) for document in documents]
    return [document for document in kept if document is not None], accounts


def _init_dedup_worker(config: ml_collections.ConfigDict) -> None:
    _worker["exact"] = config.dedup.exact
    _worker["hasher"] = dedup.MinHasher.from_config(config.dedup) if config.dedup.near else None


def _dedup_chunk(chunk: list[tuple[str, str]]) -> tuple[list[str], list[str], np.ndarray | None]:
    """Ids, exact keys and MinHash signatures of (id, text) pairs (keys/signatures only when enabled)."""
    texts = [text for _, text in chunk]
    keys = [dedup.exact_key(text) for text in texts] if _worker["exact"] else []
    signatures = _worker["hasher"].signatures(texts) if _worker["hasher"] else None
    return [doc_id for doc_id, _ in chunk], keys, signatures


class LocalRunner:
    """Runs the `filter` and `dedup` corpus steps with worker processes on this machine."""

    name = "local"

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        read: pipeline.SourceReader = sources.read_sources,
        make_stages: pipeline.StageFactory = stages.document_stages,
        progress: bool = True,
    ):
        self._workers = num_workers(config)
        self._chunk_size = config.runner.chunk_size
        self._read = read
        self._make_stages = make_stages
        self._progress = progress

    def _bar(self, description: str, total: int | None = None) -> tqdm.tqdm:
        return tqdm.tqdm(desc=description, total=total, unit="doc", disable=not self._progress, smoothing=0.1)

    def filter(self, config: ml_collections.ConfigDict, output_dir: str) -> Accounts:
        """Reads the sources, runs the per-document stages, writes the survivors as sorted shards."""
        accounts = Accounts(pipeline.filter_stage_names(self._make_stages(config)))
        chunks = _chunks(self._read(config), self._chunk_size)
        setup = (_init_filter_worker, (config, self._make_stages))
        with (
            ShardWriter(output_dir, config.output.corpus_shards) as writer,
            parallel_map(_filter_chunk, chunks, self._workers, *setup) as results,
            self._bar("filter") as bar,
        ):
            for kept, chunk_accounts in results:
                for document in kept:
                    writer.write(document)
                accounts.merge(chunk_accounts)
                megabytes = accounts.stages[pipeline.READ].bytes_out / 1e6
                bar.set_postfix(MB=f"{megabytes:.1f}", kept=accounts.documents_kept, refresh=False)
                bar.update(chunk_accounts.documents_in)
        corpus_io.write_counts(output_dir, accounts)
        return accounts

    def decontaminate(self, config: ml_collections.ConfigDict, input_dir: str, output_dir: str) -> Accounts:
        """Drops the documents of `input_dir` that share an n-gram with an evaluation set; writes the rest."""
        total = corpus_io.read_counts(input_dir).documents_kept
        accounts = Accounts([pipeline.DECONTAMINATE])
        chunks = _chunks(corpus_io.read_documents(input_dir), self._chunk_size)
        with (
            ShardWriter(output_dir, config.output.corpus_shards) as writer,
            parallel_map(_decontaminate_chunk, chunks, self._workers, _init_decontaminate_worker, (config,)) as results,
            self._bar("decontaminate", total) as bar,
        ):
            for kept, chunk_accounts in results:
                for document in kept:
                    writer.write(document)
                accounts.merge(chunk_accounts)
                bar.update(chunk_accounts.documents_in)
        corpus_io.write_counts(output_dir, accounts)
        return accounts

    def dedup(self, config: ml_collections.ConfigDict, input_dir: str, output_dir: str) -> Accounts:
        """Exact then near dedup of the filter step's output; writes the cleaned corpus as sorted shards.

        Two passes over the input: the first computes each document's exact key and MinHash signature in
        the workers, the second writes the documents that are neither kind of duplicate.
        """
        total = corpus_io.read_counts(input_dir).documents_kept
        ids: list[str] = []
        keys: list[str] = []
        signatures: list[np.ndarray] = []
        chunks = _chunks(((d.id, d.text) for d in corpus_io.read_documents(input_dir)), self._chunk_size)
        with (
            parallel_map(_dedup_chunk, chunks, self._workers, _init_dedup_worker, (config,)) as results,
            self._bar("dedup: signatures", total) as bar,
        ):
            for chunk_ids, chunk_keys, chunk_signatures in results:
                ids.extend(chunk_ids)
                keys.extend(chunk_keys)
                if chunk_signatures is not None:
                    signatures.append(chunk_signatures)
                bar.update(len(chunk_ids))
        exact = set(dedup.exact_duplicates(ids, keys)) if config.dedup.exact else set()
        near = _near_duplicates(ids, signatures, exact, config) if config.dedup.near else set()
        accounts = Accounts(pipeline.dedup_stage_names(config))
        with (
            ShardWriter(output_dir, config.output.corpus_shards) as writer,
            self._bar("dedup: write", total) as bar,
        ):
            for document in corpus_io.read_documents(input_dir):
                bar.update()
                if _dedup_verdict(document, config, exact, near, accounts):
                    writer.write(document)
        corpus_io.write_counts(output_dir, accounts)
        return accounts


def _dedup_verdict(
    document: Document, config: ml_collections.ConfigDict, exact: set[str], near: set[str], accounts: Accounts
) -> bool:
    """Counts the document through the enabled dedup stages; True if it is kept."""
    for stage, enabled, duplicates in (
        (pipeline.EXACT_DEDUP, config.dedup.exact, exact),
        (pipeline.NEAR_DEDUP, config.dedup.near, near),
    ):
        if enabled and not pipeline.count_dedup(stage, document, duplicates, accounts):
            return False
    return True


def _near_duplicates(
    ids: list[str], signatures: list[np.ndarray], exact: set[str], config: ml_collections.ConfigDict
) -> set[str]:
    """Ids of the near duplicates among the exact survivors (the exact duplicates are already dropped)."""
    matrix = np.concatenate(signatures) if signatures else np.empty((0, config.dedup.num_perm), np.uint32)
    survivors = ((doc_id, signature) for doc_id, signature in zip(ids, matrix, strict=True) if doc_id not in exact)
    return set(dedup.near_duplicates(survivors, config.dedup))
