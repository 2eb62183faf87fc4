"""Building blocks of the transformer: initializers, norms, position encodings, dropout.

Every parameter is created through `sharding.with_logical_axes`, which records its logical axis names
(`embed`, `mlp`, `vocab`, ...); `configs/base.py` maps those names to mesh axes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from llm import sharding

# GPT-2 initialization: N(0, 0.02) everywhere; projections that write into the residual stream are
# scaled by 1/sqrt(2 * num_layers) so the stream's variance does not grow with depth.
INIT_STD = 0.02


def normal_init(logical_axes: tuple[str, ...], std: float = INIT_STD):
    return sharding.with_logical_axes(nnx.initializers.normal(std), logical_axes)


def zeros_init(logical_axes: tuple[str, ...]):
    return sharding.with_logical_axes(nnx.initializers.zeros_init(), logical_axes)


def residual_std(cfg: ml_collections.ConfigDict) -> float:
    return INIT_STD / math.sqrt(2 * cfg.num_layers)


def head_dim(cfg: ml_collections.ConfigDict) -> int:
    return cfg.head_dim or cfg.embed_dim // cfg.num_heads


def over_tokens(layer: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """layer(x) for x: (batch, length, ...), with batch and length flattened into one axis of tokens.

    With two leading axes XLA:CPU computes the weight gradients of the matmuls inside through transposed
    copies of the activations, a quarter of a tiny_es train step; with one it needs none. Elsewhere the
    reshape is free.
    """
    y = layer(x.reshape(-1, *x.shape[2:]))
    return y.reshape(*x.shape[:2], *y.shape[1:])


def make_norm(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
    """RMSNorm or LayerNorm over `embed`, computed in float32 whatever the compute dtype."""
    scale_init = sharding.with_logical_axes(nnx.initializers.ones_init(), ("norm",))
    common = dict(epsilon=cfg.norm_eps, dtype=jnp.float32, param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
    if cfg.norm == "rmsnorm":
        return nnx.RMSNorm(cfg.embed_dim, scale_init=scale_init, **common)
    return nnx.LayerNorm(cfg.embed_dim, scale_init=scale_init, use_bias=True, bias_init=zeros_init(("norm",)), **common)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when `key` is None (evaluation) or rate is 0.

    Functional rather than nnx.Dropout so the key can be derived from (seed, step, layer) and a resumed
    run draws exactly the masks an uninterrupted one would.
    """
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float, max_len: int) -> jax.Array:
    """Rotary position embedding (rotate-half form) of x: (batch, length, heads, head_dim), positions < max_len.

    sin and cos are looked up in tables computed once per shape: evaluated inside the step, XLA recomputes
    them in every fusion that reads them, forward and backward, at a cost of about 4% of a CPU train step.
    """
    sin_table, cos_table = _rope_tables(x.shape[-1] // 2, theta, max_len)
    sin, cos = jnp.asarray(sin_table)[positions][:, :, None, :], jnp.asarray(cos_table)[positions][:, :, None, :]
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


@functools.cache
def _rope_tables(half: int, theta: float, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """sin and cos of position * theta^(-i / half) for every position < max_len: (max_len, half) float32."""
    angles = np.arange(max_len)[:, None] / theta ** (np.arange(half) / half)
    return np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)


def sinusoidal(positions: jax.Array, dim: int) -> jax.Array:
    """The fixed sin/cos table of "Attention is all you need", evaluated at `positions`: (..., dim)."""
    half = dim // 2
    inv_freq = 1.0 / 10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
