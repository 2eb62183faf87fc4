"""Causal self-attention with multi-head, grouped-query and multi-query variants, a KV cache, and the kernel.

`num_kv_heads` sets the variant: equal to `num_heads` is multi-head, 1 is multi-query, anything that
divides `num_heads` is grouped-query. Packed rows carry segment ids, and a query attends only to earlier
keys of its own segment, so documents packed into one row never see each other.

For generation, a `LayerCache` holds one layer's keys and values for `max_len` positions. New keys and
values are written at the cache's `index`, and queries attend to every written position up to their own.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from llm import sharding
from llm.model import layers

ATTENTION_IMPLS = ("auto", "xla", "cudnn")


def choose_impl(requested: str, dtype: jnp.dtype) -> str:
    """The kernel for this platform: cuDNN flash attention on GPU (16-bit dtypes only), XLA elsewhere.

    The XLA path is the reference that tests compare other kernels against.
    """
    if requested != "auto":
        return requested
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def attention_mask(query_segments: jax.Array, key_segments: jax.Array) -> jax.Array:
    """(batch, 1, q_len, k_len) boolean mask: causal, and only within the same segment."""
    q_len, k_len = query_segments.shape[-1], key_segments.shape[-1]
    causal = jnp.tril(jnp.ones((q_len, k_len), dtype=bool), k=k_len - q_len)
    same_segment = query_segments[:, :, None] == key_segments[:, None, :]
    return (causal[None] & same_segment)[:, None]


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array,
                          impl: str) -> jax.Array:
    """softmax(q k^T / sqrt(d) + mask) v with q: (B, T, N, H), k and v: (B, T, K, H); returns (B, T, N, H).

    The softmax runs in float32 inside `jax.nn.dot_product_attention`, which also handles K < N (GQA).
    """
    mask = attention_mask(segment_ids, segment_ids)
    return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation=impl)


class LayerCache(NamedTuple):
    """One layer's view of the KV cache; `segment_ids` and `index` are shared by all layers.

    keys, values: (batch, max_len, kv_heads, head_dim). segment_ids: (batch, max_len), the segment of each
    cached position *including* the tokens being written now (0 = padding or not yet written).
    index: (batch,) int32, where each row's first token of this call is written. Rows may be at different
    positions, which is what continuous batching needs.
    """

    keys: jax.Array
    values: jax.Array
    segment_ids: jax.Array
    index: jax.Array


def write_rows(cache: jax.Array, update: jax.Array, index: jax.Array) -> jax.Array:
    """Writes update[b] into cache[b] starting at position index[b] along axis 1 (in place under donation)."""
    def write_row(row: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_slice_in_dim(row, new, start, axis=0)
    return jax.vmap(write_row)(cache, update, index)


def cached_attention(query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array,
                     cache: LayerCache) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Writes this call's keys/values into the cache and attends over it; returns (out, keys, values)."""
    keys = write_rows(cache.keys, key.astype(cache.keys.dtype), cache.index)
    values = write_rows(cache.values, value.astype(cache.values.dtype), cache.index)
    query_index = cache.index[:, None] + jnp.arange(query.shape[1])  # (batch, q_len)
    causal = jnp.arange(keys.shape[1])[None, None, :] <= query_index[:, :, None]
    same_segment = segment_ids[:, :, None] == cache.segment_ids[:, None, :]
    mask = (causal & same_segment)[:, None]
    out = jax.nn.dot_product_attention(query, keys.astype(query.dtype), values.astype(query.dtype), mask=mask,
                                       implementation="xla")
    return out, keys, values


class Attention(nnx.Module):
    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, layers.head_dim(cfg)
        self.use_rope, self.rope_theta = cfg.position_encoding == "rope", cfg.rope_theta
        self.impl = choose_impl(cfg.attention_impl, cfg.dtype)
        common = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        kv_bias = (self.num_kv_heads, self.head_dim) if cfg.use_bias else None
        self.query = nnx.Einsum(
            "btd,dnh->btnh", (cfg.embed_dim, self.num_heads, self.head_dim),
            (self.num_heads, self.head_dim) if cfg.use_bias else None,
            kernel_init=layers.normal_init(("embed", "heads", "head_dim")),
            bias_init=layers.zeros_init(("heads", "head_dim")), **common)
        self.key, self.value = (
            nnx.Einsum("btd,dnh->btnh", (cfg.embed_dim, self.num_kv_heads, self.head_dim), kv_bias,
                       kernel_init=layers.normal_init(("embed", "kv_heads", "head_dim")),
                       bias_init=layers.zeros_init(("kv_heads", "head_dim")), **common)
            for _ in range(2))
        self.out = nnx.Einsum(
            "btnh,nhd->btd", (self.num_heads, self.head_dim, cfg.embed_dim),
            (cfg.embed_dim,) if cfg.use_bias else None,
            kernel_init=layers.normal_init(("heads", "head_dim", "embed"), layers.residual_std(cfg)),
            bias_init=layers.zeros_init(("embed",)), **common)

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache | None]:
        """Returns the attention output and, when given a cache, the cache with this call's keys written."""
        query, key, value = self.query(x), self.key(x), self.value(x)
        if self.use_rope:
            query = layers.rope(query, positions, self.rope_theta)
            key = layers.rope(key, positions, self.rope_theta)
        query = sharding.constrain(query, ("batch", "length", "heads", "head_dim"))
        key = sharding.constrain(key, ("batch", "length", "kv_heads", "head_dim"))
        value = sharding.constrain(value, ("batch", "length", "kv_heads", "head_dim"))
        if cache is None:
            return self.out(dot_product_attention(query, key, value, segment_ids, self.impl)), None
        out, keys, values = cached_attention(query, key, value, segment_ids, cache)
        return self.out(out), cache._replace(keys=keys, values=values)
