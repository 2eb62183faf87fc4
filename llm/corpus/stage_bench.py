"""Throughput of each stage of the corpus pipeline's filter step, on real input (`benchmark.py data`).

Reads up to `max_docs` documents from the data config's sources (by default the embedded Debian corpus,
fetched once like the quickstart does), then runs them through the enabled per-document stages in this one
process, exactly as a worker of the local runner does. Each stage's figure is its own CPU time, so the
numbers say which stage bounds the step; with N workers the step runs about N times faster.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import ml_collections

from llm.corpus import pipeline, sources, stages
from llm.corpus.report import Accounts


def run(config: ml_collections.ConfigDict, max_docs: int) -> dict[str, Any]:
    """Per stage (and for reading): documents/s, input MB/s and the share of documents it keeps."""
    document_stages = stages.document_stages(config)
    start = time.perf_counter()
    items = list(itertools.islice(sources.read_sources(config), max_docs))
    read_seconds = time.perf_counter() - start
    if not items:
        raise ValueError("The data config's sources yielded no documents to benchmark.")
    # One untimed document first: the language ID model loads on first use.
    pipeline.process_item(items[0], document_stages, Accounts(pipeline.filter_stage_names(document_stages)))
    accounts = Accounts(pipeline.filter_stage_names(document_stages))
    for item in items:
        pipeline.process_item(item, document_stages, accounts)

    read = accounts.stages[pipeline.READ]
    result: dict[str, Any] = {
        "documents": len(items),
        pipeline.READ: _figures(len(items), read.bytes_out, read.documents_out, read_seconds),
    }
    input_bytes = read.bytes_out
    for name, _ in document_stages:
        count = accounts.stages[name]
        result[name] = _figures(count.documents_in, input_bytes, count.documents_out, count.seconds)
        input_bytes = count.bytes_out
    all_seconds = sum(accounts.stages[name].seconds for name, _ in document_stages)
    result["all_stages"] = _figures(read.documents_out, read.bytes_out, accounts.documents_kept, all_seconds)
    return result


def _figures(documents_in: int, bytes_in: int, documents_out: int, seconds: float) -> dict[str, float]:
    seconds = max(seconds, 1e-9)
    return {
        "docs_per_sec": documents_in / seconds,
        "input_mb_per_sec": bytes_in / 1e6 / seconds,
        "kept_fraction": documents_out / documents_in if documents_in else 0.0,
    }
