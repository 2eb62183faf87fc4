"""Sharding: the mesh from config, parameters placed as the rules table says, same numbers on any mesh."""

import jax
import numpy as np
import pytest
from conftest import pattern_rows, tiny_config
from jax.sharding import PartitionSpec

from llm import checkpoint, sharding
from llm.train import step as step_lib


def _steps(config, mesh_shape):
    mesh = sharding.create_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
    with sharding.use_mesh(mesh, config.logical_axis_rules):
        return mesh, step_lib.build_steps(config, mesh)


def _batches(config, count):
    rows = list(pattern_rows(config.train.batch_size * count, config.data.seq_len, config.model.vocab_size, 3))
    for i in range(count):
        chunk = rows[i * config.train.batch_size : (i + 1) * config.train.batch_size]
        yield {name: np.stack([row[name] for row in chunk]) for name in chunk[0]}


def _run(config, mesh_shape, num_steps=3):
    mesh, steps = _steps(config, mesh_shape)
    losses = []
    with sharding.use_mesh(mesh, config.logical_axis_rules):
        state, frozen = steps.init(None)
        for batch in _batches(config, num_steps):
            state, metrics = steps.train(state, frozen, sharding.global_batch(batch, mesh, config.logical_axis_rules))
            losses.append(float(metrics["loss"]))
    return losses, state


def test_mesh_shape_resolves_minus_one():
    assert sharding.resolve_mesh_shape((1, -1, 2), 8) == (1, 4, 2)
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.resolve_mesh_shape((1, 3, 2), 8)
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.resolve_mesh_shape((-1, -1, 2), 8)


@pytest.fixture(scope="module")
def runs():
    config = tiny_config(train__grad_accum_steps=2)
    return config, _run(config, (1, 1, 1)), _run(config, (2, 2, 2))


def test_one_device_and_2x2x2_mesh_give_the_same_losses(runs):
    _, (single, _), (meshed, _) = runs
    np.testing.assert_allclose(single, meshed, atol=1e-5)
    assert single[-1] < single[0]


def test_parameters_are_sharded_as_the_rules_table_declares(runs):
    config, _, (_, state) = runs
    rules = dict(config.logical_axis_rules)
    params = state["params"]
    expected = {
        ("embed", "embedding"): ("vocab", "embed"),
        ("blocks", 0, "attention", "query", "kernel"): ("embed", "heads", "head_dim"),
        ("blocks", 0, "attention", "key", "kernel"): ("embed", "kv_heads", "head_dim"),
        ("blocks", 1, "attention", "out", "kernel"): ("heads", "head_dim", "embed"),
        ("blocks", 0, "mlp", "gate", "kernel"): ("embed", "mlp"),
        ("blocks", 1, "mlp", "down", "kernel"): ("mlp", "embed"),
        ("blocks", 0, "attention_norm", "scale"): ("norm",),
    }
    for path, logical in expected.items():
        variable = params
        for key in path:
            variable = variable[key]
        want = PartitionSpec(*[rules[name] for name in logical])
        assert variable[...].sharding.spec == want, path
    # Adam moments live where their parameters live.
    mu = state["opt_state"][1][0].mu
    assert mu["embed"]["embedding"][...].sharding.spec == PartitionSpec("tensor", "fsdp")


def test_scanned_layers_shard_the_layers_axis_as_declared():
    config = tiny_config(model__scan_layers=True)
    mesh, steps = _steps(config, (2, 2, 2))
    spec = steps.state_shardings["params"]["blocks"]["mlp"]["up"]["kernel"].get_value().spec
    assert spec == PartitionSpec(None, "fsdp", "tensor")  # layers -> replicated, embed -> fsdp, mlp -> tensor


def test_checkpoint_saved_on_2x2x2_mesh_restores_on_one_device(tmp_path):
    config = tiny_config()
    _, state = _run(config, (2, 2, 2), num_steps=1)
    saver = checkpoint.Checkpointer(str(tmp_path), keep=1)
    saver.save(1, state, {"position": 1}, {"seed": 0})
    saver.wait()
    _, single_steps = _steps(config, (1, 1, 1))
    restored, data_state, _ = saver.restore(1, single_steps.abstract_state)
    saver.close()
    assert data_state == {"position": 1}
    for want, got in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        assert len(got.sharding.device_set) == 1
        np.testing.assert_array_equal(np.asarray(want), np.asarray(got))


def test_restoring_parameters_of_another_model_is_refused(tmp_path):
    config = tiny_config()
    _, state = _run(config, (1, 1, 1), num_steps=1)
    saver = checkpoint.Checkpointer(str(tmp_path), keep=1)
    saver.save(1, state, {}, {})
    saver.wait()
    saver.close()
    other = tiny_config(model__tie_embeddings=False)  # has an `unembed` matrix the checkpoint lacks
    _, other_steps = _steps(other, (1, 1, 1))
    reader = checkpoint.Checkpointer(str(tmp_path), keep=1)
    with pytest.raises(ValueError, match="has no values for 1 parameters"):
        reader.restore_params(1, other_steps.abstract_state["params"])
    reader.close()
