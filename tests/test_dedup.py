"""Exact and near-duplicate detection: normalization, stable MinHash, LSH banding, union-find."""

import hashlib
import itertools
import os
import subprocess
import sys
import unicodedata

import ml_collections
import numpy as np
import pytest

from llm.corpus import dedup, dedup_bench

QUIJOTE = (
    "En un lugar de la Mancha, de cuyo nombre no quiero acordarme, no ha mucho tiempo que vivía un hidalgo "
    "de los de lanza en astillero, adarga antigua, rocín flaco y galgo corredor. Una olla de algo más vaca "
    "que carnero, salpicón las más noches, duelos y quebrantos los sábados, lentejas los viernes, algún "
    "palomino de añadidura los domingos, consumían las tres partes de su hacienda."
)
RECETA = (
    "Para preparar la tortilla de patatas, pela y corta las patatas en láminas finas. Fríelas a fuego "
    "lento en abundante aceite de oliva junto con la cebolla hasta que estén tiernas pero sin dorarse. "
    "Bate los huevos con una pizca de sal, mezcla las patatas escurridas y deja reposar unos minutos "
    "antes de cuajar la tortilla en una sartén bien caliente, dándole la vuelta con un plato."
)
NOTICIA = (
    "El ayuntamiento de Sevilla ha aprobado este martes el nuevo plan de movilidad urbana, que prevé "
    "ampliar los carriles bici en más de cuarenta kilómetros y peatonalizar varias calles del centro "
    "histórico antes del verano. ¿Llegará a tiempo? Los vecinos, según la asociación del barrio, piden "
    "más frecuencia de autobuses y aparcamientos disuasorios en las afueras de la ciudad."
)
# Same topic and many of the same words as NOTICIA, but different sentences: a near-miss that must be kept.
NOTICIA_OTRA = (
    "Los vecinos del centro histórico de Sevilla se reunieron el martes con el ayuntamiento para hablar "
    "de movilidad: piden autobuses más frecuentes, aparcamientos en las afueras y calles peatonales, "
    "mientras el plan municipal de carriles bici sigue pendiente de aprobación definitiva en el pleno."
)

DEFAULTS = ml_collections.ConfigDict(
    dict(exact=True, near=True, num_perm=256, shingle_size=5, seed=0, bands=28, rows=9, threshold=0.8)
)


def test_exact_key_ignores_case_whitespace_and_unicode_form():
    nfd = unicodedata.normalize("NFD", "Canción de cuna")
    assert dedup.exact_key("Canción  de\n\tcuna ") == dedup.exact_key("CANCIÓN de cuna") == dedup.exact_key(nfd)
    # Accents, punctuation and words still matter.
    assert dedup.exact_key("Canción de cuna") != dedup.exact_key("Cancion de cuna")
    assert dedup.exact_key("Canción de cuna") != dedup.exact_key("Canción de cuna.")
    assert dedup.exact_key("año") != dedup.exact_key("ano")


def test_exact_duplicates_keep_the_smallest_id():
    ids = ["c", "a", "b", "d"]
    texts = ["¡Hola, mundo!", "¡HOLA,  mundo!", "Adiós", "¡hola, mundo!"]
    keys = [dedup.exact_key(text) for text in texts]
    assert dedup.exact_duplicates(ids, keys) == {"c": "a", "d": "a"}
    # The runners pass ids in whatever order their workers return them: the keeper does not depend on it.
    order = [3, 1, 0, 2]
    assert dedup.exact_duplicates([ids[i] for i in order], [keys[i] for i in order]) == {"c": "a", "d": "a"}


def test_words_split_on_spanish_punctuation_and_fold_case():
    text = "¿Qué tal, Señor MUÑOZ? «Bien» —dijo— el niño… ¡Olé! 3º"
    assert dedup.words(text) == ["qué", "tal", "señor", "muñoz", "bien", "dijo", "el", "niño", "olé", "3"]


def _reference_signature(text: str, num_perm: int, k: int, seed: int) -> list[int]:
    """The documented MinHash definition in plain Python integers, one word and shingle at a time."""
    m64 = 2**64

    def mix(x: int) -> int:
        x ^= x >> 33
        x = x * 0xFF51AFD7ED558CCD % m64
        x ^= x >> 33
        x = x * 0xC4CEB9FE1A85EC53 % m64
        return x ^ (x >> 33)

    digest = hashlib.blake2b(f"minhash:{seed}:{num_perm}".encode(), digest_size=64).digest()
    stream = b"".join(
        hashlib.blake2b(digest + i.to_bytes(4, "little"), digest_size=64).digest() for i in range(num_perm // 8 + 1)
    )
    values = [int.from_bytes(stream[4 * i : 4 * i + 4], "little") for i in range(2 * num_perm)]
    a = [v | 1 for v in values[:num_perm]]
    b = values[num_perm:]

    word_hashes = []
    for word in dedup.words(text):
        data = word.encode("utf-8")
        linear = sum((byte + 1) * mix((r + 0x9E3779B97F4A7C15) % m64) for r, byte in enumerate(data))
        word_hashes.append(mix((linear + len(data) * 0xC2B2AE3D27D4EB4F) % m64))
    if len(word_hashes) >= k:
        windows = [word_hashes[i : i + k] for i in range(len(word_hashes) - k + 1)]
    else:
        windows = [word_hashes] if word_hashes else []
    shingles = []
    for window in windows:
        combined = 0
        for j in range(k):
            combined = (combined * 0x100000001B3 + (window[j] if j < len(window) else 0)) % m64
        shingles.append(mix(combined) % 2**32)
    return [min(((ai * s + bi) % 2**32 for s in shingles), default=2**32 - 1) for ai, bi in zip(a, b)]


def test_vectorised_signatures_match_the_reference_definition():
    texts = [
        QUIJOTE,
        "Tres palabras solas",  # fewer words than a shingle: one shingle of all of them
        "",  # no words at all
        "¡¡¡ … !!!",  # punctuation only
        "Una palabra " + "larguísima" * 12 + " de más de sesenta y cuatro bytes, y 😀 emoji, 中文 y ñandú.",
        NOTICIA,
    ]
    hasher = dedup.MinHasher(num_perm=32, shingle_size=5, seed=7)
    got = hasher.signatures(texts)
    assert got.dtype == np.uint32 and got.shape == (len(texts), 32)
    for row, text in zip(got, texts):
        assert row.tolist() == _reference_signature(text, 32, 5, 7)


def test_signature_is_pinned_so_any_change_across_versions_is_caught():
    # If this fails, the hash changed: signatures stored by earlier runs are no longer comparable.
    sig = dedup.MinHasher(num_perm=256, shingle_size=5, seed=0).signature(QUIJOTE)
    assert sig[:6].tolist() == [41808941, 8726494, 83143458, 63578068, 79808137, 146199352]


def test_signature_is_the_same_in_another_process_with_another_hash_seed():
    code = "import sys; from llm.corpus import dedup; print(dedup.MinHasher().signature(sys.argv[1])[:8].tolist())"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code, RECETA],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    ).stdout
    assert out.strip() == str(dedup.MinHasher().signature(RECETA)[:8].tolist())


def test_signatures_do_not_depend_on_the_batch():
    hasher = dedup.MinHasher()
    texts = [QUIJOTE, RECETA, "", NOTICIA]
    batch = hasher.signatures(texts)
    for row, text in zip(batch, texts):
        np.testing.assert_array_equal(row, hasher.signature(text))
    np.testing.assert_array_equal(hasher.signatures(texts[::-1])[::-1], batch)


def test_punctuation_and_case_do_not_change_the_signature():
    hasher = dedup.MinHasher()
    shouted = QUIJOTE.upper().replace(",", " ;").replace(".", "!")
    np.testing.assert_array_equal(hasher.signature(QUIJOTE), hasher.signature(shouted))


def test_estimated_jaccard_tracks_the_true_jaccard():
    words = [f"palabra{i}" for i in range(400)]
    hasher = dedup.MinHasher(shingle_size=1)
    base = " ".join(words[:200])
    for overlap in (200, 150, 100, 20):  # shared words of two 200-word documents
        other = " ".join(words[200 - overlap : 400 - overlap])
        truth = overlap / (400 - overlap)
        estimate = dedup.estimated_jaccard(hasher.signature(base), hasher.signature(other))
        assert abs(estimate - truth) < 0.1, (overlap, estimate, truth)


def test_band_keys_include_the_band_index():
    sig = np.arange(256, dtype=np.uint32)
    keys = dedup.band_keys(sig, bands=28, rows=9)
    assert len(keys) == 28 and len(set(keys)) == 28
    other = sig.copy()
    other[:27] += 1  # differs in bands 0, 1, 2 only
    shared = set(keys) & set(dedup.band_keys(other, bands=28, rows=9))
    assert shared == set(keys[3:])
    # The same values in different bands do not collide.
    flat = np.zeros(256, dtype=np.uint32)
    assert len(set(dedup.band_keys(flat, 28, 9))) == 28
    with pytest.raises(ValueError, match="exceeds"):
        dedup.band_keys(sig, bands=30, rows=9)


def test_duplicate_map_is_order_independent_and_keeps_the_smallest_id():
    pairs = [("doc-7", "doc-3"), ("doc-3", "doc-5"), ("doc-9", "doc-8"), ("doc-5", "doc-4")]
    expected = {"doc-7": "doc-3", "doc-5": "doc-3", "doc-4": "doc-3", "doc-9": "doc-8"}
    for order in itertools.permutations(pairs):
        assert dedup.duplicate_map(order) == expected
        assert dedup.duplicate_map((b, a) for a, b in order) == expected
    assert dedup.duplicate_map([]) == {}


def test_planted_near_duplicates_are_found_and_distinct_documents_kept():
    edited = QUIJOTE.replace("rocín flaco", "rocín muy flaco")  # one word inserted
    reworded = RECETA.replace("Para preparar", "PARA HACER").replace(",", ";")  # one word changed, punctuation
    ids = ["q1", "r1", "n1", "n2", "q2", "r2", "q3"]
    texts = [QUIJOTE, RECETA, NOTICIA, NOTICIA_OTRA, edited, reworded, QUIJOTE.lower()]
    signatures = dedup.MinHasher.from_config(DEFAULTS).signatures(texts)
    expected = {"q2": "q1", "q3": "q1", "r2": "r1"}
    assert dedup.near_duplicates(zip(ids, signatures), DEFAULTS) == expected
    assert dedup.near_duplicates(reversed(list(zip(ids, signatures))), DEFAULTS) == expected
    pairs = dedup.near_duplicate_pairs(zip(ids, signatures), DEFAULTS.bands, DEFAULTS.rows, DEFAULTS.threshold)
    assert pairs == {("q1", "q2"), ("q1", "q3"), ("q2", "q3"), ("r1", "r2")}
    with pytest.raises(ValueError, match="unique document ids"):
        dedup.near_duplicates(zip(["q1", "q1"], signatures), DEFAULTS)


def test_bucket_pairs_confirm_only_similar_members():
    hasher = dedup.MinHasher()
    members = [
        ("b", hasher.signature(QUIJOTE)),
        ("a", hasher.signature(QUIJOTE + " Fin.")),
        ("c", hasher.signature(RECETA)),
    ]
    assert dedup.bucket_pairs(members, 0.8) == [("a", "b")]


def test_config_errors_name_the_key():
    bad = ml_collections.ConfigDict(DEFAULTS.to_dict())
    bad.bands = 40
    with pytest.raises(ValueError, match=r"dedup\.bands \* dedup\.rows = 360 exceeds dedup\.num_perm = 256"):
        dedup.check_config(bad)
    bad = ml_collections.ConfigDict(DEFAULTS.to_dict())
    bad.threshold = 1.5
    with pytest.raises(ValueError, match=r"dedup\.threshold"):
        dedup.check_config(bad)


def test_benchmark_meets_its_accuracy_target_on_a_small_run():
    figures = dedup_bench.run(num_docs=400, repeats=1)
    assert figures["true_pairs"] > 20
    assert figures["precision"] >= 0.9 and figures["recall"] >= 0.9
    assert figures["ours_signatures_per_s"] > 0 and figures["datasketch_signatures_per_s"] > 0
