"""Sentence embeddings from final hidden states: masked mean or last-token pooling, then L2 normalisation.

One function for what is trained and what is embedded: the contrastive objective (llm/train/losses.py) and
the embedder (llm/rag/embeddings.py) both pool through `pool`, so a trained embedder is used exactly as it
was trained.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Pooling name -> how a row's vector is taken; the keys are exactly configs.base.CHOICES["train.contrastive_pooling"].
POOLINGS = ("mean", "last")


def l2_normalize(x: jax.Array) -> jax.Array:
    """`x` scaled to unit L2 norm along its last axis (a zero vector stays zero rather than becoming NaN)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def pool(hidden: jax.Array, segment_ids: jax.Array, pooling: str, normalize: bool = True) -> jax.Array:
    """(rows, embed) float32 pooled `hidden` (rows, length, embed) of right-padded rows (segment id > 0 on a
    row's tokens, 0 on padding): the mean over its tokens, or the state of its last token.

    A row of padding only pools to zeros (mean) or its first position (last): callers mask such rows out.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
    hidden = hidden.astype(jnp.float32)
    real = segment_ids > 0
    if pooling == "mean":
        # `where`, not a product: padding positions may hold NaN (with some attention kernels they attend to
        # nothing), and 0 * NaN would spread it.
        summed = jnp.sum(jnp.where(real[..., None], hidden, 0.0), axis=1)
        pooled = summed / jnp.maximum(jnp.sum(real, axis=1, keepdims=True), 1)
    else:
        last = jnp.maximum(jnp.sum(real, axis=1) - 1, 0)
        pooled = hidden[jnp.arange(hidden.shape[0]), last]
    return l2_normalize(pooled) if normalize else pooled


def truncate(embeddings: jax.Array, dim: int) -> jax.Array:
    """A Matryoshka embedding's first `dim` components, re-normalised to unit length: the smaller embedding
    that training with `train.matryoshka_dims` containing `dim` taught the prefix to be."""
    if not 0 < dim <= embeddings.shape[-1]:
        raise ValueError(f"Cannot truncate {embeddings.shape[-1]}-dimensional embeddings to {dim} dimensions.")
    return l2_normalize(embeddings[..., :dim])
