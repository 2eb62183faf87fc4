"""The transformer: packed documents stay isolated, every architecture option builds and runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import forward, tiny_config
from flax import nnx

from configs import base
from llm.model import kernels, layers
from llm.model.transformer import DropoutKeys, create_model


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


@pytest.mark.parametrize(
    "overrides",
    [
        dict(model__num_kv_heads=4),  # multi-head
        dict(model__num_kv_heads=1),  # multi-query
        dict(model__mlp_activation="gelu", model__norm="layernorm", model__use_bias=True),
        dict(model__tie_embeddings=False, model__head_dim=16),
        dict(model__scan_layers=True, model__remat_policy="full"),
        dict(model__remat_policy="save_dots"),
        dict(model__dtype="bfloat16"),
        dict(model__qk_norm=True, model__scan_layers=True),
        dict(model__rope_scaling="llama3", model__rope_scaling_factor=8.0, model__rope_original_max_len=16),
    ],
)
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
    grouped = kernels.dot_product_attention(q, k, v, segments, "xla")
    repeated = kernels.dot_product_attention(q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2), segments, "xla")
    np.testing.assert_allclose(grouped, repeated, atol=1e-6)


def test_dropout_only_with_a_key():
    model = create_model(tiny_config(model__dropout_rate=0.5))
    tokens = jnp.arange(1, 9)[None]
    np.testing.assert_array_equal(forward(model, tokens), forward(model, tokens))
    key = jax.random.key(0)
    np.testing.assert_array_equal(forward(model, tokens, dropout_key=key), forward(model, tokens, dropout_key=key))
    assert not np.allclose(forward(model, tokens), forward(model, tokens, dropout_key=key))


def test_block_dropout_keys_keep_their_order_of_split():
    """Renaming or reordering the keys would change every dropout mask of a run (and a resumed run's)."""
    key = jax.random.key(3)
    split = jax.random.split(key, 4)
    keys = DropoutKeys.split(key)
    for name, index in (("attention", 0), ("mlp", 1), ("attention_lora", 2), ("mlp_lora", 3)):
        np.testing.assert_array_equal(jax.random.key_data(getattr(keys, name)), jax.random.key_data(split[index]))
    assert DropoutKeys.split(None) == (None, None, None, None)


def test_attention_kernel_choice_on_cpu_is_blocked_xla():
    assert kernels.choose_impl("auto", jnp.bfloat16) == "blocked"
    assert kernels.choose_impl("cudnn", jnp.float32) == "cudnn"


@pytest.mark.parametrize("length", [64, 37])  # 37: the last query block is shorter than the others.
def test_blocked_attention_matches_the_xla_reference_with_its_gradients(length):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, length, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, length, 2, 8)), jnp.float32) for _ in range(2))
    # Two packed documents, then a soft prompt's segment in front of the second row.
    segments = np.ones((2, length), np.int32)
    segments[0, length // 3 :] = 2
    segments[1, :5] = kernels.PROMPT_SEGMENT
    segments = jnp.asarray(segments)

    def attend(impl):
        return jax.jit(lambda q, k, v: kernels.dot_product_attention(q, k, v, segments, impl))

    np.testing.assert_allclose(attend("blocked")(q, k, v), attend("xla")(q, k, v), atol=1e-5)
    cotangent = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    grads = {impl: jax.vjp(attend(impl), q, k, v)[1](cotangent) for impl in ("blocked", "xla")}
    for blocked, reference in zip(grads["blocked"], grads["xla"]):
        np.testing.assert_allclose(blocked, reference, atol=1e-5)


def test_rope_scores_depend_only_on_the_distance_between_positions():
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32) for _ in range(2))

    def score(query_position, key_position):
        rotate = lambda x, p: layers.rope(x, jnp.array([[p]]), layers.Rope(10000.0, max_len=64))
        return float(jnp.sum(rotate(q, query_position) * rotate(k, key_position)))

    assert score(7, 3) == pytest.approx(score(40, 36), abs=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)
    # Position 0 is the identity; the rotation keeps norms.
    np.testing.assert_allclose(layers.rope(q, jnp.zeros((1, 1), jnp.int32), layers.Rope(10000.0, 64)), q)
    rotated = layers.rope(q, jnp.full((1, 1), 21), layers.Rope(10000.0, 64))
    np.testing.assert_allclose(jnp.linalg.norm(rotated), jnp.linalg.norm(q), rtol=1e-6)


def test_rope_scaling_dispatch_has_exactly_the_allowed_choices():
    assert set(layers.ROPE_SCALINGS) == set(base.CHOICES["model.rope_scaling"])


@pytest.mark.parametrize(
    "scaling, parameters",
    [
        ("none", dict(rope_type="default")),
        ("linear", dict(rope_type="linear", factor=4.0)),
        # A pretraining context of 64 puts the 32 frequencies of head_dim 64 in all three llama3 regimes.
        (
            "llama3",
            dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ],
)
def test_rope_frequencies_equal_transformers(scaling, parameters):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    theta = 500000.0
    hf = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_parameters=dict(parameters, rope_theta=theta))
    init = ROPE_INIT_FUNCTIONS.get(parameters["rope_type"], LlamaRotaryEmbedding.compute_default_rope_parameters)
    theirs = init(hf)[0].numpy()
    spec = layers.Rope(
        theta,
        128,
        scaling,
        parameters.get("factor", 1.0),
        parameters.get("low_freq_factor", 1.0),
        parameters.get("high_freq_factor", 4.0),
        parameters.get("original_max_position_embeddings", 8192),
    )
    ours = layers.rope_frequencies(32, spec)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    if scaling != "none":
        assert not np.allclose(ours, layers.rope_frequencies(32, layers.Rope(theta, 128)), rtol=1e-3)


def test_qk_norm_adds_one_head_dim_scale_per_query_and_key():
    from llm import sharding

    def params(**overrides):
        model = nnx.eval_shape(lambda: create_model(tiny_config(**overrides)))
        return nnx.state(model, nnx.Param)

    names = lambda state: {".".join(map(str, path)) for path, _ in nnx.to_flat_state(state)}
    with_norm = params(model__qk_norm=True, model__head_dim=12)
    added = names(with_norm) - names(params())
    assert added == {f"blocks.{i}.attention.{q}_norm.scale" for i in range(2) for q in ("query", "key")}
    # The scales have the logical axis head_dim: a rule that shards head_dim shards them.
    rules = [(name, "tensor" if name == "head_dim" else axes) for name, axes in base.DEFAULT_LOGICAL_AXIS_RULES]
    placed = sharding.tree_shardings(with_norm, sharding.create_mesh((2, 2, 2)), rules)
    scale = placed["blocks"][0]["attention"]["query_norm"]["scale"]
    assert with_norm["blocks"][0]["attention"]["query_norm"]["scale"].value.shape == (12,)
    assert tuple(scale.value.spec) == ("tensor",)


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 1, 2)])
def test_splash_kernel_matches_the_xla_reference(mesh_shape):
    from llm import sharding

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 128, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 128, 2, 16)), jnp.float32) for _ in range(2))
    segments = jnp.asarray(np.repeat([[1] * 50 + [2] * 78], 2, axis=0), jnp.int32)
    reference = kernels.dot_product_attention(q, k, v, segments, "xla")
    config = tiny_config()
    mesh = sharding.create_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
    with sharding.use_mesh(mesh, config.logical_axis_rules):
        splash = jax.jit(lambda *args: kernels.dot_product_attention(*args, "splash"))(q, k, v, segments)
    np.testing.assert_allclose(splash, reference, atol=1e-5)


def _lora_paths(config) -> set[str]:
    return {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(create_model(config), nnx.LoRAParam))}


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_lora_adapters_sit_beside_their_layers_under_the_checkpointed_names(activation):
    config = tiny_config(model__lora_rank=2, model__lora_targets=".*", model__mlp_activation=activation)
    adapted = ["attention/query", "attention/key", "attention/value", "attention/out", "mlp/up", "mlp/down"]
    adapted += ["mlp/gate"] if activation == "swiglu" else []
    expected = {
        f"blocks/{block}/{layer}_lora/adapter/{weight}"
        for block in range(config.model.num_layers)
        for layer in adapted
        for weight in ("lora_a", "lora_b")
    }
    assert _lora_paths(config) == expected
    only_query = tiny_config(model__lora_rank=2, model__lora_targets="attention/query")
    assert {path.split("/")[3] for path in _lora_paths(only_query)} == {"query_lora"}
