"""Spanish sentence boundaries: pysbd's Spanish rules, with the few abbreviations it still splits after.

pysbd keeps "EE. UU.", "a. C.", "S.A.", decimals (3,5 / 3.5), ellipses, ¿...? ¡...! and quotes together, but
ends a sentence after a title or abbreviation followed by a capital ("el Sr. García", "la Dra. López",
"p. ej.") because its Spanish list marks them as possible sentence ends. The words in `NEVER_FINAL` always
precede what they qualify (a name, a number, "ej."), so a sentence never ends on them: a split after one is
undone.
"""

from __future__ import annotations

import functools

import pysbd

# Lower-cased words that precede a name or number and so never end a sentence.
NEVER_FINAL = frozenset(
    [
        "sr.",
        "sra.",
        "srta.",
        "sres.",
        "sras.",
        "dr.",
        "dra.",
        "dres.",
        "d.",
        "dña.",
        "ud.",
        "uds.",
        "vd.",
        "vds.",
        "prof.",
        "profa.",
        "lic.",
        "ing.",
        "arq.",
        "p.",
        "núm.",
        "nro.",
        "art.",
        "arts.",
        "pág.",
        "págs.",
        "cap.",
        "vol.",
        "fig.",
        "av.",
        "avda.",
        "c/.",
        "tel.",
        "excmo.",
        "excma.",
        "ilmo.",
        "ilma.",
        "sto.",
        "sta.",
        "mons.",
        "gral.",
        "cnel.",
        "tte.",
        "cía.",
    ]
)


@functools.cache
def _segmenter() -> pysbd.Segmenter:
    return pysbd.Segmenter(language="es", clean=False, char_span=True)


def _ends_on_title(text: str) -> bool:
    words = text.split()
    return bool(words) and words[-1].lower() in NEVER_FINAL


def sentence_spans(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """The (start, end) character spans of the sentences of `text[start:end]`, in `text`'s coordinates,
    without surrounding whitespace."""
    end = len(text) if end is None else end
    piece = text[start:end]
    spans: list[tuple[int, int]] = []
    for span in _segmenter().segment(piece) if piece.strip() else []:
        if piece[span.start : span.end] != span.sent:  # pysbd's own spans must map back; say so if not
            raise ValueError(f"pysbd span {span.start}:{span.end} does not match its sentence {span.sent!r}")
        if spans and _ends_on_title(piece[spans[-1][0] : spans[-1][1]]):
            spans[-1] = (spans[-1][0], span.end)
        else:
            spans.append((span.start, span.end))
    return [_strip(text, start + s, start + e) for s, e in spans if piece[s:e].strip()]


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end
