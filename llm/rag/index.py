"""A retrieval index: one directory with the passage store, BM25, optionally a vector index, and a manifest.

    INDEX/manifest.json     format, passage count, the vector index's kind, the embedder's identity and the
                            hybrid fusion's dense weight with its calibration (llm/rag/calibration.py)
    INDEX/passages.jsonl    the passages, once (row i of BM25 and of the vector index is passage i)
    INDEX/*.index.*         BM25 (llm/rag/lexical.py)
    INDEX/vectors.faiss     the vector index, when built with an embedder (llm/rag/vector.py)

Queries must be embedded by the model that embedded the passages: a query vector from another model lands in
another space, and search would return confident nonsense. The manifest therefore records the embedder's
identity (run directory, checkpoint step, pooling, normalize, prefixes, dim) and a fingerprint: the embedding
of a fixed Spanish probe text. `load` refuses an embedder whose settings or fingerprint differ. The run
directory and step are recorded but not compared (a copied or moved run is the same model); the fingerprint is
what catches a different model at the same path and step (retrained, overwritten, another import). It is
compared with a tolerance, cosine >= 0.999, not bit for bit, because the same weights on another platform or
compute dtype (bfloat16 on an accelerator, float32 on CPU) give slightly different numbers, while two different
models give clearly different probe embeddings (two random initialisations: cosine near 0).

Saving is atomic: the index is written into a staging directory beside the target and moved into place with
`llm.io.replace_dir`, so a failed build leaves neither a half index nor a destroyed old one.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from llm.io import replace_dir, write_json
from llm.rag import calibration as calibration_lib
from llm.rag.embeddings import Embedder
from llm.rag.hybrid import HYBRID_DEPTH, reciprocal_rank_fusion
from llm.rag.lexical import LexicalIndex
from llm.rag.passages import Passage
from llm.rag.vector import VectorIndex

MANIFEST_FILE = "manifest.json"
FORMAT = 2  # 2: the hybrid fusion's dense weight
MODES = ("hybrid", "bm25", "dense")
PROBE_TEXT = "¿Dónde está la biblioteca municipal? Abre de lunes a viernes, desde las nueve de la mañana."
FINGERPRINT_MIN_COSINE = 0.999
_COMPARED = ("pooling", "normalize", "query_prefix", "passage_prefix", "dim")  # identity settings that must match


@dataclasses.dataclass(frozen=True)
class Hit:
    """One result: `rank` from 1; `score` is BM25's, the cosine, or the fused RRF score; `ranks` the rank in
    each method for hybrid ({"bm25": r, "dense": r}, None where a method did not return the passage)."""

    passage: Passage
    score: float
    rank: int
    ranks: dict[str, int | None] = dataclasses.field(default_factory=dict)


def embedder_identity(embedder: Embedder) -> dict[str, Any]:
    """What the manifest records of an embedder (see the module docstring)."""
    probe = embedder.embed([PROBE_TEXT])[0]
    return {
        "workdir": os.path.abspath(embedder.workdir) if embedder.workdir else None,
        "step": embedder.step,
        "pooling": embedder.pooling,
        "normalize": embedder.normalize,
        "query_prefix": embedder.prefixes["query"],
        "passage_prefix": embedder.prefixes["passage"],
        "dim": embedder.dim,
        "probe_text": PROBE_TEXT,
        "probe_embedding": [float(value) for value in probe],
    }


def _identity_mismatch(recorded: dict[str, Any], actual: dict[str, Any]) -> str | None:
    """What differs between two identities, or None when they match."""
    for key in _COMPARED:
        if recorded.get(key) != actual[key]:
            return f"{key} differs ({recorded.get(key)!r} vs {actual[key]!r})"
    a, b = np.asarray(recorded["probe_embedding"]), np.asarray(actual["probe_embedding"])
    cosine = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
    if cosine < FINGERPRINT_MIN_COSINE:
        return f"the probe text's embeddings differ (cosine {cosine:.4f} < {FINGERPRINT_MIN_COSINE}): another model"
    return None


def _describe(identity: dict[str, Any]) -> str:
    return ", ".join(f"{key}={identity.get(key)!r}" for key in ("workdir", "step", *_COMPARED))


class RetrievalIndex:
    """BM25 and (optionally) vector search over one passage store; see the module docstring."""

    def __init__(
        self,
        lexical: LexicalIndex,
        vectors: VectorIndex | None = None,
        embedder: Embedder | None = None,
        identity: dict[str, Any] | None = None,
        calibration: calibration_lib.Calibration | None = None,
    ):
        self.lexical, self.vectors, self.embedder, self.identity = lexical, vectors, embedder, identity
        # Hybrid search weighs BM25 by 1 and the vectors by this (assign another to override the calibration).
        self.calibration = calibration
        self.dense_weight = calibration.dense_weight if calibration else 1.0
        self.passages = lexical.passages
        self._positions = {passage.id: position for position, passage in enumerate(self.passages)}
        if len(self._positions) != len(self.passages):
            counts = collections.Counter(passage.id for passage in self.passages)
            duplicates = sorted(identifier for identifier, count in counts.items() if count > 1)
            raise ValueError(f"passage ids must be unique (citations name them); repeated: {duplicates[:5]}")

    @classmethod
    def build(
        cls,
        passages: list[Passage],
        embedder: Embedder | None = None,
        vector_kind: str = "flat",
        calibrate: bool = True,
        **options: int,
    ) -> RetrievalIndex:
        """BM25 over `passages` and, with an embedder, a `vector_kind` index of their passage embeddings
        (`options`: that kind's, see `VectorIndex.build`) and, with `calibrate`, hybrid search's dense weight
        measured on the passages (llm/rag/calibration.py; without it the weight is 1, plain RRF)."""
        lexical = LexicalIndex.build(passages)
        if embedder is None:
            return cls(lexical)
        embeddings = embedder.embed([passage.text for passage in lexical.passages], kind="passage")
        vectors = VectorIndex.build(embeddings, vector_kind, **options)
        calibration = calibration_lib.calibrate(lexical.passages, embedder) if calibrate else None
        return cls(lexical, vectors, embedder, embedder_identity(embedder), calibration)

    def save(self, directory: str, overwrite: bool = False) -> None:
        """Writes the index to `directory` atomically; an existing one is replaced only with `overwrite`."""
        if os.path.exists(directory) and not overwrite:
            raise FileExistsError(f"{directory!r} already exists; pass overwrite=True to replace it")
        parent = os.path.dirname(os.path.abspath(directory))
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.staging-", dir=parent)
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide the index from a server run as another user
        try:
            self.lexical.save(staging)
            if self.vectors is not None:
                self.vectors.save(staging)
            manifest = {
                "format": FORMAT,
                "passages": len(self.passages),
                "vector_kind": self.vectors.kind if self.vectors else None,
                "embedder": self.identity,
                "hybrid": {
                    "dense_weight": self.dense_weight,
                    "calibration": dataclasses.asdict(self.calibration) if self.calibration else None,
                },
            }
            write_json(os.path.join(staging, MANIFEST_FILE), manifest)
            replace_dir(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def load(cls, directory: str, embedder: Embedder | None = None) -> RetrievalIndex:
        """The index saved in `directory`. An embedder (needed for dense and hybrid search) must match the one
        that built it, else ValueError naming both."""
        manifest = _read_manifest(directory)
        lexical = LexicalIndex.load(directory)
        if len(lexical.passages) != manifest["passages"]:
            raise ValueError(
                f"{directory!r}: the manifest counts {manifest['passages']} passages, the store holds "
                f"{len(lexical.passages)}"
            )
        if manifest["vector_kind"] is None:
            if embedder is not None:
                raise ValueError(f"{directory!r} is a BM25-only index (built without an embedder); load it without one")
            return cls(lexical)
        vectors = VectorIndex.load(directory)
        if vectors.count != len(lexical.passages):
            raise ValueError(
                f"{directory!r}: the vector index holds {vectors.count} vectors for {len(lexical.passages)} passages"
            )
        recorded = manifest["embedder"]
        if embedder is not None:
            actual = embedder_identity(embedder)
            problem = _identity_mismatch(recorded, actual)
            if problem:
                raise ValueError(
                    f"The embedder does not match the one that built {directory!r}: {problem}.\n"
                    f"  index built with: {_describe(recorded)}\n  embedder given:   {_describe(actual)}"
                )
        index = cls(lexical, vectors, embedder, recorded)
        calibration = manifest["hybrid"]["calibration"]
        index.calibration = calibration_lib.Calibration(**calibration) if calibration else None
        index.dense_weight = manifest["hybrid"]["dense_weight"]
        return index

    @classmethod
    def open(cls, directory: str, embedder_workdir: str | None = None, batch_size: int = 32) -> RetrievalIndex:
        """`load` with the embedder the manifest names, loaded again: its run (or `embedder_workdir`, e.g. the
        same run copied elsewhere), step, pooling, normalization and prefixes. Still checked against the
        fingerprint, so a different model at that path is refused."""
        recorded = _read_manifest(directory)["embedder"]
        if recorded is None:
            return cls.load(directory)
        workdir = embedder_workdir or recorded["workdir"]
        if not workdir or not os.path.isdir(workdir):
            raise FileNotFoundError(
                f"{directory!r} was embedded by the run {recorded['workdir']!r}, which is not here: "
                "pass the run's directory (embedder_workdir, or --embedder=RUN on the command line)"
            )
        embedder = Embedder.from_run(
            workdir,
            recorded["step"],
            pooling=recorded["pooling"],
            normalize=recorded["normalize"],
            query_prefix=recorded["query_prefix"],
            passage_prefix=recorded["passage_prefix"],
            batch_size=batch_size,
        )
        return cls.load(directory, embedder)

    @property
    def modes(self) -> tuple[str, ...]:
        """The search modes this index answers: all of MODES with vectors, else only "bm25"."""
        return MODES if self.vectors is not None else ("bm25",)

    def search(self, query: str, k: int = 10, mode: str | None = None) -> list[Hit]:
        """The best `k` passages for `query` (fewer when BM25 alone finds fewer matches), best first; mode None
        is the first of `modes`: hybrid with vectors, else BM25."""
        mode = mode or self.modes[0]
        if mode not in MODES:
            raise ValueError(f"search mode must be one of {MODES}, got {mode!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if mode != "bm25":
            self._check_dense(mode)
        if mode == "bm25":
            return [Hit(p, s, rank) for rank, (p, s) in enumerate(self.lexical.search(query, k), start=1)]
        if mode == "dense":
            return [Hit(self.passages[i], s, rank) for rank, (i, s) in enumerate(self._dense(query, k), start=1)]
        depth = max(k, HYBRID_DEPTH)
        bm25 = [self._positions[p.id] for p, _ in self.lexical.search(query, depth)]
        dense = [i for i, _ in self._dense(query, depth)]
        fused = reciprocal_rank_fusion([bm25, dense], weights=(1.0, self.dense_weight))[:k]
        return [
            Hit(self.passages[f.item], f.score, rank, dict(zip(("bm25", "dense"), f.ranks)))
            for rank, f in enumerate(fused, start=1)
        ]

    def _check_dense(self, mode: str) -> None:
        if self.vectors is None:
            raise ValueError(
                f"search mode {mode!r} needs vectors, but this is a BM25-only index: use mode='bm25' "
                "or rebuild it with an embedder"
            )
        if self.embedder is None:
            raise ValueError(
                f"search mode {mode!r} needs the embedder that built the index, loaded again: "
                f"RetrievalIndex.load(directory, Embedder.from_run({self.identity['workdir']!r}, ...))"
            )

    def _dense(self, query: str, k: int) -> list[tuple[int, float]]:
        scores, ids = self.vectors.search(self.embedder.embed([query], kind="query"), k)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]


def check_index(directory: str, mode: str | None = None) -> tuple[str, ...]:
    """The search modes of the index in `directory`, read from its manifest alone (nothing is loaded), after
    checking that `mode` (None: the default) is one of them; for command lines to fail before any work."""
    manifest = _read_manifest(directory)
    modes = MODES if manifest["vector_kind"] is not None else ("bm25",)
    if mode is not None and mode not in modes:
        raise ValueError(f"search mode {mode!r} needs vectors; {directory!r} is BM25 only (use mode bm25)")
    return modes


def _read_manifest(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory!r} is not a retrieval index: it has no {MANIFEST_FILE}")
    with open(path, encoding="utf-8") as file:
        manifest = json.load(file)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported index format {manifest.get('format')!r} (this code reads {FORMAT})")
    missing = sorted({"passages", "vector_kind", "embedder", "hybrid"} - set(manifest))
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    return manifest
