"""Quality filters (llm/corpus/quality.py) and the offensive-word filter (llm/corpus/offensive.py)."""

import dataclasses

import pytest

from configs.data.es_default import get_config
from llm.corpus import offensive, quality
from llm.corpus.document import Document, Dropped


@pytest.fixture(scope="module")
def thresholds() -> quality.QualityThresholds:
    config = get_config().quality
    names = [field.name for field in dataclasses.fields(quality.QualityThresholds)]
    return quality.QualityThresholds(**{name: config[name] for name in names})


KEPT = {
    "accents_and_marks": "¿Qué hora es? ¡Qué sorpresa! El niño pidió «más pingüinos» para el año que viene.",
    "refran": "Más vale pájaro en mano que ciento volando.",
    "short_paragraph": "Mañana vamos a la playa con mis primos.",
    "bible": (
        "Porque de tal manera amó Dios al mundo, que ha dado a su Hijo unigénito, para que todo aquel que en él "
        "cree, no se pierda, mas tenga vida eterna.\n"
        "Porque no envió Dios a su Hijo al mundo para que condene al mundo, mas para que el mundo sea salvo "
        "por él."
    ),
    "recipe": (
        "Gazpacho andaluz\n\n"
        "Ingredientes:\n- 1 kg de tomates maduros\n- 1 pimiento verde\n- 1 pepino\n- 2 dientes de ajo\n"
        "- 50 ml de aceite de oliva\n- 2 cucharadas de vinagre\n- sal al gusto\n\n"
        "Lava las verduras, trocéalas y tritúralas con el aceite, el vinagre y la sal hasta que quede una crema "
        "fina. Pásala por un colador y déjala en la nevera al menos dos horas antes de servir."
    ),
}


@pytest.mark.parametrize("name", sorted(KEPT))
def test_real_spanish_is_kept(name, thresholds):
    assert thresholds.reason(KEPT[name]) is None


DROPPED = {
    "quality.too_few_words": "Inicio Contacto",
    "quality.mean_word_length": "a b c d e f g h i j k l m n o p q r s t u v w x y z de la que",
    "quality.non_alpha_words": "Precios 1250 3400 5600 7800 9000 1100 2200 3300 4400 5500 en euros y con el IVA",
    "quality.few_stop_words": "Zapatillas baratas zapatillas running zapatillas mujer oferta envío gratis",
    "quality.duplicate_lines": "Compra ahora en la tienda\n" * 4 + "Gracias por su visita\nVuelva pronto a la web",
    "quality.duplicate_paragraphs": (
        "Oferta del día\n\nOferta del día\n\nLa tienda abre de lunes a sábado.\nEl envío es gratis desde 30 euros."
        "\nLos cambios se aceptan durante un mes.\nEl pago se hace con tarjeta o en efectivo."
    ),
    "quality.top_2gram": "el coche " * 10 + "rojo es de mi tío y no lo vende nunca por nada del mundo",
}


@pytest.mark.parametrize("reason", sorted(DROPPED))
def test_junk_is_dropped_with_its_reason(reason, thresholds):
    assert thresholds.reason(DROPPED[reason]) == reason


def test_words_split_spanish_punctuation():
    assert quality.words("¿Qué? ¡Olé! «Pingüino», —dijo— la señora… (años) 3:16") == [
        "Qué",
        "Olé",
        "Pingüino",
        "dijo",
        "la",
        "señora",
        "años",
        "3:16",
    ]
    assert quality.non_alpha_word_ratio("¿Qué? ¡Olé! 3:16 --") == 0.5  # "3:16" and "--" have no letter


def test_duplicate_fractions_by_count_and_characters():
    assert quality.duplicate_fractions(["uno", "dos", "uno", "uno"]) == (0.5, 6 / 12)
    assert quality.duplicate_fractions([]) == (0.0, 0.0)


def test_top_ngram_fraction_ignores_ngrams_seen_once():
    distinct = ["el", "perro", "de", "mi", "vecino", "ladra", "toda", "la", "noche"]
    assert quality.top_ngram_char_fraction(distinct, 2, sum(map(len, distinct))) == 0.0
    repeated = ["compra", "ya", "compra", "ya", "compra", "ya"]
    assert quality.top_ngram_char_fraction(repeated, 2, 24) == pytest.approx(3 * 8 / 24)


def test_too_many_words(thresholds):
    limited = dataclasses.replace(thresholds, max_words=20)
    text = " ".join(["La casa de la pradera es grande y tiene un jardín."] * 3)
    assert limited.reason(text) == "quality.too_many_words"


def test_quality_stage_returns_document_or_drop(thresholds):
    document = Document("refrán", KEPT["refran"])
    assert quality.quality_stage(document, thresholds=thresholds) is document
    dropped = quality.quality_stage(Document("x", "Hola"), thresholds=thresholds)
    assert dropped == Dropped("x", "quality.too_few_words")


# --- Offensive words -----------------------------------------------------------------------------------------


def test_offensive_matching_is_case_and_accent_insensitive_on_whole_words():
    words = offensive.offensive_words()
    assert offensive.offensive_fraction("¡MARICÓN! maricon, Maricón", words) == 1.0
    assert offensive.offensive_fraction("La computadora disputa el coño", words) == pytest.approx(1 / 5)
    # "ñ" is a letter of its own: "cono" (cone) is not "coño".
    assert offensive.offensive_fraction("un cono de helado", words) == 0.0


def test_offensive_stage_threshold():
    words = offensive.offensive_words()
    insulting = Document("insulto", "Eres un gilipollas y un cabrón, joder.")
    dropped = offensive.offensive_stage(insulting, offensive=words, max_fraction=0.02)
    assert dropped == Dropped("insulto", "offensive.too_many")
    # One swear word in a long, ordinary text is normal Spanish and is kept.
    long_text = Document("cuento", "Joder, qué frío hace. " + "Caminamos por la orilla hacia el pueblo. " * 10)
    assert offensive.offensive_stage(long_text, offensive=words, max_fraction=0.02) is long_text
    # Innocent words that are insults elsewhere are not in the built-in list.
    animals = Document("fauna", "Las zorras tienen cavernas; la perra y la polla duermen en la concha del patio.")
    assert offensive.offensive_stage(animals, offensive=words, max_fraction=0.02) is animals


def test_extra_words_from_config_and_file(tmp_path):
    word_file = tmp_path / "extra.txt"
    word_file.write_text("# mis palabras\nCaraculo\n\nmamarracho  # comentario\n", encoding="utf-8")
    words = offensive.offensive_words(extra_words=["Zopenco"], words_file=str(word_file))
    assert {"caraculo", "mamarracho", "zopenco", "mierda"} <= words
    assert offensive.offensive_fraction("¡Zopenco, caraculo, mamarracho!", words) == 1.0


def test_bad_word_file_names_file_and_line(tmp_path):
    word_file = tmp_path / "malo.txt"
    word_file.write_text("bien\nhijo de puta\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"malo.txt:2: expected a single word"):
        offensive.offensive_words(words_file=str(word_file))
    with pytest.raises(ValueError, match="offensive.extra_words"):
        offensive.offensive_words(extra_words=["dos palabras"])
