"""Decontamination: whether a training text shares a long word n-gram with an evaluation text.

Texts are compared as `words`: NFC, case-folded, punctuation dropped (a word is a run of letters, digits or
`_`), so spacing, case and punctuation do not hide a copy; accents are kept. A training text is contaminated
when it contains any `n`-word sequence (13 by default, as GPT-3's decontamination) of an evaluation text.
Exact n-gram look-ups have no threshold to tune and catch a copied stretch wherever it starts; paraphrases
and copies shorter than `n` words pass, as in every n-gram decontamination.

Evaluation sets are files, one set per file, named by the file's stem (`xquad_es.json` -> "xquad_es"); the
texts of a file are read by its format, without knowing the task:

  .json     every string value (SQuAD-style files: titles, contexts, questions, answers)
  .jsonl    the "text" string of every line
  .tsv      every field of every line (premise and hypothesis, question and answer)
  .conllu   the `# text = ...` sentence lines
  other     plain text, one evaluation text per line

`SHIPPED_EVAL_FILES` are the evaluation sets shipped in llm/eval/data that the project scores models on (the
sentiment train split is left out: fitting on it is allowed). This module sits below the corpus pipeline and
the fine-tuning data builders so that both use it; it finds the shipped files by path, not through llm.eval.
"""

from __future__ import annotations

import functools
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from llm.io import SourceError, jsonl_objects

DEFAULT_NGRAM = 13
EVAL_DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "eval", "data")
SHIPPED_EVAL_FILES = tuple(
    os.path.join(EVAL_DATA_DIR, name)
    for name in (
        "xquad_es.json",
        "xnli_es_test.tsv",
        "mgsm_es.tsv",
        "sentiment_es_val_text.txt",
        "sentiment_es_test_text.txt",
        "ud_gsd_es_dev.conllu",
    )
)
_WORD = re.compile(r"\w+")
_CONLLU_TEXT = "# text = "


def words(text: str) -> list[str]:
    """The normalised words of a text: NFC, case-folded, punctuation and spacing dropped."""
    return _WORD.findall(unicodedata.normalize("NFC", text).casefold())


def _ngrams(text_words: Sequence[str], n: int) -> Iterator[str]:
    # Joined into one string: smaller than a tuple of words, and pickles compactly to worker processes.
    return (" ".join(text_words[i : i + n]) for i in range(len(text_words) - n + 1))


class NgramIndex:
    """The word n-grams of named evaluation sets; `match` names the set a text shares an n-gram with."""

    def __init__(self, eval_sets: Mapping[str, Iterable[str]], n: int = DEFAULT_NGRAM):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"decontamination n-gram length must be an integer >= 1, got {n!r}.")
        self.n = n
        self.names = list(eval_sets)
        self.ngram_counts: dict[str, int] = {}
        # n-gram -> index of the first set (in the given order) that holds it.
        self._sets: dict[str, int] = {}
        for index, (name, texts) in enumerate(eval_sets.items()):
            ngrams = {ngram for text in texts for ngram in _ngrams(words(text), n)}
            self.ngram_counts[name] = len(ngrams)
            for ngram in ngrams:
                self._sets.setdefault(ngram, index)

    def match(self, text: str) -> str | None:
        """The name of the evaluation set holding the text's first n-gram found in the index, else None."""
        for ngram in _ngrams(words(text), self.n):
            index = self._sets.get(ngram)
            if index is not None:
                return self.names[index]
        return None

    def summary(self) -> dict[str, Any]:
        """What the texts were checked against, for reports."""
        return {"ngram": self.n, "eval_sets": dict(self.ngram_counts)}


def set_name(path: str) -> str:
    """The evaluation set a file holds: its name without directory and extension ("xquad_es")."""
    return os.path.basename(path).split(".", 1)[0]


def _json_strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _json_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _json_strings(item)


def _jsonl_texts(path: str, lines: list[str]) -> Iterator[str]:
    for number, record in jsonl_objects(path, lines):
        if not isinstance(record.get("text"), str):
            raise SourceError(f'{path}:{number}: expected a JSON object with a "text" string.')
        yield record["text"]


def read_eval_texts(path: str) -> list[str]:
    """The evaluation texts of one file, read by its extension (see the module docstring)."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8-sig") as f:
            content = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"Evaluation file {path!r} does not exist.") from None
    except UnicodeDecodeError as error:
        raise SourceError(f"{path}: not UTF-8 text (byte {error.start}).") from None
    lines = content.splitlines()
    if path.endswith(".json"):
        try:
            return list(_json_strings(json.loads(content)))
        except json.JSONDecodeError as error:
            raise SourceError(f"{path}:{error.lineno}: not valid JSON ({error.msg}).") from None
    if path.endswith(".jsonl"):
        return list(_jsonl_texts(path, lines))
    if path.endswith(".tsv"):
        return [field for line in lines for field in line.split("\t")]
    if path.endswith(".conllu"):
        return [line[len(_CONLLU_TEXT) :] for line in lines if line.startswith(_CONLLU_TEXT)]
    return lines


def eval_files(shipped: bool, extra: str | Sequence[str]) -> tuple[str, ...]:
    """The shipped evaluation files (if `shipped`) and the `extra` ones (a comma-separated string or a list)."""
    extra_files = [path.strip() for path in (extra.split(",") if isinstance(extra, str) else extra) if path.strip()]
    files = (*(SHIPPED_EVAL_FILES if shipped else ()), *(os.path.expanduser(path) for path in extra_files))
    names = [set_name(path) for path in files]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"Evaluation files {list(files)} give the set name(s) {repeated} twice; rename a file.")
    return files


@functools.cache
def load_index(files: tuple[str, ...], n: int = DEFAULT_NGRAM) -> NgramIndex:
    """The n-gram index of the evaluation `files` (cached: every builder and worker reads them once)."""
    return NgramIndex({set_name(path): read_eval_texts(path) for path in files}, n)
