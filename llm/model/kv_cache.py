"""The KV cache of generation: every layer's keys and values for `max_len` positions of a batch of rows.

    keys, values              per layer (batch, kv_heads, max_len, head_dim)
    key_scales, value_scales  per layer (batch, kv_heads, max_len, 1)        int8 cache only, else None
    segment_ids               (batch, max_len)                               shared by all layers
    index                     (batch,)                                       shared by all layers

The per-layer fields are one array per layer (a tuple), or, for a `scan_layers` model whose scan indexes the
layer, one array with a leading `layers` axis. Only this module knows that layout. The model reads and writes
it one layer at a time through a `LayerCache` view (`KVCache.layer`, `with_layer`); continuous batching and
scoring move whole rows (`row`, `with_row`, `repeat_rows`). New keys and values are written at each row's own
`index`, so rows may be at different positions.

Why this layout (measured on a decoding step of batch 64 on CPU, where the cache is most of the bytes read):
only the new rows are written, by one scatter per array (copying a layer's slice out and back made XLA copy
it several times per layer); attention reads a layer's arrays as stored (a slice of a stacked array is a copy
on XLA:CPU, which cost about as much as the attention itself); and (batch, kv_heads) lead, the batch dimensions
of attention's contractions, so keys and values feed them without a transposed copy.

On a mesh (`sharding.use_mesh`), the cache is pinned where it is created and written to the logical axes of
`FIELD_AXES`: rows over the data-parallel axes and kv heads over `tensor`, as the rules table says for the keys
and values that attention writes and reads, so a decoding step reads each device's own slice and gathers none.

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
from llm import sharding
from llm.model import layers

# The KVCache fields that hold one array per layer (the others are shared by all layers).
PER_LAYER_FIELDS = ("keys", "values", "key_scales", "value_scales")
KV_CACHE_DTYPES = base.CHOICES["model.kv_cache_dtype"]
# The logical axes of each field (a stacked per-layer field has `layers` in front). They are the names of the
# keys and values that attention writes and reads (("batch", "length", "kv_heads", "head_dim")), not names of
# the cache's own: the cache must be split exactly as they are, or every decoding step would move it between
# devices, and any run's rules table (older ones too) already maps them.
FIELD_AXES = {
    "keys": ("batch", "kv_heads", "length", "head_dim"),
    "values": ("batch", "kv_heads", "length", "head_dim"),
    "key_scales": ("batch", "kv_heads", "length", "head_dim"),
    "value_scales": ("batch", "kv_heads", "length", "head_dim"),
    "segment_ids": ("batch", "length"),
    "index": ("batch",),
}


def write_rows(cache: jax.Array, update: jax.Array, index: jax.Array) -> jax.Array:
    """Writes update[b] into cache[b] starting at position index[b] along axis 1 (in place under donation)."""

    def write_row(row: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_slice_in_dim(row, new, start, axis=0)

    return jax.vmap(write_row)(cache, update, index)


def write_layer_rows(
    cached: jax.Array, layer: int | jax.Array | None, update: jax.Array, index: jax.Array
) -> jax.Array:
    """Writes update[b] (length, kv_heads, x) at positions index[b]... of row b of one layer's array
    (batch, kv_heads, max_len, x), or of layer `layer` of a stacked one (layers, batch, kv_heads, max_len, x):
    one scatter of the new rows, in place under donation. (A vmap of dynamic_update_slice over the batch axis
    made XLA transpose a stacked array whole.)"""
    batch, length, kv_heads = update.shape[:3]
    rows = jnp.arange(batch)[:, None, None]
    heads = jnp.arange(kv_heads)[None, :, None]
    positions = (index[:, None] + jnp.arange(length))[:, None, :]  # (batch, 1, length)
    update = jnp.swapaxes(update, 1, 2).astype(cached.dtype)  # (batch, kv_heads, length, x)
    where = (rows, heads, positions) if layer is None else (layer, rows, heads, positions)
    return cached.at[where].set(update, indices_are_sorted=True, unique_indices=True)


PerLayer = jax.Array | tuple[jax.Array, ...]  # A per-layer field: one array per layer, or one stacked array.


class LayerCache(NamedTuple):
    """Layer `layer`'s view of the KV cache; `segment_ids` and `index` are shared by all layers.

    keys, values (and key_scales, value_scales) are the per-layer fields of the whole `KVCache`: `store` writes
    this layer's new rows into them and `load` reads this layer's arrays, so no layer is copied out and back.
    segment_ids: (batch, max_len), the segment of each cached position *including* the tokens being written
    now (0 = padding or not yet written). index: (batch,) int32, where each row's first token of this call is
    written. Rows may be at different positions, which is what continuous batching needs.
    key_scales, value_scales: float32 when keys and values are stored as int8 (one scale per token and head),
    None when they are stored as floats.
    """

    keys: PerLayer
    values: PerLayer
    segment_ids: jax.Array
    index: jax.Array
    layer: int | jax.Array
    key_scales: PerLayer | None = None
    value_scales: PerLayer | None = None

    def store(self, keys: jax.Array, values: jax.Array) -> LayerCache:
        """The cache with new keys and values (batch, length, kv_heads, head_dim) written at `index`."""
        keys, key_scales = self._store(self.keys, self.key_scales, keys)
        values, value_scales = self._store(self.values, self.value_scales, values)
        return self._replace(keys=keys, values=values, key_scales=key_scales, value_scales=value_scales)

    def load(self, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
        """This layer's keys and values at every position (batch, kv_heads, max_len, head_dim), in `dtype`."""
        return self._load(self.keys, self.key_scales, dtype), self._load(self.values, self.value_scales, dtype)

    def _store(self, cached: PerLayer, scales: PerLayer | None, new: jax.Array) -> tuple[PerLayer, PerLayer | None]:
        """Writes new keys (or values); into an int8 cache, with an absmax scale per token and head."""
        if scales is None:
            return self._write(cached, new), None
        quantized = qwix.quantize(new, jnp.int8, channelwise_axes=(0, 1, 2), scale_dtype=_take(scales, 0).dtype)
        return self._write(cached, quantized.qvalue), self._write(scales, quantized.scale)

    def _write(self, cached: PerLayer, new: jax.Array) -> PerLayer:
        if isinstance(cached, tuple):
            written = write_layer_rows(cached[self.layer], None, new, self.index)
            return cached[: self.layer] + (written,) + cached[self.layer + 1 :]
        return write_layer_rows(cached, self.layer, new, self.index)

    def _load(self, cached: PerLayer, scales: PerLayer | None, dtype: jnp.dtype) -> jax.Array:
        if scales is None:
            return _take(cached, self.layer).astype(dtype)
        return qwix.dequantize(qwix.QArray(_take(cached, self.layer), _take(scales, self.layer))).astype(dtype)


def _take(cached: PerLayer, layer: int | jax.Array) -> jax.Array:
    """One layer's array of a per-layer field (a tuple is indexed by Python ints only, as unrolled layers are)."""
    if isinstance(cached, tuple):
        return cached[layer]
    return jax.lax.dynamic_index_in_dim(cached, layer, axis=0, keepdims=False)


class KVCache(NamedTuple):
    """Keys and values of every layer for `max_len` positions of a batch of sequences being generated.

    keys, values: per layer (batch, kv_heads, max_len, head_dim), a tuple of one array per layer or one array
    with a leading layers axis (scan_layers models). segment_ids: (batch, max_len), 1 for a written token, 0 for
    padding or a position not written yet. index: (batch,) int32, the next position each row writes to.
    key_scales, value_scales: per layer (batch, kv_heads, max_len, 1) for an int8 cache, else None.
    """

    keys: PerLayer
    values: PerLayer
    segment_ids: jax.Array
    index: jax.Array
    key_scales: PerLayer | None = None
    value_scales: PerLayer | None = None

    @classmethod
    def create(cls, cfg: ml_collections.ConfigDict, batch: int, max_len: int) -> KVCache:
        """An empty cache in the compute dtype, or in int8 with per-(token, head) scales when the model's
        `kv_cache_dtype` is "int8" (set by llm/quant; configs without the key use the compute dtype)."""
        shape = (batch, cfg.num_kv_heads, max_len, layers.head_dim(cfg))
        segment_ids, index = jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((batch,), jnp.int32)
        kv_cache_dtype = cfg.get("kv_cache_dtype", "auto")
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"model.kv_cache_dtype={kv_cache_dtype!r} is not one of {KV_CACHE_DTYPES}.")

        def per_layer(shape: tuple[int, ...], dtype: jnp.dtype) -> PerLayer:
            if cfg.scan_layers:
                return jnp.zeros((cfg.num_layers, *shape), dtype)
            return tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))

        if kv_cache_dtype == "int8":
            scale_shape = shape[:-1] + (1,)
            return cls(
                per_layer(shape, jnp.int8),
                per_layer(shape, jnp.int8),
                segment_ids,
                index,
                per_layer(scale_shape, jnp.float32),
                per_layer(scale_shape, jnp.float32),
            ).constrained()
        dtype = jnp.dtype(cfg.dtype)
        return cls(per_layer(shape, dtype), per_layer(shape, dtype), segment_ids, index).constrained()

    def layer(self, i: int | jax.Array) -> LayerCache:
        """Layer i's view, with the shared segment ids and index (`i` may be traced, as in a scan, when the
        per-layer fields are stacked; a tuple of per-layer arrays takes a Python int)."""
        if isinstance(self.keys, tuple) and not isinstance(i, int):
            raise TypeError(f"A cache of one array per layer is indexed by a Python int, got {type(i).__name__}.")
        return LayerCache(self.keys, self.values, self.segment_ids, self.index, i, self.key_scales, self.value_scales)

    def with_layer(self, layer: LayerCache) -> KVCache:
        """The cache after `layer` (a view from `self.layer`) stored its keys and values."""
        return self._replace(**{name: getattr(layer, name) for name in PER_LAYER_FIELDS}).constrained()

    def constrained(self) -> KVCache:
        """The cache pinned to the logical axes of `FIELD_AXES` under the active mesh and rules (a no-op without
        them). A dimension its mesh axes do not divide (2 kv heads on 4 tensor devices, a batch of one row) comes
        out replicated, as such a parameter dimension is (`sharding.tree_shardings`); tests/test_kv_sharding.py
        checks that XLA does so."""

        def pin(name: str, array: jax.Array) -> jax.Array:
            axes = FIELD_AXES[name]
            return sharding.constrain(array, ("layers", *axes) if array.ndim > len(axes) else axes)

        return KVCache(
            *(jax.tree.map(lambda a, name=name: pin(name, a), field) for name, field in zip(self._fields, self))
        )

    def row(self, i: int | jax.Array) -> KVCache:
        """Row i as a cache of batch 1 (its index included)."""
        return self._map_rows(lambda a, axis: jax.lax.dynamic_slice_in_dim(a, i, 1, axis))

    def with_row(self, i: int | jax.Array, row: KVCache) -> KVCache:
        """The cache with row i replaced by the batch-1 cache `row` (its index included)."""
        return self._map_rows(lambda a, axis, new: jax.lax.dynamic_update_slice_in_dim(a, new, i, axis), row)

    def repeat_rows(self, repeats: int) -> KVCache:
        """Every row `repeats` times in a row: a batch-1 cache becomes `repeats` copies of itself."""
        return self._map_rows(lambda a, axis: jnp.repeat(a, repeats, axis=axis))

    def _map_rows(self, fn: Callable[..., jax.Array], *others: KVCache) -> KVCache:
        """fn(array, its batch axis, *the same array of `others`) over every array of the cache: a stacked
        per-layer array (layers, batch, kv_heads, max_len, x) has its rows on axis 1, every other one on axis 0."""
        return jax.tree.map(lambda a, *rest: fn(a, 1 if a.ndim == 5 else 0, *rest), self, *others).constrained()

    def with_segments(self, segment_ids: jax.Array) -> KVCache:
        """The cache with the segments (batch, length) of tokens about to be written recorded from `index` on."""
        return self._replace(segment_ids=write_rows(self.segment_ids, segment_ids, self.index)).constrained()

    def with_index(self, position: int | jax.Array) -> KVCache:
        """The cache with every row's next write at `position`."""
        return self._replace(index=jnp.full_like(self.index, position))

    def advance(self, length: int) -> KVCache:
        """The cache after `length` tokens were written to every row: their next writes go after them."""
        return self._replace(index=self.index + length)

    def nbytes(self) -> int:
        """Bytes held by the cache."""
        return sum(a.nbytes for a in jax.tree.leaves(self))


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def new_cache(graphdef: nnx.GraphDef, params: nnx.State, batch: int, max_len: int) -> KVCache:
    """`Transformer.init_cache` of the model (graphdef, params), compiled once per shape."""
    return nnx.merge(graphdef, params).init_cache(batch, max_len)
