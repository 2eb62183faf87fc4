"""Builds a retrieval index (passages, BM25 and, with an embedder, a FAISS vector index) from documents.

python scripts/build_index.py --input=PATH[,PATH...] --output=INDEX [--embedder=RUN [--step=N]]
    [--vector_index=flat|ivfpq|hnsw] [--max_tokens=256 --overlap=1] [--pooling=mean|last]
    [--query_prefix="consulta: " --passage_prefix="pasaje: "] [--batch_size=32] [--overwrite]

An input is a file or a directory of them: the corpus pipeline's JSONL shards, .txt or .md (see
llm/rag/documents.py). Without --embedder the index is BM25 only. --max_tokens counts the embedder's tokens
(whitespace-separated words without one). The index appears complete or not at all (llm/rag/index.py).
"""

import os
import time

from absl import app, flags

from llm.rag import embeddings, passages as passages_lib, vector
from llm.rag.index import RetrievalIndex
from llm.runs import directory
from llm.tokenizer import load_tokenizer

_INPUT = flags.DEFINE_list("input", None, "Document files or directories (comma-separated).", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Index directory to write.", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing index at --output.")
_EMBEDDER = flags.DEFINE_string("embedder", None, "Run whose model embeds the passages; without it, BM25 only.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of --embedder (default: the latest).")
_VECTOR_INDEX = flags.DEFINE_enum("vector_index", "flat", vector.KINDS, "FAISS index kind (llm/rag/vector.py).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 256, "Token budget of a passage.", lower_bound=1)
_OVERLAP = flags.DEFINE_integer("overlap", 1, "Sentences repeated between consecutive passages.", lower_bound=0)
_POOLING = flags.DEFINE_enum("pooling", "mean", embeddings.POOLINGS, "Pooling (default: as trained, else mean).")
_QUERY_PREFIX = flags.DEFINE_string("query_prefix", "", "Prefix of queries before embedding (e5-style).")
_PASSAGE_PREFIX = flags.DEFINE_string("passage_prefix", "", "Prefix of passages before embedding.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Passages embedded per batch.", lower_bound=1)


def _validate() -> None:
    """Flag and input errors, found before any work."""
    for path in _INPUT.value:
        if not os.path.exists(path):
            raise app.UsageError(f"--input: {path!r} does not exist.")
    if os.path.exists(_OUTPUT.value) and not _OVERWRITE.value:
        raise app.UsageError(f"--output={_OUTPUT.value!r} already exists; pass --overwrite to replace it.")
    if _EMBEDDER.value is None:
        if flags.FLAGS["vector_index"].present:
            raise app.UsageError("--vector_index needs --embedder=RUN (without one the index is BM25 only).")
    elif not os.path.isdir(_EMBEDDER.value):
        raise app.UsageError(f"--embedder={_EMBEDDER.value!r} is not a run directory.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    _validate()
    started = time.perf_counter()
    tokenizer = None
    if _EMBEDDER.value:  # the budget counts the embedder's tokens; the tokenizer alone loads in a moment
        tokenizer = load_tokenizer(directory.find_tokenizer(_EMBEDDER.value, directory.load_config(_EMBEDDER.value)))
    passages = [
        passage
        for path in _INPUT.value
        for passage in passages_lib.passages_from_path(path, _MAX_TOKENS.value, _OVERLAP.value, tokenizer)
    ]
    if not passages:
        raise app.UsageError(f"--input={','.join(_INPUT.value)}: no passages (no non-empty documents found).")
    documents = len({passage.document_id for passage in passages})
    print(f"{len(passages)} passages from {documents} documents in {time.perf_counter() - started:.1f} s")
    embedder = None
    if _EMBEDDER.value:
        named = {"pooling": _POOLING, "query_prefix": _QUERY_PREFIX, "passage_prefix": _PASSAGE_PREFIX}
        embedder = embeddings.Embedder.from_run(
            _EMBEDDER.value,
            _STEP.value,
            # Flags given win; otherwise a contrastively trained run embeds as it was trained.
            **{name: flag.value for name, flag in named.items() if flag.present},
            batch_size=_BATCH_SIZE.value,
        )
    started = time.perf_counter()
    index = RetrievalIndex.build(passages, embedder, _VECTOR_INDEX.value)
    kind = f"BM25 and a {_VECTOR_INDEX.value} vector index of dim {embedder.dim}" if embedder else "BM25 only"
    print(f"Indexed ({kind}) in {time.perf_counter() - started:.1f} s")
    if index.calibration and index.calibration.mrr:
        tried = ", ".join(f"{weight}: {mrr:.3f}" for weight, mrr in index.calibration.mrr.items())
        print(
            f"Hybrid search weighs the vectors {index.dense_weight} against BM25's 1 (MRR@10 of each weight on "
            f"{index.calibration.queries} inverse-cloze pseudo-queries: {tried})"
        )
    index.save(_OUTPUT.value, overwrite=_OVERWRITE.value)
    print(f"Wrote {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(main)
