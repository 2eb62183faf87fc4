"""The Spanish evaluation sets: readers, held-out shot pools and the Spanish prompt templates.

Files ship with the package in `llm/eval/data/` (see its README for sources and licences), or come from any
directory given as `data_dir`. Shots never come from the examples that are scored:

  xnli       test only: the first XNLI_SHOT_POOL pairs are the shot pool, the rest are scored
  sentiment  shots from the train split, test split scored
  mgsm       test only: the first MGSM_SHOT_POOL problems are the shot pool, the rest are scored
  xquad      test only: the questions of the first article are the shot pool, the other articles scored

Prompts (shots are the same template with the answer filled in, separated by a blank line):

  xnli       "{premise}, ¿verdad? {Sí|Además|No}, {hypothesis}"  (entailment / neutral / contradiction)
  sentiment  "Tuit: {text}\nSentimiento: {Negativo|Neutro|Positivo}"
  mgsm       "Pregunta: {question}\nRespuesta: {number}"
  xquad      "Contexto: {context}\nPregunta: {question}\nRespuesta: {answer}"
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
XNLI_FILE = "xnli_es_test.tsv"
MGSM_FILE = "mgsm_es.tsv"
XQUAD_FILE = "xquad_es.json"
SENTIMENT_SPLITS = ("train", "val", "test")
XNLI_SHOT_POOL = 30  # 10 premises x their 3 hypotheses: every label appears
MGSM_SHOT_POOL = 8

XNLI_ANSWERS = ("Sí", "Además", "No")  # labels 0 entailment, 1 neutral, 2 contradiction
SENTIMENT_ANSWERS = ("Negativo", "Neutro", "Positivo")  # labels 0, 1, 2
SENTIMENT_INSTRUCTION = "Clasifica el sentimiento de cada tuit como Negativo, Neutro o Positivo."
MGSM_INSTRUCTION = "Resuelve cada problema y da la respuesta numérica."
QA_INSTRUCTION = "Responde a cada pregunta con un fragmento del contexto."
SHOT_SEPARATOR = "\n\n"


@dataclasses.dataclass(frozen=True)
class NliExample:
    premise: str
    hypothesis: str
    label: int


@dataclasses.dataclass(frozen=True)
class SentimentExample:
    text: str
    label: int


@dataclasses.dataclass(frozen=True)
class MathExample:
    question: str
    answer: int


@dataclasses.dataclass(frozen=True)
class QaExample:
    context: str
    question: str
    answers: tuple[str, ...]
    id: str


def data_file(data_dir: str, name: str) -> str:
    path = os.path.join(data_dir, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Evaluation file {path!r} does not exist; pass --data_dir=DIR, a directory with "
            f"the files of llm/eval/data (see its README)."
        )
    return path


def _lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}).") from error


def _label(path: str, line: int, value: str, num_labels: int) -> int:
    if value.strip() not in {str(label) for label in range(num_labels)}:
        raise ValueError(f"{path}:{line}: label {value!r} is not one of 0..{num_labels - 1}.")
    return int(value)


def read_xnli(path: str) -> list[NliExample]:
    """`premise<TAB>hypothesis<TAB>label` rows after a header line."""
    rows = _lines(path)
    if not rows or rows[0].split("\t") != ["premise", "hypothesis", "label"]:
        raise ValueError(f"{path}:1: expected the header 'premise<TAB>hypothesis<TAB>label'.")
    examples = []
    for line, row in enumerate(rows[1:], start=2):
        fields = row.split("\t")
        if len(fields) != 3:
            raise ValueError(f"{path}:{line}: expected 3 tab-separated fields, got {len(fields)}.")
        examples.append(NliExample(fields[0], fields[1], _label(path, line, fields[2], len(XNLI_ANSWERS))))
    return examples


def read_sentiment(data_dir: str, split: str) -> list[SentimentExample]:
    """`sentiment_es_{split}_text.txt` and `..._labels.txt`: one tweet and one label per line."""
    if split not in SENTIMENT_SPLITS:
        raise ValueError(f"Sentiment split {split!r} is not one of {SENTIMENT_SPLITS}.")
    text_path = data_file(data_dir, f"sentiment_es_{split}_text.txt")
    label_path = data_file(data_dir, f"sentiment_es_{split}_labels.txt")
    texts, labels = _lines(text_path), _lines(label_path)
    if len(texts) != len(labels):
        raise ValueError(f"{text_path} has {len(texts)} lines but {label_path} has {len(labels)}.")
    return [
        SentimentExample(text, _label(label_path, line, label, len(SENTIMENT_ANSWERS)))
        for line, (text, label) in enumerate(zip(texts, labels), start=1)
    ]


def read_mgsm(path: str) -> list[MathExample]:
    """`question<TAB>answer` rows, no header; answers are integers, possibly with "," thousands (2,125)."""
    examples = []
    for line, row in enumerate(_lines(path), start=1):
        fields = row.split("\t")
        if len(fields) != 2:
            raise ValueError(f"{path}:{line}: expected 'question<TAB>answer', got {len(fields)} fields.")
        answer = fields[1].strip().replace(",", "")
        if not answer.lstrip("-").isdigit():
            raise ValueError(f"{path}:{line}: answer {fields[1]!r} is not an integer.")
        examples.append(MathExample(fields[0], int(answer)))
    return examples


def read_xquad(path: str) -> list[list[QaExample]]:
    """SQuAD v1.1 JSON; one list of questions per article (the article is the unit of the shot pool)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        articles = []
        for article in data["data"]:
            questions = []
            for paragraph in article["paragraphs"]:
                context = paragraph["context"].lstrip("\ufeff")  # a few contexts start with a byte-order mark
                for qa in paragraph["qas"]:
                    answers = tuple(answer["text"] for answer in qa["answers"])
                    if not answers:
                        raise ValueError(f"{path}: question {qa['id']!r} has no answer.")
                    questions.append(QaExample(context, qa["question"], answers, qa["id"]))
            articles.append(questions)
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a SQuAD v1.1 JSON file ({type(error).__name__}: {error}).") from error
    return articles


def load_xnli(data_dir: str) -> tuple[list[NliExample], list[NliExample]]:
    """(shot pool, scored examples)."""
    examples = read_xnli(data_file(data_dir, XNLI_FILE))
    return examples[:XNLI_SHOT_POOL], examples[XNLI_SHOT_POOL:]


def load_sentiment(data_dir: str) -> tuple[list[SentimentExample], list[SentimentExample]]:
    """(shot pool = train split, scored examples = test split)."""
    return read_sentiment(data_dir, "train"), read_sentiment(data_dir, "test")


def load_mgsm(data_dir: str) -> tuple[list[MathExample], list[MathExample]]:
    examples = read_mgsm(data_file(data_dir, MGSM_FILE))
    return examples[:MGSM_SHOT_POOL], examples[MGSM_SHOT_POOL:]


def load_xquad(data_dir: str) -> tuple[list[QaExample], list[QaExample]]:
    articles = read_xquad(data_file(data_dir, XQUAD_FILE))
    return articles[0], [question for article in articles[1:] for question in article]


def subsample(examples: Sequence[T], max_examples: int, seed: int) -> list[T]:
    """A seeded random subset of at most `max_examples` (all if <= 0), in the original order."""
    if max_examples <= 0 or max_examples >= len(examples):
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), max_examples))
    return [examples[i] for i in keep]


def choose_shots(pool: Sequence[T], k: int, seed: int, label_of: Callable[[T], int] | None = None) -> list[T]:
    """k seeded examples from the pool; with `label_of`, labels take turns so every class is shown."""
    if k > len(pool):
        raise ValueError(f"{k} shots requested but the shot pool has only {len(pool)} examples.")
    shuffled = list(pool)
    random.Random(seed).shuffle(shuffled)
    if label_of is None:
        return shuffled[:k]
    by_label: dict[int, list[T]] = {}
    for example in shuffled:
        by_label.setdefault(label_of(example), []).append(example)
    queues = [by_label[label] for label in sorted(by_label)]
    shots: list[T] = []
    while len(shots) < k:
        for queue in queues:
            if queue and len(shots) < k:
                shots.append(queue.pop(0))
    return shots


def with_shots(instruction: str, shots: Sequence[str], query: str) -> str:
    """The prompt: optional instruction, solved shots, then the query, separated by blank lines."""
    return SHOT_SEPARATOR.join([part for part in (instruction, *shots) if part] + [query])


def xnli_query(example: NliExample) -> str:
    return f"{example.premise.rstrip().rstrip('.')}, ¿verdad?"


def xnli_answer(example: NliExample, label: int) -> str:
    return f" {XNLI_ANSWERS[label]}, {example.hypothesis}"


def sentiment_query(example: SentimentExample) -> str:
    return f"Tuit: {example.text}\nSentimiento:"


def sentiment_answer(label: int) -> str:
    return f" {SENTIMENT_ANSWERS[label]}"


def mgsm_query(example: MathExample) -> str:
    return f"Pregunta: {example.question}\nRespuesta:"


def xquad_query(example: QaExample) -> str:
    return f"Contexto: {example.context}\nPregunta: {example.question}\nRespuesta:"
