"""HTML to plain text for corpus extraction, with the stdlib `html.parser`.

Keeps what a reader reads as prose: headings, paragraphs, list items, table cells, and inline code words
(`<code>ls</code>` inside a sentence stays). Drops what a language model should not learn from: scripts,
styles, code listings (`<pre>`), navigation and page chrome (`<nav>`, `<header>`, `<footer>`, `<aside>`,
forms), and elements whose class or id marks them as navigation (`navheader`, `nav_table`, `toc`, `menu`...),
which is how the DocBook, Texinfo and LibreOffice generators mark theirs.

Output: one paragraph per block element, paragraphs separated by a blank line, whitespace inside a paragraph
collapsed to single spaces (HTML rendering rules), line breaks kept for `<br>`, list items and table rows.
"""

from __future__ import annotations

import html.parser
import re
from collections.abc import Collection

# Elements whose whole subtree is skipped. `pre` holds code listings and program output; the rest is page
# machinery or chrome rather than text.
SKIPPED_TAGS = frozenset(
    {
        "script",
        "style",
        "pre",
        "nav",
        "header",
        "footer",
        "aside",
        "head",
        "noscript",
        "template",
        "form",
        "button",
        "select",
        "textarea",
        "svg",
        "math",
        "iframe",
        "object",
    }
)

# Class/id words that mark navigation. Class names are split on whitespace, "_" and "-" so that "nav_table",
# "toc_header" or "footer_version" match, while "table-contents" (DocBook's real tables) does not.
NAVIGATION_WORDS = frozenset(
    {
        "nav",
        "navheader",
        "navfooter",
        "navigation",
        "navbar",
        "toc",
        "menu",
        "breadcrumb",
        "breadcrumbs",
        "sidebar",
        "footer",
        "header",
    }
)

# Elements that end a paragraph; everything else is inline and flows into the surrounding text.
_PARAGRAPH_TAGS = frozenset(
    {
        "p",
        "div",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "blockquote",
        "table",
        "ul",
        "ol",
        "dl",
        "section",
        "article",
        "main",
        "figure",
        "figcaption",
        "caption",
        "address",
        "center",
        "fieldset",
        "details",
        "summary",
        "hr",
        "body",
        "html",
    }
)
# Elements that end a line but not a paragraph: a list item or a table row is one line of its block.
_LINE_TAGS = frozenset({"br", "li", "dt", "dd", "tr"})
# Table cells of one row stay on one line, separated by a space.
_CELL_TAGS = frozenset({"td", "th"})
# Elements that never have content or an end tag (HTML spec), so they can never open a skipped region.
_VOID_TAGS = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
)

_PARAGRAPH_BREAK = "\x00P"  # sentinels, resolved in `_layout`; NUL cannot occur in parsed HTML text
_LINE_BREAK = "\x00L"
_WHITESPACE = re.compile(r"\s+")
_WORD_SPLIT = re.compile(r"[\s_\-]+")


class _TextExtractor(html.parser.HTMLParser):
    """Collects text, skipping whole subtrees; tracks only the element that opened the current skip."""

    def __init__(self, skip_classes: Collection[str]):
        super().__init__(convert_charrefs=True)
        self._skip_classes = frozenset(skip_classes)
        self._skip_tag: str | None = None  # tag that opened the skipped subtree we are in
        self._skip_depth = 0  # nesting of `_skip_tag` inside itself (e.g. <div> in a skipped <div>)
        self.parts: list[str] = []

    def _is_skipped(self, tag: str, attrs: list[tuple[str, str | None]]) -> bool:
        if tag in SKIPPED_TAGS:
            return True
        for name, value in attrs:
            if name in ("class", "id") and value:
                if name == "class" and self._skip_classes.intersection(value.split()):
                    return True
                if NAVIGATION_WORDS.intersection(_WORD_SPLIT.split(value.lower())):
                    return True
        return False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skip_tag is not None:
            if tag == self._skip_tag:
                self._skip_depth += 1
            return
        if tag not in _VOID_TAGS and self._is_skipped(tag, attrs):
            self._skip_tag, self._skip_depth = tag, 1
            return
        self._break(tag)

    def handle_endtag(self, tag: str) -> None:
        if self._skip_tag is not None:
            if tag == self._skip_tag:
                self._skip_depth -= 1
                if self._skip_depth == 0:
                    self._skip_tag = None
            return
        self._break(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # XHTML `<br/>`, `<a id="x"/>`: an empty element, never opens a skipped region.
        if self._skip_tag is None:
            self._break(tag)

    def handle_data(self, data: str) -> None:
        if self._skip_tag is None:
            self.parts.append(data)

    def _break(self, tag: str) -> None:
        if tag in _PARAGRAPH_TAGS:
            self.parts.append(_PARAGRAPH_BREAK)
        elif tag in _LINE_TAGS:
            self.parts.append(_LINE_BREAK)
        elif tag in _CELL_TAGS:
            self.parts.append(" ")


def _layout(parts: list[str]) -> str:
    """Joins text parts into paragraphs: collapse whitespace, then apply the break sentinels."""
    paragraphs = []
    for block in "".join(parts).split(_PARAGRAPH_BREAK):
        lines = (_WHITESPACE.sub(" ", line).strip() for line in block.split(_LINE_BREAK))
        paragraph = "\n".join(line for line in lines if line)
        if paragraph:
            paragraphs.append(paragraph)
    return "\n\n".join(paragraphs)


def html_to_text(markup: str, skip_classes: Collection[str] = ()) -> str:
    """Returns the readable text of an HTML page: paragraphs separated by blank lines.

    Args:
      markup: the HTML (or XHTML) source.
      skip_classes: extra class names whose elements are dropped, for generator-specific markup (e.g.
        LibreOffice's per-platform variants of a sentence).
    """
    parser = _TextExtractor(skip_classes)
    parser.feed(markup)
    parser.close()
    return _layout(parser.parts)
