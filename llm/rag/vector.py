"""Vector search over passage embeddings with FAISS: cosine similarity as inner product of unit vectors.

Embeddings and queries are L2-normalised here (a no-op for a normalising `Embedder`), so the inner product
FAISS ranks by is the cosine. Three kinds, chosen by name:

- "flat" (default): `IndexFlatIP`, exact. 4 x dim bytes per passage (1 KiB at dim 256: 1 GB per million
  passages) and a scan of every vector per query; the reference the others are measured against.
- "ivfpq": an inverted file of `nlist` k-means cells, each vector stored as `m` product-quantizer codes of
  `nbits` bits (m x nbits / 8 bytes: 64 bytes at dim 256, 16x smaller than flat), searched in the `nprobe`
  nearest cells. Smallest and fast, but approximate twice over (cells not probed, quantized scores): recall@10
  against exact search falls below 1, and more so with fewer bytes (smaller m) or fewer probed cells. It must be
  trained (k-means) on a sample of the corpus, so it needs at least max(nlist, 2**nbits) vectors.
- "hnsw": `IndexHNSWFlat`, a navigable small-world graph over the full vectors (`M` links per node,
  `efSearch` candidates per query). The best recall per millisecond, but larger than flat (the vectors plus
  about 2 x M x 4 bytes of links each) and slow to build on few cores.

`scripts/benchmark.py rag_index` measures these trade-offs (size, build time, latency, recall@10) at 1M passages.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import faiss
import numpy as np

from llm.io import write_json

KINDS = ("flat", "ivfpq", "hnsw")
INDEX_FILE = "vectors.faiss"
OPTIONS_FILE = "vectors.json"
# Each option a kind accepts, with the FAISS parameter it sets.
OPTIONS = {"flat": (), "ivfpq": ("nlist", "m", "nbits", "nprobe", "seed"), "hnsw": ("M", "efConstruction", "efSearch")}
# FAISS's k-means warns below 39 training points per centroid; 40 per centroid of the coarse quantizer or of one
# product quantizer's codebook is the sample IVF-PQ trains on (capped by the corpus).
_TRAIN_POINTS_PER_CENTROID = 40


def _normalized(vectors: np.ndarray, what: str) -> np.ndarray:
    array = np.array(vectors, dtype=np.float32, copy=True, order="C")
    if array.ndim != 2:
        raise ValueError(f"{what} must be a (count, dim) matrix, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} hold NaN or infinite values")
    faiss.normalize_L2(array)  # zero rows stay zero
    return array


def _largest_divisor_at_most(dim: int, limit: int) -> int:
    return max(m for m in range(1, max(1, limit) + 1) if dim % m == 0)


def ivfpq_options(count: int, dim: int, **given: int) -> dict[str, int]:
    """IVF-PQ parameters: those `given`, the rest derived from the corpus size and dim. nlist ~ 4 sqrt(count)
    (FAISS's guideline is 4 to 16 sqrt(count)) but at most count / 40, so each cell trains on enough points;
    m = dim / 4 sub-vectors (4 dims per byte code: high recall for 1/16 of flat's bytes); nbits 8; nprobe
    nlist / 32 (at least 8) cells per query."""
    nlist = given.get("nlist") or max(1, min(round(4 * math.sqrt(count)), count // _TRAIN_POINTS_PER_CENTROID))
    m = given.get("m") or _largest_divisor_at_most(dim, dim // 4)
    nbits = given.get("nbits") or 8
    nprobe = given.get("nprobe") or min(nlist, max(8, nlist // 32))
    options = {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": nprobe, "seed": given.get("seed", 0)}
    if dim % m:
        raise ValueError(f"IVF-PQ needs m to divide the embedding dim: m={m} does not divide dim={dim}")
    needed = max(nlist, 2**nbits)
    if count < needed:
        raise ValueError(
            f"IVF-PQ with nlist={nlist} and nbits={nbits} needs at least {needed} vectors to train, the corpus has "
            f"{count}: use the exact 'flat' index for a corpus this small (or a smaller nlist / nbits)"
        )
    return options


def _ivfpq(embeddings: np.ndarray, options: dict[str, int]) -> faiss.Index:
    count, dim = embeddings.shape
    # "np": no polysemous training, which only serves Hamming-distance filtering (not used here) and made training
    # 6x slower (measured: 72 s against 12 s for 50,000 training vectors of dim 256).
    factory = f"IVF{options['nlist']},PQ{options['m']}x{options['nbits']}np"
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    sample_size = min(count, _TRAIN_POINTS_PER_CENTROID * max(options["nlist"], 2 ** options["nbits"]))
    sample = np.random.default_rng(options["seed"]).choice(count, sample_size, replace=False)
    index.train(embeddings[np.sort(sample)])
    return index


def _hnsw(dim: int, options: dict[str, int]) -> faiss.Index:
    index = faiss.index_factory(dim, f"HNSW{options['M']},Flat", faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = options["efConstruction"]
    return index


def _apply_search_options(index: faiss.Index, kind: str, options: dict[str, int]) -> None:
    """Search-time parameters (FAISS's index file keeps them: checked for nprobe and efSearch)."""
    if kind == "ivfpq":
        faiss.extract_index_ivf(index).nprobe = options["nprobe"]
    elif kind == "hnsw":
        index.hnsw.efSearch = options["efSearch"]


@dataclasses.dataclass
class VectorIndex:
    """A FAISS index of unit vectors: `build`, `search`, `save`, `load`."""

    index: faiss.Index
    kind: str
    options: dict[str, Any]

    @property
    def count(self) -> int:
        return self.index.ntotal

    @property
    def dim(self) -> int:
        return self.index.d

    @classmethod
    def build(cls, embeddings: np.ndarray, kind: str = "flat", **options: int) -> VectorIndex:
        """An index of `embeddings` (count, dim), row i searchable as id i. `options` per kind: ivfpq nlist, m,
        nbits, nprobe, seed (of the training sample); hnsw M (32), efConstruction (40), efSearch (64)."""
        if kind not in KINDS:
            raise ValueError(f"vector index kind must be one of {KINDS}, got {kind!r}")
        unknown = sorted(set(options) - set(OPTIONS[kind]))
        if unknown:
            raise ValueError(f"unknown options {unknown} for a {kind!r} index; it takes {list(OPTIONS[kind])}")
        vectors = _normalized(embeddings, "embeddings")
        if not len(vectors):
            raise ValueError("Cannot build a vector index of an empty corpus: no embeddings were given.")
        count, dim = vectors.shape
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "ivfpq":
            options = ivfpq_options(count, dim, **options)
            index = _ivfpq(vectors, options)
        else:
            options = {"M": 32, "efConstruction": 40, "efSearch": 64, **options}
            index = _hnsw(dim, options)
        index.add(vectors)
        _apply_search_options(index, kind, options)
        return cls(index, kind, dict(options))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (len(queries), k'), best first, with k' = min(k, count); an approximate index
        may find fewer than k' and pads with id -1."""
        vectors = _normalized(queries, "queries")
        if vectors.shape[1] != self.dim:
            raise ValueError(f"queries have dim {vectors.shape[1]}, the index {self.dim}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return self.index.search(vectors, min(k, self.count))

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        faiss.write_index(self.index, os.path.join(directory, INDEX_FILE))
        write_json(os.path.join(directory, OPTIONS_FILE), {"kind": self.kind, "options": self.options})

    @classmethod
    def load(cls, directory: str) -> VectorIndex:
        paths = [os.path.join(directory, name) for name in (INDEX_FILE, OPTIONS_FILE)]
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{directory!r} holds no vector index: {path} is missing")
        with open(paths[1], encoding="utf-8") as file:
            saved = json.load(file)
        if saved.get("kind") not in KINDS:
            raise ValueError(f"{paths[1]}: 'kind' must be one of {KINDS}, got {saved.get('kind')!r}")
        return cls(faiss.read_index(paths[0]), saved["kind"], saved["options"])
