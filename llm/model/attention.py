"""Causal self-attention with multi-head, grouped-query and multi-query variants, a KV cache, and the kernel.

`num_kv_heads` sets the variant: equal to `num_heads` is multi-head, 1 is multi-query, anything that
divides `num_heads` is grouped-query. Packed rows carry segment ids, and a query attends only to earlier
keys of its own segment, so documents packed into one row never see each other.

For generation, a `LayerCache` holds one layer's keys and values for `max_len` positions. New keys and
values are written at the cache's `index`, and queries attend to every written position up to their own.
An int8 cache (`model.kv_cache_dtype="int8"`) stores them with one scale per token and head, quantized and
dequantized by Qwix: a quarter of the float32 cache's memory.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import qwix
from flax import nnx

from llm import sharding
from llm.model import layers, lora

ATTENTION_IMPLS = ("auto", "xla", "blocked", "cudnn", "splash")
# The segment id of a soft prompt (llm/model/transformer.py): its keys are visible to every segment.
PROMPT_SEGMENT = -1
# "blocked" attention splits the queries into this many blocks (fewer skip less work, more add small ops),
# of at least BLOCKED_ATTENTION_MIN_BLOCK queries (shorter blocks cost more in compile time than they save).
BLOCKED_ATTENTION_BLOCKS = 8
BLOCKED_ATTENTION_MIN_BLOCK = 32
SPLASH_BLOCK = 128  # The splash kernel tiles the sequence in blocks of 128 (or 512 when it divides).


def choose_impl(requested: str, dtype: jnp.dtype) -> str:
    """The kernel for this platform: cuDNN flash attention on GPU (16-bit dtypes only), the Pallas splash
    kernel on TPU, causal blocks in XLA on CPU, plain XLA otherwise. The plain XLA path is the reference
    that tests compare the others against.
    """
    if requested != "auto":
        return requested
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if jax.default_backend() == "tpu":
        return "splash"
    if jax.default_backend() == "cpu":
        return "blocked"
    return "xla"


def visible(query_segments: jax.Array, key_segments: jax.Array) -> jax.Array:
    """(batch, q_len, k_len): whether a query's segment may see a key's: the same one, or the soft prompt."""
    return (query_segments[:, :, None] == key_segments[:, None, :]) | (key_segments == PROMPT_SEGMENT)[:, None, :]


def attention_mask(query_segments: jax.Array, key_segments: jax.Array) -> jax.Array:
    """(batch, 1, q_len, k_len) boolean mask: causal, and only within the same segment (or the prompt)."""
    q_len, k_len = query_segments.shape[-1], key_segments.shape[-1]
    causal = jnp.tril(jnp.ones((q_len, k_len), dtype=bool), k=k_len - q_len)
    return (causal[None] & visible(query_segments, key_segments))[:, None]


def dot_product_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array, impl: str
) -> jax.Array:
    """softmax(q k^T / sqrt(d) + mask) v with q: (B, T, N, H), k and v: (B, T, K, H); returns (B, T, N, H).

    The softmax runs in float32 inside `jax.nn.dot_product_attention`, which also handles K < N (GQA).
    """
    if impl == "splash" and _splash_fits(query, key):
        return splash_attention(query, key, value, segment_ids)
    mask = attention_mask(segment_ids, segment_ids)
    if impl == "blocked":
        return blocked_causal_attention(query, key, value, mask)
    xla_or_cudnn = "xla" if impl == "splash" else impl
    return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation=xla_or_cudnn)


def blocked_causal_attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array) -> jax.Array:
    """The XLA computation split into blocks of queries, each attending only to keys up to its last position.

    The keys after a block's last query are masked for all of its queries (causality), so skipping them
    changes nothing but the work: with 8 blocks, 9/16 of the full score matrix is computed. Queries are
    grouped by the key/value head they share (GQA) instead of repeating keys and values.
    """
    batch, length, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    grouped = (query * head_dim**-0.5).reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
    block = max(-(-length // BLOCKED_ATTENTION_BLOCKS), BLOCKED_ATTENTION_MIN_BLOCK)
    starts = range(0, length, block)
    # Split (whose gradient is a concatenation), not slices (whose gradients are padded copies to add up).
    query_blocks = jnp.split(grouped, list(starts[1:]), axis=1)
    outputs = []
    for start, query_block in zip(starts, query_blocks):
        end = min(start + block, length)
        logits = jnp.einsum("btkgh,bskh->bkgts", query_block, key[:, :end], preferred_element_type=jnp.float32)
        logits = jnp.where(mask[:, :, None, start:end, :end], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
        outputs.append(jnp.einsum("bkgts,bskh->btkgh", probs, value[:, :end]))
    return jnp.concatenate(outputs, axis=1).reshape(batch, length, num_heads, head_dim)


def _splash_fits(query: jax.Array, key: jax.Array) -> bool:
    """Splash needs whole blocks of sequence and key/value heads that split evenly over the tensor axis;
    otherwise (short prompts, MQA on many tensor shards) the XLA path runs instead."""
    return (
        query.shape[1] % SPLASH_BLOCK == 0
        and key.shape[2] % sharding.logical_axis_size("kv_heads") == 0
        and query.shape[2] % sharding.logical_axis_size("heads") == 0
    )


def splash_attention(query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """The Pallas splash (block-sparse flash) attention kernel of TPUs, with causal + segment masking.

    Runs per device shard (batch and heads split as the rules say). Off TPU it runs in Pallas' interpret
    mode, which is how the tests check it against the XLA reference on CPU.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
        splash_attention_mask as splash_masks,
    )

    def kernel(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array) -> jax.Array:
        length, heads, dim = q.shape[1], q.shape[2], q.shape[3]
        block = 512 if length % 512 == 0 else SPLASH_BLOCK
        blocks = splash.BlockSizes(
            block_q=block,
            block_kv_compute=block,
            block_kv=block,
            block_q_dkv=block,
            block_kv_dkv=block,
            block_kv_dkv_compute=block,
            block_q_dq=block,
            block_kv_dq=block,
        )
        mask = splash_masks.MultiHeadMask([splash_masks.CausalMask((length, length))] * heads)
        attend = splash.make_splash_mha(
            mask, head_shards=1, q_seq_shards=1, block_sizes=blocks, interpret=jax.default_backend() != "tpu"
        )
        # The kernel wants (heads, length, dim) per sequence and leaves the 1/sqrt(d) scaling to the caller.
        heads_first = lambda x: jnp.swapaxes(x, 1, 2)
        out = jax.vmap(attend)(
            heads_first(q * dim**-0.5),
            heads_first(k),
            heads_first(v),
            segment_ids=splash.SegmentIds(q=segments, kv=segments),
        )
        return heads_first(out)

    qkv_axes = (
        ("batch", "length", "heads", "head_dim"),
        ("batch", "length", "kv_heads", "head_dim"),
        ("batch", "length", "kv_heads", "head_dim"),
        ("batch", "length"),
    )
    return sharding.per_shard(kernel, qkv_axes, ("batch", "length", "heads", "head_dim"))(
        query, key, value, segment_ids
    )


class LayerCache(NamedTuple):
    """One layer's view of the KV cache; `segment_ids` and `index` are shared by all layers.

    keys, values: (batch, max_len, kv_heads, head_dim). segment_ids: (batch, max_len), the segment of each
    cached position *including* the tokens being written now (0 = padding or not yet written).
    index: (batch,) int32, where each row's first token of this call is written. Rows may be at different
    positions, which is what continuous batching needs.
    key_scales, value_scales: (batch, max_len, kv_heads, 1) float32 when keys and values are stored as int8
    (one scale per token and head), None when they are stored as floats.
    """

    keys: jax.Array
    values: jax.Array
    segment_ids: jax.Array
    index: jax.Array
    key_scales: jax.Array | None = None
    value_scales: jax.Array | None = None


def write_rows(cache: jax.Array, update: jax.Array, index: jax.Array) -> jax.Array:
    """Writes update[b] into cache[b] starting at position index[b] along axis 1 (in place under donation)."""

    def write_row(row: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_slice_in_dim(row, new, start, axis=0)

    return jax.vmap(write_row)(cache, update, index)


def _store(
    cached: jax.Array, scales: jax.Array | None, new: jax.Array, index: jax.Array
) -> tuple[jax.Array, jax.Array | None]:
    """Writes new keys (or values) at `index`; into an int8 cache, with an absmax scale per token and head."""
    if scales is None:
        return write_rows(cached, new.astype(cached.dtype), index), None
    quantized = qwix.quantize(new, jnp.int8, channelwise_axes=(0, 1, 2), scale_dtype=scales.dtype)
    return write_rows(cached, quantized.qvalue, index), write_rows(scales, quantized.scale, index)


def _load(cached: jax.Array, scales: jax.Array | None, dtype: jnp.dtype) -> jax.Array:
    if scales is None:
        return cached.astype(dtype)
    return qwix.dequantize(qwix.QArray(cached, scales)).astype(dtype)


def cached_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array, cache: LayerCache
) -> tuple[jax.Array, LayerCache]:
    """Writes this call's keys/values into the cache and attends over it; returns (out, updated cache)."""
    keys, key_scales = _store(cache.keys, cache.key_scales, key, cache.index)
    values, value_scales = _store(cache.values, cache.value_scales, value, cache.index)
    query_index = cache.index[:, None] + jnp.arange(query.shape[1])  # (batch, q_len)
    causal = jnp.arange(keys.shape[1])[None, None, :] <= query_index[:, :, None]
    mask = (causal & visible(segment_ids, cache.segment_ids))[:, None]
    out = jax.nn.dot_product_attention(
        query,
        _load(keys, key_scales, query.dtype),
        _load(values, value_scales, query.dtype),
        mask=mask,
        implementation="xla",
    )
    return out, cache._replace(keys=keys, values=values, key_scales=key_scales, value_scales=value_scales)


class Attention(nnx.Module):
    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, layers.head_dim(cfg)
        self.use_rope, self.rope_theta, self.max_len = cfg.position_encoding == "rope", cfg.rope_theta, cfg.max_seq_len
        self.impl = choose_impl(cfg.attention_impl, cfg.dtype)
        if self.impl == "splash" and cfg.soft_prompt_length:
            self.impl = "xla"  # Splash masks by segment equality only; a shared soft prompt needs the general mask.
        common = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        kv_bias = (self.num_kv_heads, self.head_dim) if cfg.use_bias else None
        self.query = nnx.Einsum(
            "td,dnh->tnh",
            (cfg.embed_dim, self.num_heads, self.head_dim),
            (self.num_heads, self.head_dim) if cfg.use_bias else None,
            kernel_init=layers.normal_init(("embed", "heads", "head_dim")),
            bias_init=layers.zeros_init(("heads", "head_dim")),
            **common,
        )
        self.key, self.value = (
            nnx.Einsum(
                "td,dnh->tnh",
                (cfg.embed_dim, self.num_kv_heads, self.head_dim),
                kv_bias,
                kernel_init=layers.normal_init(("embed", "kv_heads", "head_dim")),
                bias_init=layers.zeros_init(("kv_heads", "head_dim")),
                **common,
            )
            for _ in range(2)
        )
        self.out = nnx.Einsum(
            "tnh,nhd->td",
            (self.num_heads, self.head_dim, cfg.embed_dim),
            (cfg.embed_dim,) if cfg.use_bias else None,
            kernel_init=layers.normal_init(("heads", "head_dim", "embed"), layers.residual_std(cfg)),
            bias_init=layers.zeros_init(("embed",)),
            **common,
        )
        shapes = {
            "query": ((cfg.embed_dim,), (self.num_heads, self.head_dim)),
            "key": ((cfg.embed_dim,), (self.num_kv_heads, self.head_dim)),
            "value": ((cfg.embed_dim,), (self.num_kv_heads, self.head_dim)),
            "out": ((self.num_heads, self.head_dim), (cfg.embed_dim,)),
        }
        for name in lora.targets(cfg, "attention", tuple(shapes)):
            setattr(self, name + lora.LORA_SUFFIX, lora.LoRA(*shapes[name], cfg, rngs=rngs))

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        cache: LayerCache | None = None,
        dropout_key: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """Returns the attention output and, when given a cache, the cache with this call's keys written.

        `dropout_key` drives the LoRA adapters' dropout (training only)."""
        query, key, value = (lora.project(self, name, x, dropout_key) for name in ("query", "key", "value"))
        if self.use_rope:
            query = layers.rope(query, positions, self.rope_theta, self.max_len)
            key = layers.rope(key, positions, self.rope_theta, self.max_len)
        query = sharding.constrain(query, ("batch", "length", "heads", "head_dim"))
        key = sharding.constrain(key, ("batch", "length", "kv_heads", "head_dim"))
        value = sharding.constrain(value, ("batch", "length", "kv_heads", "head_dim"))
        if cache is None:
            attended = dot_product_attention(query, key, value, segment_ids, self.impl)
            return lora.project(self, "out", attended, dropout_key), None
        attended, cache = cached_attention(query, key, value, segment_ids, cache)
        return lora.project(self, "out", attended, dropout_key), cache
