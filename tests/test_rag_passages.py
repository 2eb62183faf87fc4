"""Passages (Spanish sentences, token budget, overlap, exact spans, Markdown headings) and BM25 search."""

import json

import pytest

from llm.rag.documents import SourceDocument, read_documents
from llm.rag.lexical import LexicalIndex
from llm.rag.passages import passages_from_path, read_passages, split_document, token_counter, write_passages
from llm.rag.sentences import sentence_spans

TRICKY = (
    "El Sr. García y la Dra. López viajaron a EE. UU. el año pasado. "
    "Costó 3,5 millones, p. ej. en el art. 5 de la pág. 12 del núm. 4. "
    "¿Vendrá Ud. mañana? ¡Claro que sí! Dijo: «No sé...» y se fue. "
    "Nació en el 44 a. C. y murió en el 10 d. C. en Roma. La empresa S.A. creció un 3.5 por ciento."
)
EXPECTED = [
    "El Sr. García y la Dra. López viajaron a EE. UU. el año pasado.",
    "Costó 3,5 millones, p. ej. en el art. 5 de la pág. 12 del núm. 4.",
    "¿Vendrá Ud. mañana?",
    "¡Claro que sí!",
    "Dijo: «No sé...» y se fue.",
    "Nació en el 44 a. C. y murió en el 10 d. C. en Roma.",
    "La empresa S.A. creció un 3.5 por ciento.",
]
STORY = "\n\n".join(
    " ".join(f"La frase número {p * 10 + s} del párrafo {p} habla del tiempo en Madrid." for s in range(4))
    for p in range(5)
)


def test_abbreviations_decimals_and_punctuation_do_not_split_sentences():
    assert [TRICKY[s:e] for s, e in sentence_spans(TRICKY)] == EXPECTED


@pytest.mark.parametrize("budget", [12, 30, 80])
def test_budget_holds_and_spans_map_back(tokenizer, budget):
    document = SourceDocument("doc-1", STORY + "\n\n" + "palabra" * 60 + " " + TRICKY, "story.txt:3")
    passages = split_document(document, budget=budget, overlap=1, tokenizer=tokenizer)
    count = token_counter(tokenizer)
    assert all(count(p.text) <= budget for p in passages)
    assert all(document.text[p.start : p.end] == p.text for p in passages)
    assert [p.index for p in passages] == list(range(len(passages)))
    assert all(p.id == f"doc-1#{p.index}" and p.source == "story.txt:3" for p in passages)
    covered = "".join(document.text[p.start : p.end] for p in passages)
    assert all(word in covered for word in document.text.split())  # nothing dropped, overlong words cut


def test_overlap_repeats_the_last_sentence():
    document = SourceDocument("d", STORY, "s")
    passages = split_document(document, budget=40, overlap=1)
    assert len(passages) > 2
    for previous, current in zip(passages, passages[1:], strict=False):
        last = [previous.text[s:e] for s, e in sentence_spans(previous.text)][-1]
        assert current.text.startswith(last)
    no_overlap = split_document(document, budget=40, overlap=0)
    assert all(a.end < b.start for a, b in zip(no_overlap, no_overlap[1:], strict=False))


def test_markdown_heading_paths_and_jsonl_shards(tmp_path):
    (tmp_path / "guia.md").write_text(
        "# Guía\n\nIntroducción breve.\n\n## Instalación\n\nEjecute el programa.\n\n```\n# no es un título\n```\n\n"
        "### Linux\n\nUse apt.\n\n## Uso\n\nEscriba una pregunta.\n",
        encoding="utf-8",
    )
    records = [{"id": "a", "text": "Primer documento.", "metadata": {"source": "x"}}, {"id": "b", "text": "Otro."}]
    (tmp_path / "documents-00000-of-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    passages = passages_from_path(str(tmp_path), budget=50)
    by_text = {p.text: p for p in passages}
    assert by_text["Introducción breve."].headings == ("Guía",)
    assert by_text["Ejecute el programa.\n\n```\n# no es un título\n```"].headings == ("Guía", "Instalación")
    assert by_text["Use apt."].headings == ("Guía", "Instalación", "Linux")
    assert by_text["Escriba una pregunta."].headings == ("Guía", "Uso")
    assert by_text["Otro."].source.endswith("documents-00000-of-00001.jsonl:2") and by_text["Otro."].id == "b#0"
    write_passages(str(tmp_path / "p.jsonl"), passages)
    assert read_passages(str(tmp_path / "p.jsonl")) == passages


def test_a_data_directory_is_read_for_its_documents_only(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x80\x81 binary")  # What a data directory holds beside them.
    (tmp_path / "notas.txt").write_text("Una nota.", encoding="utf-8")
    assert [p.text for p in passages_from_path(str(tmp_path))] == ["Una nota."]
    with pytest.raises(ValueError, match=r"tokenizer\.model: not a UTF-8 text document"):
        passages_from_path(str(tmp_path / "tokenizer.model"))


def test_bad_shard_line_is_named(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"id": "a", "text": "x"}\n{"text": "sin id"}\n')
    with pytest.raises(ValueError, match=r"s\.jsonl:2"):
        list(read_documents(str(tmp_path / "s.jsonl")))


CORPUS = [
    "El ayuntamiento aprobó los presupuestos municipales para el año próximo.",
    "La selección nacional ganó el partido de fútbol en el último minuto.",
    "Mi abuela canta canciones populares de su pueblo cada domingo en la plaza.",
    "El precio de la vivienda subió un 3,5 por ciento en las grandes ciudades.",
    "Los científicos descubrieron una nueva especie de rana en la selva.",
]


@pytest.fixture(scope="module")
def index():
    documents = [SourceDocument(f"doc{i}", text, "corpus") for i, text in enumerate(CORPUS)]
    return LexicalIndex.build([p for d in documents for p in split_document(d)])


@pytest.mark.parametrize("query", ["¿Quién cantaba una cancion popular?", "¿Qué cantaban los abuelos?"])
def test_planted_passage_found_first_through_stemming(index, query):
    assert index.search(query, k=3)[0][0].document_id == "doc2"


def test_save_and_load_give_identical_results(index, tmp_path):
    index.save(str(tmp_path / "ix"))
    loaded = LexicalIndex.load(str(tmp_path / "ix"))
    for query in ["precio de las viviendas", "partidos de fútbol", "especies nuevas", "canción"]:
        assert loaded.search(query, k=5) == index.search(query, k=5)


def test_empty_corpus_and_missing_index_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="empty corpus"):
        LexicalIndex.build([])
    with pytest.raises(FileNotFoundError, match="has no params.index.json"):
        LexicalIndex.load(str(tmp_path / "nada"))
