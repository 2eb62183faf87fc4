"""The KV cache's accessors: layers and rows come out and go back where they were, int8 scales included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from llm.model.kv_cache import KVCache


def _filled_cache(kv_cache_dtype: str, batch: int = 3) -> KVCache:
    """A cache whose every entry differs, so a misplaced slice shows."""
    empty = KVCache.create(tiny_config(model__kv_cache_dtype=kv_cache_dtype).model, batch=batch, max_len=8)
    leaves, treedef = jax.tree.flatten(empty)
    filled = [jnp.arange(leaf.size).reshape(leaf.shape).astype(leaf.dtype) for leaf in leaves]
    return jax.tree.unflatten(treedef, filled)


def _assert_same(a: KVCache, b: KVCache) -> None:
    for x, y in zip(a, b, strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_a_layer_comes_out_with_the_shared_fields_and_goes_back_in_place(kv_cache_dtype):
    cache = _filled_cache(kv_cache_dtype)
    layer = cache.layer(1)
    np.testing.assert_array_equal(layer.keys, cache.keys[1])
    np.testing.assert_array_equal(layer.values, cache.values[1])
    assert layer.segment_ids is cache.segment_ids and layer.index is cache.index
    assert (layer.key_scales is None) == (kv_cache_dtype == "auto")
    _assert_same(cache.with_layer(1, layer), cache)
    zeroed = cache.with_layer(0, jax.tree.map(jnp.zeros_like, layer))
    assert not np.any(zeroed.keys[0]) and np.array_equal(zeroed.keys[1], cache.keys[1])


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_a_row_comes_out_as_a_batch_of_one_and_goes_back_in_place(kv_cache_dtype):
    cache = _filled_cache(kv_cache_dtype)
    row = cache.row(jnp.int32(2))
    np.testing.assert_array_equal(row.keys, cache.keys[:, 2:3])
    np.testing.assert_array_equal(row.segment_ids, cache.segment_ids[2:3])
    assert row.index.tolist() == [int(cache.index[2])]
    _assert_same(cache.with_row(2, row), cache)
    moved = cache.with_row(0, row.with_index(5))
    np.testing.assert_array_equal(moved.values[:, 0], cache.values[:, 2])
    assert moved.index.tolist() == [5, *cache.index[1:].tolist()]


def test_repeated_rows_are_copies_of_the_row():
    row = _filled_cache("int8", batch=1)
    repeated = row.repeat_rows(4)
    assert repeated.keys.shape[1] == 4 and repeated.index.shape == (4,)
    for i in range(4):
        _assert_same(repeated.row(i), row)


def test_segments_are_written_at_each_rows_index_and_advance_moves_it():
    cache = KVCache.create(tiny_config().model, batch=2, max_len=6)._replace(index=jnp.array([0, 3], jnp.int32))
    cache = cache.with_segments(jnp.array([[1, 1], [2, 2]], jnp.int32)).advance(2)
    assert cache.segment_ids.tolist() == [[1, 1, 0, 0, 0, 0], [0, 0, 0, 2, 2, 0]]
    assert cache.index.tolist() == [2, 5]
