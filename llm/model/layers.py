"""Building blocks of the transformer: initializers, norms, position encodings, dropout.

Every parameter is created through `sharding.with_logical_axes`, which records its logical axis names
(`embed`, `mlp`, `vocab`, ...); `configs/base.py` maps those names to mesh axes.
"""

from __future__ import annotations

import dataclasses
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


def make_head_norm(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.RMSNorm:
    """RMSNorm over `head_dim` with one scale shared by every head (model.qk_norm, Qwen3), in float32."""
    return nnx.RMSNorm(
        head_dim(cfg),
        epsilon=cfg.norm_eps,
        dtype=jnp.float32,
        param_dtype=jnp.dtype(cfg.param_dtype),
        scale_init=sharding.with_logical_axes(nnx.initializers.ones_init(), ("head_dim",)),
        rngs=rngs,
    )


class Embed(nnx.Embed):
    """The token embedding; its `attend` (the tied output projection) reads the table in its stored layout.

    Written as x @ E.T, XLA:CPU copies a transposed table on every call, 131 MB per decoded token for a
    32K x 1024 table; E x reads it as it is.
    """

    def attend(self, query: jax.Array) -> jax.Array:
        query, embedding = self.promote_dtype((query, self.embedding[...]), dtype=self.dtype)
        return jnp.einsum("vd,...d->...v", embedding, query)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when `key` is None (evaluation) or rate is 0.

    Functional rather than nnx.Dropout so the key can be derived from (seed, step, layer) and a resumed
    run draws exactly the masks an uninterrupted one would.
    """
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Rope:
    """The rotary encoding of a model: base frequency, table length and frequency scaling (hashable, so the
    tables are computed once per model shape).

    `scaling` (model.rope_scaling) stretches the wavelengths for contexts longer than pretraining saw, as
    transformers' `_compute_linear_scaling_rope_parameters` and `_compute_llama3_parameters` do: "linear"
    divides every frequency by `factor`; "llama3" (Llama 3.1) divides the low frequencies (wavelength above
    original_max_len / low_freq_factor) by `factor`, keeps the high ones (below original_max_len /
    high_freq_factor) and interpolates smoothly between.
    """

    theta: float
    max_len: int
    scaling: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> Rope:
        return cls(
            cfg.rope_theta,
            cfg.max_seq_len,
            cfg.rope_scaling,
            cfg.rope_scaling_factor,
            cfg.rope_low_freq_factor,
            cfg.rope_high_freq_factor,
            cfg.rope_original_max_len,
        )


def _llama3_frequencies(inv_freq: np.ndarray, spec: Rope) -> np.ndarray:
    wavelength = 2 * np.pi / inv_freq
    low_freq_wavelength = spec.original_max_len / spec.low_freq_factor
    high_freq_wavelength = spec.original_max_len / spec.high_freq_factor
    scaled = np.where(wavelength > low_freq_wavelength, inv_freq / spec.factor, inv_freq)
    smooth = (spec.original_max_len / wavelength - spec.low_freq_factor) / (
        spec.high_freq_factor - spec.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
    medium = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return np.where(medium, smoothed, scaled)


# model.rope_scaling -> (unscaled inverse frequencies, spec) -> the frequencies used.
ROPE_SCALINGS: dict[str, Callable[[np.ndarray, Rope], np.ndarray]] = {
    "none": lambda inv_freq, spec: inv_freq,
    "linear": lambda inv_freq, spec: inv_freq / spec.factor,
    "llama3": _llama3_frequencies,
}


def rope_frequencies(half: int, spec: Rope) -> np.ndarray:
    """The `half` inverse frequencies theta^(-i / half) of RoPE, scaled as `spec.scaling` says (float64)."""
    return ROPE_SCALINGS[spec.scaling](1.0 / spec.theta ** (np.arange(half) / half), spec)


def rope(x: jax.Array, positions: jax.Array, spec: Rope) -> jax.Array:
    """Rotary position embedding (rotate-half form) of x: (batch, length, heads, head_dim), positions < max_len.

    sin and cos are looked up in tables computed once per shape: evaluated inside the step, XLA recomputes
    them in every fusion that reads them, forward and backward, at a cost of about 4% of a CPU train step.
    """
    sin_table, cos_table = _rope_tables(x.shape[-1] // 2, spec)
    sin, cos = jnp.asarray(sin_table)[positions][:, :, None, :], jnp.asarray(cos_table)[positions][:, :, None, :]
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


@functools.cache
def _rope_tables(half: int, spec: Rope) -> tuple[np.ndarray, np.ndarray]:
    """sin and cos of position * frequency for every position < max_len: (max_len, half) float32."""
    angles = np.arange(spec.max_len)[:, None] * rope_frequencies(half, spec)
    return np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)


def sinusoidal(positions: jax.Array, dim: int) -> jax.Array:
    """The fixed sin/cos table of "Attention is all you need", evaluated at `positions`: (..., dim)."""
    half = dim // 2
    inv_freq = 1.0 / 10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
