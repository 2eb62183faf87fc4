"""The KV cache of generation: every layer's keys and values for `max_len` positions of a batch of rows.

    keys, values              (layers, batch, max_len, kv_heads, head_dim)   one slice per layer
    key_scales, value_scales  (layers, batch, max_len, kv_heads, 1)          int8 cache only, else None
    segment_ids               (batch, max_len)                               shared by all layers
    index                     (batch,)                                       shared by all layers

Only this module knows that layout. The model reads and writes it one layer at a time (`KVCache.layer`,
`with_layer`); continuous batching and scoring move whole rows (`row`, `with_row`, `repeat_rows`). New keys
and values are written at each row's own `index`, so rows may be at different positions.

An int8 cache (`model.kv_cache_dtype="int8"`) stores keys and values with one scale per token and head,
quantized and dequantized by Qwix: a quarter of the float32 cache's memory.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import qwix
from flax import nnx

from configs import base
from llm.model import layers

# The KVCache fields that hold one slice per layer (the others are shared by all layers).
PER_LAYER_FIELDS = ("keys", "values", "key_scales", "value_scales")
KV_CACHE_DTYPES = base.CHOICES["model.kv_cache_dtype"]


def write_rows(cache: jax.Array, update: jax.Array, index: jax.Array) -> jax.Array:
    """Writes update[b] into cache[b] starting at position index[b] along axis 1 (in place under donation)."""

    def write_row(row: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_slice_in_dim(row, new, start, axis=0)

    return jax.vmap(write_row)(cache, update, index)


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

    def store(self, keys: jax.Array, values: jax.Array) -> LayerCache:
        """The cache with new keys and values (batch, length, kv_heads, head_dim) written at `index`."""
        keys, key_scales = _store(self.keys, self.key_scales, keys, self.index)
        values, value_scales = _store(self.values, self.value_scales, values, self.index)
        return self._replace(keys=keys, values=values, key_scales=key_scales, value_scales=value_scales)

    def load(self, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
        """Every position's keys and values (batch, max_len, kv_heads, head_dim) in `dtype`."""
        return _load(self.keys, self.key_scales, dtype), _load(self.values, self.value_scales, dtype)


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


class KVCache(NamedTuple):
    """Keys and values of every layer for `max_len` positions of a batch of sequences being generated.

    keys, values: (layers, batch, max_len, kv_heads, head_dim). segment_ids: (batch, max_len), 1 for a
    written token, 0 for padding or a position not written yet. index: (batch,) int32, the next position
    each row writes to. key_scales, value_scales: (layers, batch, max_len, kv_heads, 1) for an int8 cache,
    else None.
    """

    keys: jax.Array
    values: jax.Array
    segment_ids: jax.Array
    index: jax.Array
    key_scales: jax.Array | None = None
    value_scales: jax.Array | None = None

    @classmethod
    def create(cls, cfg: ml_collections.ConfigDict, batch: int, max_len: int) -> KVCache:
        """An empty cache in the compute dtype, or in int8 with per-(token, head) scales when the model's
        `kv_cache_dtype` is "int8" (set by llm/quant; configs without the key use the compute dtype)."""
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, layers.head_dim(cfg))
        segment_ids, index = jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((batch,), jnp.int32)
        kv_cache_dtype = cfg.get("kv_cache_dtype", "auto")
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"model.kv_cache_dtype={kv_cache_dtype!r} is not one of {KV_CACHE_DTYPES}.")
        if kv_cache_dtype == "int8":
            scale_shape = shape[:-1] + (1,)
            return cls(
                jnp.zeros(shape, jnp.int8),
                jnp.zeros(shape, jnp.int8),
                segment_ids,
                index,
                jnp.zeros(scale_shape, jnp.float32),
                jnp.zeros(scale_shape, jnp.float32),
            )
        dtype = jnp.dtype(cfg.dtype)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), segment_ids, index)

    def layer(self, i: int | jax.Array) -> LayerCache:
        """Layer i's keys and values with the shared segment ids and index (`i` may be traced, as in a scan)."""
        sliced = _map_fields(
            self, PER_LAYER_FIELDS, lambda _, a: jax.lax.dynamic_index_in_dim(a, i, axis=0, keepdims=False)
        )
        return LayerCache(segment_ids=self.segment_ids, index=self.index, **sliced)

    def with_layer(self, i: int | jax.Array, layer: LayerCache) -> KVCache:
        """The cache with layer i's keys and values (and int8 scales) replaced by those of `layer`."""
        put = lambda name, a: jax.lax.dynamic_update_index_in_dim(a, getattr(layer, name), i, axis=0)
        return self._replace(**_map_fields(self, PER_LAYER_FIELDS, put))

    def row(self, i: int | jax.Array) -> KVCache:
        """Row i as a cache of batch 1 (its index included)."""
        take = lambda name, a: jax.lax.dynamic_slice_in_dim(a, i, 1, _batch_axis(name))
        return self._replace(**_map_fields(self, self._fields, take))

    def with_row(self, i: int | jax.Array, row: KVCache) -> KVCache:
        """The cache with row i replaced by the batch-1 cache `row` (its index included)."""
        put = lambda name, a: jax.lax.dynamic_update_slice_in_dim(a, getattr(row, name), i, _batch_axis(name))
        return self._replace(**_map_fields(self, self._fields, put))

    def repeat_rows(self, repeats: int) -> KVCache:
        """Every row `repeats` times in a row: a batch-1 cache becomes `repeats` copies of itself."""
        repeat = lambda name, a: jnp.repeat(a, repeats, axis=_batch_axis(name))
        return self._replace(**_map_fields(self, self._fields, repeat))

    def with_segments(self, segment_ids: jax.Array) -> KVCache:
        """The cache with the segments (batch, length) of tokens about to be written recorded from `index` on."""
        return self._replace(segment_ids=write_rows(self.segment_ids, segment_ids, self.index))

    def with_index(self, position: int | jax.Array) -> KVCache:
        """The cache with every row's next write at `position`."""
        return self._replace(index=jnp.full_like(self.index, position))

    def advance(self, length: int) -> KVCache:
        """The cache after `length` tokens were written to every row: their next writes go after them."""
        return self._replace(index=self.index + length)


def _batch_axis(field: str) -> int:
    return 1 if field in PER_LAYER_FIELDS else 0


def _map_fields(
    cache: KVCache, fields: tuple[str, ...], fn: Callable[[str, jax.Array], jax.Array]
) -> dict[str, jax.Array | None]:
    """{field: fn(field, value)} for the named fields; a float cache's absent int8 scales stay None."""
    return {name: None if getattr(cache, name) is None else fn(name, getattr(cache, name)) for name in fields}


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def new_cache(graphdef: nnx.GraphDef, params: nnx.State, batch: int, max_len: int) -> KVCache:
    """`Transformer.init_cache` of the model (graphdef, params), compiled once per shape."""
    return nnx.merge(graphdef, params).init_cache(batch, max_len)
