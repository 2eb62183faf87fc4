"""Turning next-token logits into tokens: greedy, temperature, top-k, top-p, min-p, repetition penalty, and the
green-list watermark (llm/infer/watermark.py).

`sample` takes one SamplingParams for the whole batch (static: the step is specialized on it);
`sample_rows` takes parameters per row as arrays, for a server batching requests that ask for different ones.
The order is: repetition penalty, watermark bias, then greedy or temperature and the filters (as Hugging Face
applies a watermark logits processor before its warpers), so a greedy watermarked row takes the argmax of the
biased logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llm.infer.watermark import WatermarkParams, green_mask, watermark_logits


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. Hashable: the jitted decode step is specialized on it."""

    temperature: float = 0.0  # 0 picks the most likely token (greedy, deterministic).
    top_k: int = 0  # Keep only the k most likely tokens (0: off).
    top_p: float = 1.0  # Keep the smallest set of tokens whose probability reaches p (nucleus; 1: off).
    min_p: float = 0.0  # Drop tokens less likely than min_p times the most likely one (0: off).
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output (CTRL; 1: off).
    watermark: WatermarkParams | None = None  # Bias towards a keyed green list of tokens (None: off).

    def __post_init__(self):
        checks = {
            "temperature": self.temperature >= 0,
            "top_k": self.top_k >= 0,
            "top_p": 0 < self.top_p <= 1,
            "min_p": 0 <= self.min_p < 1,
            "repetition_penalty": self.repetition_penalty > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(
                    f"Invalid sampling parameter {name}={getattr(self, name)!r} (temperature >= 0, "
                    "top_k >= 0, 0 < top_p <= 1, 0 <= min_p < 1, repetition_penalty > 0)."
                )


def greedy(logits: jax.Array) -> jax.Array:
    """The most likely token of each row (batch,), the first one on ties: `jnp.argmax` of NaN-free logits, in
    two plain reductions. XLA:CPU reduces argmax's (value, index) pairs in one slow variadic reduction: about
    2 ms of a 64-row decoding step over 8K tokens. (A row with a NaN gets the last token, argmax its first NaN.)"""
    vocab = logits.shape[-1]
    most_likely = logits == jnp.max(logits, axis=-1, keepdims=True)
    return jnp.min(jnp.where(most_likely, jnp.arange(vocab, dtype=jnp.int32), vocab - 1), axis=-1)


def _penalize(logits: jax.Array, seen: jax.Array, penalty) -> jax.Array:
    """CTRL repetition penalty on the tokens marked in `seen`; `penalty` is a scalar or (batch, 1)."""
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalized, logits)


def _top_p_filter(logits: jax.Array, top_p) -> jax.Array:
    """Masks the tokens outside the nucleus of mass `top_p` (a scalar or (batch, 1))."""
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    # A token stays if the tokens more likely than it have not yet reached top_p.
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def _min_p_filter(logits: jax.Array, min_p) -> jax.Array:
    """Masks the tokens less likely than `min_p` (a scalar or (batch, 1)) times the most likely one."""
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.where(probs < min_p * jnp.max(probs, axis=-1, keepdims=True), -jnp.inf, logits)


def sample(
    logits: jax.Array,
    key: jax.Array,
    params: SamplingParams,
    seen: jax.Array,
    previous: jax.Array | None = None,
) -> jax.Array:
    """Next tokens (batch,) from logits (batch, vocab); `seen` (batch, vocab) marks tokens already present and
    `previous` (batch,) is each row's last token, which a watermark needs (its green list depends on it)."""
    logits = logits.astype(jnp.float32)
    if params.repetition_penalty != 1.0:
        logits = _penalize(logits, seen, params.repetition_penalty)
    if params.watermark is not None:
        if previous is None:
            raise ValueError("Sampling with a watermark needs each row's previous token (`previous`).")
        logits = watermark_logits(logits, previous, params.watermark)
    if params.temperature == 0.0:
        return greedy(logits)
    logits = logits / params.temperature
    if params.top_k:
        kth_largest = jax.lax.top_k(logits, params.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if params.top_p < 1.0:
        logits = _top_p_filter(logits, params.top_p)
    if params.min_p > 0.0:
        logits = _min_p_filter(logits, params.min_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class RowSampling(NamedTuple):
    """Sampling parameters per row of a batch, as arrays (batch,), so that rows of one jitted step can each
    follow their own request (continuous batching). Same meaning and "off" values as SamplingParams."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    watermark_key: jax.Array  # (batch, 2) uint32: the key's low and high halves.
    watermark_threshold: jax.Array  # uint32: gamma * 2**32.
    watermark_delta: jax.Array  # 0: the row is not watermarked.

    @classmethod
    def stack(cls, rows: Sequence[SamplingParams]) -> RowSampling:
        """Host arrays for a batch whose row i follows rows[i]."""
        dtypes = {"temperature": np.float32, "top_k": np.int32, "top_p": np.float32, "min_p": np.float32}
        dtypes["repetition_penalty"] = np.float32
        plain = {name: np.array([getattr(p, name) for p in rows], dtype) for name, dtype in dtypes.items()}
        marks = [p.watermark for p in rows]
        return cls(
            **plain,
            watermark_key=np.array([m.key_words if m else [0, 0] for m in marks], np.uint32).reshape(len(rows), 2),
            watermark_threshold=np.array([m.threshold if m else 0 for m in marks], np.uint32),
            watermark_delta=np.array([m.delta if m else 0.0 for m in marks], np.float32),
        )


def sample_rows(
    logits: jax.Array,
    keys: jax.Array,
    params: RowSampling,
    seen: jax.Array,
    previous: jax.Array | None = None,
) -> jax.Array:
    """Next tokens (batch,) with each row's own parameters and PRNG key (`keys`: (batch,) typed keys).

    `previous` (batch,) is each row's last token, which the rows that watermark need; without it (callers that
    never watermark) no row is watermarked.

    Every filter runs on every row (a row whose filter is off is left unchanged), so one compiled step
    serves any mix of requests; a filter no row uses is skipped, and a batch of greedy rows only takes the
    argmax (sorting the vocabulary of every row, every step, cost more than the rest of the sampling). A row
    with temperature 0 takes the argmax, exactly like `sample`.
    """
    column = lambda x: x[:, None]
    logits = _penalize(logits.astype(jnp.float32), seen, column(params.repetition_penalty))
    if previous is not None:
        logits = _if_any(params.watermark_delta > 0, lambda x: _watermark_rows(x, previous, params), logits)
    chosen = greedy(logits)

    def draw(logits: jax.Array) -> jax.Array:
        logits = logits / column(jnp.where(params.temperature > 0, params.temperature, 1.0))
        logits = _if_any(params.top_k > 0, lambda x: _top_k_rows(x, params.top_k), logits)
        top_p = lambda x: jnp.where(column(params.top_p < 1.0), _top_p_filter(x, column(params.top_p)), x)
        logits = _if_any(params.top_p < 1.0, top_p, logits)
        logits = _if_any(params.min_p > 0.0, lambda x: _min_p_filter(x, column(params.min_p)), logits)
        drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, logits).astype(jnp.int32)
        return jnp.where(params.temperature > 0, drawn, chosen)

    return jax.lax.cond(jnp.any(params.temperature > 0), draw, lambda _: chosen, logits)


def _if_any(rows: jax.Array, filter_rows, logits: jax.Array) -> jax.Array:
    """filter_rows(logits) when any row asks for the filter (its rows that do not are left as they are)."""
    return jax.lax.cond(jnp.any(rows), filter_rows, lambda x: x, logits)


def _watermark_rows(logits: jax.Array, previous: jax.Array, params: RowSampling) -> jax.Array:
    """Adds each watermarked row's delta to its green logits; the other rows are left exactly as they are."""
    green = green_mask(params.watermark_key, previous, params.watermark_threshold, logits.shape[-1])
    delta = params.watermark_delta[:, None]
    return jnp.where(green & (delta > 0), logits + delta, logits)


def _top_k_rows(logits: jax.Array, top_k: jax.Array) -> jax.Array:
    """Masks the tokens below each row's top_k-th largest (rows with top_k 0 keep all)."""
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    kth_largest = jnp.take_along_axis(sorted_logits, jnp.clip(top_k - 1, 0, logits.shape[-1] - 1)[:, None], axis=-1)
    return jnp.where((top_k > 0)[:, None] & (logits < kth_largest), -jnp.inf, logits)
