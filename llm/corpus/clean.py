"""Text cleaning: Unicode NFC, control characters, leftover HTML, boilerplate lines and whitespace; plus the
archaic-orthography normalizer for the Reina-Valera 1909 Bible.

Each step is a small pure function of the text; `clean_stage` and `archaic_stage` wrap them as document
stages (llm/corpus/stages.py builds them from the `clean` section of the data config).
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Sequence

from llm.corpus.document import Document, Dropped
from llm.corpus.html_text import html_to_text

# Line breaks other than "\n" (Windows "\r\n", old Mac "\r", vertical tab, form feed, NEL, Unicode line and
# paragraph separators) become "\n" before control characters are removed, so no line break is lost.
_LINE_BREAKS = re.compile(r"\r\n?|[\x0b\x0c\x85\u2028\u2029]")
# C0/C1 control characters except "\t" and "\n", plus invisible format characters that split words in two for
# the tokenizer and the filters: soft hyphen, zero-width space and the byte-order mark.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u200b\ufeff]")
# Unicode space separators (no-break, thin, ideographic...) become plain spaces. After
# `remove_control_characters` these and " ", "\t", "\n" are the only whitespace left.
_UNICODE_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_SPACE_RUNS = re.compile(" {2,}")
_EXTRA_BLANK_LINES = re.compile(r"\n{3,}")
# Something that looks like an HTML tag or comment, or an HTML entity.
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>|<!--")
_HTML_ENTITY = re.compile(r"&(?:[A-Za-z][A-Za-z0-9]{1,31}|#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6});")


def normalize_unicode(text: str) -> str:
    """Compose to NFC, so "á" is one code point whatever the source used (the tokenizer expects NFC)."""
    return unicodedata.normalize("NFC", text)


def remove_control_characters(text: str) -> tuple[str, int]:
    """Turn every kind of line break into "\\n" and drop other control characters; returns (text, dropped)."""
    return _CONTROL.subn("", _LINE_BREAKS.sub("\n", text))


def normalize_whitespace(text: str) -> str:
    """Collapse runs of spaces, strip both ends of every line and keep at most one blank line between
    paragraphs, so paragraph breaks survive but layout noise does not. Expects control characters and
    exotic line breaks already handled by `remove_control_characters`."""
    text = _SPACE_RUNS.sub(" ", _UNICODE_SPACES.sub(" ", text))
    text = "\n".join(line.strip(" \t") for line in text.split("\n"))
    return _EXTRA_BLANK_LINES.sub("\n\n", text).strip()


def strip_html(text: str) -> tuple[str, bool]:
    """Remove leftover HTML; returns (text, whether it had markup).

    Text with tags is HTML: it goes through the corpus HTML parser (llm/corpus/html_text.py, which drops
    scripts, styles and navigation and lays out paragraphs). Text with entities but no tags is plain text
    with escapes: only the entities are decoded, so its line layout is kept. Text with neither is returned
    unparsed, so a literal "<" or "&" in prose costs nothing and is kept.
    """
    if _HTML_TAG.search(text):
        return html_to_text(text), True
    if _HTML_ENTITY.search(text):
        return html.unescape(text), True
    return text, False


def compile_boilerplate(patterns: Sequence[str]) -> re.Pattern[str]:
    """One regex that finds any of `patterns` in a line ("^" and "$" anchor the line).

    It is matched against the lower-cased line, so patterns are written in lower case: that is about twice
    as fast as a case-insensitive regex, and it runs on every short line of every document.
    """
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"config clean.boilerplate_patterns: invalid regex {pattern!r}: {err}") from err
    return re.compile("|".join(f"(?:{p})" for p in patterns))


def remove_boilerplate_lines(text: str, boilerplate: re.Pattern[str], max_words: int) -> tuple[str, int]:
    """Drop lines that match `boilerplate` and have at most `max_words` words; returns (text, lines dropped).

    The word limit keeps a real paragraph that merely mentions, say, cookies or a privacy policy, and it
    spares the regex the long lines that make up most prose.
    """
    lines = text.split("\n")
    kept = [line for line in lines if len(line.split()) > max_words or not boilerplate.search(line.lower())]
    return "\n".join(kept), len(lines) - len(kept)


def clean_text(
    text: str, *, strip_markup: bool, boilerplate: re.Pattern[str] | None, boilerplate_max_words: int
) -> tuple[str, dict[str, int]]:
    """All cleaning steps in order; returns the clean text and what each step did (for the report)."""
    nfc = normalize_unicode(text)
    stats = {"nfc": int(nfc != text)}
    text, stats["control_chars"] = remove_control_characters(nfc)
    had_html = False
    if strip_markup:
        text, had_html = strip_html(text)
    stats["html"] = int(had_html)
    stats["boilerplate_lines"] = 0
    if boilerplate is not None:
        text, stats["boilerplate_lines"] = remove_boilerplate_lines(text, boilerplate, boilerplate_max_words)
    return normalize_whitespace(text), stats


def clean_stage(
    doc: Document, *, strip_markup: bool, boilerplate: re.Pattern[str] | None, boilerplate_max_words: int
) -> Document | Dropped:
    """Document stage: cleans the text, records the step counts in metadata["clean"], drops empty results."""
    text, stats = clean_text(
        doc.text, strip_markup=strip_markup, boilerplate=boilerplate, boilerplate_max_words=boilerplate_max_words
    )
    if not text:
        return Dropped(doc.id, "clean.empty")
    return doc.replace(text=text, metadata={**doc.metadata, "clean": stats})


# Reina-Valera 1909 spells monosyllables and the one-letter conjunctions/prepositions with an accent that
# modern Spanish (RAE 1959/2010) dropped. Only words whose accent is never written today are listed, so the
# diacritic accents of modern Spanish (él, tú, mí, sí, sé, dé, más, aún, qué...) are left alone.
_ARCHAIC_SPELLINGS = {
    "fué": "fue",
    "fuí": "fui",
    "dió": "dio",
    "vió": "vio",
    "dí": "di",
    "ví": "vi",
    "tí": "ti",
    "pié": "pie",
    "há": "ha",
    "á": "a",
    "é": "e",
    "ó": "o",
    "ú": "u",
}
_ARCHAIC_WORD = re.compile(r"(?<!\w)(?:" + "|".join(_ARCHAIC_SPELLINGS) + r")(?!\w)", re.IGNORECASE)
# The 1909 text opens chapters with the first word in capitals ("EN el principio", "Y ACONTECIÓ en los días",
# "PABLO, siervo de Jesucristo"): an all-caps word followed by a lower-case word. All-caps phrases such as the
# inscription "ESTE ES JESUS EL REY DE LOS JUDIOS" are not followed by lower case and stay as they are.
_UPPER = "A-ZÁÉÍÓÚÜÑ"
_CAPS_OPENING = re.compile(rf"(?<!\w)([{_UPPER}])([{_UPPER}]+)(?!\w)(?=[,;:]?\s+[a-záéíóúüñ])")


def _modern_spelling(match: re.Match[str]) -> str:
    word = match.group()
    modern = _ARCHAIC_SPELLINGS[word.lower()]
    if word.isupper() and len(word) > 1:
        return modern.upper()
    return modern.capitalize() if word[0].isupper() else modern


def normalize_archaic(text: str) -> tuple[str, int]:
    """Modernize Reina-Valera 1909 orthography; returns (text, number of replacements).

    "Y dijo Dios: Sea la luz: y fué la luz." -> "Y dijo Dios: Sea la luz: y fue la luz."
    "EN el principio crió Dios" -> "En el principio crió Dios"; "dijo á Noé" -> "dijo a Noé".
    """
    text, capitals = _CAPS_OPENING.subn(lambda m: m.group(1) + m.group(2).lower(), text)
    text, words = _ARCHAIC_WORD.subn(_modern_spelling, text)
    return text, capitals + words


def archaic_stage(doc: Document) -> Document:
    """Document stage: modernizes spelling only where metadata says `archaic_orthography: True`."""
    if not doc.metadata.get("archaic_orthography"):
        return doc
    text, replacements = normalize_archaic(doc.text)
    return doc.replace(text=text, metadata={**doc.metadata, "archaic_replacements": replacements})
