"""Input perturbations for robustness: the same task inputs with typos, or written without accents.

  typos       each word of 3+ letters gets, with probability TYPO_RATE, one typo: two adjacent letters
              swapped or one letter dropped (seeded per example; digits are never touched, so MGSM
              problems keep their numbers)
  no_accents  á é í ó ú ü à è ... lose their accent marks, as when typing on a keyboard without them;
              ñ is kept: it is a letter of its own in Spanish, not an accented n ("año" is not "ano")

Only what the model reads is perturbed (premise and hypothesis, tweet, math question, XQuAD question):
answers, labels and shots stay clean. The XQuAD passage stays clean so the gold answer is still in it.
"""

from __future__ import annotations

import dataclasses
import random
import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import TypeVar

from llm.eval import tasks

T = TypeVar("T")
PERTURBATIONS = ("typos", "no_accents")
TYPO_RATE = 0.15
_WORD = re.compile(r"[^\W\d_]{3,}")  # runs of 3+ letters
_COMBINING_TILDE = "\u0303"
PERTURBED_FIELDS = {
    tasks.NliExample: ("premise", "hypothesis"),
    tasks.SentimentExample: ("text",),
    tasks.MathExample: ("question",),
    tasks.QaExample: ("question",),
}


def add_typos(text: str, rng: random.Random, rate: float = TYPO_RATE) -> str:
    """`text` with a swap or drop of letters in about `rate` of its words."""

    def typo(match: re.Match) -> str:
        word = match.group()
        if rng.random() >= rate:
            return word
        i = rng.randrange(len(word) - 1)
        if rng.random() < 0.5:
            return word[:i] + word[i + 1] + word[i] + word[i + 2 :]  # swap letters i and i + 1
        return word[:i] + word[i + 1 :]  # drop letter i

    return _WORD.sub(typo, text)


def strip_accents(text: str) -> str:
    """`text` without accent marks (acute, grave, diaeresis, circumflex...); ñ and Ñ stay."""
    decomposed = unicodedata.normalize("NFD", text)
    kept = []
    for i, char in enumerate(decomposed):
        is_enye_tilde = char == _COMBINING_TILDE and i > 0 and decomposed[i - 1] in "nN"
        # Only the combining diacritics block: other marks (emoji variation selectors) are not accents.
        if not "\u0300" <= char <= "\u036f" or is_enye_tilde:
            kept.append(char)
    return unicodedata.normalize("NFC", "".join(kept))


def perturbation(kind: str, seed: int) -> Callable[[int, str], str]:
    """(example index, text) -> perturbed text; typos are seeded by (seed, index), so runs repeat."""
    if kind == "typos":
        return lambda index, text: add_typos(text, random.Random(f"{seed}:{index}"))
    if kind == "no_accents":
        return lambda index, text: strip_accents(text)
    raise ValueError(f"Unknown perturbation {kind!r}; expected one of {PERTURBATIONS}.")


def perturb_examples(examples: Sequence[T], kind: str, seed: int) -> list[T]:
    """Copies of the examples with their model-read fields (PERTURBED_FIELDS) perturbed."""
    perturb = perturbation(kind, seed)
    return [
        dataclasses.replace(
            example, **{name: perturb(index, getattr(example, name)) for name in PERTURBED_FIELDS[type(example)]}
        )
        for index, example in enumerate(examples)
    ]


def drop(clean: dict[str, float], perturbed: dict[str, float], metrics: Sequence[str]) -> dict[str, float]:
    """clean - perturbed for each metric (positive: the perturbation hurt)."""
    return {metric: clean[metric] - perturbed[metric] for metric in metrics}
