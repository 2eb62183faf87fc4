"""The dry run's figures against what they stand for: the shards of a real initialized state, the sharding of a
mesh, the gradient all-reduce of data parallelism, the 6NT FLOP count; and its command-line tools' verdicts."""

import functools

import jax
import pytest
from conftest import run_script, tiny_config

from llm import devices, sharding
from llm.train import dry_run, fit_sweep, step as step_lib


@functools.cache
def report(mesh_shape, **model):
    """The dry run of the tiny config on `mesh_shape` with these model keys, once per test session."""
    config = tiny_config(mesh_shape=mesh_shape, **{f"model__{key}": value for key, value in model.items()})
    return dry_run.dry_run(config, "TPU v5p")


def shard_bytes(tree):
    """Bytes device 0 holds of a tree of real, placed arrays."""
    return sum(next(s for s in x.addressable_shards if s.device == jax.devices()[0]).data.nbytes for x in tree)


def test_parameter_and_optimizer_bytes_are_those_of_the_initialized_state_on_one_device():
    config = tiny_config(mesh_shape=(1, 8, 1))
    mesh = sharding.create_mesh(config.mesh_shape)
    with sharding.use_mesh(mesh, config.logical_axis_rules):
        state, frozen = step_lib.build_steps(config, mesh, num_steps=10).init(None)
    memory = report((1, 8, 1))["memory_per_device"]
    assert memory["parameters"] == shard_bytes(jax.tree.leaves((state["params"], frozen)))
    assert memory["optimizer_state"] == shard_bytes(jax.tree.leaves(state["opt_state"]))
    # XLA's arguments hold the state and the batch; the new state overwrites the donated old one.
    assert memory["arguments"] >= memory["parameters"] + memory["optimizer_state"]
    assert memory["aliased"] >= memory["parameters"] + memory["optimizer_state"]
    assert (
        memory["total"]
        == memory["arguments"] + memory["outputs"] - memory["aliased"] + (memory["activations_and_temporaries"])
    )


def test_fsdp_holds_an_eighth_of_the_parameters_that_data_parallelism_replicates():
    fsdp, replicated = report((1, 8, 1))["memory_per_device"], report((8, 1, 1))["memory_per_device"]
    # Norm scales and biases stay replicated, so a little more than an eighth.
    assert replicated["parameters"] / 8 <= fsdp["parameters"] < replicated["parameters"] / 6
    assert fsdp["optimizer_state"] < replicated["optimizer_state"] / 6


def test_data_parallelism_all_reduces_the_gradients_and_tensor_parallelism_adds_collectives():
    # Untied: a tied embedding gets two gradients, one per use, and XLA reduces both before adding them.
    data = report((8, 1, 1), tie_embeddings=False)
    gradients = data["collectives"]["all-reduce"]["operand_bytes"]
    # One all-reduce of every gradient (plus a few scalars: the loss sums and weight).
    assert data["memory_per_device"]["parameters"] <= gradients < 1.01 * data["memory_per_device"]["parameters"]
    assert data["collectives"]["all-gather"]["count"] == 0
    tensor = report((1, 2, 4))["collectives"]
    assert tensor["all-gather"]["count"] > 0
    assert tensor["all-reduce"]["count"] > 5 * data["collectives"]["all-reduce"]["count"]


def test_flops_match_six_n_t_and_count_scanned_layers_as_often_as_they_run():
    unrolled, scanned = report((1, 8, 1)), report((1, 8, 1), scan_layers=True)
    total = unrolled["flops_per_device"] * unrolled["devices"]
    assert 0.8 < total / unrolled["model_flops_per_step"] < 1.5
    assert scanned["flops_per_device"] == pytest.approx(unrolled["flops_per_device"], rel=0.02)
    estimate = unrolled["estimate"]
    assert estimate["fits"] and estimate["step_time_s"] == pytest.approx(
        max(estimate["compute_s"], estimate["memory_s"]) + estimate["collective_s"]
    )


def test_an_unknown_device_kind_is_refused_with_the_known_kinds():
    with pytest.raises(ValueError, match="TPU v5p"):
        devices.spec_by_name("TPU v9")
    assert devices.spec_by_name("NVIDIA H100 80GB HBM3") == devices.DEVICE_SPECS["H100"]
    result = run_script("train.py", "--dry_run", "--dry_run_device_kind=TPU v9", timeout=120)
    assert result.returncode != 0 and "known kinds: H200, H100" in result.stderr
    result = run_script("train.py", "--dry_run", "--dry_run_devices=0", timeout=120)
    assert result.returncode != 0 and "dry_run_devices" in result.stderr


def test_the_grid_syntax_keeps_mesh_shapes_whole_and_refuses_a_malformed_axis():
    grid = fit_sweep.parse_grid("mesh_shape=(1,-1,1),(1,-1,2);model.remat_policy=none,full;train.batch_size=8,16")
    assert grid == [
        ("mesh_shape", [(1, -1, 1), (1, -1, 2)]),
        ("model.remat_policy", ["none", "full"]),
        ("train.batch_size", [8, 16]),
    ]
    with pytest.raises(ValueError, match="KEY=VALUE"):
        fit_sweep.parse_grid("train.batch_size")


def test_the_sweep_marks_the_points_that_do_not_fit(monkeypatch):
    # A device of 1 MiB: batch 8 of the tiny model needs about 0.4 MiB, batch 128 several MiB.
    chip = devices.DeviceSpec(1e12, 1e12, hbm_bytes=2**20, interconnect_bytes_per_s=1e11)
    monkeypatch.setitem(devices.DEVICE_SPECS, "Test chip", chip)
    grid = fit_sweep.parse_grid("train.batch_size=8,128,12")
    rows = fit_sweep.sweep(tiny_config(mesh_shape=(1, 8, 1)), grid, "Test chip")
    assert [row.get("fits") for row in rows] == [True, False, None]
    assert rows[0]["memory_per_device_bytes"] < 2**20 < rows[1]["memory_per_device_bytes"]
    assert "not divisible" in rows[2]["error"]
    table = fit_sweep.format_sweep(rows, "Test chip").splitlines()
    assert " yes " in table[1] and " NO " in table[2] and "error" in table[3]
