"""Green-list watermark of Kirchenbauer et al. 2023 ("A Watermark for Large Language Models"), and its detector.

At every step a keyed hash of the previous token splits the vocabulary: token t is green iff
`token_hash(row_seed(key, previous), t) < gamma * 2**32`, so a fraction gamma of the vocabulary is green, a
different fraction at each previous token. Sampling adds `delta` to the green logits ("soft" watermark), which
nudges the text towards green tokens wherever the model leaves some choice. Detection needs only the token ids and
the key: human text has a green fraction near gamma, watermarked text well above, measured by the one-sided
z-test z = (G - gamma T) / sqrt(T gamma (1 - gamma)) over T scored tokens of which G are green.

The hash is written once with nothing but `^`, `>>`, `*` and `astype` on uint32 arrays, which NumPy and
jax.numpy both evaluate with 32-bit wrap-around: the sampling step (jitted, over the whole vocabulary) and the
detector (NumPy, over the text's bigrams) compute the same bits.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

# MurmurHash3's 32-bit finaliser constants, and odd multipliers (golden-ratio based) that spread small integers
# (token ids) over all 32 bits before they are mixed. NumPy scalars, not Python ints: JAX refuses a Python int
# above 2**31 as an operand, and both libraries keep uint32 (wrapping) arithmetic with a uint32 scalar.
_FMIX_1, _FMIX_2 = np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35)
_SPREAD_PREVIOUS, _SPREAD_TOKEN = np.uint32(0x9E3779B1), np.uint32(0x7FEB352D)
# Fewer scored tokens than this give a z-score too noisy to read (with gamma 0.25 a 16-token text needs 12 or more
# green tokens to reach z = 4): detection refuses them.
MIN_SCORED = 16


def _fmix32(x):
    """MurmurHash3's finaliser on uint32 arrays (NumPy or JAX): every input bit flips each output bit with
    probability about one half."""
    x = x ^ (x >> 16)
    x = x * _FMIX_1
    x = x ^ (x >> 13)
    x = x * _FMIX_2
    return x ^ (x >> 16)


def row_seed(key_words, previous):
    """The seed of the green list after `previous` (uint32 or int32 ids, any shape), for a key given as its two
    32-bit halves `key_words` (..., 2) uint32 (broadcast against `previous`)."""
    spread = previous.astype(np.uint32) * _SPREAD_PREVIOUS
    return _fmix32(key_words[..., 0] ^ _fmix32(key_words[..., 1] ^ _fmix32(spread)))


def token_hash(seed, tokens):
    """The uint32 hash of each token id under `seed` (broadcast): compared with gamma * 2**32 it makes the green
    list. For a fixed seed it is a bijection of the token id, so no two tokens share a hash."""
    return _fmix32(seed ^ (tokens.astype(np.uint32) * _SPREAD_TOKEN))


@dataclasses.dataclass(frozen=True)
class WatermarkParams:
    """A watermark: the secret key (any integer in [0, 2**64); not shown by repr), the green fraction gamma of the
    vocabulary and the bias delta added to the green logits. Hashable: a jitted step may be specialized on it."""

    key: int = dataclasses.field(repr=False)
    gamma: float = 0.25
    delta: float = 2.0

    def __post_init__(self):
        if isinstance(self.key, bool) or not isinstance(self.key, int | np.integer) or not 0 <= self.key < 2**64:
            raise ValueError("Invalid watermark key: it must be an integer in [0, 2**64).")
        if not 0 < self.gamma < 1:
            raise ValueError(f"Invalid watermark gamma={self.gamma!r}: the green fraction must be in (0, 1).")
        if not (math.isfinite(self.delta) and self.delta > 0):
            raise ValueError(f"Invalid watermark delta={self.delta!r}: the green-logit bias must be finite and > 0.")

    @property
    def key_words(self) -> np.ndarray:
        """The key as two uint32 halves (low, high), the form the hash takes."""
        return np.array([int(self.key) & 0xFFFFFFFF, int(self.key) >> 32], np.uint32)

    @property
    def threshold(self) -> int:
        """Hashes below this are green: gamma * 2**32, within uint32."""
        return min(round(self.gamma * 2**32), 2**32 - 1)


def green_mask(key_words: jax.Array, previous: jax.Array, threshold: jax.Array, vocab_size: int) -> jax.Array:
    """(batch, vocab) True where a token is green after each row's previous token (batch,); `key_words` (batch, 2)
    and `threshold` (batch,) may differ per row (or be one row's, broadcast)."""
    seeds = row_seed(jnp.asarray(key_words, jnp.uint32), jnp.asarray(previous))
    hashes = token_hash(seeds[:, None], jnp.arange(vocab_size, dtype=jnp.uint32)[None, :])
    return hashes < jnp.asarray(threshold, jnp.uint32)[..., None]


def watermark_logits(logits: jax.Array, previous_tokens: jax.Array, params: WatermarkParams) -> jax.Array:
    """logits (batch, vocab) with `params.delta` added to the tokens green after each row's previous token."""
    green = green_mask(params.key_words, previous_tokens, params.threshold, logits.shape[-1])
    return jnp.where(green, logits + params.delta, logits)


class Detection(NamedTuple):
    """The z-test of one text: z-score, one-sided p-value, green tokens and scored tokens (distinct bigrams)."""

    z: float
    p_value: float
    green: int
    scored: int

    @property
    def green_fraction(self) -> float:
        return self.green / self.scored


def detect(token_ids: Sequence[int], params: WatermarkParams, min_scored: int = MIN_SCORED) -> Detection:
    """Tests token ids for the watermark of `params` (its key and gamma; delta plays no part).

    Each token after the first is scored against its previous token, and each distinct (previous, token) bigram
    counts once (Kirchenbauer et al.'s "ignore repeated n-grams"): its colour is fixed by the key, so a text that
    repeats a phrase would otherwise count the same coin flip again and again, and human text that repeats a green
    bigram could reach any z. Raises ValueError when fewer than `min_scored` bigrams are left to score.
    """
    ids = np.asarray(token_ids, np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= 2**32):
        raise ValueError("Token ids must be in [0, 2**32).")
    bigrams = np.unique(np.stack([ids[:-1], ids[1:]], axis=1), axis=0) if ids.size > 1 else np.zeros((0, 2), np.int64)
    scored = len(bigrams)
    if scored < max(min_scored, 1):
        raise ValueError(
            f"Only {scored} distinct token bigrams to score (from {ids.size} tokens); detection needs at least "
            f"{max(min_scored, 1)} for a meaningful z-score: give a longer text."
        )
    hashes = token_hash(row_seed(params.key_words, bigrams[:, 0]), bigrams[:, 1])
    green = int(np.sum(hashes < np.uint32(params.threshold)))
    gamma = params.gamma
    z = (green - gamma * scored) / math.sqrt(scored * gamma * (1 - gamma))
    return Detection(z, float(stats.norm.sf(z)), green, scored)
