"""The KV cache's accessors: a layer's new rows land at each row's index of that layer only, and rows come out
and go back where they were, int8 scales included, whether the layers are separate arrays or one stacked array."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from llm.model.kv_cache import KVCache

LAYOUTS = [("auto", False), ("auto", True), ("int8", False), ("int8", True)]  # (kv_cache_dtype, scan_layers)


def _filled_cache(kv_cache_dtype: str, scan_layers: bool, batch: int = 3) -> KVCache:
    """A cache whose every entry differs, so a misplaced slice shows."""
    cfg = tiny_config(model__kv_cache_dtype=kv_cache_dtype, model__scan_layers=scan_layers).model
    leaves, treedef = jax.tree.flatten(KVCache.create(cfg, batch=batch, max_len=8))
    filled = [jnp.arange(leaf.size).reshape(leaf.shape).astype(leaf.dtype) for leaf in leaves]
    return jax.tree.unflatten(treedef, filled)


def _assert_same(a: KVCache, b: KVCache) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kv_cache_dtype, scan_layers", LAYOUTS)
def test_a_layer_stores_each_rows_new_keys_at_its_index_and_loads_them(kv_cache_dtype, scan_layers):
    cache = _filled_cache(kv_cache_dtype, scan_layers)._replace(index=jnp.array([0, 3, 6], jnp.int32))
    layer = 1 if not scan_layers else jnp.int32(1)  # A scan indexes its stacked layers with a traced index.
    new_keys = jnp.arange(3 * 2 * 2 * 8, dtype=jnp.float32).reshape(3, 2, 2, 8) + 0.5  # (batch, length, kv, dim)
    stored = cache.layer(layer).store(new_keys, -new_keys)
    written = cache.with_layer(stored)
    keys, values = written.layer(layer).load(jnp.float32)  # (batch, kv_heads, max_len, head_dim)
    before_keys, _ = cache.layer(layer).load(jnp.float32)
    tolerance = 0.5 if kv_cache_dtype == "int8" else 0  # int8 keeps each (token, head) to 1/127 of its absmax
    for row, start in enumerate([0, 3, 6]):
        expected = jnp.swapaxes(new_keys[row], 0, 1)  # (kv_heads, length, head_dim)
        np.testing.assert_allclose(keys[row, :, start : start + 2], expected, atol=tolerance)
        np.testing.assert_allclose(values[row, :, start : start + 2], -expected, atol=tolerance)
        untouched = np.ones(8, bool)
        untouched[start : start + 2] = False
        np.testing.assert_array_equal(keys[row, :, untouched], before_keys[row, :, untouched])
    # The other layer and the shared fields are as they were.
    other = 0 if not scan_layers else jnp.int32(0)
    _assert_same(written.layer(other).load(jnp.float32), cache.layer(other).load(jnp.float32))
    assert written.index is cache.index and written.segment_ids is cache.segment_ids


def test_an_unrolled_layer_is_named_by_a_python_int():
    with pytest.raises(TypeError, match="Python int"):
        _filled_cache("auto", scan_layers=False).layer(jnp.int32(1))


@pytest.mark.parametrize("kv_cache_dtype, scan_layers", LAYOUTS)
def test_a_row_comes_out_as_a_batch_of_one_and_goes_back_in_place(kv_cache_dtype, scan_layers):
    cache = _filled_cache(kv_cache_dtype, scan_layers)
    row = cache.row(jnp.int32(2))
    for layer in range(2):
        np.testing.assert_array_equal(row.keys[layer], cache.keys[layer][2:3])
    np.testing.assert_array_equal(row.segment_ids, cache.segment_ids[2:3])
    assert row.index.tolist() == [int(cache.index[2])]
    _assert_same(cache.with_row(2, row), cache)
    moved = cache.with_row(0, row.with_index(5))
    np.testing.assert_array_equal(moved.values[1][0], cache.values[1][2])
    assert moved.index.tolist() == [5, *cache.index[1:].tolist()]
    assert moved.nbytes() == cache.nbytes() == sum(leaf.nbytes for leaf in jax.tree.leaves(cache))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_repeated_rows_are_copies_of_the_row(scan_layers):
    row = _filled_cache("int8", scan_layers, batch=1)
    repeated = row.repeat_rows(4)
    assert repeated.keys[0].shape[0] == 4 and repeated.index.shape == (4,)
    for i in range(4):
        _assert_same(repeated.row(i), row)


def test_segments_are_written_at_each_rows_index_and_advance_moves_it():
    cache = KVCache.create(tiny_config().model, batch=2, max_len=6)._replace(index=jnp.array([0, 3], jnp.int32))
    cache = cache.with_segments(jnp.array([[1, 1], [2, 2]], jnp.int32)).advance(2)
    assert cache.segment_ids.tolist() == [[1, 1, 0, 0, 0, 0], [0, 0, 0, 2, 2, 0]]
    assert cache.index.tolist() == [2, 5]
