"""LoRA on the experts of a mixture-of-experts layer: per-expert adapters start at the base model, the dropless
and masked computations agree with them (values, gradients, dropout), merging equals not merging, and a LoRA run
of an MoE model trains the adapters alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import forward, pattern_rows
from flax import nnx
from test_moe import moe_config, moe_layer

from llm import config_validation, sharding
from llm.model import lora, moe
from llm.model.transformer import create_model
from llm.train import step as step_lib

LORA = dict(model__lora_rank=4, model__lora_alpha=8.0, model__lora_targets="attention/query|mlp/.*")
TOKENS = jnp.array([[7, 21, 3, 99, 45, 8, 60, 12, 5], [2, 17, 40, 5, 9, 31, 77, 12, 1]])


def _randomize_adapters(model, seed=0):
    """B away from zero (and A redrawn), so that the adapters change the output."""
    state = nnx.state(model, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))


def _base_model(config, adapted):
    """The model without adapters holding `adapted`'s merged parameters (what scripts/merge_lora.py loads)."""
    config.model.lora_rank = 0
    base = create_model(config)
    nnx.update(base, lora.merged_params(adapted))
    return base


def test_experts_get_one_adapter_each_under_the_mlp_paths_and_the_router_none():
    config = moe_config(model__num_shared_experts=1, **LORA)
    config_validation.validate(config)  # MLP targets on an MoE model are accepted
    shapes = {
        "/".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(nnx.state(create_model(config), nnx.LoRAParam))
    }
    assert shapes["blocks/0/mlp/up_lora/lora_a"] == (8, 32, 4)  # (experts, embed, rank)
    assert shapes["blocks/0/mlp/up_lora/lora_b"] == (8, 4, 32)  # (experts, rank, moe_mlp_dim)
    assert shapes["blocks/1/mlp/down_lora/lora_a"] == (8, 32, 4)
    assert shapes["blocks/1/mlp/gate_lora/lora_b"] == (8, 4, 32)
    assert shapes["blocks/0/mlp/shared/up_lora/adapter/lora_a"] == (32, 4)  # the shared experts: a dense LoRA
    assert not any("router" in path for path in shapes)


@pytest.mark.parametrize("impl", list(moe.IMPLEMENTATIONS))
def test_adapters_start_at_zero_so_the_adapted_model_computes_its_base(impl):
    config = moe_config(model__moe_impl=impl, **LORA)
    adapted = create_model(config)
    assert all(
        float(jnp.abs(b).max()) == 0
        for p, b in nnx.to_flat_state(nnx.state(adapted, nnx.LoRAParam))
        if p[-1] == "lora_b"
    )
    np.testing.assert_array_equal(forward(adapted, TOKENS), forward(_base_model(config, adapted), TOKENS))


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("dropout", [False, True])
def test_dropless_equals_masked_with_nonzero_adapters_in_values_and_gradients(activation, dropout):
    x = jax.random.normal(jax.random.key(1), (2, 8, 32)) * 20.0
    cotangent = jax.random.normal(jax.random.key(2), x.shape)
    key = jax.random.key(3) if dropout else None
    results = {}
    for impl in moe.IMPLEMENTATIONS:
        cfg = moe_config(model__moe_impl=impl, model__mlp_activation=activation, model__lora_dropout=0.3, **LORA).model
        layer = moe_layer(cfg)
        _randomize_adapters(layer)

        def objective(layer, x):
            out, _ = layer(x, key)
            return jnp.sum(out * cotangent), out

        (_, out), grads = nnx.value_and_grad(objective, argnums=(0, 1), has_aux=True)(layer, x)
        results[impl] = out, nnx.to_pure_dict(grads[0]), grads[1]
    # Large inputs (far-apart router logits) give large outputs: tolerances relative to each array's scale.
    close = lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    want_out, want_params, want_x = results.pop("masked")
    for got_out, got_params, got_x in results.values():  # dropless (ragged_dot) and megablox (Pallas, interpreted)
        close(got_out, want_out)
        close(got_x, want_x)
        jax.tree.map(close, got_params, want_params)
        assert float(jnp.abs(got_params["down_lora"]["lora_a"]).max()) > 0
    # The adapters matter: without them the output differs (so the comparison above covers them).
    layer.up_lora = layer.down_lora = layer.gate_lora = None
    assert not np.allclose(layer(x, key)[0], got_out, atol=1e-2)


def test_megablox_runs_per_device_on_a_mesh_and_equals_dropless_with_adapters_and_dropout():
    # Each device sorts its own tokens for the Pallas kernel; the dropout masks are drawn over the global batch.
    x = jax.random.normal(jax.random.key(1), (8, 8, 32)) * 20.0
    cotangent = jax.random.normal(jax.random.key(2), x.shape)
    results = {}
    for impl in ("dropless", "megablox"):
        config = moe_config(model__moe_impl=impl, model__lora_dropout=0.3, **LORA)
        layer = moe_layer(config.model)
        _randomize_adapters(layer)

        def objective(layer, x):
            out, stats = layer(x, jax.random.key(3))
            return jnp.sum(out * cotangent) + stats.aux_loss, out

        step = nnx.jit(nnx.value_and_grad(objective, argnums=(0, 1), has_aux=True))
        with sharding.use_mesh(sharding.create_mesh((2, 2, 2)), config.logical_axis_rules):
            (_, out), grads = step(layer, x)
        results[impl] = out, nnx.to_pure_dict(grads[0]), grads[1]
    close = lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    jax.tree.map(close, results["megablox"], results["dropless"])


@pytest.mark.parametrize("impl, scan_layers", [("dropless", False), ("dropless", True), ("masked", True)])
def test_merged_adapters_give_the_logits_of_unmerged_ones(impl, scan_layers):
    config = moe_config(model__moe_impl=impl, model__scan_layers=scan_layers, model__num_shared_experts=1, **LORA)
    adapted = create_model(config)
    _randomize_adapters(adapted)
    merged = _base_model(config, adapted)
    np.testing.assert_allclose(forward(merged, TOKENS), forward(adapted, TOKENS), rtol=1e-4, atol=1e-4)
    assert not np.allclose(forward(merged, TOKENS), forward(create_model(config), TOKENS), atol=1e-3)


def test_a_lora_run_of_an_moe_model_trains_only_the_adapters_and_its_loss_falls():
    config = moe_config(train__trainable="lora", model__scan_layers=True, **LORA)
    config.optimizer.update(learning_rate=3e-2, warmup_steps=0)
    mesh = sharding.create_mesh((1, 1, 1), jax.devices()[:1])
    rows = list(pattern_rows(config.train.batch_size, config.data.seq_len, config.model.vocab_size, 3))
    batch = {name: np.stack([row[name] for row in rows]) for name in rows[0]}
    losses = []
    with sharding.use_mesh(mesh, config.logical_axis_rules):
        steps = step_lib.build_steps(config, mesh)
        state, frozen = steps.init(None)
        base_before = jax.tree.map(np.asarray, frozen["rest"])
        for _ in range(6):
            state, metrics = steps.train(state, frozen, sharding.global_batch(batch, mesh, config.logical_axis_rules))
            losses.append(float(metrics["loss"]))
    names = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(state["params"])]
    assert names and all("_lora/" in name for name in names)
    assert "moe_blocks/mlp/up_lora/lora_b" in names and "moe_blocks/mlp/down_lora/lora_a" in names
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, frozen["rest"]), base_before)
    assert losses[-1] < losses[0] - 0.05, losses
