"""A configurable Spanish offensive-word filter: drop documents where slurs and profanity are too frequent.

Words are compared after lower-casing and removing accents (so "MARICÓN", "maricon" and
"Maricón" are one word); "ñ" is kept because it is a different letter ("coño" is not "cono").
A single swear word in a long text is normal Spanish and is kept: only the fraction of offensive words
against a threshold decides. Extra words come from the config or from a file (one word per line, "#"
starts a comment).
"""

from __future__ import annotations

import pathlib
import re
import unicodedata
from collections.abc import Iterable

from llm.corpus.document import Document, Dropped

_WORD = re.compile(r"\w+")
# Combining acute, grave, diaeresis and circumflex: removed after decomposition. The tilde of "ñ" is not
# among them, so "ñ" comes back whole when the text is recomposed.
_FOLDED_MARKS = ("\u0301", "\u0300", "\u0308", "\u0302")

# Built-in list, in folded form: common Spanish profanity and slurs of Spain and Latin America. Words whose
# ordinary meaning is innocent ("zorra" vixen, "perra" dog, "concha" shell, "pinche" kitchen boy, "verga"
# yard of a mast, "polla" young hen, "capullo" bud, "mamón" a fruit, "culo" in refranes) are left out, so
# texts about animals, the sea, cooking or the Bible are not counted.
BUILTIN_OFFENSIVE_WORDS = frozenset(
    [
        "puta",
        "putas",
        "puto",
        "putos",
        "putada",
        "hijoputa",
        "hijoputas",
        "hijueputa",
        "malparido",
        "malparida",
        "mierda",
        "mierdas",
        "coño",
        "cojones",
        "joder",
        "jodido",
        "jodida",
        "jodidos",
        "gilipollas",
        "gilipollez",
        "cabron",
        "cabrona",
        "cabrones",
        "pendejo",
        "pendeja",
        "pendejos",
        "pendejada",
        "chingar",
        "chingada",
        "chingado",
        "chingados",
        "culero",
        "culera",
        "culeros",
        "follar",
        "follando",
        "carajo",
        "marica",
        "maricon",
        "maricones",
        "maricona",
        "bollera",
        "bolleras",
        "sudaca",
        "sudacas",
        "negrata",
        "subnormal",
        "subnormales",
    ]
)


def fold(text: str) -> str:
    """The comparison form of text: lower case, accents removed, "ñ" kept ("MARICÓN" -> "maricon")."""
    # Decompose, drop the marks, recompose: three C-speed passes, several times faster than str.translate.
    decomposed = unicodedata.normalize("NFD", text.lower())
    for mark in _FOLDED_MARKS:
        decomposed = decomposed.replace(mark, "")
    return unicodedata.normalize("NFC", decomposed)


def _folded_word(entry: str, where: str) -> str:
    """`entry` folded, or a ValueError naming `where` when it is not a single word (it could never match)."""
    if not _WORD.fullmatch(entry):
        raise ValueError(f"{where}: expected a single word (letters and digits only), got {entry!r}")
    return fold(entry)


def load_word_list(path: str | pathlib.Path) -> frozenset[str]:
    """Read extra offensive words, one per line; blank lines and "#" comments are skipped."""
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: offensive word list is not UTF-8: {err}") from err
    entries = set()
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if entry:
            entries.add(_folded_word(entry, f"{path}:{number}"))
    return frozenset(entries)


def offensive_words(extra_words: Iterable[str] = (), words_file: str = "") -> frozenset[str]:
    """The built-in list plus the extra words and the words of `words_file` (if given), folded."""
    extra = {_folded_word(word, "config offensive.extra_words") for word in extra_words}
    from_file = load_word_list(words_file) if words_file else frozenset()
    return BUILTIN_OFFENSIVE_WORDS | extra | from_file


def offensive_fraction(text: str, offensive: frozenset[str]) -> float:
    """Fraction of the words of `text` that are in `offensive`; words are whole runs of letters and digits,
    so "¡Joder!" counts and "joderse" or "computadora" do not."""
    text_words = _WORD.findall(fold(text))
    if not text_words:
        return 0.0
    return sum(map(offensive.__contains__, text_words)) / len(text_words)


def offensive_stage(doc: Document, *, offensive: frozenset[str], max_fraction: float) -> Document | Dropped:
    """Document stage: drops the document as "offensive.too_many" when the fraction exceeds `max_fraction`."""
    if offensive_fraction(doc.text, offensive) > max_fraction:
        return Dropped(doc.id, "offensive.too_many")
    return doc
