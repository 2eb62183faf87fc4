"""Log-probabilities of tokens under a model's logits, in float32, computed one way everywhere.

The training loss, DPO's sequence log-probabilities, evaluation's scores and the server's logprobs all read
log p(target) = logit[target] - log Z, with log Z = logsumexp(logits) in float32 whatever the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def log_normalizer(logits: jax.Array) -> jax.Array:
    """log Z = logsumexp over the vocabulary (...) float32, for logits (..., vocab)."""
    return jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)


def target_logprobs(logits: jax.Array, targets: jax.Array, normalizer: jax.Array | None = None) -> jax.Array:
    """log p(target) (...) float32, for logits (..., vocab) and integer targets (...).

    `normalizer`: `log_normalizer(logits)` when the caller needs it too (the z-loss), so that it and its
    gradient are computed once: XLA does not merge two of them.
    """
    logits = logits.astype(jnp.float32)
    normalizer = log_normalizer(logits) if normalizer is None else normalizer
    return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - normalizer


def log_softmax(logits: jax.Array) -> jax.Array:
    """log p of every token (..., vocab) float32: exactly the numbers `target_logprobs` picks out, so that a
    token's log-probability and its entry among the top alternatives agree."""
    return logits.astype(jnp.float32) - log_normalizer(logits)[..., None]
