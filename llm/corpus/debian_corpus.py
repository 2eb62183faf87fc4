"""The embedded default Spanish corpus: six Debian packages of Spanish text, fetched without root.

`apt-get download` fetches each `.deb` into a cache directory and `dpkg-deb -x` unpacks it there; nothing is
installed system-wide and a re-run reuses the cache. Each package has its own extractor that turns its
format into plain Spanish documents:

  sword-text-sparv       Reina-Valera 1909 Bible, a SWORD zText module read with struct + zlib; one
                         document per chapter.
  fortunes-es            fortune databases (entries between `%` lines), grouped into documents.
  libreoffice-help-es    LibreOffice help pages (HTML).
  lilypond-doc-html-es   LilyPond manuals, Spanish pages only (`*.es.html`).
  manpages-es            manual pages, rendered to text by groff.
  debian-reference-es    the Debian Reference (HTML).

Every document carries metadata `source` (the package) and `licence` (read from the package's DEP-5
`copyright` file); Bible documents also carry `archaic_orthography: True` so that the cleaning stage
modernises the 1909 spelling for that source only. Extraction walks files in sorted order, so document ids
are stable across runs.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from llm.corpus.document import Document
from llm.corpus.html_text import html_to_text

# A fortune entry is one quotation or proverb (~15 words); alone it is too short for the quality filters
# (word count, n-gram statistics) and a whole file (refranes: 5,000 entries) would make one document
# dominate. 20 consecutive entries of one file give ~1.5 KB / ~250 words, the size of a short web page.
FORTUNES_PER_DOCUMENT = 20

# LibreOffice pages hold per-platform and per-application variants of some sentences, all hidden but the
# one its JavaScript picks; the unclassed default variant is kept, these alternatives are dropped.
_LIBREOFFICE_VARIANT_CLASSES = frozenset(
    {"MAC", "WIN", "UNIX", "WRITER", "CALC", "IMPRESS", "DRAW", "CHART", "MATH", "BASE", "BASIC"}
)

# groff: man macros, tbl, UTF-8 in and out, no colour/bold/underline escapes (-P-cbou), no hyphenation
# (HY=0: hyphens at line ends would split words), ragged right (AD=l: no padding spaces), one page
# (cR=1), and lines long enough that a paragraph stays on one line.
_GROFF = ["groff", "-man", "-t", "-Kutf-8", "-Tutf8", "-P-cbou", "-rHY=0", "-dAD=l", "-rcR=1", "-rLL=2000n"]
# tbl draws table borders with box-drawing characters (U+2500-U+257F); prose never uses them.
_BOX_DRAWING = re.compile(r"[\u2500-\u257f]")


class DebianCorpusError(RuntimeError):
    """The embedded corpus cannot be fetched or read; the message says what to do instead."""


@dataclasses.dataclass(frozen=True)
class Package:
    """A Debian package of the default corpus.

    `licence` summarises the package's copyright file for the README and the model card; `licence_files`
    is the DEP-5 `Files:` pattern of the paragraph whose `License:` covers the text we extract.
    """

    name: str
    description: str
    licence: str
    licence_files: str = "*"


PACKAGES: dict[str, Package] = {
    p.name: p
    for p in (
        Package("sword-text-sparv", "Reina-Valera 1909 Bible (SWORD module)", "public-domain"),
        Package(
            "fortunes-es",
            "Spanish quotations and proverbs for fortune(6); the packager presumes "
            "the quotations public domain, the package is GPL-2+",
            "GPL-2+",
        ),
        Package("libreoffice-help-es", "LibreOffice help pages in Spanish", "MPL-2.0"),
        Package(
            "lilypond-doc-html-es",
            "LilyPond music engraver manuals, Spanish pages",
            "GFDL-1.3+",
            licence_files="Documentation/*",
        ),
        Package("manpages-es", "Spanish translations of manual pages", "GPL-3+"),
        Package("debian-reference-es", "Debian Reference, Spanish translation", "GPL-2+"),
    )
}
DEFAULT_PACKAGES: tuple[str, ...] = tuple(PACKAGES)

_NO_APT_HINT = (
    "Pass your own corpus instead: --config.sources.paths=DIR_OR_FILES (plain text, JSONL or Parquet), "
    "--config.sources.tfds_name=NAME or --config.sources.hf_name=NAME."
)


def fetch_package(name: str, cache_dir: str | Path) -> Path:
    """Downloads and unpacks one package under `cache_dir`, once; returns the root of the unpacked tree."""
    cache = Path(cache_dir).expanduser()
    root = cache / name
    if root.is_dir():  # only ever created by an atomic rename of a complete unpack
        return root
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise DebianCorpusError(
            f"The embedded default corpus is fetched with apt-get and dpkg-deb; this machine lacks "
            f"{' and '.join(missing)}. {_NO_APT_HINT}"
        )
    cache.mkdir(parents=True, exist_ok=True)
    debs = sorted(cache.glob(f"{name}_*.deb"))
    if not debs:
        # Download into a fresh directory and move the file in whole, so an interrupted download never
        # leaves a truncated .deb where the next run would take it for a good one.
        with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
            result = subprocess.run(["apt-get", "download", name], cwd=tmp, capture_output=True, text=True)
            downloaded = sorted(Path(tmp).glob(f"{name}_*.deb"))
            if result.returncode != 0 or not downloaded:
                raise DebianCorpusError(
                    f"`apt-get download {name}` failed (exit {result.returncode}): {result.stderr.strip()}\n"
                    f"If the package lists are empty, run `apt-get update` (as root) and retry. "
                    f"{_NO_APT_HINT}"
                )
            debs = [downloaded[-1].rename(cache / downloaded[-1].name)]
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=f".{name}-"))
    result = subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(staging)], capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(staging)
        raise DebianCorpusError(
            f"`dpkg-deb -x {debs[-1]}` failed: {result.stderr.strip()}\nDelete that file and run again."
        )
    try:
        staging.rename(root)
    except OSError:  # another process unpacked the same package first: use its tree
        shutil.rmtree(staging)
        if not root.is_dir():
            raise
    return root


def read_licence(root: Path, package: Package) -> str:
    """Returns the `License:` short name that the package's DEP-5 copyright file gives its text."""
    path = root / "usr/share/doc" / package.name / "copyright"
    if not path.is_file():
        raise DebianCorpusError(f"{path}: missing; cannot tell the licence of {package.name}")
    # A DEP-5 file is paragraphs of `Field: value` lines; continuation lines start with whitespace.
    for paragraph in re.split(r"\n[ \t]*\n", path.read_text(encoding="utf-8")):
        files = re.search(r"^Files:(.*(?:\n[ \t].*)*)", paragraph, re.MULTILINE)
        licence = re.search(r"^License:[ \t]*(\S.*)$", paragraph, re.MULTILINE)
        if files and licence and package.licence_files in files.group(1).split():
            return licence.group(1).strip()
    raise DebianCorpusError(f"{path}: no paragraph with `Files: {package.licence_files}` and a License field")


# ------------------------------------------------------------------------------------------------ extractors
# Each yields (id within the package, text, extra metadata) from the root of the unpacked tree.
Extracted = Iterator[tuple[str, str, dict[str, Any]]]


def _files(base: Path, pattern: str) -> list[Path]:
    """Regular files under `base` matching `pattern`, sorted; symlinks (aliases, duplicates) excluded."""
    return sorted(p for p in base.glob(pattern) if p.is_file() and not p.is_symlink())


def _osis_text(element: ElementTree.Element) -> Iterator[str]:
    """The reading text of an OSIS fragment: word and added-word text, without titles."""
    if element.tag != "title" and element.text:
        yield element.text
    previous = None
    for child in element:
        if previous is not None and not previous.tail and "transChange" in (previous.tag, child.tag):
            yield " "  # the module omits the space between an added word and the word next to it
        yield from _osis_text(child)
        if child.tail:
            yield child.tail
        previous = child


def _sword_entries(data_dir: Path, testament: str) -> Iterator[str]:
    """The OSIS markup of every index entry of one testament of a zText module, in canonical order.

    zText layout: `.bzs` lists the zlib-compressed blocks (offset, compressed size, size: 3 x uint32 LE)
    stored back to back in `.bzz`; `.bzv` has one entry per index slot (block number, offset in the
    uncompressed block: uint32 LE; size: uint16 LE). Slots cover module, testament, book and chapter
    headings and then the verses, in canonical order; empty slots have size 0.
    """
    blocks = list(struct.iter_unpack("<III", (data_dir / f"{testament}.bzs").read_bytes()))
    compressed = (data_dir / f"{testament}.bzz").read_bytes()
    current, block = -1, b""
    for number, offset, size in struct.iter_unpack("<IIH", (data_dir / f"{testament}.bzv").read_bytes()):
        if size == 0:
            continue
        if number != current:  # entries run through each block in order: keep one block decompressed
            start, length, _ = blocks[number]
            current, block = number, zlib.decompress(compressed[start : start + length])
        yield block[offset : offset + size].decode("utf-8")


def _sword_module_dir(root: Path) -> Path:
    """The data directory of the zText module declared in the package's `mods.d/*.conf`."""
    confs = _files(root / "usr/share/sword/mods.d", "*.conf")
    if not confs:
        raise DebianCorpusError(f"{root}/usr/share/sword/mods.d: no SWORD module .conf file")
    conf = dict(re.findall(r"^(\w+)=(.*)$", confs[0].read_text(encoding="utf-8"), re.MULTILINE))
    if conf.get("ModDrv", "").lower() != "ztext" or conf.get("CompressType", "ZIP").upper() != "ZIP":
        raise DebianCorpusError(f"{confs[0]}: expected ModDrv=zText with CompressType=ZIP, found {conf}")
    return root / "usr/share/sword" / conf["DataPath"].strip()


def _extract_sword(root: Path) -> Extracted:
    """One document per chapter, one verse per line; the OSIS milestones in the text name book/chapter."""
    data_dir = _sword_module_dir(root)
    book, chapter_id, metadata, lines = "", None, {}, []
    for testament in ("ot", "nt"):
        if not (data_dir / f"{testament}.bzv").exists():
            continue
        for markup in _sword_entries(data_dir, testament):
            fragment = ElementTree.fromstring(f"<entry>{markup}</entry>")
            for element in fragment.iter():
                if element.tag == "milestone" and element.get("type") == "x-usfm-h":
                    book = element.get("n", "")
                elif element.tag == "chapter" and element.get("sID"):
                    if chapter_id is not None:
                        yield chapter_id, "\n".join(lines), metadata
                        lines = []
                    chapter_id = element.get("osisID", element.get("sID"))
                    metadata = {
                        "book": book,
                        "chapter": int(chapter_id.rsplit(".", 1)[-1]),
                        "archaic_orthography": True,
                    }
            verse = " ".join("".join(_osis_text(fragment)).split())
            if verse:
                lines.append(verse)
    if chapter_id is not None:
        yield chapter_id, "\n".join(lines), metadata


def _extract_fortunes(root: Path) -> Extracted:
    """Groups of FORTUNES_PER_DOCUMENT entries of each fortune database.

    A database is a file with a `.dat` index beside it, as `fortune` itself finds them. The `off/`
    subdirectory (the package's own offensive set, shown by `fortune` only with -o) is left out.
    """
    base = root / "usr/share/games/fortunes/es"
    for path in _files(base, "*"):
        if not path.with_name(path.name + ".dat").exists():
            continue
        entries = []
        for entry in re.split(r"^%[ \t]*$", path.read_text(encoding="utf-8"), flags=re.MULTILINE):
            text = "\n".join(line.strip() for line in entry.strip("\n").splitlines()).strip()
            if text:
                entries.append(text)
        for group, start in enumerate(range(0, len(entries), FORTUNES_PER_DOCUMENT)):
            text = "\n\n".join(entries[start : start + FORTUNES_PER_DOCUMENT])
            yield f"{path.name.removesuffix('.fortunes')}:{group}", text, {}


def _html_pages(base: Path, pages: Iterable[Path], skip_classes: Collection[str] = ()) -> Extracted:
    for path in pages:
        text = html_to_text(path.read_text(encoding="utf-8"), skip_classes)
        yield str(path.relative_to(base)), text, {}


def _extract_libreoffice(root: Path) -> Extracted:
    base = root / "usr/share/libreoffice/help/es"
    return _html_pages(base, _files(base, "text/**/*.html"), _LIBREOFFICE_VARIANT_CLASSES)


def _extract_lilypond(root: Path) -> Extracted:
    # `*-big-page.es.html` repeat a whole manual on one page: the split pages already hold that text.
    base = root / "usr/share/doc/lilypond/html/Documentation"
    pages = [p for p in _files(base, "**/*.es.html") if not p.name.endswith("-big-page.es.html")]
    return _html_pages(base, pages)


def _extract_debian_reference(root: Path) -> Extracted:
    base = root / "usr/share/debian-reference"
    return _html_pages(base, _files(base, "*.es.html"))


def render_man_page(source: str, name: str = "<man page>") -> str:
    """Renders man(7) source to plain text with groff; drops the page header and footer lines."""
    if shutil.which("groff") is None:
        raise DebianCorpusError(
            "manpages-es needs groff to render man pages: install it (`apt-get install groff-base`) or drop "
            "manpages-es from --config.sources.debian_packages."
        )
    result = subprocess.run(_GROFF, input=source.encode("utf-8"), capture_output=True)
    if result.returncode != 0:
        raise DebianCorpusError(f"{name}: groff failed: {result.stderr.decode('utf-8', 'replace').strip()}")
    text = re.sub(r".\x08", "", result.stdout.decode("utf-8"))  # any overstrike that slipped through
    text = _BOX_DRAWING.sub(" ", text)
    # Strip indentation and collapse the column gaps of tagged paragraphs ("-c     con -lt: ...").
    lines = [" ".join(line.split()) for line in text.splitlines()]
    content = [i for i, line in enumerate(lines) if line]
    # With continuous rendering groff prints the title line once at the top and the footer once at the end.
    body = lines[content[0] + 1 : content[-1]] if len(content) > 2 else []
    return re.sub(r"\n{3,}", "\n\n", "\n".join(body)).strip()


def _extract_manpages(root: Path) -> Extracted:
    base = root / "usr/share/man/es"
    for path in _files(base, "man*/*"):
        raw = path.read_bytes()
        source = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
        page = str(path.relative_to(base)).removesuffix(".gz")
        yield page, render_man_page(source, name=str(path)), {}


_EXTRACTORS: dict[str, Callable[[Path], Extracted]] = {
    "sword-text-sparv": _extract_sword,
    "fortunes-es": _extract_fortunes,
    "libreoffice-help-es": _extract_libreoffice,
    "lilypond-doc-html-es": _extract_lilypond,
    "manpages-es": _extract_manpages,
    "debian-reference-es": _extract_debian_reference,
}


def extract_package(root: Path, name: str) -> Iterator[Document]:
    """Documents of one unpacked package tree (`root` holds its `usr/`); empty pages are left out."""
    package = PACKAGES[name]
    licence = read_licence(root, package)
    if licence != package.licence:
        logging.warning("%s: copyright now says %r, PACKAGES says %r: update PACKAGES", name, licence, package.licence)
    for local_id, text, extra in _EXTRACTORS[name](root):
        if text.strip():
            yield Document(f"{name}:{local_id}", text, {"source": name, "licence": licence, **extra})


def load_debian_corpus(cache_dir: str, packages: Sequence[str] = DEFAULT_PACKAGES) -> Iterator[Document]:
    """Yields the documents of the default corpus, fetching the packages into `cache_dir` on first use."""
    unknown = [name for name in packages if name not in PACKAGES]
    if unknown:
        raise ValueError(f"sources.debian_packages: unknown package(s) {unknown}; known: {list(PACKAGES)}")
    for name in packages:
        yield from extract_package(fetch_package(name, cache_dir), name)
