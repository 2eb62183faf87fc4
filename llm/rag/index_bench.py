"""Vector index benchmark: IVF-PQ and HNSW against exact search on synthetic passage embeddings.

The embeddings are a seeded mixture of Gaussian clusters (so IVF's cells mean something), L2-normalised like
an `Embedder`'s; the queries are fresh draws from the same clusters. Text embeddings concentrate near a subspace
of far fewer dimensions than they have (their intrinsic dimension is tens, not hundreds), so the clusters live in
`intrinsic_dim` dimensions, mapped into `dim` by a random linear map, with a little noise in every dimension.
`intrinsic_dim=dim` spreads the points evenly over all dimensions instead: then every point's neighbours are
nearly equidistant, the worst case for product quantization (measured at 1M x 256 on 2 cores: IVF-PQ recall@10
0.395, HNSW 0.912). For each kind: build time (training
included), index size (its FAISS file), resident memory the index added to the process, single-query latency
p50/p99 (one query per call, as a server sees them) and recall@10 against exact (flat) search.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from typing import Any

import faiss
import numpy as np
import psutil

from llm.rag.vector import KINDS, VectorIndex

K = 10


def synthetic_embeddings(
    count: int, dim: int, clusters: int, seed: int, intrinsic_dim: int, num_queries: int
) -> tuple[np.ndarray, np.ndarray]:
    """(passages, queries): unit vectors, each a cluster centre plus Gaussian noise of 0.5 per dimension in
    `intrinsic_dim` dimensions, mapped into `dim` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    latent = min(intrinsic_dim, dim)
    centres = rng.standard_normal((clusters, latent), dtype=np.float32)
    basis = np.eye(dim, dtype=np.float32) if latent == dim else rng.standard_normal((latent, dim), np.float32)
    ambient_noise = 0.0 if latent == dim else 0.05 * np.sqrt(latent)  # a tenth of a latent noise vector's norm

    def draw(n: int) -> np.ndarray:
        vectors = np.empty((n, dim), np.float32)
        for start in range(0, n, 100_000):  # in blocks: all the noise of 1M x 256 at once would double peak memory
            rows = min(100_000, n - start)
            points = centres[rng.integers(0, clusters, rows)] + 0.5 * rng.standard_normal((rows, latent), np.float32)
            vectors[start : start + rows] = points @ basis
            vectors[start : start + rows] += ambient_noise * rng.standard_normal((rows, dim), np.float32)
        faiss.normalize_L2(vectors)
        return vectors

    return draw(count), draw(num_queries)


def _cpu() -> dict[str, Any]:
    """The machine: FAISS runs on the host CPU, whatever JAX's devices are."""
    model = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            names = [line.split(":", 1)[1].strip() for line in file if line.startswith("model name")]
        model = names[0] if names else model
    return {
        "cpu": model or "unknown",
        "cpu_count": os.cpu_count(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "faiss_version": faiss.__version__,
    }


def _measure(kind: str, corpus: np.ndarray, queries: np.ndarray, exact: np.ndarray | None) -> tuple[dict, np.ndarray]:
    process = psutil.Process()
    resident = process.memory_info().rss
    started = time.perf_counter()
    index = VectorIndex.build(corpus, kind)
    build_s = time.perf_counter() - started
    added = process.memory_info().rss - resident
    with tempfile.TemporaryDirectory() as scratch:
        index.save(scratch)
        size = os.path.getsize(os.path.join(scratch, "vectors.faiss"))
    latencies, found = [], []
    for query in queries:
        started = time.perf_counter()
        found.append(index.search(query[None], K)[1][0])
        latencies.append(time.perf_counter() - started)
    found = np.stack(found)
    truth = found if exact is None else exact
    recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, truth)]))
    p50, p99 = np.percentile(latencies, [50, 99]) * 1e3
    figures = {
        "build_s": build_s,
        "index_bytes": size,
        "bytes_per_vector": size / len(corpus),
        "rss_added_mib": added / 2**20,
        "query_p50_ms": float(p50),
        "query_p99_ms": float(p99),
        f"recall_at_{K}": recall,
        "options": index.options,
    }
    return figures, found


def run(
    count: int = 1_000_000,
    dim: int = 256,
    num_queries: int = 200,
    clusters: int = 1000,
    seed: int = 0,
    intrinsic_dim: int = 32,
) -> dict:
    """The figures of every index kind, flat first (its results are the exact ones the others are scored on)."""
    if count < K or num_queries < 1:
        raise ValueError(f"need at least {K} passages and 1 query, got count={count}, num_queries={num_queries}")
    started = time.perf_counter()
    corpus, queries = synthetic_embeddings(count, dim, clusters, seed, intrinsic_dim, num_queries)
    result: dict[str, Any] = {
        "benchmark": "rag_index",
        **_cpu(),
        "passages": count,
        "dim": dim,
        "clusters": clusters,
        "intrinsic_dim": min(intrinsic_dim, dim),
        "queries": num_queries,
        "data_s": time.perf_counter() - started,
    }
    exact = None
    for kind in KINDS:  # "flat" first
        result[kind], found = _measure(kind, corpus, queries, exact)
        exact = found if kind == "flat" else exact
    return result


def table(result: dict) -> str:
    """The figures as a table, one row per index kind, under the machine and the data."""
    head = [f"{key}: {value}" for key, value in result.items() if key not in KINDS]
    columns = ["build_s", "index_bytes", "bytes_per_vector", "rss_added_mib", "query_p50_ms", "query_p99_ms"]
    columns.append(f"recall_at_{K}")
    rows = [["kind", *columns, "options"]]
    for kind in KINDS:
        figures = result[kind]
        cells = [f"{figures[c]:,.3f}" if isinstance(figures[c], float) else f"{figures[c]:,}" for c in columns]
        rows.append([kind, *cells, ",".join(f"{k}={v}" for k, v in figures["options"].items())])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    return "\n".join(head + [""] + lines)
