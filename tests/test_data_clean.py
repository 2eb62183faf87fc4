"""Cleaning (llm/corpus/clean.py), the archaic-orthography normalizer, and the stage chain (llm/corpus/stages.py)."""

import pickle

import pytest

from configs.data.es_default import get_config
from llm.corpus import clean
from llm.corpus.document import Document, Dropped
from llm.corpus.stages import document_stages


def _clean(text: str) -> str:
    config = get_config().clean
    cleaned, _ = clean.clean_text(
        text,
        strip_markup=True,
        boilerplate=clean.compile_boilerplate(config.boilerplate_patterns),
        boilerplate_max_words=config.boilerplate_max_words,
    )
    return cleaned


def test_nfc_composes_decomposed_accents():
    decomposed = "cancio\u0301n espan\u0303ola"  # "canción española" with combining marks
    assert clean.normalize_unicode(decomposed) == "canción española"
    assert len(_clean(decomposed)) == len("canción española")


def test_control_characters_removed_but_tabs_and_line_breaks_kept():
    text, removed = clean.remove_control_characters("a\x00b\x07c\u200bd\ufeffe\tf\r\ng\rh\x0ci")
    assert text == "abcde\tf\ng\nh\ni"
    assert removed == 4


def test_whitespace_keeps_paragraph_breaks():
    text = "  Hola,\u00a0\u00a0 ¿qué   tal?  \n\n\n\n  Muy bien.   \nGracias.  "
    assert clean.normalize_whitespace(text) == "Hola, ¿qué tal?\n\nMuy bien.\nGracias."


def test_html_tags_and_entities_become_text():
    text = "<p>La ni&ntilde;a  comi&oacute; <b>pan</b>.</p><script>var x = 1;</script><p>Fin&hellip;</p>"
    assert _clean(text) == "La niña comió pan.\n\nFin…"


def test_entities_without_tags_are_decoded_and_layout_kept():
    text = "Ca&ntilde;&oacute;n &amp; r&iacute;o\nsegunda l&iacute;nea"
    assert _clean(text) == "Cañón & río\nsegunda línea"


def test_prose_with_angle_brackets_and_ampersands_is_untouched():
    text = "Si a < b y b > c, entonces a < c. Pérez & Hijos, S.A."
    assert clean.strip_html(text) == (text, False)


def test_boilerplate_lines_removed_and_prose_about_cookies_kept():
    text = (
        "Inicio > Recetas > Postres\n"
        "Utilizamos cookies propias y de terceros para mejorar su experiencia.\n"
        "Las galletas, que en inglés se llaman cookies, se hornean doce minutos a 180 grados.\n"
        "© 2024 Cocina Fácil. Todos los derechos reservados.\n"
        "Leer más"
    )
    assert _clean(text) == "Las galletas, que en inglés se llaman cookies, se hornean doce minutos a 180 grados."


def test_long_paragraph_mentioning_privacy_policy_is_kept():
    paragraph = (
        "La ley obliga a que cada sitio que utilizamos cookies lo explique con claridad, y por eso este "
        "artículo repasa, punto por punto, qué datos se guardan, durante cuánto tiempo y con qué fines, "
        "además de cómo puede el lector borrarlos desde su navegador sin perder sus preferencias guardadas."
    )
    assert len(paragraph.split()) > get_config().clean.boilerplate_max_words
    assert _clean(paragraph) == paragraph


def test_invalid_boilerplate_regex_names_the_key():
    with pytest.raises(ValueError, match=r"clean.boilerplate_patterns.*\(unclosed"):
        clean.compile_boilerplate(["(unclosed"])


def test_clean_stage_drops_empty_documents_and_records_counts():
    stage = dict(document_stages(get_config()))["clean"]
    assert stage(Document("vacío", " \x00 <br/> \n\n ")) == Dropped("vacío", "clean.empty")
    result = stage(Document("d", "<p>Hola</p>\x07", {"source": "web"}))
    assert result.text == "Hola"
    assert result.metadata == {
        "source": "web",
        "clean": {"nfc": 0, "control_chars": 1, "html": 1, "boilerplate_lines": 0},
    }


# --- Archaic orthography (Reina-Valera 1909) ---------------------------------------------------------------


@pytest.mark.parametrize(
    "archaic, modern",
    [
        ("Y dijo Dios: Sea la luz: y fué la luz.", "Y dijo Dios: Sea la luz: y fue la luz."),
        ("Y vió Dios que la luz era buena", "Y vio Dios que la luz era buena"),
        ("EN el principio crió Dios los cielos y la tierra.", "En el principio crió Dios los cielos y la tierra."),
        ("Y JEHOVÁ dijo á Noé: Entra tú y toda tu casa", "Y Jehová dijo a Noé: Entra tú y toda tu casa"),
        ("y engendró hijos é hijas", "y engendró hijos e hijas"),
        ("sea buey ó asno ú oveja", "sea buey o asno u oveja"),
        ("por cuanto dí mi sierva á mi marido", "por cuanto di mi sierva a mi marido"),
        ("Fué en el día octavo; Yo fuí; Dió voces", "Fue en el día octavo; Yo fui; Dio voces"),
        ("PABLO, siervo de Jesucristo, llamado á ser", "Pablo, siervo de Jesucristo, llamado a ser"),
        ("Á ti, oh Jehová, levantaré mi alma.", "A ti, oh Jehová, levantaré mi alma."),
    ],
)
def test_archaic_spelling_is_modernized(archaic, modern):
    assert clean.normalize_archaic(archaic)[0] == modern


def test_modern_accents_and_all_caps_inscriptions_stay():
    modern = (
        "Él está aquí y sí, tú sabes más que yo; mí, sé, dé, aún, qué, cómo. "
        "Y pusieron sobre su cabeza su causa escrita: ESTE ES JESUS EL REY DE LOS JUDIOS."
    )
    assert clean.normalize_archaic(modern) == (modern, 0)


def test_archaic_stage_only_touches_flagged_documents():
    modern = Document("fortunes-es:1", "Y vió que fué así.", {"source": "fortunes-es"})
    assert clean.archaic_stage(modern) is modern
    bible = clean.archaic_stage(Document("Gen.1", "Y vió que fué así.", {"archaic_orthography": True}))
    assert bible.text == "Y vio que fue así."
    assert bible.metadata["archaic_replacements"] == 2


# --- The stage chain -----------------------------------------------------------------------------------------


def test_document_stages_order_and_pickling():
    stages = document_stages(get_config())
    assert [name for name, _ in stages] == ["clean", "archaic", "quality", "langid", "pii", "offensive"]
    restored = pickle.loads(pickle.dumps(stages))  # What Beam and multiprocessing do with them.
    text = "EN el principio crió Dios los cielos y la tierra.\nY vió Dios que la luz era buena."
    document = Document("Gen.1", text, {"archaic_orthography": True})
    for _, stage in restored:
        document = stage(document)
    assert document.text == "En el principio crió Dios los cielos y la tierra.\nY vio Dios que la luz era buena."
    assert document.metadata["language"] == "es"


def test_disabled_stages_are_left_out():
    config = get_config()
    config.langid.enabled = False
    config.clean.archaic_orthography = False
    assert [name for name, _ in document_stages(config)] == ["clean", "quality", "pii", "offensive"]


def test_config_errors_name_the_section_and_key():
    config = get_config()
    config.quality.min_word = 3
    with pytest.raises(ValueError, match=r"'quality'.*unknown keys \['min_word'\]"):
        document_stages(config)
    config = get_config()
    del config.pii
    with pytest.raises(ValueError, match="no section 'pii'"):
        document_stages(config)
    config = get_config()
    config.langid.min_score = 1.5
    with pytest.raises(ValueError, match="langid.min_score"):
        document_stages(config)


def test_stage_chain_keeps_real_spanish_and_drops_junk():
    stages = document_stages(get_config())

    def run(document):
        for _, stage in stages:
            document = stage(document)
            if isinstance(document, Dropped):
                return document
        return document

    recipe = Document(
        "receta",
        (
            "Tortilla de patatas\n\n"
            "Ingredientes: 4 huevos, 500 g de patatas, 1 cebolla, aceite de oliva y sal.\n\n"
            "Pela las patatas y córtalas en láminas finas. Fríelas a fuego lento con la cebolla durante 20 minutos. "
            "Bate los huevos, mézclalos con las patatas escurridas y cuaja la tortilla por los dos lados. "
            "Si tienes dudas, escribe a cocina@ejemplo.es o llama al 612 345 678."
        ),
    )
    kept = run(recipe)
    assert isinstance(kept, Document)
    assert "<EMAIL>" in kept.text and "<TELEFONO>" in kept.text
    assert kept.metadata["pii"]["email"] == 1 and kept.metadata["pii"]["phone"] == 1
    menu = Document("menu", "Inicio | Productos | Ofertas | Contacto | Carrito | Mi cuenta | Ayuda")
    assert isinstance(run(menu), Dropped)
    portuguese = Document("pt", "O menino comeu uma maçã e depois foi dormir em sua casa com os irmãos.")
    assert run(portuguese) == Dropped("pt", "langid.not_spanish")
