"""Causal self-attention with multi-head, grouped-query and multi-query variants, and the kernel choice.

`num_kv_heads` sets the variant: equal to `num_heads` is multi-head, 1 is multi-query, anything that
divides `num_heads` is grouped-query. Packed rows carry segment ids, and a query attends only to earlier
keys of its own segment, so documents packed into one row never see each other.
"""

from __future__ import annotations

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

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        query, key, value = self.query(x), self.key(x), self.value(x)
        if self.use_rope:
            query = layers.rope(query, positions, self.rope_theta)
            key = layers.rope(key, positions, self.rope_theta)
        query = sharding.constrain(query, ("batch", "length", "heads", "head_dim"))
        key = sharding.constrain(key, ("batch", "length", "kv_heads", "head_dim"))
        value = sharding.constrain(value, ("batch", "length", "kv_heads", "head_dim"))
        return self.out(dot_product_attention(query, key, value, segment_ids, self.impl))
