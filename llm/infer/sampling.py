"""Turning next-token logits into tokens: greedy, temperature, top-k, top-p, min-p, repetition penalty."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. Hashable: the jitted decode step is specialized on it."""

    temperature: float = 0.0  # 0 picks the most likely token (greedy, deterministic).
    top_k: int = 0  # Keep only the k most likely tokens (0: off).
    top_p: float = 1.0  # Keep the smallest set of tokens whose probability reaches p (nucleus; 1: off).
    min_p: float = 0.0  # Drop tokens less likely than min_p times the most likely one (0: off).
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output (CTRL; 1: off).

    def __post_init__(self):
        checks = {
            "temperature": self.temperature >= 0, "top_k": self.top_k >= 0, "top_p": 0 < self.top_p <= 1,
            "min_p": 0 <= self.min_p < 1, "repetition_penalty": self.repetition_penalty > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"Invalid sampling parameter {name}={getattr(self, name)!r} (temperature >= 0, "
                                 "top_k >= 0, 0 < top_p <= 1, 0 <= min_p < 1, repetition_penalty > 0).")


def sample(logits: jax.Array, key: jax.Array, params: SamplingParams, seen: jax.Array) -> jax.Array:
    """Next tokens (batch,) from logits (batch, vocab); `seen` (batch, vocab) marks tokens already present."""
    logits = logits.astype(jnp.float32)
    if params.repetition_penalty != 1.0:
        penalized = jnp.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = jnp.where(seen, penalized, logits)
    if params.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / params.temperature
    if params.top_k:
        kth_largest = jax.lax.top_k(logits, params.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if params.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
        # A token stays if the tokens more likely than it have not yet reached top_p.
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        cutoff = jnp.min(jnp.where(mass_before < params.top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    if params.min_p > 0.0:
        probs = jax.nn.softmax(logits, axis=-1)
        logits = jnp.where(probs < params.min_p * jnp.max(probs, axis=-1, keepdims=True), -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
