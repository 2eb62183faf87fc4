"""The embedded Debian corpus on crafted package trees (no download): each extractor, licences, the cache."""

import gzip
import os
import shutil
import struct
import subprocess
import zlib

import pytest

from llm.corpus import debian_corpus
from llm.corpus.debian_corpus import DebianCorpusError, extract_package, fetch_package, load_debian_corpus
from llm.corpus.html_text import html_to_text


def write_copyright(root, package, paragraphs):
    doc = root / "usr/share/doc" / package
    doc.mkdir(parents=True)
    header = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
    body = "\n".join(
        f"Files: {files}\nCopyright: someone\nLicense: {licence}\n some text\n" for files, licence in paragraphs
    )
    (doc / "copyright").write_text(header + "\n" + body, encoding="utf-8")


def ids_and_texts(docs):
    return [(d.id, d.text) for d in docs]


# --- SWORD zText: the Reina-Valera 1909 ---------------------------------------------------------------------


def write_ztext(data_dir, testament, entries, per_block):
    """Writes a zText testament like osis2mod does: `per_block` index entries per zlib block."""
    bzs, bzv, bzz = b"", b"", b""
    for first in range(0, len(entries), per_block):
        block = b""
        for markup in entries[first : first + per_block]:
            data = markup.encode("utf-8")
            bzv += struct.pack("<IIH", first // per_block, len(block), len(data))
            block += data
        compressed = zlib.compress(block)
        bzs += struct.pack("<III", len(bzz), len(compressed), len(block))
        bzz += compressed
    for suffix, data in (("bzs", bzs), ("bzv", bzv), ("bzz", bzz)):
        (data_dir / f"{testament}.{suffix}").write_bytes(data)


def book_heading(osis, name):
    return (
        f'<div osisID="{osis}" sID="b{osis}" type="book"/> <milestone n="{name}" type="x-usfm-h"/> '
        f'<title level="1" type="main">{name}</title>'
    )


def chapter_heading(osis):
    return f'<chapter n="{osis.split(".")[1]}" osisID="{osis}" sID="{osis}"/>'


@pytest.fixture
def sword_root(tmp_path):
    root = tmp_path / "sword-text-sparv"
    sword = root / "usr/share/sword"
    data_dir = sword / "modules/texts/ztext/tiny"
    data_dir.mkdir(parents=True)
    (sword / "mods.d").mkdir()
    (sword / "mods.d/tiny.conf").write_text(
        "[Tiny]\nDataPath=./modules/texts/ztext/tiny/\nModDrv=zText\nCompressType=ZIP\nEncoding=UTF-8\n"
    )
    # Index slots as in the real module: module heading (empty), testament heading, book heading, chapter
    # heading, verses...
    ot = [
        "",
        '<milestone type="x-importer" n="test"/>',
        book_heading("Gen", "Génesis"),
        chapter_heading("Gen.1"),
        '<w lemma="strong:H7225">EN el principio</w> <w lemma="strong:H1254">crió</w> Dios los cielos.',
        '<w>Y la tierra</w> <w>estaba</w><transChange type="added">desordenada</transChange><w>y vacía</w>.',
        chapter_heading("Gen.2"),
        "<w>Y fueron acabados</w> los cielos y la tierra.",
    ]
    nt = [
        "",
        "",
        book_heading("Matt", "San Mateo"),
        chapter_heading("Matt.1"),
        "<w>LIBRO</w> de la generación de Jesucristo.",
    ]
    write_ztext(data_dir, "ot", ot, per_block=3)  # chapters cross block boundaries
    write_ztext(data_dir, "nt", nt, per_block=10)
    write_copyright(root, "sword-text-sparv", [("*", "public-domain")])
    return root


def test_sword_one_document_per_chapter_with_book_and_chapter(sword_root):
    docs = list(extract_package(sword_root, "sword-text-sparv"))
    assert [d.id for d in docs] == ["sword-text-sparv:Gen.1", "sword-text-sparv:Gen.2", "sword-text-sparv:Matt.1"]
    # One verse per line; markup gone; the book title is a heading, not text; an added word gets its spaces.
    assert docs[0].text == "EN el principio crió Dios los cielos.\nY la tierra estaba desordenada y vacía."
    assert docs[1].text == "Y fueron acabados los cielos y la tierra."
    assert docs[0].metadata == {
        "source": "sword-text-sparv",
        "licence": "public-domain",
        "book": "Génesis",
        "chapter": 1,
        "archaic_orthography": True,
    }
    # The last chapter of a book keeps its book when the next book's heading follows it.
    assert [(d.metadata["book"], d.metadata["chapter"]) for d in docs] == [
        ("Génesis", 1),
        ("Génesis", 2),
        ("San Mateo", 1),
    ]


def test_sword_rejects_a_module_of_another_format(sword_root):
    conf = sword_root / "usr/share/sword/mods.d/tiny.conf"
    conf.write_text(conf.read_text().replace("zText", "RawText"))
    with pytest.raises(DebianCorpusError, match="tiny.conf: expected ModDrv=zText"):
        list(extract_package(sword_root, "sword-text-sparv"))


# --- fortunes -----------------------------------------------------------------------------------------------


def write_fortunes(path, entries):
    path.write_text("\n%\n".join(entries) + "\n%\n", encoding="utf-8")
    path.with_name(path.name + ".dat").write_bytes(b"strfile index")


def test_fortunes_grouped_and_offensive_set_left_out(tmp_path):
    root = tmp_path / "fortunes-es"
    base = root / "usr/share/games/fortunes/es"
    (base / "off").mkdir(parents=True)
    entries = [f"Refrán número {i}, que mucho abarca.\n\t\t-- Anónimo" for i in range(45)]
    write_fortunes(base / "refranes.fortunes", entries)
    write_fortunes(base / "off/racistas.fortunes", ["No debe salir."])
    (base / "notas.txt").write_text("Sin índice .dat: no es una base de fortunes.\n%\n")
    write_copyright(root, "fortunes-es", [("*", "GPL-2+")])

    docs = list(extract_package(root, "fortunes-es"))

    assert [d.id for d in docs] == [f"fortunes-es:refranes:{i}" for i in range(3)]
    first = docs[0].text.split("\n\n")
    assert len(first) == debian_corpus.FORTUNES_PER_DOCUMENT
    assert first[0] == "Refrán número 0, que mucho abarca.\n-- Anónimo"  # attribution kept, dedented
    assert len(docs[2].text.split("\n\n")) == 45 - 2 * debian_corpus.FORTUNES_PER_DOCUMENT
    assert all("No debe salir" not in d.text and "índice" not in d.text for d in docs)
    assert docs[0].metadata == {"source": "fortunes-es", "licence": "GPL-2+"}


# --- HTML ---------------------------------------------------------------------------------------------------

PAGE = """<!DOCTYPE html><html><head><title>Título repetido</title><style>p { color: red }</style></head>
<body>
<div class="navheader"><table><tr><td><a href="prev.html">Anterior</a></td></tr></table></div>
<nav><ul><li>Inicio</li><li>Índice</li></ul></nav>
<script>var menú = "no es texto";</script>
<h1>Capítulo 1. Órdenes básicas</h1>
<p>Para listar un directorio use <code>ls</code> con la opción
   <code>-l</code>; verá   los permisos.</p>
<pre class="screen">$ ls -l
total 0</pre>
<ul><li>¿Dónde está?</li><li>¡Aquí!</li></ul>
<table><tr><td>ñandú</td><td>ave</td></tr></table>
<p>Línea uno<br/>línea dos &amp; más</p>
<div class="navfooter">Siguiente</div>
</body></html>"""


def test_html_keeps_prose_and_inline_code_drops_listings_and_navigation():
    assert html_to_text(PAGE) == (
        "Capítulo 1. Órdenes básicas\n\n"
        "Para listar un directorio use ls con la opción -l; verá los permisos.\n\n"
        "¿Dónde está?\n¡Aquí!\n\n"
        "ñandú ave\n\n"
        "Línea uno\nlínea dos & más"
    )


def test_html_skipped_element_nested_in_itself_is_skipped_whole():
    markup = '<div class="toc"><div>uno</div><div>dos</div></div><p>Texto real.</p>'
    assert html_to_text(markup) == "Texto real."


def test_html_extra_skip_classes_choose_one_variant():
    markup = (
        '<p>Pulse <span hidden="true" class="MAC">Comando</span><span hidden="true">Ctrl</span> + F para buscar.</p>'
    )
    assert html_to_text(markup, skip_classes={"MAC"}) == "Pulse Ctrl + F para buscar."


def test_html_packages_pick_their_pages(tmp_path):
    lily = tmp_path / "lilypond-doc-html-es"
    docs_dir = lily / "usr/share/doc/lilypond/html/Documentation"
    (docs_dir / "learning").mkdir(parents=True)
    (docs_dir / "learning/tutorial.es.html").write_text("<p>Tutorial de LilyPond.</p>", encoding="utf-8")
    (docs_dir / "learning/tutorial.fr.html").write_text("<p>Tutoriel de LilyPond.</p>", encoding="utf-8")
    (docs_dir / "learning-big-page.es.html").write_text("<p>Tutorial de LilyPond.</p>", encoding="utf-8")
    (docs_dir / "learning/vacia.es.html").write_text("<script>x()</script>", encoding="utf-8")
    write_copyright(lily, "lilypond-doc-html-es", [("*", "GPL-3+"), ("Documentation/*", "GFDL-1.3+")])

    docs = list(extract_package(lily, "lilypond-doc-html-es"))

    # Only Spanish pages, not the big-page duplicate, not an empty page; the manuals' own licence.
    assert ids_and_texts(docs) == [("lilypond-doc-html-es:learning/tutorial.es.html", "Tutorial de LilyPond.")]
    assert docs[0].metadata["licence"] == "GFDL-1.3+"


def test_libreoffice_help_keeps_default_variant(tmp_path):
    root = tmp_path / "libreoffice-help-es"
    text_dir = root / "usr/share/libreoffice/help/es/text/swriter"
    text_dir.mkdir(parents=True)
    (text_dir / "buscar.html").write_text(
        '<header>Ayuda de LibreOffice</header><aside>Contenido</aside><p>Use <span hidden="true" class="MAC">'
        'Comando</span><span hidden="true">Ctrl</span> + F para buscar.</p>',
        encoding="utf-8",
    )
    (root / "usr/share/libreoffice/help/es/contents.js").write_text("document.write('x')")
    write_copyright(root, "libreoffice-help-es", [("*", "MPL-2.0")])

    docs = list(extract_package(root, "libreoffice-help-es"))

    assert ids_and_texts(docs) == [("libreoffice-help-es:text/swriter/buscar.html", "Use Ctrl + F para buscar.")]


# --- man pages ----------------------------------------------------------------------------------------------

MAN_PAGE = r""".\" -*- coding: UTF-8 -*-
.TH LS 1 "Septiembre de 2022" "GNU coreutils 9.1" "Órdenes de usuario"
.SH NOMBRE
ls \- lista el contenido de un directorio
.SH DESCRIPCIÓN
Muestra información de los \fBARCHIVOS\fP del directorio actual, una información
muy extensa que en una terminal de ochenta columnas ocuparía varias líneas y que
no debe partirse con guiones de separación silábica.
.TP
\fB\-a\fP, \fB\-\-all\fP
no oculta las entradas que comienzan con «.»
.SH "ESTADO DE SALIDA"
.TS
allbox;
l l.
Código	Significado
0	Éxito
.TE
"""


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed (apt-get install groff-base)")
def test_manpages_rendered_by_groff_to_plain_text(tmp_path):
    root = tmp_path / "manpages-es"
    man1 = root / "usr/share/man/es/man1"
    man1.mkdir(parents=True)
    (man1 / "ls.1.gz").write_bytes(gzip.compress(MAN_PAGE.encode("utf-8")))
    (man1 / "dir.1.gz").symlink_to("ls.1.gz")  # an alias: not a second document
    write_copyright(root, "manpages-es", [("*", "GPL-3+")])

    docs = list(extract_package(root, "manpages-es"))

    assert [d.id for d in docs] == ["manpages-es:man1/ls.1"]
    assert docs[0].text == (
        "NOMBRE\nls - lista el contenido de un directorio\n\n"
        "DESCRIPCIÓN\nMuestra información de los ARCHIVOS del directorio actual, una información muy "
        "extensa que en una terminal de ochenta columnas ocuparía varias líneas y que no debe partirse con "
        "guiones de separación silábica.\n\n-a, --all\nno oculta las entradas que comienzan con «.»\n\n"
        "ESTADO DE SALIDA\n\nCódigo Significado\n\n0 Éxito"
    )  # no page header/footer, no bold overstrikes, no hyphenation, no table borders, one line a paragraph
    assert docs[0].metadata == {"source": "manpages-es", "licence": "GPL-3+"}


# --- licences, packages, fetching ---------------------------------------------------------------------------


def test_licence_is_read_from_the_copyright_file(tmp_path):
    package = debian_corpus.PACKAGES["lilypond-doc-html-es"]
    write_copyright(tmp_path, package.name, [("*", "GPL-3+"), ("mf/*", "OFL-1.1"), ("Documentation/*", "GFDL-1.3+")])
    assert debian_corpus.read_licence(tmp_path, package) == "GFDL-1.3+"
    with pytest.raises(DebianCorpusError, match="copyright: missing"):
        debian_corpus.read_licence(tmp_path, debian_corpus.PACKAGES["manpages-es"])


def test_every_default_package_has_an_extractor_and_a_licence():
    assert set(debian_corpus.DEFAULT_PACKAGES) == set(debian_corpus._EXTRACTORS)
    assert all(p.licence and p.description for p in debian_corpus.PACKAGES.values())


def test_unknown_package_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown package.*'fortunes-fr'"):
        list(load_debian_corpus(str(tmp_path), ["fortunes-fr"]))


def test_without_apt_the_error_says_how_to_pass_own_files(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(DebianCorpusError, match=r"lacks apt-get and dpkg-deb.*--config\.sources\.paths="):
        fetch_package("fortunes-es", tmp_path / "cache")


def fake_apt_get(bin_dir, script, monkeypatch):
    """Puts first on PATH an `apt-get` that runs `script`; the real dpkg-deb (and tar) stay reachable."""
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(f"#!/bin/sh\n{script}\n")
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed")


@needs_dpkg
def test_empty_package_lists_error_says_apt_get_update(tmp_path, monkeypatch):
    fake_apt_get(tmp_path / "bin", 'echo "E: Unable to locate package $2" >&2; exit 100', monkeypatch)
    with pytest.raises(
        DebianCorpusError,
        match=r"(?s)Unable to locate package fortunes-es.*apt-get update.*"
        r"--config\.sources\.paths=",
    ):
        fetch_package("fortunes-es", tmp_path / "cache")


@needs_dpkg
def test_fetch_unpacks_a_real_deb_once_and_reuses_the_cache(tmp_path, monkeypatch):
    # A real .deb built from a fixture tree; the fake apt-get "downloads" it and logs each call.
    tree = tmp_path / "tree"
    fortunes_dir = tree / "usr/share/games/fortunes/es"
    fortunes_dir.mkdir(parents=True)
    write_fortunes(fortunes_dir / "amistad.fortunes", ["La amistad es una igualdad armónica."])
    write_copyright(tree, "fortunes-es", [("*", "GPL-2+")])
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN/control").write_text(
        "Package: fortunes-es\nVersion: 1.0\nArchitecture: all\nMaintainer: Test <t@example.org>\nDescription: test\n"
    )
    deb = tmp_path / "fortunes-es_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(tree), str(deb)], check=True, capture_output=True)
    log = tmp_path / "apt.log"
    fake_apt_get(tmp_path / "bin", f'echo "$@" >> {log}; cp {deb} .', monkeypatch)
    cache = tmp_path / "cache"

    first = list(load_debian_corpus(str(cache), ["fortunes-es"]))
    second = list(load_debian_corpus(str(cache), ["fortunes-es"]))

    assert log.read_text() == "download fortunes-es\n"  # downloaded once, unpacked once
    assert first == second  # same ids and texts on a re-run
    assert ids_and_texts(first) == [("fortunes-es:amistad:0", "La amistad es una igualdad armónica.")]
    assert sorted(p.name for p in cache.iterdir()) == ["fortunes-es", "fortunes-es_1.0_all.deb"]
