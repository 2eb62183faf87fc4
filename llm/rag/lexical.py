"""BM25 search over passages with Spanish analysis, on `bm25s` and PyStemmer's Snowball Spanish stemmer.

Analysis, the same for passages and queries: Unicode NFC, lower case, words of two or more letters or
digits, bm25s's Spanish stop words, the Snowball Spanish stemmer. Accents: the Snowball Spanish algorithm
already removes acute accents from every stem, so "canción", "cancion" and "canciones" all become "cancion"
on both sides (measured: nación/nacion, camión/camion, árboles/arbol, informática/informatica each give one
stem). Folding more (NFD and dropping every mark) was rejected: it maps "ñ" to "n" and so conflates
"año" and "ano", and gained nothing on those examples.

An index directory holds bm25s's own files plus `passages.jsonl`, the passage store, in the same order.
"""

from __future__ import annotations

import functools
import os
import unicodedata

import bm25s
import Stemmer

from llm.rag.passages import Passage, read_passages, write_passages

PASSAGES_FILE = "passages.jsonl"
# bm25s's files an index directory must hold (its defaults for BM25.save).
BM25_FILES = ("params.index.json", "vocab.index.json", "data.csc.index.npy", "indices.csc.index.npy")


@functools.cache
def _stemmer() -> Stemmer.Stemmer:
    return Stemmer.Stemmer("spanish")


def analyze(texts: list[str]) -> list[list[str]]:
    """The index terms of each text (see the module docstring)."""
    normalized = [unicodedata.normalize("NFC", text) for text in texts]
    # A fresh bm25s tokenizer per call: it only returns the words of its vocabulary, which it grows as it goes.
    analyzer = bm25s.tokenization.Tokenizer(lower=True, stopwords="es", stemmer=_stemmer())
    return analyzer.tokenize(normalized, update_vocab=True, return_as="string", show_progress=False)


class LexicalIndex:
    """A BM25 index of passages: build, search, save and load."""

    def __init__(self, retriever: bm25s.BM25, passages: list[Passage]):
        self.retriever = retriever
        self.passages = passages

    @classmethod
    def build(cls, passages: list[Passage]) -> LexicalIndex:
        if not passages:
            raise ValueError("Cannot build a BM25 index of an empty corpus: no passages were given.")
        retriever = bm25s.BM25()
        retriever.index(analyze([passage.text for passage in passages]), show_progress=False)
        return cls(retriever, list(passages))

    def search(self, query: str, k: int = 10) -> list[tuple[Passage, float]]:
        """The best `k` passages (fewer if fewer match a query term) with their BM25 scores, best first."""
        terms = analyze([query])
        if not self.retriever.get_tokens_ids(terms[0]):
            return []  # no query term occurs in the corpus: nothing scores above zero
        k = min(k, len(self.passages))
        indices, scores = self.retriever.retrieve(terms, k=k, show_progress=False)
        return [(self.passages[int(i)], float(s)) for i, s in zip(indices[0], scores[0], strict=True) if float(s) > 0]

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.retriever.save(directory, show_progress=False)
        write_passages(os.path.join(directory, PASSAGES_FILE), self.passages)

    @classmethod
    def load(cls, directory: str) -> LexicalIndex:
        for name in (*BM25_FILES, PASSAGES_FILE):
            if not os.path.isfile(os.path.join(directory, name)):
                raise FileNotFoundError(f"{directory!r} is not a BM25 index: it has no {name}")
        retriever = bm25s.BM25.load(directory)
        passages = read_passages(os.path.join(directory, PASSAGES_FILE))
        if len(passages) != retriever.scores["num_docs"]:
            raise ValueError(
                f"{directory!r}: {PASSAGES_FILE} holds {len(passages)} passages, the BM25 index "
                f"{retriever.scores['num_docs']}"
            )
        return cls(retriever, passages)
