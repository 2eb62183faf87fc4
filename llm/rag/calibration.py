"""How much hybrid search should trust the vectors, measured on the indexed corpus itself, without labels.

Fusion with equal weights is only as good as its weaker ranker: an untrained or tiny embedder drags BM25 down
(on XQuAD-es with the quickstart model, recall@1 fell from 91.9 with BM25 to 21.2 with equal-weight fusion). So
when an index is built, both rankers are measured on inverse-cloze pseudo-queries (Lee et al., 2019) from its
own passages: a sentence of a passage is the query, and the rest of that passage, the sentence removed, is the
one right answer among the remainders of the other sampled passages. Removing the sentence matters: left in,
BM25 would find every query verbatim and the vectors would never seem worth anything. Each dense weight of
DENSE_WEIGHTS (BM25's is 1) is scored by the MRR@10 of the weighted reciprocal rank fusion; the best wins, ties
going to the smaller weight (weight 0 is BM25's ranking). Pseudo-queries are not real questions, so the chosen
weight is an estimate: the index records the whole table, and a caller may override the weight.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import numpy as np

from llm.rag.embeddings import Embedder
from llm.rag.hybrid import HYBRID_DEPTH, reciprocal_rank_fusion
from llm.rag.lexical import LexicalIndex
from llm.rag.passages import Passage
from llm.rag.sentences import sentence_spans

DENSE_WEIGHTS = (0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
SAMPLE_SIZE = 256  # pseudo-queries: enough to tell the weights apart, a few seconds of embedding
MIN_QUERIES = 16  # fewer, and the estimate is noise: fuse with equal weights
MRR_CUTOFF = 10


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The chosen dense weight, the MRR@10 of every weight tried, and how many pseudo-queries measured them."""

    dense_weight: float
    mrr: dict[str, float]  # str(weight) -> MRR@10 (JSON keys)
    queries: int


def pseudo_queries(passages: Sequence[Passage], sample_size: int, seed: int) -> list[tuple[str, Passage]]:
    """(query sentence, the passage without it) for up to `sample_size` passages of two or more sentences."""
    rng = random.Random(seed)
    candidates = [passage for passage in passages if len(sentence_spans(passage.text)) >= 2]
    pairs = []
    for passage in rng.sample(candidates, min(sample_size, len(candidates))):
        spans = sentence_spans(passage.text)
        chosen = rng.randrange(len(spans))
        rest = " ".join(passage.text[start:end] for index, (start, end) in enumerate(spans) if index != chosen)
        start, end = spans[chosen]
        pairs.append((passage.text[start:end], dataclasses.replace(passage, text=rest)))
    return pairs


def calibrate(
    passages: Sequence[Passage], embedder: Embedder, sample_size: int = SAMPLE_SIZE, seed: int = 0
) -> Calibration:
    """The dense weight of hybrid search for this corpus and embedder (see the module docstring)."""
    pairs = pseudo_queries(passages, sample_size, seed)
    if len(pairs) < MIN_QUERIES:
        return Calibration(1.0, {}, len(pairs))
    queries, targets = [query for query, _ in pairs], [target for _, target in pairs]
    lexical = LexicalIndex.build(targets)
    position = {target.id: index for index, target in enumerate(targets)}
    bm25 = [[position[passage.id] for passage, _ in lexical.search(query, HYBRID_DEPTH)] for query in queries]
    similarity = embedder.embed(queries, "query") @ embedder.embed([t.text for t in targets], "passage").T
    dense = np.argsort(-similarity, axis=1, kind="stable")[:, :HYBRID_DEPTH].tolist()
    mrr = {}
    for weight in DENSE_WEIGHTS:
        total = 0.0
        for answer, (lexical_ranking, dense_ranking) in enumerate(zip(bm25, dense)):
            fused = reciprocal_rank_fusion([lexical_ranking, dense_ranking], weights=(1.0, weight))
            ranked = [entry.item for entry in fused[:MRR_CUTOFF]]
            total += 1.0 / (ranked.index(answer) + 1) if answer in ranked else 0.0
        mrr[str(weight)] = total / len(pairs)
    best = max(DENSE_WEIGHTS, key=lambda weight: (mrr[str(weight)], -weight))
    return Calibration(best, mrr, len(pairs))
