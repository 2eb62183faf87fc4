"""Corpus sources on temporary files: each reader, stable ids, and malformed input in both on_error modes."""

import gzip
import json
import sys
import tracemalloc
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from configs.data import es_default
from llm.corpus import sources
from llm.corpus.document import Document, Dropped
from llm.corpus.sources import SourceError, read_files, read_indexed, read_sources


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else lambda d: path.write_text(d, encoding="utf-8"))(data)
    return path


def ids(items):
    return [(item.id, item.reason if isinstance(item, Dropped) else item.text) for item in items]


# --- local text ---------------------------------------------------------------------------------------------


def test_text_files_one_document_per_file_with_relative_ids(tmp_path):
    write(tmp_path / "corpus/b.txt", "Segundo archivo.\n")
    write(tmp_path / "corpus/sub/a.txt", b"\xef\xbb\xbfA\xc3\xb1o nuevo,\r\nvida nueva.\r\n")  # BOM, CRLF
    write(tmp_path / "corpus/LEEME", "no es un formato conocido")
    write(tmp_path / "corpus/.oculto.txt", "oculto")

    docs = list(read_files([str(tmp_path / "corpus")], licence="CC-BY-4.0"))

    assert ids(docs) == [("b.txt", "Segundo archivo.\n"), ("sub/a.txt", "Año nuevo,\nvida nueva.\n")]
    assert docs[0].metadata == {"source": "b.txt", "licence": "CC-BY-4.0"}


def test_text_paragraph_mode_ids_by_paragraph_index(tmp_path):
    write(tmp_path / "cuento.txt", "Érase una vez\nun niño.\n\n\n¿Quién era?\n   \n¡Nadie!\n")
    assert ids(read_files([str(tmp_path / "cuento.txt")], text_mode="paragraph")) == [
        ("cuento.txt:0", "Érase una vez\nun niño."),
        ("cuento.txt:1", "¿Quién era?"),
        ("cuento.txt:2", "¡Nadie!"),
    ]


def test_globs_and_ids_relative_to_the_common_directory(tmp_path):
    write(tmp_path / "a/x.txt", "uno")
    write(tmp_path / "b/x.txt", "dos")
    assert ids(read_files([str(tmp_path / "*/x.txt")])) == [("a/x.txt", "uno"), ("b/x.txt", "dos")]


def test_missing_path_is_named(tmp_path):
    with pytest.raises(SourceError, match="sources.paths: '.*nada.txt' matches no file"):
        list(read_files([str(tmp_path / "nada.txt")]))


# --- JSONL and Parquet --------------------------------------------------------------------------------------


def test_jsonl_text_field_and_metadata(tmp_path):
    lines = [
        {"contenido": "El niño comió.", "url": "https://ejemplo.es/1", "licence": "CC0-1.0"},
        {},
        {"contenido": "La señora leyó.", "url": "https://ejemplo.es/2"},
    ]
    write(tmp_path / "web.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) if r else "" for r in lines))

    docs = list(read_files([str(tmp_path / "web.jsonl")], text_field="contenido", licence="mixed"))

    # Ids carry the 1-based line number; a blank line is not a record.
    assert ids(docs) == [("web.jsonl:1", "El niño comió."), ("web.jsonl:3", "La señora leyó.")]
    assert docs[0].metadata == {"url": "https://ejemplo.es/1", "licence": "CC0-1.0", "source": "web.jsonl"}
    assert docs[1].metadata == {"url": "https://ejemplo.es/2", "licence": "mixed", "source": "web.jsonl"}


def test_gzipped_jsonl_with_byte_order_mark(tmp_path):
    write(tmp_path / "web.jsonl.gz", gzip.compress('\ufeff{"text": "Comprimido y leído."}\n'.encode()))
    assert ids(read_files([str(tmp_path)])) == [("web.jsonl.gz:1", "Comprimido y leído.")]


def test_parquet_text_column_and_metadata(tmp_path):
    table = pa.table({"cuerpo": ["Primera fila.", "Segunda fila, más larga."], "año": [2023, 2024]})
    pq.write_table(table, tmp_path / "datos.parquet", row_group_size=1)

    docs = list(read_files([str(tmp_path / "datos.parquet")], text_field="cuerpo"))

    assert ids(docs) == [("datos.parquet:0", "Primera fila."), ("datos.parquet:1", "Segunda fila, más larga.")]
    assert docs[1].metadata == {"año": 2024, "source": "datos.parquet", "licence": "unknown"}


def test_parquet_missing_column_is_a_config_error_naming_the_columns(tmp_path):
    pq.write_table(pa.table({"texto": ["hola"]}), tmp_path / "datos.parquet")
    with pytest.raises(SourceError, match=r"datos.parquet: no column 'text'; columns: \['texto'\]"):
        list(read_files([str(tmp_path / "datos.parquet")], on_error="skip"))


# --- TFDS and Hugging Face ----------------------------------------------------------------------------------


class SourcesTestTinyEs(tfds.core.GeneratorBasedBuilder):
    """A two-example Spanish dataset written as ArrayRecord, the format `tfds.data_source` reads."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({"text": tfds.features.Text(), "year": np.int32})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, text in enumerate(["¿Qué tal?", "Año nuevo, vida nueva."]):
            yield i, {"text": text, "year": 2020 + i}


def test_tfds_array_record_builder_read_with_data_source(tmp_path):
    SourcesTestTinyEs(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()

    docs = list(sources.read_tfds("sources_test_tiny_es", "train", str(tmp_path), licence="CC0-1.0"))

    assert ids(docs) == [
        ("sources_test_tiny_es/train:0", "¿Qué tal?"),
        ("sources_test_tiny_es/train:1", "Año nuevo, vida nueva."),
    ]
    assert docs[1].metadata == {"year": 2021, "source": "sources_test_tiny_es/train", "licence": "CC0-1.0"}


def test_indexed_source_bytes_decoded_and_bad_utf8_counted():
    records = [{"text": "Canción".encode()}, {"text": b"\xff\xfe roto"}]
    assert ids(read_indexed(records, "mi_ds/train")) == [
        ("mi_ds/train:0", "Canción"),
        ("mi_ds/train:1", "source.invalid_utf8"),
    ]
    with pytest.raises(SourceError, match="mi_ds/train: example 1: field 'text': invalid UTF-8"):
        list(read_indexed(records, "mi_ds/train", on_error="raise"))


def test_hf_missing_extra_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r"pip install '\.\[hf\]'"):
        list(sources.read_hf("usuario/corpus"))


def test_hf_rows_become_documents(monkeypatch):
    # A stand-in for the `datasets` package (not installed offline): records how it is called.
    calls = []

    def load_dataset(name, config_name, split, streaming):
        calls.append((name, config_name, split, streaming))
        return iter([{"text": "Hola mundo.", "id": "a1"}, {"text": ""}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    docs = list(sources.read_hf("usuario/corpus", "es", "validation"))
    assert calls == [("usuario/corpus", "es", "validation", True)]
    assert ids(docs) == [
        ("usuario/corpus/validation:0", "Hola mundo."),
        ("usuario/corpus/validation:1", "source.empty"),
    ]
    assert docs[0].metadata == {"id": "a1", "source": "usuario/corpus", "licence": "unknown"}


# --- read_sources: the config chooses -----------------------------------------------------------------------


def test_read_sources_reads_paths_from_the_config(tmp_path):
    write(tmp_path / "a.txt", "Uno.\n\nDos.")
    write(tmp_path / "b.jsonl", '{"text": "Tres."}\n')
    config = es_default.get_config()
    config.sources.paths = f"{tmp_path / 'a.txt'},{tmp_path / 'b.jsonl'}"
    config.sources.text_mode = "paragraph"
    assert ids(read_sources(config)) == [("a.txt:0", "Uno."), ("a.txt:1", "Dos."), ("b.jsonl:1", "Tres.")]


def test_read_sources_without_inputs_reads_the_debian_corpus(tmp_path):
    # A cache that already holds the unpacked package: nothing is downloaded.
    root = tmp_path / "cache/fortunes-es"
    write(root / "usr/share/games/fortunes/es/vida.fortunes", "La vida es sueño.\n%\n")
    write(root / "usr/share/games/fortunes/es/vida.fortunes.dat", b"index")
    write(root / "usr/share/doc/fortunes-es/copyright", "Files: *\nCopyright: x\nLicense: GPL-2+\n")
    config = es_default.get_config()
    config.sources.debian_cache_dir = str(tmp_path / "cache")
    config.sources.debian_packages = "fortunes-es"

    docs = list(read_sources(config))

    assert ids(docs) == [("fortunes-es:vida:0", "La vida es sueño.")]
    assert docs[0].metadata == {"source": "fortunes-es", "licence": "GPL-2+"}


def test_read_sources_rejects_a_bad_on_error_by_key():
    config = es_default.get_config()
    config.sources.on_error = "ignore"
    with pytest.raises(ValueError, match=r"sources.on_error='ignore': expected one of \['raise', 'skip'\]"):
        list(read_sources(config))


# --- malformed input, in both modes -------------------------------------------------------------------------

BAD_UTF8 = b"Primera l\xc3\xadnea.\nSegunda l\xednea en Latin-1.\n"


def test_invalid_utf8_text_file(tmp_path):
    path = write(tmp_path / "latin1.txt", BAD_UTF8)
    with pytest.raises(SourceError, match=r"latin1.txt:2: invalid UTF-8 at byte 25.*on_error=skip"):
        list(read_files([str(path)], on_error="raise"))
    assert ids(read_files([str(path)], on_error="skip")) == [("latin1.txt", "source.invalid_utf8")]


def test_invalid_utf8_drops_only_its_paragraph(tmp_path):
    path = write(tmp_path / "mixto.txt", b"Bien.\n\n" + BAD_UTF8 + b"\nTambi\xc3\xa9n bien.\n")
    with pytest.raises(SourceError, match=r"mixto.txt:4: invalid UTF-8"):
        list(read_files([str(path)], text_mode="paragraph", on_error="raise"))
    assert ids(read_files([str(path)], text_mode="paragraph")) == [
        ("mixto.txt:0", "Bien."),
        ("mixto.txt:1", "source.invalid_utf8"),
        ("mixto.txt:2", "También bien."),
    ]


def test_invalid_utf8_jsonl_line(tmp_path):
    path = write(tmp_path / "datos.jsonl", b'{"text": "bien"}\n{"text": "mal \xe9"}\n')
    with pytest.raises(SourceError, match=r"datos.jsonl:2: invalid UTF-8"):
        list(read_files([str(path)], on_error="raise"))
    assert ids(read_files([str(path)])) == [("datos.jsonl:1", "bien"), ("datos.jsonl:2", "source.invalid_utf8")]


@pytest.mark.parametrize("name,mode", [("vacio.txt", "file"), ("vacio.txt", "paragraph"), ("vacio.jsonl", "file")])
def test_empty_file(tmp_path, name, mode):
    path = write(tmp_path / name, "\n  \n")
    with pytest.raises(SourceError, match=rf"{name}: empty file"):
        list(read_files([str(path)], text_mode=mode, on_error="raise"))
    assert ids(read_files([str(path)], text_mode=mode)) == [(name, "source.empty")]


def test_empty_parquet(tmp_path):
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "vacio.parquet")
    with pytest.raises(SourceError, match="vacio.parquet: empty file"):
        list(read_files([str(tmp_path)], on_error="raise"))
    assert ids(read_files([str(tmp_path)])) == [("vacio.parquet", "source.empty")]


def test_corrupt_parquet(tmp_path):
    write(tmp_path / "roto.parquet", b"PAR1 esto no es parquet")
    with pytest.raises(SourceError, match="roto.parquet: not a readable Parquet file"):
        list(read_files([str(tmp_path)], on_error="raise"))
    assert ids(read_files([str(tmp_path)])) == [("roto.parquet", "source.bad_parquet")]


def test_jsonl_with_one_bad_line(tmp_path):
    path = write(
        tmp_path / "web.jsonl", '{"text": "uno"}\n{"text": "dos",\n{"sin_texto": 1}\n["lista"]\n{"text": "cinco"}\n'
    )
    with pytest.raises(SourceError, match=r"web.jsonl:2: invalid JSON: .* at column"):
        list(read_files([str(path)], on_error="raise"))
    # Every line is accounted for: kept, or dropped with its reason.
    assert ids(read_files([str(path)])) == [
        ("web.jsonl:1", "uno"),
        ("web.jsonl:2", "source.bad_json"),
        ("web.jsonl:3", "source.missing_field"),
        ("web.jsonl:4", "source.bad_json"),
        ("web.jsonl:5", "cinco"),
    ]


HUGE = 50 * 1024 * 1024


def test_a_50_mb_line_is_dropped_with_bounded_memory(tmp_path):
    path = tmp_path / "enorme.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "antes"}\n{"text": "' + b"a" * HUGE + b'"}\n{"text": "despu\xc3\xa9s"}\n')
    with pytest.raises(SourceError, match=r"enorme.jsonl:2: larger than sources.max_document_bytes=8388608"):
        list(read_files([str(path)], on_error="raise"))

    tracemalloc.start()
    try:
        items = list(read_files([str(path)]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ids(items) == [
        ("enorme.jsonl:1", "antes"),
        ("enorme.jsonl:2", "source.too_large"),
        ("enorme.jsonl:3", "después"),
    ]
    assert peak < 3 * sources.DEFAULT_MAX_DOCUMENT_BYTES  # the 50 MB line was never held whole


@pytest.mark.parametrize("mode", ["file", "paragraph"])
def test_a_50_mb_single_line_text_file(tmp_path, mode):
    path = tmp_path / "una_linea.txt"
    with open(path, "wb") as f:
        f.write(b"palabra " * (HUGE // 8))
    with pytest.raises(SourceError, match="una_linea.txt.*larger than sources.max_document_bytes"):
        list(read_files([str(path)], text_mode=mode, on_error="raise"))
    expected = "una_linea.txt" if mode == "file" else "una_linea.txt:0"
    assert ids(read_files([str(path)], text_mode=mode)) == [(expected, "source.too_large")]


def test_max_document_bytes_is_the_limit(tmp_path):
    path = write(tmp_path / "doc.txt", "ñ" * 1500)  # 3000 bytes
    assert ids(read_files([str(path)], max_document_bytes=2000)) == [("doc.txt", "source.too_large")]
    assert ids(read_files([str(path)], max_document_bytes=3000)) == [("doc.txt", "ñ" * 1500)]
    jsonl = write(tmp_path / "doc.jsonl", json.dumps({"text": "ñ" * 1500}, ensure_ascii=False) + "\n")
    assert ids(read_files([str(jsonl)], max_document_bytes=2000)) == [("doc.jsonl:1", "source.too_large")]


def test_documents_are_documents():
    # The contract the pipeline relies on: readers yield exactly these two types.
    assert {Document, Dropped} >= {type(x) for x in read_indexed([{"text": "x"}, {"text": " "}], "d/s")}
