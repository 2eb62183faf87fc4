"""Attention kernels: softmax(q k^T / sqrt(d) + mask) v, computed by XLA, by causal blocks, by cuDNN or by splash.

The masks are causal and segment-wise: a query attends only to earlier keys of its own segment (packed
documents never see each other) or of the soft prompt, whose segment every other one may see. `choose_impl`
picks the kernel for the platform; the plain XLA path is the reference the tests compare the others with.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from configs import base
from llm import sharding

ATTENTION_IMPLS = base.CHOICES["model.attention_impl"]
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


def attention_over_cache(
    query: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    segment_ids: jax.Array,
    cache_segment_ids: jax.Array,
    index: jax.Array,
) -> jax.Array:
    """Decoding's attention: queries (B, T, N, H), the first written at cache position index[b], attend to the
    cached keys and values (B, K, S, H) at or before their own position, of their segment or the prompt.

    `cache_segment_ids` (B, S) already hold the queries' own segments. The computation of the XLA path of
    `jax.nn.dot_product_attention` (float32 logits scaled after the product, float32 softmax), arranged for
    XLA:CPU, where a decoding step reads the whole cache here (measured at batch 64): the queries sharing a
    key/value head (GQA) form one matrix; the keys are the left operand of their product, read as stored (as
    the right one, contracted over their last axis, it ran about 3x slower); and the small logits are turned to
    (queries, keys) before the softmax, which then reduces over their last axis (5x faster than over the
    other) and hands the values' product a plain matrix.
    """
    batch, length, num_heads, head_dim = query.shape
    num_kv_heads = keys.shape[1]
    group = num_heads // num_kv_heads
    # (batch, kv_heads, length * group, head_dim): query (t, kv head k, g) is row t * group + g of head k.
    grouped = query.reshape(batch, length, num_kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    grouped = grouped.reshape(batch, num_kv_heads, length * group, head_dim)
    logits = jnp.einsum("bksh,bkqh->bksq", keys, grouped, preferred_element_type=jnp.float32)
    # To (batch, kv_heads, queries, k_len); the barrier keeps XLA from folding this transpose back into the
    # product (as the slow form).
    logits = jnp.swapaxes(jax.lax.optimization_barrier(logits), 2, 3) * jnp.float32(head_dim**-0.5)
    query_positions = index[:, None] + jnp.arange(length)  # (batch, q_len)
    causal = jnp.arange(keys.shape[2])[None, None, :] <= query_positions[:, :, None]
    mask = jnp.repeat(causal & visible(segment_ids, cache_segment_ids), group, axis=1)  # (batch, queries, k_len)
    logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
    attended = jnp.einsum("bkqs,bksh->bkqh", probs, values)
    attended = attended.reshape(batch, num_kv_heads, length, group, head_dim).transpose(0, 2, 1, 3, 4)
    return attended.reshape(batch, length, num_heads, head_dim)
