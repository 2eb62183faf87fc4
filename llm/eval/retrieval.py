"""The `retrieval` task: queries searched over a corpus of passages, scored by recall, MRR and nDCG.

By default the queries are the XQuAD-es questions and the corpus every distinct context of the file, one
passage each: an article is a document (its contexts joined by blank lines), a context is its passage number
p, with the id "xquad_es/<article>#<p>". A question's gold passage is its own context.

On the user's own pairs (a JSONL file of `{"id"?, "query", "positive", "negative"?}`, e.g. the
validation_pairs.jsonl that scripts/prepare_pairs.py holds out) the corpus is every distinct positive and
negative (the negatives as distractors), each its own passage "<pair id>#0" (positive) or "#1" (negative) of the
pair it first appears in; a query's gold passage is its positive. A pair without an "id" is "<file name>:<line>",
as prepare_pairs names it.

Each method is a searcher, `(query, k) -> passage ids, best first`; the task asks every method for the top
MAX_K of each query and reports, in percent and averaged over the queries: recall@1, @5 and @20 (the gold
passage among the first k), MRR@10 (one over the gold's rank, 0 below rank 10) and nDCG@10, all as trec_eval
defines them (the tests compare with pytrec_eval).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence

from llm.eval import tasks
from llm.io import SourceError, jsonl_objects
from llm.rag.embeddings import Embedder
from llm.rag.index import RetrievalIndex
from llm.rag.passages import Passage

# (query, k) -> the ids of the best k passages (or fewer), best first.
Searcher = Callable[[str, int], list[str]]
SEARCH_METHODS = ("bm25", "dense", "hybrid")  # what default_searchers offers (RetrievalIndex modes)
RECALL_CUTOFFS = (1, 5, 20)
RANK_CUTOFF = 10  # of MRR and nDCG
MAX_K = max(*RECALL_CUTOFFS, RANK_CUTOFF)
METRICS = (*(f"recall@{k}" for k in RECALL_CUTOFFS), f"mrr@{RANK_CUTOFF}", f"ndcg@{RANK_CUTOFF}")
PAIR_KEYS = ("query", "positive", "negative")


@dataclasses.dataclass(frozen=True)
class Query:
    id: str
    text: str
    gold: str  # the id of its one relevant passage


@dataclasses.dataclass(frozen=True)
class Corpus:
    """What the retrieval task searches: `name` is report.XQUAD_CORPUS or the pairs file's path."""

    name: str
    passages: list[Passage]
    queries: list[Query]


def xquad_corpus(articles: Sequence[Sequence[tasks.QaExample]], source: str) -> tuple[list[Passage], dict[str, str]]:
    """(passages, context -> passage id) of XQuAD articles (lists of questions, as tasks.read_xquad gives)."""
    passages: list[Passage] = []
    id_of: dict[str, str] = {}
    for number, article in enumerate(articles):
        start = 0
        contexts = [
            context for context in dict.fromkeys(question.context for question in article) if context not in id_of
        ]
        for index, context in enumerate(contexts):
            document = f"xquad_es/{number}"
            passage = Passage(f"{document}#{index}", document, index, start, start + len(context), source, context)
            passages.append(passage)
            id_of[context] = passage.id
            start += len(context) + 2  # the blank line joining the contexts of the article
    return passages, id_of


def ranked_ids(scores: Mapping[str, float]) -> list[str]:
    """Passage ids by score, best first; ties go to the larger id, as trec_eval orders them."""
    return sorted(scores, key=lambda passage_id: (scores[passage_id], passage_id), reverse=True)


def query_metrics(ranking: Sequence[str], relevance: Mapping[str, int]) -> dict[str, float]:
    """The METRICS (fractions) of one query's ranking against its graded relevance (passage id -> grade > 0)."""
    if len(set(ranking)) != len(ranking):
        raise ValueError(f"A ranking names a passage twice: {list(ranking)}")
    relevant = {passage_id for passage_id, grade in relevance.items() if grade > 0}
    if not relevant:
        raise ValueError("A query needs at least one relevant passage.")
    metrics = {f"recall@{k}": len(relevant.intersection(ranking[:k])) / len(relevant) for k in RECALL_CUTOFFS}
    ranks = [rank for rank, passage_id in enumerate(ranking[:RANK_CUTOFF], start=1) if passage_id in relevant]
    metrics[f"mrr@{RANK_CUTOFF}"] = 1.0 / ranks[0] if ranks else 0.0
    gains = [relevance.get(passage_id, 0) for passage_id in ranking[:RANK_CUTOFF]]
    ideal = sorted(relevance.values(), reverse=True)[:RANK_CUTOFF]
    metrics[f"ndcg@{RANK_CUTOFF}"] = _dcg(gains) / _dcg(ideal)
    return metrics


def _dcg(gains: Sequence[float]) -> float:
    return sum(gain / math.log2(rank + 1) for rank, gain in enumerate(gains, start=1))


def mean_metrics(rankings: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    """The METRICS in percent, averaged over every query of `qrels` (a query without a ranking scores 0)."""
    if not qrels:
        raise ValueError("No queries to score.")
    totals = dict.fromkeys(METRICS, 0.0)
    for query_id, relevance in qrels.items():
        for name, value in query_metrics(rankings.get(query_id, []), relevance).items():
            totals[name] += value
    return {name: 100.0 * total / len(qrels) for name, total in totals.items()}


def evaluate_retrieval(queries: Sequence[Query], searchers: Mapping[str, Searcher]) -> dict[str, dict[str, float]]:
    """Per method, the METRICS of its top MAX_K for each query."""
    if not queries:
        raise ValueError("No queries to search for.")
    qrels = {query.id: {query.gold: 1} for query in queries}
    return {
        method: mean_metrics({query.id: search(query.text, MAX_K) for query in queries}, qrels)
        for method, search in searchers.items()
    }


def default_searchers(passages: Sequence[Passage], embedder: Embedder | None) -> dict[str, Searcher]:
    """One searcher per mode of a `RetrievalIndex` of the passages: "bm25" and, with an embedder, "dense"
    (exact inner product: the flat FAISS index) and "hybrid" (their reciprocal rank fusion, the vectors weighted
    as the index's calibration on the passages themselves decides: llm/rag/calibration.py)."""
    index = RetrievalIndex.build(list(passages), embedder)
    if index.calibration:
        logging.info("Hybrid search's dense weight: %s (calibration: %s)", index.dense_weight, index.calibration)
    return {
        mode: functools.partial(lambda mode, query, k: [hit.passage.id for hit in index.search(query, k, mode)], mode)
        for mode in SEARCH_METHODS
        if mode in index.modes
    }


def load_corpus(data_dir: str) -> tuple[list[list[tasks.QaExample]], list[Passage], dict[str, str]]:
    """(articles, passages, context -> passage id) of the XQuAD-es file in `data_dir`."""
    path = tasks.data_file(data_dir, tasks.XQUAD_FILE)
    articles = tasks.read_xquad(path)
    passages, gold_of = xquad_corpus(articles, os.path.basename(path))
    return articles, passages, gold_of


def xquad_queries(articles: Sequence[Sequence[tasks.QaExample]], gold_of: Mapping[str, str]) -> list[Query]:
    """Every question of the articles, its gold passage its own context (gold_of: context -> passage id)."""
    return [
        Query(question.id, question.question, gold_of[question.context]) for article in articles for question in article
    ]


def read_pairs(path: str) -> list[tuple[str, str, dict[str, str | None]]]:
    """(pair id, "path:line", {query, positive, negative or None}) of every line of a pairs JSONL file."""
    pairs, line_of = [], {}
    for number, record in jsonl_objects(path):
        where = f"{path}:{number}"
        for key in PAIR_KEYS:
            value = record.get(key)
            if not (isinstance(value, str) and value.strip()) and not (key == "negative" and value is None):
                raise SourceError(f'{where}: "{key}" must be a non-empty string, got {value!r}.')
        pair_id = record.get("id", f"{os.path.basename(path)}:{number}")
        if not isinstance(pair_id, str) or not pair_id:
            raise SourceError(f'{where}: "id" must be a non-empty string, got {pair_id!r}.')
        if pair_id in line_of:
            raise SourceError(f'{where}: "id" {pair_id!r} already names the pair of line {line_of[pair_id]}.')
        line_of[pair_id] = number
        pairs.append((pair_id, where, {key: record.get(key) for key in PAIR_KEYS}))
    if not pairs:
        raise SourceError(f'{path}: no pairs (expected one {{"query", "positive", "negative"?}} object per line).')
    return pairs


def pairs_corpus(path: str) -> Corpus:
    """The corpus of a pairs file: its distinct positives and negatives as passages, its queries as queries."""
    passages: dict[str, Passage] = {}  # text -> its passage, where it first appears
    queries = []
    for pair_id, where, pair in read_pairs(path):
        for index, key in enumerate(("positive", "negative")):
            text = pair[key]
            if text is not None and text not in passages:
                passages[text] = Passage(f"{pair_id}#{index}", pair_id, index, 0, len(text), where, text)
        queries.append(Query(pair_id, pair["query"], passages[pair["positive"]].id))
    return Corpus(path, list(passages.values()), queries)
