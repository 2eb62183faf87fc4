"""The transformer: packed documents stay isolated, every architecture option builds and runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import forward, tiny_config
from flax import nnx

from llm.model import attention
from llm.model.transformer import create_model


def _packed_row():
    tokens = jnp.array([[5, 9, 17, 33, 41, 6, 12, 88, 90, 3]])
    segments = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 2]])
    positions = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])
    return tokens, segments, positions


@pytest.mark.parametrize("position_encoding", ["rope", "learned", "sinusoidal"])
def test_changing_one_document_leaves_the_other_untouched(position_encoding):
    model = create_model(tiny_config(model__position_encoding=position_encoding))
    tokens, segments, positions = _packed_row()
    before = forward(model, tokens, positions, segments)
    after = forward(model, tokens.at[0, 7].set(101), positions, segments)  # edit document 2 only
    np.testing.assert_array_equal(before[0, :5], after[0, :5])
    assert not np.allclose(before[0, 7:], after[0, 7:])


def test_second_document_is_as_if_it_were_alone():
    model = create_model(tiny_config())
    tokens, segments, positions = _packed_row()
    packed = forward(model, tokens, positions, segments)
    alone = forward(model, tokens[:, 5:])
    np.testing.assert_allclose(packed[0, 5:], alone[0], atol=1e-5)


def test_attention_is_causal():
    model = create_model(tiny_config())
    tokens = jnp.arange(1, 11)[None]
    before = forward(model, tokens)
    after = forward(model, tokens.at[0, 6].set(77))
    np.testing.assert_array_equal(before[0, :6], after[0, :6])


@pytest.mark.parametrize("overrides", [
    dict(model__num_kv_heads=4),  # multi-head
    dict(model__num_kv_heads=1),  # multi-query
    dict(model__mlp_activation="gelu", model__norm="layernorm", model__use_bias=True),
    dict(model__tie_embeddings=False, model__head_dim=16),
    dict(model__scan_layers=True, model__remat_policy="full"),
    dict(model__remat_policy="save_dots"),
    dict(model__dtype="bfloat16"),
])
def test_architecture_options_run_and_are_finite(overrides):
    config = tiny_config(**overrides)
    model = create_model(config)
    logits = forward(model, jnp.ones((2, 8), jnp.int32))
    assert logits.shape == (2, 8, config.model.vocab_size)
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_scanned_layers_compute_the_same_function_as_a_list():
    listed = create_model(tiny_config())
    scanned = create_model(tiny_config(model__scan_layers=True))
    # Give the scanned model the listed model's weights, stacked along the layers axis.
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in listed.blocks])
    nnx.update(scanned.blocks, stacked)
    for name in ("embed", "final_norm"):
        nnx.update(getattr(scanned, name), nnx.state(getattr(listed, name)))
    tokens = jnp.arange(1, 13)[None]
    np.testing.assert_allclose(forward(listed, tokens), forward(scanned, tokens), atol=1e-5)


def test_grouped_query_attention_equals_repeated_key_value_heads():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 6, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 6, 2, 8)), jnp.float32) for _ in range(2))
    segments = jnp.ones((2, 6), jnp.int32)
    grouped = attention.dot_product_attention(q, k, v, segments, "xla")
    repeated = attention.dot_product_attention(q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2), segments, "xla")
    np.testing.assert_allclose(grouped, repeated, atol=1e-6)


def test_dropout_only_with_a_key():
    model = create_model(tiny_config(model__dropout_rate=0.5))
    tokens = jnp.arange(1, 9)[None]
    np.testing.assert_array_equal(forward(model, tokens), forward(model, tokens))
    key = jax.random.key(0)
    np.testing.assert_array_equal(forward(model, tokens, dropout_key=key), forward(model, tokens, dropout_key=key))
    assert not np.allclose(forward(model, tokens), forward(model, tokens, dropout_key=key))


def test_attention_kernel_choice_falls_back_to_xla_on_cpu():
    assert attention.choose_impl("auto", jnp.bfloat16) == "xla"
    assert attention.choose_impl("cudnn", jnp.float32) == "cudnn"


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 1, 2)])
def test_splash_kernel_matches_the_xla_reference(mesh_shape):
    from llm import sharding
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 128, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 128, 2, 16)), jnp.float32) for _ in range(2))
    segments = jnp.asarray(np.repeat([[1] * 50 + [2] * 78], 2, axis=0), jnp.int32)
    reference = attention.dot_product_attention(q, k, v, segments, "xla")
    config = tiny_config()
    mesh = sharding.create_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
    with sharding.use_mesh(mesh, config.logical_axis_rules):
        splash = jax.jit(lambda *args: attention.dot_product_attention(*args, "splash"))(q, k, v, segments)
    np.testing.assert_allclose(splash, reference, atol=1e-5)
