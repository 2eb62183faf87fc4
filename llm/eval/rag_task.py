"""The `rag` task: XQuAD-es answered closed-book, with retrieved passages, and with the gold passage.

The three conditions share one prompt, XQuAD's few-shot frame (tasks.xquad_query after QA_INSTRUCTION and the
solved shots), and differ only in what follows "Contexto:": nothing (closed-book), the top-k passages of a
searcher joined by newlines (retrieved), or the question's own context (gold; its prompt is then exactly the
xquad task's). Passages are fitted to the generator's budget by llm.rag.grounded.fit_passages (best first,
whole, the best one cut at a sentence end if none fits whole). Shots are dropped, first ones first, until
the gold passage fits whole beside them (or none are left); the same shots then frame all three conditions.

Reported, in percent: exact match and token F1 per condition (text_metrics, as xquad), the retrieved
condition's hit rate (the gold passage among the passages that made it into its prompt), the mean number
of passages in each prompt and of shots kept, how often the gold passage had to be cut, and a few samples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from llm.eval import tasks, text_metrics
from llm.eval.generation_tasks import NUM_SAMPLES, STOP_STRINGS, Generate
from llm.eval.retrieval import Searcher
from llm.rag.grounded import GroundedPrompt, fit_passages
from llm.rag.passages import Counter, Passage

CONDITIONS = ("closed_book", "retrieved", "gold")


@dataclasses.dataclass(frozen=True)
class Budget:
    """How prompts are measured: `count` gives a text's length in the generator's tokens (no BOS) and
    `tokens` how many a prompt may have (the context minus BOS minus the answer's tokens)."""

    count: Counter
    tokens: int


def _frame(example: tasks.QaExample, shots: Sequence[str]):
    def render(passages: Sequence[Passage]) -> str:
        context = "\n".join(passage.text for passage in passages)
        query = tasks.xquad_query(dataclasses.replace(example, context=context))
        return tasks.with_shots(tasks.QA_INSTRUCTION, shots, query)

    return render


def condition_prompts(
    example: tasks.QaExample, gold: Passage, retrieved: Sequence[Passage], solved_shots: Sequence[str], budget: Budget
) -> tuple[int, dict[str, GroundedPrompt]]:
    """(shots kept, the prompt of each condition) for one question (see the module docstring for the shots)."""
    kept = list(solved_shots)
    while kept and budget.count(_frame(example, kept)([gold])) > budget.tokens:
        kept = kept[1:]
    render = _frame(example, kept)
    ranked = {"closed_book": [], "retrieved": retrieved, "gold": [gold]}
    return len(kept), {
        condition: fit_passages(render, ranked[condition], budget.count, budget.tokens) for condition in CONDITIONS
    }


def evaluate_rag(
    examples: Sequence[tasks.QaExample],
    shots: Sequence[tasks.QaExample],
    corpus: Sequence[Passage],
    gold_of: Mapping[str, str],
    search: Searcher,
    generate: Generate,
    budget: Budget,
    max_new_tokens: int,
    num_passages: int,
) -> dict[str, Any]:
    """The three conditions' scores (see the module docstring); gold_of maps a context to its passage id."""
    if not examples:
        raise ValueError("No XQuAD examples to evaluate.")
    by_id = {passage.id: passage for passage in corpus}
    solved = [f"{tasks.xquad_query(shot)} {shot.answers[0]}" for shot in shots]
    shots_kept, prompts = zip(
        *(
            condition_prompts(
                example,
                by_id[gold_of[example.context]],
                [by_id[passage_id] for passage_id in search(example.question, num_passages)],
                solved,
                budget,
            )
            for example in examples
        ),
        strict=True,
    )
    results: dict[str, Any] = {}
    completions: dict[str, list[str]] = {}
    for condition in CONDITIONS:
        texts = [example_prompts[condition].text for example_prompts in prompts]
        completions[condition] = [completion.strip() for completion in generate(texts, max_new_tokens, STOP_STRINGS)]
        results[condition] = _scores(examples, completions[condition], [p[condition] for p in prompts])
    gold_ids = [gold_of[example.context] for example in examples]
    results["retrieved"]["hit_rate"] = _percent(
        gold_id in {passage.id for passage in p["retrieved"].passages} for gold_id, p in zip(gold_ids, prompts)
    )
    results["gold"]["gold_cut"] = _percent(
        not p["gold"].passages or p["gold"].passages[0].text != example.context for example, p in zip(examples, prompts)
    )
    results.update(
        examples=len(examples),
        num_passages=num_passages,
        shots=sum(shots_kept) / len(examples),
        samples=[
            {
                "question": example.question,
                "answers": list(example.answers),
                "retrieved_passages": [passage.id for passage in p["retrieved"].passages],
                "gold_passage": gold_id,
                "completions": {condition: completions[condition][i] for condition in CONDITIONS},
            }
            for i, (example, p, gold_id) in enumerate(zip(examples[:NUM_SAMPLES], prompts, gold_ids))
        ],
    )
    return results


def _percent(values: Iterable[float]) -> float:
    """The mean of 0/1 flags or scores in [0, 1], in percent."""
    values = list(values)
    return 100.0 * sum(values) / len(values)


def _scores(
    examples: Sequence[tasks.QaExample], completions: Sequence[str], prompts: Sequence[GroundedPrompt]
) -> dict[str, float]:
    references = [example.answers for example in examples]
    return {
        "exact_match": _percent(map(text_metrics.exact_match, completions, references)),
        "f1": _percent(map(text_metrics.token_f1, completions, references)),
        "passages": sum(len(prompt.passages) for prompt in prompts) / len(prompts),
    }
