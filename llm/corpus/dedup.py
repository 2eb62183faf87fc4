"""Exact and near-duplicate detection: normalized-text hashes, MinHash signatures, LSH banding, union-find.

Every function here is a pure function of its inputs, so the local runner and the Apache Beam pipeline
compute the same decisions from the same pieces:

  exact      key = exact_key(text)                           (per document, embarrassingly parallel)
             exact_duplicates(ids, keys)                     (per key group, or all at once: smallest id kept)
  near       sig = MinHasher(...).signature(text)            (per document, embarrassingly parallel)
             for key in band_keys(sig, bands, rows): group  (a shuffle on the band key)
             bucket_pairs(members, threshold)                (per bucket: candidates confirmed by similarity)
             duplicate_map(all confirmed pairs)              (union-find; the smallest id of a cluster is kept)

The Beam runner distributes these steps (GroupByKey on the exact key and on the band key); the local runner
and the benchmark run the near-dedup steps in memory through `near_duplicate_pairs` and `near_duplicates`.

Hashing is stable across processes, machines and runs: no Python `hash()` (salted per process), only
hashlib and fixed-width NumPy integer arithmetic, whose wrap-around is defined.

MinHash details. A document's words are maximal runs of letters and digits of its NFC, case-folded text
(ASCII punctuation, Latin-1 punctuation such as ¿ ¡ « » and the General Punctuation block such as — “ ” …
separate words); `words()` is the reference definition. A shingle is `shingle_size` consecutive words
(a document with fewer words is one shingle of all of them). Words are hashed to 64 bits by a linear hash
with pseudo-random position weights, shingles by a polynomial over their word hashes, both finished with
the MurmurHash3 64-bit finalizer and truncated to 32 bits. Each of the `num_perm` permutations is the
affine bijection x -> a*x + b mod 2^32 with odd `a` (the scheme datasketch >= 2.0 uses by default); the
signature keeps the minimum per permutation, as uint32. The whole document batch is processed with
vectorised NumPy over bytes, words and shingles, with no Python loop per word.
"""

from __future__ import annotations

import hashlib
import re
import struct
import unicodedata
from collections.abc import Iterable, Sequence

import ml_collections
import numpy as np

_U64 = np.uint64
_MAX32 = np.uint32(0xFFFFFFFF)
# A batch is cut once this many UTF-8 bytes are gathered: big enough to amortise NumPy call overhead,
# small enough that the per-byte temporaries stay in cache-friendly tens of megabytes.
_BATCH_BYTES = 1 << 20
# Shingles permuted at once: a (num_perm, 8192) uint32 block, 8 MiB with 256 permutations.
_PERM_CHUNK = 8192
# Constants of the word and shingle hashes; arbitrary odd 64-bit values, fixed forever (changing any of
# them changes every signature, which tests/test_dedup.py pins).
_POSITION_SALT = _U64(0x9E3779B97F4A7C15)
_LENGTH_MULT = _U64(0xC2B2AE3D27D4EB4F)
_SHINGLE_MULT = _U64(0x100000001B3)
_WORD_RE = re.compile("[0-9A-Za-z\u00c0-\u1fff\u2080-\U0010ffff]+")


def normalize_text(text: str) -> str:
    """NFC, case-folded text: the form both exact and near-duplicate detection compare."""
    return unicodedata.normalize("NFC", text).casefold()


def exact_key(text: str) -> str:
    """Stable hex key of the text up to Unicode form, letter case and whitespace runs."""
    collapsed = " ".join(normalize_text(text).split())
    return hashlib.blake2b(collapsed.encode("utf-8"), digest_size=16).hexdigest()


def exact_duplicates(ids: Sequence[str], keys: Sequence[str]) -> dict[str, str]:
    """Maps every exact duplicate id to the smallest id with the same key (`exact_key` of its text).

    Takes keys rather than texts so that the keys can be computed where the texts are (worker processes,
    Beam workers) and only the small keys gathered; the keeper does not depend on the order of the ids.
    """
    keeper: dict[str, str] = {}
    for doc_id, key in zip(ids, keys, strict=True):
        keeper[key] = min(keeper.get(key, doc_id), doc_id)
    return {doc_id: keeper[key] for doc_id, key in zip(ids, keys) if keeper[key] != doc_id}


def words(text: str) -> list[str]:
    """Reference word segmentation of MinHash (the vectorised path in `MinHasher` computes the same)."""
    return _WORD_RE.findall(normalize_text(text))


def shingle_set(text: str, shingle_size: int) -> set[tuple[str, ...]]:
    """The exact shingle set MinHash estimates Jaccard similarity over (used to measure its accuracy)."""
    tokens = words(text)
    if 0 < len(tokens) < shingle_size:
        return {tuple(tokens)}
    return {tuple(tokens[i : i + shingle_size]) for i in range(len(tokens) - shingle_size + 1)}


def _mix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer, element-wise (uint64 multiplication wraps modulo 2^64)."""
    x = x ^ (x >> _U64(33))
    x *= _U64(0xFF51AFD7ED558CCD)
    x ^= x >> _U64(33)
    x *= _U64(0xC4CEB9FE1A85EC53)
    x ^= x >> _U64(33)
    return x


def _position_weights(offsets: np.ndarray) -> np.ndarray:
    """Weight of a byte at `offsets` within its word in the word hash."""
    return _mix64(offsets.astype(_U64) + _POSITION_SALT)


# The weights of the first 64 offsets, which cover nearly every word, are looked up instead of computed.
_POSITION_WEIGHTS = _position_weights(np.arange(64))


def _word_byte_table() -> np.ndarray:
    table = np.ones(256, dtype=bool)  # bytes >= 0x80 belong to multi-byte letters unless unmarked below
    table[:128] = False
    for lo, hi in (("0", "9"), ("A", "Z"), ("a", "z")):
        table[ord(lo) : ord(hi) + 1] = True
    return table


_WORD_BYTE = _word_byte_table()


def _word_mask(buf: np.ndarray) -> np.ndarray:
    """True on the UTF-8 bytes that belong to words (the byte-level twin of `_WORD_RE`)."""
    mask = _WORD_BYTE[buf]
    # U+0080..U+00BF (Latin-1 punctuation: ¡ « » ¿ NBSP ...) are the two bytes C2 xx.
    lead = np.flatnonzero(buf[:-1] == 0xC2)
    mask[lead] = False
    mask[lead + 1] = False
    # U+2000..U+207F (General Punctuation: — “ ” … and typographic spaces) are E2 80 xx and E2 81 xx.
    lead = np.flatnonzero((buf[:-2] == 0xE2) & ((buf[1:-1] & 0xFE) == 0x80))
    for offset in range(3):
        mask[lead + offset] = False
    return mask


class MinHasher:
    """MinHash signatures of documents over word shingles; see the module docstring for the scheme."""

    def __init__(self, num_perm: int = 256, shingle_size: int = 5, seed: int = 0):
        if num_perm < 1 or shingle_size < 1:
            raise ValueError(f"num_perm ({num_perm}) and shingle_size ({shingle_size}) must be >= 1.")
        self.num_perm = num_perm
        self.shingle_size = shingle_size
        self.seed = seed
        # Permutation parameters come from blake2b, not a NumPy generator, so they never change with the
        # NumPy version.
        digest = hashlib.blake2b(f"minhash:{seed}:{num_perm}".encode(), digest_size=64).digest()
        stream = b"".join(
            hashlib.blake2b(digest + i.to_bytes(4, "little"), digest_size=64).digest()
            for i in range((8 * num_perm + 63) // 64)
        )
        params = np.frombuffer(stream[: 8 * num_perm], dtype="<u4").reshape(2, num_perm)
        self._a = params[0] | np.uint32(1)  # odd, so x -> a*x + b is a bijection modulo 2^32
        self._b = params[1].copy()

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> MinHasher:
        """Builds the hasher of the `dedup` config section."""
        return cls(config.num_perm, config.shingle_size, config.seed)

    def signature(self, text: str) -> np.ndarray:
        """The (num_perm,) uint32 signature of one document."""
        return self.signatures([text])[0]

    def signatures(self, texts: Iterable[str]) -> np.ndarray:
        """The (num_docs, num_perm) uint32 signatures; a document without words gets all 0xFFFFFFFF.

        Documents are processed in batches of about 1 MiB of text; a larger single document is one batch,
        with temporaries of about 30 bytes per byte of its text.
        """
        encoded = [normalize_text(text).encode("utf-8") for text in texts]
        out = np.full((len(encoded), self.num_perm), _MAX32, dtype=np.uint32)
        begin = size = 0
        for end, data in enumerate(encoded, start=1):
            size += len(data) + 1
            if size >= _BATCH_BYTES or end == len(encoded):
                self._fill(encoded[begin:end], out[begin:end])
                begin, size = end, 0
        return out

    def _fill(self, batch: list[bytes], out: np.ndarray) -> None:
        """Computes the signatures of a batch of encoded documents into `out` (rows of the batch)."""
        word_hashes, word_docs = self._word_hashes(batch)
        shingles, shingle_docs = self._shingle_hashes(word_hashes, word_docs, len(batch))
        # Permutations along rows, shingles along columns: written in place and reduced along the
        # contiguous axis, this layout is ~10x faster than the (shingles, num_perm) one.
        permuted = np.empty((self.num_perm, _PERM_CHUNK), dtype=np.uint32)
        for start in range(0, len(shingles), _PERM_CHUNK):
            values = shingles[start : start + _PERM_CHUNK]
            docs = shingle_docs[start : start + _PERM_CHUNK]
            block = permuted[:, : len(values)]
            np.multiply(self._a[:, None], values[None, :], out=block)  # uint32: wraps modulo 2^32
            block += self._b[:, None]
            # Shingles are sorted by document, so each document is a contiguous run of columns.
            firsts = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]])
            rows = docs[firsts]
            out[rows] = np.minimum(out[rows], np.minimum.reduceat(block, firsts, axis=1).T)

    @staticmethod
    def _word_hashes(batch: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """64-bit hash and document index of every word of the batch, in text order."""
        buf = np.frombuffer(b" ".join(batch), dtype=np.uint8)
        doc_starts = np.cumsum([0] + [len(data) + 1 for data in batch[:-1]])
        in_word = _word_mask(buf)
        positions = np.flatnonzero(in_word)
        is_first = np.ones(len(positions), dtype=bool)
        is_first[1:] = positions[1:] != positions[:-1] + 1
        firsts = np.flatnonzero(is_first)
        if len(firsts) == 0:
            return np.empty(0, dtype=_U64), np.empty(0, dtype=np.int64)
        lengths = np.diff(np.r_[firsts, len(positions)])
        offset_in_word = np.arange(len(positions)) - np.repeat(firsts, lengths)
        # Linear hash sum_r (byte_r + 1) * w(r) with pseudo-random weights w(r) = mix64(r + salt):
        # distinct words of equal length collide with probability ~2^-56, and no weight table bounds
        # the word length.
        weights = _POSITION_WEIGHTS[np.minimum(offset_in_word, len(_POSITION_WEIGHTS) - 1)]
        beyond = np.flatnonzero(offset_in_word >= len(_POSITION_WEIGHTS))
        weights[beyond] = _position_weights(offset_in_word[beyond])
        terms = (buf[positions].astype(_U64) + _U64(1)) * weights
        sums = np.add.reduceat(terms, firsts)
        hashes = _mix64(sums + lengths.astype(_U64) * _LENGTH_MULT)
        docs = np.searchsorted(doc_starts, positions[firsts], side="right") - 1
        return hashes, docs

    def _shingle_hashes(
        self, word_hashes: np.ndarray, word_docs: np.ndarray, num_docs: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """32-bit hash and document index of every shingle, sorted by document."""
        k = self.shingle_size
        n = len(word_hashes)
        if n == 0:
            return np.empty(0, dtype=np.uint32), np.empty(0, dtype=np.int64)
        doc_end = np.searchsorted(word_docs, np.arange(num_docs), side="right")
        doc_begin = np.searchsorted(word_docs, np.arange(num_docs), side="left")
        starts = np.arange(n)
        end_of_mine = doc_end[word_docs]
        combined = np.zeros(n, dtype=_U64)
        for j in range(k):
            # Words past the document's end contribute 0: only short documents keep such windows.
            inside = starts + j < end_of_mine
            combined = combined * _SHINGLE_MULT + np.where(inside, word_hashes[np.minimum(starts + j, n - 1)], 0)
        short_doc = (doc_end - doc_begin)[word_docs] < k
        keep = (starts + k <= end_of_mine) | (short_doc & (starts == doc_begin[word_docs]))
        return _mix64(combined[keep]).astype(np.uint32), word_docs[keep]


def band_keys(signature: np.ndarray, bands: int, rows: int) -> list[bytes]:
    """LSH keys of a signature: band index (2 bytes) + the band's `rows` values; equal key = candidate."""
    if bands * rows > len(signature):
        raise ValueError(f"bands * rows = {bands * rows} exceeds the signature length {len(signature)}.")
    values = np.asarray(signature, dtype="<u4")
    return [struct.pack(">H", band) + values[band * rows : (band + 1) * rows].tobytes() for band in range(bands)]


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """MinHash estimate of the Jaccard similarity: the fraction of permutations whose minima agree."""
    return float(np.mean(np.asarray(sig_a) == np.asarray(sig_b)))


def bucket_pairs(members: Sequence[tuple[str, np.ndarray]], threshold: float) -> list[tuple[str, str]]:
    """Confirmed pairs of one LSH bucket: (smaller id, larger id) whose estimated Jaccard >= threshold."""
    ids = [doc_id for doc_id, _ in members]
    sigs = np.stack([sig for _, sig in members]) if members else np.empty((0, 0))
    pairs = []
    for i in range(len(ids) - 1):
        similar = (sigs[i + 1 :] == sigs[i]).mean(axis=1) >= threshold
        pairs.extend(tuple(sorted((ids[i], ids[j]))) for j in np.flatnonzero(similar) + i + 1)
    return pairs


def duplicate_map(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Union-find over duplicate pairs: maps every duplicate id to the smallest id of its cluster.

    The keeper is the minimum of the connected component, so the result depends only on the set of
    pairs, never on their order.
    """
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        root = x
        while parent.setdefault(root, root) != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for a, b in pairs:
        root_a, root_b = find(a), find(b)
        if root_a != root_b:
            # The smaller root wins, so every root is the minimum of its component.
            parent[max(root_a, root_b)] = min(root_a, root_b)
    return {x: find(x) for x in list(parent) if find(x) != x}


def check_config(config: ml_collections.ConfigDict) -> None:
    """Validates the `dedup` config section, naming the offending key."""
    for key in ("num_perm", "shingle_size", "bands", "rows"):
        if int(config[key]) < 1:
            raise ValueError(f"dedup.{key} must be >= 1, got {config[key]}.")
    if config.bands * config.rows > config.num_perm:
        raise ValueError(
            f"dedup.bands * dedup.rows = {config.bands * config.rows} exceeds dedup.num_perm = {config.num_perm}."
        )
    if not 0.0 < config.threshold <= 1.0:
        raise ValueError(f"dedup.threshold must be in (0, 1], got {config.threshold}.")


def near_duplicate_pairs(
    members: Iterable[tuple[str, np.ndarray]], bands: int, rows: int, threshold: float
) -> set[tuple[str, str]]:
    """In-memory LSH: confirmed pairs (smaller id, larger id) of (id, signature) members.

    Members are grouped into buckets by `band_keys` and each bucket is confirmed by `bucket_pairs`; the same
    pair often shares several bands, and the set keeps one copy of it.
    """
    buckets: dict[bytes, list[tuple[str, np.ndarray]]] = {}
    for member in members:
        for key in band_keys(member[1], bands, rows):
            buckets.setdefault(key, []).append(member)
    return {pair for bucket in buckets.values() if len(bucket) > 1 for pair in bucket_pairs(bucket, threshold)}


def near_duplicates(members: Iterable[tuple[str, np.ndarray]], config: ml_collections.ConfigDict) -> dict[str, str]:
    """In-memory near dedup of (id, signature) members: duplicate id -> id kept for its cluster.

    `config` is the `dedup` section. Signatures come from `MinHasher.from_config(config)`, computed wherever
    the texts are; the result depends on the set of members, not on their order.
    """
    check_config(config)
    members = list(members)
    if len({doc_id for doc_id, _ in members}) != len(members):
        raise ValueError("near_duplicates needs unique document ids.")
    return duplicate_map(near_duplicate_pairs(members, config.bands, config.rows, config.threshold))
