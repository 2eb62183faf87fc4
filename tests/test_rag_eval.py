"""Grounded prompts, the retrieval metrics against pytrec_eval (trec_eval), and the retrieval and rag tasks."""

import dataclasses
import json
import re

import pytest
import pytrec_eval

from llm.eval import generation_tasks, rag_task, report, retrieval, suite, tasks
from llm.io import SourceError
from llm.rag.grounded import grounded_prompt, render_grounded
from llm.rag.passages import Passage, token_counter

# --- metrics against trec_eval ------------------------------------------------------------------------------

SCORES = {
    # the gold p1 ties with p0 and p2: trec_eval puts it second (ties by id, descending)
    "tie": {"p0": 1.0, "p1": 1.0, "p2": 1.0, "p3": 0.5},
    # two graded relevant passages, one of them below rank 5
    "graded": {f"p{i}": 10.0 - i for i in range(8)},
    # the gold is ranked 12th: in recall@20 but outside MRR@10 and nDCG@10
    "deep": {f"p{i:02d}": 30.0 - i for i in range(25)},
    # the gold is not retrieved at all
    "missed": {"p0": 2.0, "p1": 1.0},
}
QRELS = {
    "tie": {"p1": 1},
    "graded": {"p6": 2, "p1": 1, "p9": 0},
    "deep": {"p11": 1},
    "missed": {"p7": 1},
}


def trec_eval(scores, qrels):
    """pytrec_eval's recall@1/5/20 and nDCG@10 on the full run, and reciprocal rank on each run's top 10."""
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"recall.1,5,20", "ndcg_cut.10"})
    full = evaluator.evaluate(scores)
    top10 = {
        query: {passage: run[passage] for passage in retrieval.ranked_ids(run)[:10]} for query, run in scores.items()
    }
    reciprocal = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    return {
        query: {
            "recall@1": full[query]["recall_1"],
            "recall@5": full[query]["recall_5"],
            "recall@20": full[query]["recall_20"],
            "mrr@10": reciprocal[query]["recip_rank"],
            "ndcg@10": full[query]["ndcg_cut_10"],
        }
        for query in qrels
    }


def test_ties_are_ranked_as_trec_eval_ranks_them():
    assert retrieval.ranked_ids(SCORES["tie"]) == ["p2", "p1", "p0", "p3"]


def test_metrics_equal_trec_eval_per_query_and_on_average():
    reference = trec_eval(SCORES, QRELS)
    rankings = {query: retrieval.ranked_ids(run)[:20] for query, run in SCORES.items()}
    for query in QRELS:
        assert retrieval.query_metrics(rankings[query], QRELS[query]) == pytest.approx(reference[query]), query
    # The cases differ where they should: each metric is tested at a value other than 0 and 1 somewhere.
    assert reference["tie"]["mrr@10"] == 0.5 and reference["deep"]["recall@20"] == 1.0
    assert reference["deep"]["mrr@10"] == 0.0 and 0 < reference["graded"]["ndcg@10"] < 1
    means = retrieval.mean_metrics(rankings, QRELS)
    for metric in retrieval.METRICS:
        assert means[metric] == pytest.approx(100 * sum(ref[metric] for ref in reference.values()) / len(QRELS))


def test_a_ranking_that_names_a_passage_twice_is_refused():
    with pytest.raises(ValueError, match="names a passage twice"):
        retrieval.query_metrics(["p1", "p1"], {"p1": 1})


# --- grounded prompts -----------------------------------------------------------------------------------------

TEXT = (
    "El río Ebro nace en Fontibre. Cruza Zaragoza de oeste a este.\n\n"
    "La Aljafería es un palacio islámico del siglo XI, construido por los reyes de la taifa de Saraqusta en "
    "la ribera del río, y reformado por los Reyes Católicos siglos después.\n\n"
    "El Pilar es una basílica barroca."
)
QUESTION = "¿Dónde nace el Ebro?"


@pytest.fixture
def passages():
    """The paragraphs of one document as passages: a short one, a long one, a short one."""
    found = []
    for index, paragraph in enumerate(TEXT.split("\n\n")):
        start = TEXT.index(paragraph)
        found.append(
            Passage(f"aragon#{index}", "aragon", index, start, start + len(paragraph), "aragon.txt", paragraph)
        )
    return found


def test_the_first_passage_that_does_not_fit_ends_the_prompt_so_rank_order_is_kept(passages, tokenizer):
    count = token_counter(tokenizer)
    short, long, last = passages  # `long` is one sentence: it cannot be cut
    exact = count(render_grounded(QUESTION, [short, last]))
    assert count(render_grounded(QUESTION, [short, long])) > exact  # the long one cannot be the second
    prompt = grounded_prompt(QUESTION, passages, tokenizer, exact)
    assert prompt.passages == (short,)  # `last` would fit, but it ranks below `long`
    assert prompt.tokens == count(prompt.text) == len(tokenizer.encode(prompt.text))
    assert prompt.text == render_grounded(QUESTION, [short])
    assert "[1] (aragon.txt) El río Ebro" in prompt.text and prompt.text.endswith(f"Pregunta: {QUESTION}\nRespuesta:")
    assert grounded_prompt(QUESTION, [short, last], tokenizer, exact).passages == (short, last)


def test_a_passage_that_does_not_fit_whole_is_cut_at_a_sentence_end_and_closes_the_prompt(passages, tokenizer):
    short, long, last = passages  # `short` has two sentences
    first_sentence = dataclasses.replace(short, end=short.start + 29, text="El río Ebro nace en Fontibre.")
    budget = token_counter(tokenizer)(render_grounded(QUESTION, [last, first_sentence]))
    prompt = grounded_prompt(QUESTION, [last, short, long], tokenizer, budget)
    assert prompt.passages == (last, first_sentence) and prompt.tokens <= budget


def test_sources_point_to_the_real_passages_and_flag_the_cited_ones(passages, tokenizer):
    prompt = grounded_prompt(QUESTION, passages[::-1], tokenizer, 10_000)
    result = prompt.answer("Nace en Fontibre [3], según [1, 9].")
    assert result["answer"] == "Nace en Fontibre [3], según [1, 9]."
    assert [(s["number"], s["passage_id"], s["cited"]) for s in result["sources"]] == [
        (1, passages[2].id, True),
        (2, passages[1].id, False),
        (3, passages[0].id, True),
    ]
    for source in result["sources"]:
        passage = next(p for p in passages if p.id == source["passage_id"])
        assert TEXT[source["start"] : source["end"]] == passage.text
        assert (source["document_id"], source["source"]) == ("aragon", "aragon.txt")


def test_when_nothing_fits_whole_the_best_passage_is_cut_at_a_sentence_end(passages, tokenizer):
    first = passages[0]  # two sentences
    budget = token_counter(tokenizer)(render_grounded(QUESTION, [first])) - 1
    prompt = grounded_prompt(QUESTION, [first, passages[1]], tokenizer, budget)
    (cut,) = prompt.passages
    assert cut.id == first.id and cut.text == "El río Ebro nace en Fontibre."
    assert TEXT[cut.start : cut.end] == cut.text and prompt.tokens <= budget
    bare = token_counter(tokenizer)(render_grounded(QUESTION, []))
    assert grounded_prompt(QUESTION, [first], tokenizer, bare).passages == ()


def test_a_question_that_alone_does_not_fit_names_its_length_and_the_budget(passages, tokenizer):
    bare = len(tokenizer.encode(render_grounded(QUESTION, [])))
    with pytest.raises(ValueError, match=rf"prompt of {bare} tokens, over the budget of {bare - 1} tokens"):
        grounded_prompt(QUESTION, passages, tokenizer, bare - 1)


# --- the retrieval and rag tasks on a tiny XQuAD-shaped file ------------------------------------------------------

PLANTED = "¿Qué come el ornitorrinco azul de Tasmania?"


def write_xquad(directory):
    """Three articles of two contexts with two questions each, one planted with words only its context has."""
    articles = []
    for a in range(3):
        paragraphs = []
        for p in range(2):
            context = f"El artículo {a} habla del tema {p}. La respuesta {a}{p} está aquí."
            qas = [
                {
                    "id": f"q{a}{p}{q}",
                    "question": f"¿Qué dice el artículo {a} del tema {p}?",
                    "answers": [{"text": f"respuesta {a}{p}"}],
                }
                for q in range(2)
            ]
            paragraphs.append({"context": context, "qas": qas})
        articles.append({"title": f"Artículo {a}", "paragraphs": paragraphs})
    planted = {"id": "planted", "question": PLANTED, "answers": [{"text": "camarones"}]}
    articles[2]["paragraphs"].append({"context": "El ornitorrinco azul de Tasmania come camarones.", "qas": [planted]})
    directory.mkdir(exist_ok=True)
    (directory / tasks.XQUAD_FILE).write_text(json.dumps({"data": articles}), encoding="utf-8")
    return str(directory)


def test_corpus_passages_are_the_distinct_contexts_with_spans_in_their_article(tmp_path):
    articles, passages, gold_of = retrieval.load_corpus(write_xquad(tmp_path))
    assert len(passages) == 7 and len(gold_of) == 7 and passages[6].id == "xquad_es/2#2"
    article = "\n\n".join(p.text for p in passages if p.document_id == "xquad_es/2")
    assert all(article[p.start : p.end] == p.text for p in passages if p.document_id == "xquad_es/2")
    assert {p.source for p in passages} == {tasks.XQUAD_FILE}


def test_bm25_finds_the_planted_passage_first(tmp_path):
    articles, passages, gold_of = retrieval.load_corpus(write_xquad(tmp_path))
    searchers = retrieval.default_searchers(passages, None)
    planted = [q for q in retrieval.xquad_queries(articles, gold_of) if q.id == "planted"]
    scores = retrieval.evaluate_retrieval(planted, searchers)["bm25"]
    assert scores["recall@1"] == scores["mrr@10"] == scores["ndcg@10"] == 100.0


def test_retrieval_task_scores_every_question_with_every_method(tmp_path):
    settings = suite.Settings(data_dir=write_xquad(tmp_path))
    ranked_backwards = lambda query, k: [f"xquad_es/{a}#{p}" for a in (2, 1, 0) for p in (1, 0)][:k]  # noqa: E731
    tools = suite.RetrievalTools(
        lambda passages: {**retrieval.default_searchers(passages, None), "backwards": ranked_backwards}, len, 100
    )
    results, seconds = suite.run_tasks(["retrieval"], settings, None, None, tools)
    found = results["retrieval"]
    assert (found["queries"], found["passages"], set(found["methods"])) == (13, 7, {"bm25", "backwards"})
    # backwards puts article a's context p at rank 1 + 2 * (2 - a) + (1 - p); the planted one never.
    ranks = [1 + 2 * (2 - a) + (1 - p) for a in range(3) for p in range(2) for _ in range(2)]
    assert found["methods"]["backwards"]["mrr@10"] == pytest.approx(100 * sum(1 / r for r in ranks) / 13)
    assert found["methods"]["backwards"]["recall@1"] == pytest.approx(100 * 2 / 13) and "retrieval" in seconds
    assert found["corpus"] == "XQuAD-es"


# --- retrieval over the user's own pairs ------------------------------------------------------------------------

PAIRS = [
    # The planted query: its words occur only in its positive.
    {"id": "plant", "query": "ornitorrinco azul Tasmania", "positive": "El ornitorrinco azul de Tasmania nada."},
    # Its negative is the first positive: a shared text is one passage.
    {
        "query": "¿Qué come el perro?",
        "positive": "El perro come pienso.",
        "negative": "El ornitorrinco azul de Tasmania nada.",
    },
    # Its negative is a distractor that matches the query better than its positive does.
    {
        "query": "¿Dónde duerme el gato?",
        "positive": "El gato, sobre el sofá.",
        "negative": "El gato duerme mucho; el gato.",
    },
]


def write_pairs(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n", "utf-8")
    return str(path)


def test_pairs_corpus_searches_distinct_positives_and_negatives_as_distractors(tmp_path):
    path = write_pairs(tmp_path / "held_out.jsonl", PAIRS)
    corpus = retrieval.pairs_corpus(path)
    assert corpus.name == path and [q.id for q in corpus.queries] == ["plant", "held_out.jsonl:2", "held_out.jsonl:3"]
    assert [(p.id, p.text) for p in corpus.passages] == [
        ("plant#0", PAIRS[0]["positive"]),
        ("held_out.jsonl:2#0", PAIRS[1]["positive"]),
        ("held_out.jsonl:3#0", PAIRS[2]["positive"]),
        ("held_out.jsonl:3#1", PAIRS[2]["negative"]),
    ]
    assert corpus.passages[3].source == f"{path}:3" and [q.gold for q in corpus.queries] == [
        "plant#0",
        "held_out.jsonl:2#0",
        "held_out.jsonl:3#0",
    ]
    searchers = retrieval.default_searchers(corpus.passages, None)
    planted = retrieval.evaluate_retrieval(corpus.queries[:1], searchers)["bm25"]
    assert planted["recall@1"] == planted["mrr@10"] == 100.0
    cat = retrieval.evaluate_retrieval(corpus.queries[2:], searchers)["bm25"]
    assert cat["recall@1"] == 0.0 and cat["mrr@10"] == 50.0  # the distractor outranks the positive


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"query": "x",', r"held_out.jsonl:2: not valid JSON"),
        ('["query"]', r"held_out.jsonl:2: expected a JSON object, got list"),
        ({"query": "¿Y?"}, r'held_out.jsonl:2: "positive" must be a non-empty string, got None'),
        ({"query": " ", "positive": "Sí."}, r'held_out.jsonl:2: "query" must be a non-empty string'),
        ({"query": "¿Y?", "positive": "Sí.", "negative": 3}, r'held_out.jsonl:2: "negative" must be a non-empty'),
        ({**PAIRS[0], "query": "¿Otra?"}, r"held_out.jsonl:2: \"id\" 'plant' already names the pair of line 1"),
    ],
)
def test_pairs_file_errors_name_file_line_and_key(tmp_path, line, message):
    path = write_pairs(tmp_path / "held_out.jsonl", [PAIRS[0], line])
    with pytest.raises(SourceError, match=message):
        retrieval.pairs_corpus(path)


def test_retrieval_on_a_pairs_file_leaves_rag_on_xquad(tmp_path):
    pairs = write_pairs(tmp_path / "held_out.jsonl", PAIRS)
    settings = suite.Settings(data_dir=write_xquad(tmp_path), retrieval_pairs=pairs, max_examples=2, num_shots=0)
    corpora = []
    tools = suite.RetrievalTools(
        lambda passages: corpora.append(passages) or retrieval.default_searchers(passages, None),
        token_counter(None),
        1000,
    )
    results, _ = suite.run_tasks(["retrieval", "rag"], settings, None, answer_if_in_context, tools)
    found = results["retrieval"]
    assert (found["corpus"], found["queries"], found["passages"]) == (pairs, 2, 4)  # queries subsampled, not passages
    assert [len(passages) for passages in corpora] == [4, 7] and results["rag"]["examples"] == 2
    table = report.markdown_table({**results, "settings": {"num_shots": 0}})
    assert f"Retrieval: 2 queries of `{pairs}` over 4 passages (its distinct positives and negatives)" in table


def answer_if_in_context(prompts, max_new_tokens, stop_strings):
    """A fake model: the gold answer when it appears in the prompt's own context (not the shots'), else "no sé"."""
    completions = []
    for prompt in prompts:
        context, question = prompt.rsplit("Contexto:", 1)[1].split("\nPregunta: ")
        numbers = re.search(r"artículo (\d) del tema (\d)", question)
        wanted = f"respuesta {numbers[1]}{numbers[2]}" if numbers else "camarones"
        completions.append(f" {wanted}" if wanted in context else " no sé")
    return completions


def test_rag_scores_gold_above_retrieved_above_closed_book(tmp_path):
    data_dir = write_xquad(tmp_path)
    settings = suite.Settings(data_dir=data_dir, num_shots=1, rag_passages=2)

    # A searcher that finds the gold context only for questions about tema 0 (article 0 is the shot pool).
    def search(query, k):
        match = re.search(r"artículo (\d) del tema (\d)", query)
        return ["xquad_es/0#0", "xquad_es/0#1"][:k] if not match or match[2] == "1" else [f"xquad_es/{match[1]}#0"]

    tools = suite.RetrievalTools(lambda passages: {"bm25": search}, token_counter(None), 1000)
    results, _ = suite.run_tasks(["rag"], settings, None, answer_if_in_context, tools)
    rag = results["rag"]
    assert (rag["examples"], rag["searcher"], rag["shots"]) == (9, "bm25", 1.0)
    assert (rag["closed_book"]["exact_match"], rag["closed_book"]["f1"]) == (0.0, 0.0)
    assert rag["retrieved"]["exact_match"] == pytest.approx(100 * 4 / 9) == rag["retrieved"]["hit_rate"]
    assert (rag["gold"]["exact_match"], rag["gold"]["gold_cut"]) == (100.0, 0.0)
    assert rag["retrieved"]["passages"] == pytest.approx((4 * 1 + 5 * 2) / 9) and rag["closed_book"]["passages"] == 0
    sample = rag["samples"][0]
    assert (sample["gold_passage"], sample["retrieved_passages"]) == ("xquad_es/1#0", ["xquad_es/1#0"])
    assert sample["completions"] == {"closed_book": "no sé", "retrieved": "respuesta 10", "gold": "respuesta 10"}


def test_rag_conditions_differ_only_in_the_context_and_gold_is_the_xquad_prompt(tmp_path):
    articles, passages, gold_of = retrieval.load_corpus(write_xquad(tmp_path))
    example, shots = articles[1][0], [articles[0][0], articles[0][2]]  # about tema 0, then tema 1
    gold = next(p for p in passages if p.id == gold_of[example.context])
    solved = [f"{tasks.xquad_query(shot)} {shot.answers[0]}" for shot in shots]
    count = token_counter(None)
    kept, roomy = rag_task.condition_prompts(example, gold, passages[:2], solved, rag_task.Budget(count, 1000))
    assert kept == 2 and roomy["gold"].text == generation_tasks.xquad_prompts([example], shots)[0]
    heads = {condition: prompt.text.split("Contexto:")[:3] for condition, prompt in roomy.items()}
    assert heads["closed_book"] == heads["retrieved"] == heads["gold"]
    assert "Contexto: \nPregunta:" in roomy["closed_book"].text
    # Room for the gold passage beside one shot only: the first shot goes, in every condition.
    tight = count(generation_tasks.xquad_prompts([example], shots[1:])[0])
    kept, prompts = rag_task.condition_prompts(example, gold, passages[:2], solved, rag_task.Budget(count, tight))
    assert kept == 1 and all(prompt.text.count("Respuesta:") == 2 for prompt in prompts.values())
    assert all("artículo 0 del tema 0" not in p.text and "artículo 0 del tema 1" in p.text for p in prompts.values())
    assert prompts["gold"].tokens == tight and prompts["retrieved"].passages == (passages[0],)


def test_the_report_shows_methods_and_conditions_side_by_side():
    scores = {"recall@1": 40.0, "recall@5": 70.0, "recall@20": 90.0, "mrr@10": 52.25, "ndcg@10": 60.0}
    rag = {
        "searcher": "bm25",
        "num_passages": 3,
        "examples": 32,
        "shots": 0.5,
        "closed_book": {"exact_match": 3.125, "f1": 8.0, "passages": 0.0},
        "retrieved": {"exact_match": 12.5, "f1": 20.0, "hit_rate": 60.0, "passages": 1.5},
        "gold": {"exact_match": 25.0, "f1": 35.0, "passages": 1.0, "gold_cut": 40.0},
    }
    table = report.markdown_table(
        {
            "retrieval": {"methods": {"bm25": scores}, "queries": 1190, "passages": 240},
            "rag": rag,
            "settings": {"num_shots": 3},
        }
    )
    for line in (
        "| retrieval | bm25 | MRR@10 | 52.2 | - |",
        "| rag | bm25 top-3, 3-shot | token F1 | 20.0 | closed-book 8.0 |",
        "| rag | gold passage, 3-shot | exact match | 25.0 | closed-book 3.1 |",
        "| bm25 | 40.0 | 70.0 | 90.0 | 52.2 | 60.0 |",
        "| exact match | 3.1 | 12.5 | 25.0 |",
        "| retrieval hit rate | - | 60.0 | - |",
        "| passages in the prompt | 0.0 | 1.5 | 1.0 |",
        "| gold passage cut to fit | - | - | 40.0 |",
    ):
        assert line in table.splitlines(), line
    assert "(on average 0.5 shots fitted the context)" in table
