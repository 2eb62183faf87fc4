"""Benchmark of near-duplicate detection: MinHash speed against datasketch, and LSH accuracy.

`run()` builds a synthetic Spanish-like corpus (Zipf-distributed words built from Spanish syllables, with
accents, ñ, ¿? and ¡!) in which some documents are edited copies of others, then measures:

  * signatures/s of `MinHasher.signatures` and of datasketch's `MinHash.bulk` with the same num_perm,
    both from raw text with the same word shingles (datasketch hashes each shingle with SHA-1 in Python);
  * precision and recall of the confirmed LSH pairs against the TRUE pairs: every pair whose exact
    Jaccard similarity of shingle sets is >= threshold, found with an exact prefix-filter similarity join.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable

import ml_collections
import numpy as np

from llm.corpus import dedup

_FUNCTION_WORDS = [
    "de",
    "la",
    "que",
    "el",
    "en",
    "y",
    "a",
    "los",
    "se",
    "del",
    "las",
    "un",
    "por",
    "con",
    "no",
    "una",
    "su",
    "para",
    "es",
    "al",
    "lo",
    "como",
    "más",
    "o",
    "pero",
    "sus",
    "le",
    "ha",
    "me",
    "si",
    "sin",
    "sobre",
    "este",
    "ya",
    "entre",
    "cuando",
    "todo",
    "esta",
    "ser",
    "son",
    "dos",
    "también",
    "fue",
    "había",
    "era",
    "muy",
    "años",
    "hasta",
    "desde",
    "está",
    "mi",
    "porque",
    "qué",
    "sólo",
    "han",
    "yo",
    "hay",
    "vez",
    "puede",
    "todos",
    "así",
    "nos",
    "ni",
    "parte",
    "tiene",
    "él",
    "uno",
    "donde",
    "bien",
    "tiempo",
    "mismo",
    "ese",
    "ahora",
    "cada",
    "vida",
    "otro",
    "después",
    "te",
    "otros",
    "aunque",
    "esa",
    "eso",
    "hace",
    "otra",
    "tan",
    "durante",
    "siempre",
    "día",
    "tanto",
    "ella",
]
_SYLLABLES = [
    "ca",
    "co",
    "cu",
    "ta",
    "te",
    "ti",
    "to",
    "ma",
    "me",
    "mi",
    "mo",
    "pa",
    "pe",
    "po",
    "ra",
    "re",
    "ri",
    "ro",
    "sa",
    "se",
    "si",
    "so",
    "la",
    "le",
    "li",
    "lo",
    "na",
    "ne",
    "ni",
    "no",
    "da",
    "de",
    "di",
    "do",
    "ga",
    "go",
    "ba",
    "be",
    "bi",
    "vi",
    "va",
    "fe",
    "fi",
    "gue",
    "qui",
    "che",
    "chi",
    "ña",
    "ño",
    "lla",
    "llo",
    "rra",
    "rro",
    "cia",
    "ción",
    "sión",
    "mien",
    "tán",
    "dá",
    "pú",
    "lí",
    "mé",
    "ár",
    "ér",
    "ín",
    "ón",
    "ús",
    "tra",
    "tre",
    "pro",
    "pre",
    "bla",
    "ble",
    "cla",
    "cri",
    "gra",
    "fla",
]


def _vocabulary(rng: np.random.Generator, size: int) -> list[str]:
    vocab = list(_FUNCTION_WORDS)
    seen = set(vocab)
    while len(vocab) < size:
        word = "".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 5))))
        if word not in seen:
            seen.add(word)
            vocab.append(word)
    return vocab


def _render(tokens: list[str], rng: np.random.Generator) -> str:
    """Words to Spanish-looking sentences: capitals, commas, ¿...? and ¡...!."""
    sentences, start = [], 0
    while start < len(tokens):
        end = min(len(tokens), start + int(rng.integers(6, 20)))
        body = " ".join(tokens[start:end])
        body = body[0].upper() + body[1:]
        kind = rng.random()
        sentences.append(f"¿{body}?" if kind < 0.1 else f"¡{body}!" if kind < 0.15 else f"{body}.")
        start = end
    return " ".join(sentences)


def _edit(tokens: list[str], rate: float, rng: np.random.Generator, vocab: list[str]) -> list[str]:
    """Substitutes, deletes or inserts a word at each position with probability `rate`."""
    out = []
    for token in tokens:
        roll = rng.random()
        if roll < rate / 3:
            out.append(vocab[int(rng.integers(len(vocab)))])
        elif roll < 2 * rate / 3:
            continue
        elif roll < rate:
            out.extend([token, vocab[int(rng.integers(len(vocab)))]])
        else:
            out.append(token)
    return out


def synthetic_corpus(
    num_docs: int, seed: int = 0, duplicate_fraction: float = 0.3, max_edit_rate: float = 0.05
) -> list[str]:
    """Documents of 100-400 Zipf-distributed words; `duplicate_fraction` of them are edited copies of an
    earlier document (edit rate uniform in [0, max_edit_rate], which spreads their Jaccard similarity to
    the source over roughly 0.6-1.0) rendered with fresh punctuation and capitalisation."""
    rng = np.random.default_rng(seed)
    vocab = _vocabulary(rng, 20_000)
    zipf = 1.0 / np.arange(1, len(vocab) + 1)
    zipf /= zipf.sum()
    token_lists: list[list[str]] = []
    texts = []
    for _ in range(num_docs):
        if token_lists and rng.random() < duplicate_fraction:
            source = token_lists[int(rng.integers(len(token_lists)))]
            tokens = _edit(source, float(rng.uniform(0, max_edit_rate)), rng, vocab)
        else:
            tokens = [vocab[i] for i in rng.choice(len(vocab), size=int(rng.integers(100, 400)), p=zipf)]
        token_lists.append(tokens)
        texts.append(_render(tokens, rng))
    return texts


def true_pairs(texts: list[str], shingle_size: int, threshold: float) -> set[tuple[int, int]]:
    """All index pairs with exact shingle-set Jaccard >= threshold (prefix-filter similarity join).

    Two sets with Jaccard >= t share at least ceil(t*|A|) elements, so with all sets sorted by one global
    order, their prefixes of length |A| - ceil(t*|A|) + 1 must intersect; the rarest-first order keeps
    the prefix posting lists short. Every candidate is then verified exactly.
    """
    sets = [dedup.shingle_set(text, shingle_size) for text in texts]
    frequency = Counter(shingle for s in sets for shingle in s)
    postings: dict[tuple[str, ...], list[int]] = {}
    candidates = set()
    for index, shingles in enumerate(sets):
        ordered = sorted(shingles, key=lambda sh: (frequency[sh], sh))
        prefix = len(ordered) - math.ceil(threshold * len(ordered) - 1e-9) + 1
        for shingle in ordered[:prefix]:
            for other in postings.setdefault(shingle, []):
                candidates.add((other, index))
            postings[shingle].append(index)
    return {(i, j) for i, j in candidates if len(sets[i] & sets[j]) >= threshold * len(sets[i] | sets[j])}


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _datasketch_signatures(texts: list[str], num_perm: int, shingle_size: int) -> list[np.ndarray]:
    from datasketch import MinHash  # test extra; imported here so the library does not need it

    shingle_bytes = [[" ".join(s).encode() for s in dedup.shingle_set(t, shingle_size)] for t in texts]
    return [m.hashvalues for m in MinHash.generator(shingle_bytes, num_perm=num_perm)]


def run(
    num_docs: int = 5000,
    num_perm: int = 256,
    shingle_size: int = 5,
    bands: int = 28,
    rows: int = 9,
    threshold: float = 0.8,
    seed: int = 0,
    repeats: int = 3,
) -> dict[str, float]:
    """Runs the benchmark and returns its figures (speeds are the best of `repeats` timings)."""
    config = ml_collections.ConfigDict(
        dict(num_perm=num_perm, shingle_size=shingle_size, seed=seed, bands=bands, rows=rows, threshold=threshold)
    )
    dedup.check_config(config)
    texts = synthetic_corpus(num_docs, seed)
    hasher = dedup.MinHasher.from_config(config)
    ours_s = _best_time(lambda: hasher.signatures(texts), repeats)
    theirs_s = _best_time(lambda: _datasketch_signatures(texts, num_perm, shingle_size), repeats)

    start = time.perf_counter()
    ids = [f"{i:08d}" for i in range(num_docs)]  # zero-padded so string order = index order
    pairs = dedup.near_duplicate_pairs(zip(ids, hasher.signatures(texts)), bands, rows, threshold)
    found = {(int(a), int(b)) for a, b in pairs}
    near_dup_s = time.perf_counter() - start

    truth = true_pairs(texts, shingle_size, threshold)
    hits = len(found & truth)
    return {
        "num_docs": num_docs,
        "num_perm": num_perm,
        "ours_signatures_per_s": num_docs / ours_s,
        "datasketch_signatures_per_s": num_docs / theirs_s,
        "speedup": theirs_s / ours_s,
        "near_dup_seconds": near_dup_s,
        "true_pairs": len(truth),
        "found_pairs": len(found),
        "precision": hits / len(found) if found else 1.0,
        "recall": hits / len(truth) if truth else 1.0,
    }
