"""Text metrics and perturbations of the evaluation suite: Spanish normalization, numbers, overlap scores."""

import random

import pytest
import sacrebleu

from llm.eval import robustness, text_metrics


@pytest.mark.parametrize(
    "text, normalized",
    [
        ("¿El Tribunal Supremo?", "tribunal supremo"),
        ("«Los  Ángeles», la ciudad", "ángeles ciudad"),
        ("¡Una canción!", "canción"),
        ("unos 3,5 kilómetros…", "3 5 kilómetros"),
        ("Él lo dijo", "él lo dijo"),  # the pronoun "él" is not the article "el": accents are kept
    ],
)
def test_spanish_answer_normalization(text, normalized):
    assert text_metrics.normalize_answer(text) == normalized


def test_exact_match_and_token_f1_follow_squad():
    assert text_metrics.exact_match("El Tribunal Supremo.", ["Tribunal Supremo"]) == 1.0
    assert text_metrics.exact_match("Tribunal", ["Tribunal Supremo"]) == 0.0
    # precision 1/1, recall 1/2: F1 = 2/3; the best of several references counts.
    assert text_metrics.token_f1("Tribunal", ["Tribunal Supremo"]) == pytest.approx(2 / 3)
    assert text_metrics.token_f1("Tribunal", ["Congreso", "el tribunal"]) == 1.0
    assert text_metrics.token_f1("", ["Congreso"]) == 0.0


@pytest.mark.parametrize(
    "completion, number",
    [
        ("La respuesta es 18.", 18),
        ("Gana 1.000 dólares", 1000),
        ("Gana 1 000 dólares", 1000),
        ("cuesta $80 000 y luego 70000", 70000),
        ("1,000 o 2,125", 2125),  # the gold answers of the MGSM file use English thousands separators
        ("mide 2,5 metros", 2.5),
        ("0,125 litros", 0.125),
        ("1.234.567,5", 1234567.5),
        ("unos -4 grados", -4),
        ("3 carreras 3 veces", 3),
        ("sin números", None),
    ],
)
def test_final_number_extraction(completion, number):
    assert text_metrics.extract_final_number(completion) == number


def test_numbers_compare_as_values():
    assert text_metrics.numbers_equal(1000.0, 1000)
    assert not text_metrics.numbers_equal(None, 0)
    assert not text_metrics.numbers_equal(999.0, 1000)


def test_overlap_metrics_come_from_sacrebleu_and_rouge_score():
    predictions = ["la casa es grande y azul", "el perro come"]
    references = [["la casa grande es azul"], ["el perro come carne", "un perro come"]]
    scores = text_metrics.overlap_metrics(predictions, references)
    streams = [["la casa grande es azul", "el perro come carne"], ["la casa grande es azul", "un perro come"]]
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, streams).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, streams).score)
    # ROUGE-1 with the Spanish tokenizer: "casa es grande azul" vs "casa grande es azul" (articles and "y"
    # aside) shares all 4 of 5 predicted words; the second item matches "un perro come" exactly.
    assert scores["rouge1"] == pytest.approx(100 * (2 * (4 / 5) * 1 / (4 / 5 + 1) + 1.0) / 2)
    assert text_metrics.overlap_metrics(["acción rápida"], [["acción rápida"]])["rougeL"] == 100.0


def test_overlap_metrics_reject_mismatched_inputs():
    with pytest.raises(ValueError, match="as many predictions"):
        text_metrics.overlap_metrics(["a"], [])


def test_typos_are_seeded_and_leave_digits_alone():
    text = "Juana compró 12 manzanas y 30 peras en el mercado municipal de Sevilla"
    first = robustness.add_typos(text, random.Random(1), rate=1.0)
    assert first == robustness.add_typos(text, random.Random(1), rate=1.0)
    assert first != text and "12" in first and "30" in first
    assert robustness.add_typos(text, random.Random(1), rate=0.0) == text
    # Every word of 3+ letters lost a letter or had two swapped: same length or one shorter.
    for original, changed in zip(text.split(), first.split()):
        assert len(changed) in (len(original), len(original) - 1)


def test_stripping_accents_keeps_the_enye():
    stripped = robustness.strip_accents("¿Qué canción? Pingüino, ÁRBOL, año, Ñandú")
    assert stripped == "¿Que cancion? Pinguino, ARBOL, año, Ñandu"
    assert robustness.strip_accents("te quiero \u2764\ufe0f") == "te quiero \u2764\ufe0f"  # emoji selector kept
