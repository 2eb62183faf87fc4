"""Answer normalization and scores for Spanish: exact match, token F1, final-number extraction, and
BLEU / chrF / ROUGE through their reference implementations (sacrebleu, rouge-score).

Normalization follows SQuAD's evaluation script, adapted to Spanish: lowercase, drop every punctuation
character (Unicode category P*, so ¿ ¡ « » — … are included), drop the articles el la los las un una unos
unas, collapse whitespace. Accents are kept: "él" and "el" are different words.
"""

from __future__ import annotations

import collections
import re
import unicodedata
from collections.abc import Sequence

import sacrebleu
from rouge_score import rouge_scorer

SPANISH_ARTICLES = frozenset({"el", "la", "los", "las", "un", "una", "unos", "unas"})
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

# A number: an optional sign, then either digit groups of exactly three after a 1-3 digit head, joined by a
# thousands separator ("." "," or a space: 1.000, 1,000, 1 000), or a plain run of digits; then an optional
# decimal part after "," or ".". The head "0" never starts a thousands group ("0,125" is a decimal).
_NUMBER = re.compile(r"(?<![\d.,])(-?)((?:[1-9]\d{0,2})(?:[.,\u00a0\u202f ]\d{3})+(?!\d)|\d+)(?:[.,](\d+))?")


def normalize_answer(text: str) -> str:
    """SQuAD-style normalization for Spanish (see the module docstring)."""
    text = unicodedata.normalize("NFC", text).lower()
    text = "".join(" " if unicodedata.category(char).startswith("P") else char for char in text)
    return " ".join(word for word in text.split() if word not in SPANISH_ARTICLES)


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized reference, else 0.0."""
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(reference) for reference in references))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """Best token-overlap F1 of the normalized prediction against the references (SQuAD definition)."""
    return max(_f1(normalize_answer(prediction).split(), normalize_answer(ref).split()) for ref in references)


def _f1(predicted: list[str], reference: list[str]) -> float:
    if not predicted or not reference:
        return float(predicted == reference)  # both empty: a match; one empty: nothing in common
    common = sum((collections.Counter(predicted) & collections.Counter(reference)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def extract_final_number(text: str) -> float | None:
    """The last number in a completion ("... la respuesta es 1.000." -> 1000.0); None if it has none."""
    matches = list(_NUMBER.finditer(text))
    return _value(matches[-1]) if matches else None


def _value(match: re.Match) -> float:
    sign, integer, decimals = match.groups()
    digits = re.sub(r"\D", "", integer)
    return float(f"{sign}{digits}.{decimals}" if decimals else f"{sign}{digits}")


def numbers_equal(predicted: float | None, reference: float) -> bool:
    return predicted is not None and abs(predicted - reference) <= 1e-6 * max(1.0, abs(reference))


class _SpanishRougeTokenizer:
    """rouge-score's default tokenizer keeps only [a-z0-9], which would split "acción" into "acci n"."""

    def tokenize(self, text: str) -> list[str]:
        return normalize_answer(text).split()


def overlap_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu) and mean ROUGE-1/2/L F-measure (rouge-score), on a 0-100 scale.

    Items may have several references: sacrebleu takes them as parallel reference streams (an item with
    fewer repeats its first one, which changes nothing), ROUGE takes the best reference per item.
    """
    if len(predictions) != len(references) or not predictions:
        raise ValueError(
            f"overlap_metrics needs as many predictions as reference lists, and at least one "
            f"(got {len(predictions)} and {len(references)})."
        )
    if any(not refs for refs in references):
        raise ValueError("Every prediction needs at least one reference.")
    num_streams = max(len(refs) for refs in references)
    streams = [[refs[i] if i < len(refs) else refs[0] for refs in references] for i in range(num_streams)]
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=_SpanishRougeTokenizer())
    rouge = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, refs in zip(predictions, references):
        scores = scorer.score_multi(list(refs), prediction)
        for name in ROUGE_TYPES:
            rouge[name] += scores[name].fmeasure
    return {
        "bleu": sacrebleu.corpus_bleu(list(predictions), streams).score,
        "chrf": sacrebleu.corpus_chrf(list(predictions), streams).score,
        **{name: 100.0 * total / len(predictions) for name, total in rouge.items()},
    }
