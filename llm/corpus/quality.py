"""FineWeb-2-style quality filters for Spanish text (the Gopher heuristics with Spanish words and stop words).

Every measure is a small pure function; `QualityThresholds.reason` applies them in order and returns the
stable reason key of the first one that fails ("quality.mean_word_length", ...), or None to keep the text.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import string

from llm.corpus.document import Document, Dropped

# Marks stripped from both ends of a whitespace token: ASCII punctuation plus the Spanish opening marks,
# guillemets, typographic quotes, dashes and the ellipsis, so "¿Qué", "«casa»," and "—Dijo" are the words
# "Qué", "casa" and "Dijo".
_PUNCTUATION = string.punctuation + "¿¡«»“”‘’‚„‹›—–‐…·•"

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_LETTER = re.compile(r"[^\W\d_]")  # A Unicode letter: a word character that is not a digit or "_".

# Frequent Spanish function words (articles, prepositions, pronouns, conjunctions, auxiliaries, adverbs),
# lower case. Running Spanish prose uses several of them in any sentence; lists, tables and keyword spam
# do not. Both "más" and the unaccented archaic "mas" (but) are listed.
SPANISH_STOP_WORDS = frozenset(
    [
        "a",
        "al",
        "algo",
        "algunos",
        "ante",
        "antes",
        "aquel",
        "aquella",
        "aquí",
        "así",
        "aun",
        "aún",
        "bien",
        "cada",
        "como",
        "cómo",
        "con",
        "contra",
        "cual",
        "cuando",
        "de",
        "del",
        "desde",
        "donde",
        "dos",
        "e",
        "el",
        "él",
        "ella",
        "ellas",
        "ello",
        "ellos",
        "en",
        "entre",
        "era",
        "eran",
        "es",
        "esa",
        "ese",
        "eso",
        "esta",
        "está",
        "están",
        "este",
        "esto",
        "estos",
        "estas",
        "fue",
        "fueron",
        "ha",
        "han",
        "hasta",
        "hay",
        "la",
        "las",
        "le",
        "les",
        "lo",
        "los",
        "mas",
        "más",
        "me",
        "mi",
        "mí",
        "mientras",
        "mis",
        "mucho",
        "muy",
        "nada",
        "ni",
        "no",
        "nos",
        "nosotros",
        "o",
        "os",
        "otra",
        "otro",
        "para",
        "pero",
        "poco",
        "por",
        "porque",
        "pues",
        "que",
        "qué",
        "quien",
        "se",
        "sea",
        "ser",
        "si",
        "sí",
        "sin",
        "sobre",
        "son",
        "su",
        "sus",
        "también",
        "tan",
        "te",
        "tiene",
        "tienen",
        "todo",
        "todos",
        "tu",
        "tú",
        "un",
        "una",
        "uno",
        "unos",
        "y",
        "ya",
        "yo",
    ]
)


def _strip_punctuation(token: str) -> str:
    return token.strip(_PUNCTUATION)


def words(text: str) -> list[str]:
    """Whitespace tokens with surrounding punctuation removed; tokens that are only punctuation are skipped."""
    return list(filter(None, map(_strip_punctuation, text.split())))


def non_alpha_word_ratio(text: str) -> float:
    """Fraction of whitespace tokens without a single letter (numbers, symbols, separators)."""
    tokens = text.split()
    if not tokens:
        return 1.0
    with_letter = sum(map(bool, map(_LETTER.search, tokens)))  # map: no Python-level loop per token.
    return 1.0 - with_letter / len(tokens)


def duplicate_fractions(chunks: list[str]) -> tuple[float, float]:
    """(fraction of chunks that repeat an earlier chunk, fraction of characters in those repeats)."""
    if not chunks:
        return 0.0, 0.0
    seen: set[str] = set()
    repeats = repeated_chars = 0
    for chunk in chunks:
        if chunk in seen:
            repeats += 1
            repeated_chars += len(chunk)
        seen.add(chunk)
    return repeats / len(chunks), repeated_chars / max(1, sum(len(chunk) for chunk in chunks))


def lines(text: str) -> list[str]:
    """Non-empty lines, stripped."""
    return [line.strip() for line in text.split("\n") if line.strip()]


def paragraphs(text: str) -> list[str]:
    """Non-empty blank-line-separated paragraphs, stripped."""
    return [paragraph.strip() for paragraph in _PARAGRAPH_BREAK.split(text) if paragraph.strip()]


def top_ngram_char_fraction(lowered_words: list[str], n: int, total_chars: int) -> float:
    """Share of the `total_chars` word characters covered by the most frequent word n-gram, counting each
    occurrence. A text that repeats one phrase ("compra ya compra ya ...") scores high; an n-gram seen only
    once scores 0."""
    counts = collections.Counter(zip(*(lowered_words[i:] for i in range(n))))
    if not counts:
        return 0.0
    ngram, count = counts.most_common(1)[0]
    if count < 2:
        return 0.0
    return count * sum(map(len, ngram)) / max(1, total_chars)


def stop_word_count(lowered_words: list[str]) -> int:
    """Number of distinct Spanish stop words in the text."""
    return len(SPANISH_STOP_WORDS.intersection(lowered_words))


@dataclasses.dataclass(frozen=True)
class QualityThresholds:
    """The limits of every filter; built from the `quality` section of the data config."""

    min_words: int
    max_words: int
    min_mean_word_length: float
    max_mean_word_length: float
    max_non_alpha_word_ratio: float
    max_duplicate_line_fraction: float
    max_duplicate_line_char_fraction: float
    max_duplicate_paragraph_fraction: float
    max_duplicate_paragraph_char_fraction: float
    max_top_2gram_char_fraction: float
    max_top_3gram_char_fraction: float
    max_top_4gram_char_fraction: float
    min_stop_words: int

    def reason(self, text: str) -> str | None:
        """The reason key of the first failing filter, cheapest first, or None when the text passes."""
        text_words = words(text)
        if len(text_words) < self.min_words:
            return "quality.too_few_words"
        if len(text_words) > self.max_words:
            return "quality.too_many_words"
        total_chars = sum(map(len, text_words))
        mean_length = total_chars / len(text_words)
        if not self.min_mean_word_length <= mean_length <= self.max_mean_word_length:
            return "quality.mean_word_length"
        if non_alpha_word_ratio(text) > self.max_non_alpha_word_ratio:
            return "quality.non_alpha_words"
        lowered = [word.lower() for word in text_words]
        if stop_word_count(lowered) < self.min_stop_words:
            return "quality.few_stop_words"
        line_fraction, line_char_fraction = duplicate_fractions(lines(text))
        if line_fraction > self.max_duplicate_line_fraction:
            return "quality.duplicate_lines"
        if line_char_fraction > self.max_duplicate_line_char_fraction:
            return "quality.duplicate_line_chars"
        paragraph_fraction, paragraph_char_fraction = duplicate_fractions(paragraphs(text))
        if paragraph_fraction > self.max_duplicate_paragraph_fraction:
            return "quality.duplicate_paragraphs"
        if paragraph_char_fraction > self.max_duplicate_paragraph_char_fraction:
            return "quality.duplicate_paragraph_chars"
        for n, limit in (
            (2, self.max_top_2gram_char_fraction),
            (3, self.max_top_3gram_char_fraction),
            (4, self.max_top_4gram_char_fraction),
        ):
            if top_ngram_char_fraction(lowered, n, total_chars) > limit:
                return f"quality.top_{n}gram"
        return None


def quality_stage(doc: Document, *, thresholds: QualityThresholds) -> Document | Dropped:
    """Document stage: keeps the document unchanged, or drops it with the first failing filter's key."""
    reason = thresholds.reason(doc.text)
    return doc if reason is None else Dropped(doc.id, reason)
