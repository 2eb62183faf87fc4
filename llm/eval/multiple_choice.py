"""Multiple-choice tasks scored by log-likelihood: the model picks the answer it finds most probable.

Each item is a context and a few candidate continuations; the prediction is the continuation with the
highest total log-likelihood given the context (the harness' `acc`). XNLI-es and 3-way sentiment are built
from the templates of `tasks.py`, zero-shot or with k solved shots in front.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from llm.eval import tasks
from llm.eval.scoring import Loglikelihood


@dataclasses.dataclass(frozen=True)
class MultipleChoiceItem:
    context: str
    choices: tuple[str, ...]
    label: int


def predict(items: Sequence[MultipleChoiceItem], loglikelihood: Loglikelihood) -> list[int]:
    """The index of the most likely choice of each item (all choices of all items in one batched call)."""
    requests = [(item.context, choice) for item in items for choice in item.choices]
    scores = loglikelihood(requests)
    predictions, offset = [], 0
    for item in items:
        item_scores = scores[offset : offset + len(item.choices)]
        predictions.append(max(range(len(item.choices)), key=item_scores.__getitem__))
        offset += len(item.choices)
    return predictions


def macro_f1(labels: Sequence[int], predictions: Sequence[int], num_classes: int) -> float:
    """Unweighted mean over classes of F1 (a class never predicted nor present scores 0)."""
    total = 0.0
    for cls in range(num_classes):
        true_positive = sum(1 for y, p in zip(labels, predictions) if y == cls and p == cls)
        predicted = sum(1 for p in predictions if p == cls)
        actual = sum(1 for y in labels if y == cls)
        total += 2 * true_positive / (predicted + actual) if predicted + actual else 0.0
    return total / num_classes


def evaluate(items: Sequence[MultipleChoiceItem], loglikelihood: Loglikelihood) -> dict[str, Any]:
    """accuracy, macro_f1 and chance (1 / number of choices) in percent, and the predicted-class histogram."""
    if not items:
        raise ValueError("No multiple-choice items to evaluate.")
    num_classes = len(items[0].choices)
    predictions = predict(items, loglikelihood)
    labels = [item.label for item in items]
    return {
        "accuracy": 100.0 * sum(p == y for p, y in zip(predictions, labels)) / len(items),
        "macro_f1": 100.0 * macro_f1(labels, predictions, num_classes),
        "chance": 100.0 / num_classes,
        "examples": len(items),
        # A model that always answers the same class has accuracy near chance: the histogram shows it.
        "predicted": [predictions.count(cls) for cls in range(num_classes)],
    }


def xnli_items(examples: Sequence[tasks.NliExample], shots: Sequence[tasks.NliExample]) -> list[MultipleChoiceItem]:
    solved = [tasks.xnli_query(shot) + tasks.xnli_answer(shot, shot.label) for shot in shots]
    return [
        MultipleChoiceItem(
            context=tasks.with_shots("", solved, tasks.xnli_query(example)),
            choices=tuple(tasks.xnli_answer(example, label) for label in range(len(tasks.XNLI_ANSWERS))),
            label=example.label,
        )
        for example in examples
    ]


def sentiment_items(
    examples: Sequence[tasks.SentimentExample], shots: Sequence[tasks.SentimentExample]
) -> list[MultipleChoiceItem]:
    solved = [tasks.sentiment_query(shot) + tasks.sentiment_answer(shot.label) for shot in shots]
    choices = tuple(tasks.sentiment_answer(label) for label in range(len(tasks.SENTIMENT_ANSWERS)))
    return [
        MultipleChoiceItem(
            tasks.with_shots(tasks.SENTIMENT_INSTRUCTION, solved, tasks.sentiment_query(example)),
            choices,
            example.label,
        )
        for example in examples
    ]
