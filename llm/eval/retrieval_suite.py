"""The retrieval and rag tasks of the suite on XQuAD-es (or, for retrieval, a pairs file): the corpus, its
searchers and the rag prompt budget, built once and shared by both tasks."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from llm.eval import rag_task, retrieval, tasks
from llm.eval.generation_tasks import Generate
from llm.eval.report import XQUAD_CORPUS
from llm.eval.retrieval import Searcher
from llm.rag.passages import Counter, Passage

if TYPE_CHECKING:  # the suite imports this module at run time
    from llm.eval.suite import Settings


@dataclasses.dataclass(frozen=True)
class RetrievalTools:
    """What retrieval and rag need besides `generate`: the search methods over a corpus, a text's length in
    the generator's tokens (no BOS) and the generator's context length."""

    make_searchers: Callable[[list[Passage]], dict[str, Searcher]]
    count: Counter
    context: int


@dataclasses.dataclass(frozen=True)
class _Xquad:
    """XQuAD-es as retrieval and rag search it: its articles, its contexts as passages and their searchers."""

    articles: list[list[tasks.QaExample]]
    passages: list[Passage]
    gold_of: dict[str, str]  # context -> passage id
    searchers: dict[str, Searcher]

    @classmethod
    def load(cls, settings: Settings, tools: RetrievalTools) -> _Xquad:
        articles, passages, gold_of = retrieval.load_corpus(settings.data_dir)
        return cls(articles, passages, gold_of, tools.make_searchers(passages))


def run_retrieval_tasks(
    task_names: Sequence[str], settings: Settings, generate: Generate, tools: RetrievalTools
) -> tuple[dict[str, Any], dict[str, float]]:
    """retrieval and rag; on XQuAD-es they share one corpus and one set of searchers (built once, timed with the
    first task). With `retrieval_pairs`, retrieval searches the pairs file's texts, and rag still XQuAD-es."""
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    xquad = None
    start = time.perf_counter()
    if "retrieval" in task_names:
        if settings.retrieval_pairs:
            corpus = retrieval.pairs_corpus(settings.retrieval_pairs)
            searchers = tools.make_searchers(corpus.passages)
        else:
            xquad = _Xquad.load(settings, tools)
            queries = retrieval.xquad_queries(xquad.articles, xquad.gold_of)
            corpus, searchers = retrieval.Corpus(XQUAD_CORPUS, xquad.passages, queries), xquad.searchers
        logging.info("Evaluating retrieval (%s) on %s", ", ".join(searchers), corpus.name)
        scored = tasks.subsample(corpus.queries, settings.examples("retrieval"), settings.seed)
        results["retrieval"] = {
            "corpus": corpus.name,
            "methods": retrieval.evaluate_retrieval(scored, searchers),
            "queries": len(scored),
            "passages": len(corpus.passages),
        }
        seconds["retrieval"] = time.perf_counter() - start
        start = time.perf_counter()
    if "rag" in task_names:
        results["rag"] = _rag(xquad or _Xquad.load(settings, tools), settings, generate, tools)
        seconds["rag"] = time.perf_counter() - start
    return results, seconds


def _rag(xquad: _Xquad, settings: Settings, generate: Generate, tools: RetrievalTools) -> dict[str, Any]:
    logging.info("Evaluating rag (%s, top %d)", settings.rag_searcher, settings.rag_passages)
    articles = xquad.articles
    shots = tasks.choose_shots(articles[0], settings.num_shots, settings.seed)
    scored = tasks.subsample(
        [question for article in articles[1:] for question in article], settings.examples("rag"), settings.seed
    )
    budget = rag_task.Budget(tools.count, tools.context - settings.max_new_tokens - 1)  # BOS comes first
    return {
        "searcher": settings.rag_searcher,
        **rag_task.evaluate_rag(
            scored,
            shots,
            xquad.passages,
            xquad.gold_of,
            xquad.searchers[settings.rag_searcher],
            generate,
            budget,
            settings.max_new_tokens,
            settings.rag_passages,
        ),
    }
