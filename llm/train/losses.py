"""Next-token cross-entropy over packed rows, with a loss mask and an optional z-loss, in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_weights(segment_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Weight of predicting token t+1 from position t: (batch, length - 1) float32.

    A prediction counts when its target is marked in `loss_mask` and lies in the same document as the
    position that predicts it (see llm/data/records.py).
    """
    same_segment = segment_ids[:, 1:] == segment_ids[:, :-1]
    return (same_segment & (loss_mask[:, 1:] > 0)).astype(jnp.float32)


def next_token_loss(logits: jax.Array, tokens: jax.Array, weights: jax.Array,
                    z_loss: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sums over the batch of (cross-entropy, z-loss term, weight) for predicting tokens[:, 1:].

    Sums rather than means, so gradient accumulation over microbatches divides once by the total weight and
    equals the full-batch gradient. The z-loss z_loss * log(Z)^2 (PaLM) keeps the softmax normalizer near 1.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = tokens[:, 1:]
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    cross_entropy = jnp.sum((log_normalizer - target_logits) * weights)
    z_term = z_loss * jnp.sum(jnp.square(log_normalizer) * weights)
    return cross_entropy, z_term, jnp.sum(weights)
