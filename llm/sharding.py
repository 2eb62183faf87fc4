"""Meshes, logical axis rules and shardings: the ONLY module that calls JAX/Flax partitioning APIs.

Model code never names a mesh axis. It annotates each parameter with logical axis names through
`with_logical_axes(initializer, ("embed", "mlp"))` and each key activation through
`constrain(x, ("batch", "length", "embed"))`. The config's `logical_axis_rules` table maps those names to
the mesh axes `data`, `fsdp` and `tensor`, so changing the parallelism of a run is a config change, and the
next rename of a partitioning API in Flax or JAX touches this file only.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
Rules = Sequence[tuple[str, Any]]

# The rules in force while tracing model code; set by `use_mesh`.
_active_rules: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("logical_axis_rules", default=None)


def check_distributed_args(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Raises ValueError naming the flag when an explicit process layout cannot be right."""
    if coordinator_address is not None and not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", coordinator_address):
        raise ValueError(f"coordinator_address={coordinator_address!r} is not HOST:PORT (e.g. localhost:12345).")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes={num_processes} must be at least 1.")
    if process_id is not None and process_id < 0:
        raise ValueError(f"process_id={process_id} must be at least 0.")
    if process_id is not None and num_processes is not None and process_id >= num_processes:
        raise ValueError(f"process_id={process_id} must be below num_processes={num_processes} (ids count from 0).")


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Joins a multi-process run; call it before any other JAX call, in every process.

    Without arguments JAX detects the layout from the environment (TPU pod slice, SLURM, Open MPI, or
    JAX_COORDINATOR_ADDRESS). A localhost or bare-metal launch without a cluster manager names the coordinator
    (process 0's HOST:PORT), the number of processes and this one's id. Each process then feeds its own shard
    of the data (see `llm/data/loader.py`) and `global_batch` assembles the global arrays.
    """
    check_distributed_args(coordinator_address, num_processes, process_id)
    # CPU devices of different processes exchange collectives through gloo; without it a computation that spans
    # processes fails on CPU. Accelerators are unaffected.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    logging.info(
        "Process %d of %d, %d local devices.", jax.process_index(), jax.process_count(), jax.local_device_count()
    )


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces a single -1 entry of a (data, fsdp, tensor) shape by the number of devices left over."""
    shape = tuple(int(n) for n in mesh_shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh_shape must have {len(MESH_AXES)} entries {MESH_AXES}, got {shape}.")
    if shape.count(-1) > 1 or any(n == 0 or n < -1 for n in shape):
        raise ValueError(f"mesh_shape entries must be positive, with at most one -1; got {shape}.")
    known = math.prod(n for n in shape if n != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh_shape {shape}: {num_devices} devices are not divisible by {known}.")
        shape = tuple(num_devices // known if n == -1 else n for n in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh_shape {shape} needs {math.prod(shape)} devices, but {num_devices} are available.")
    return shape


def create_mesh(mesh_shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh over all devices (or the given ones)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_shape, len(devices))
    # Auto axes: XLA propagates shardings between our annotations (JAX now defaults to Explicit).
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Makes `mesh` and the logical axis `rules` current for tracing, jitting and `constrain`."""
    rules = tuple((name, _as_tuple(axes)) for name, axes in rules)
    token = _active_rules.set(rules)
    try:
        # Flax reads the same table when it derives shardings itself (e.g. in nnx.eval_shape).
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            yield
    finally:
        _active_rules.reset(token)


def _as_tuple(axes: Any) -> Any:
    # Configs hold rules as lists after a round trip through JSON; flax wants tuples or strings.
    return tuple(axes) if isinstance(axes, list) else axes


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once per array."""
    return nn.logical_to_mesh_axes(tuple(logical_axes), tuple((n, _as_tuple(a)) for n, a in rules))


def with_logical_axes(initializer: Callable[..., jax.Array], logical_axes: Sequence[str | None]):
    """Wraps a parameter initializer so the created nnx.Param records its logical axis names."""
    return nnx.with_partitioning(initializer, tuple(logical_axes))


def stacked_layers_metadata() -> dict[str, str]:
    """`transform_metadata` for nnx.vmap over blocks: the new leading axis of every parameter is `layers`."""
    return {nnx.PARTITION_NAME: "layers"}


def no_eager_sharding():
    """Context in which annotated parameters may be created without a mesh (we shard them explicitly)."""
    return nnx.use_eager_sharding(False)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Pins an activation's sharding inside jitted code; a no-op outside `use_mesh`."""
    rules = _active_rules.get()
    if rules is None or jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, rules))


def per_shard(
    fn: Callable[..., jax.Array], logical_in: Sequence[Sequence[str | None]], logical_out: Sequence[str | None]
) -> Callable[..., jax.Array]:
    """Runs `fn` on each device's shard of its inputs (for kernels XLA cannot partition, e.g. Pallas).

    Inputs and output are split as their logical axes say under the active mesh and rules; without a mesh,
    `fn` runs as is.
    """
    rules = _active_rules.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return fn
    in_specs = tuple(logical_to_spec(names, rules) for names in logical_in)
    return jax.shard_map(
        fn, mesh=mesh, in_specs=in_specs, out_specs=logical_to_spec(logical_out, rules), check_vma=False
    )


def logical_axis_size(name: str) -> int:
    """How many shards the active mesh and rules split a logical axis into (1 outside `use_mesh`)."""
    rules = _active_rules.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return 1
    axes = logical_to_spec((name,), rules)[0]
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))


def _sharding_for(leaf: Any, mesh: Mesh, rules: Rules) -> NamedSharding:
    names = leaf.get_metadata().get("out_sharding") if isinstance(leaf, nnx.Variable) else None
    shape = getattr(leaf.value if isinstance(leaf, nnx.Variable) else leaf, "shape", ())
    if not names:
        return NamedSharding(mesh, PartitionSpec())
    spec = list(logical_to_spec(names, rules))
    spec += [None] * (len(shape) - len(spec))
    for dim, axes in enumerate(spec):
        size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
        if size > 1 and shape[dim] % size:
            # Uneven shards are not supported by jit; replicate this dimension rather than fail.
            logging.warning(
                "Dimension %d (%s, size %d) of a parameter is not divisible by mesh axes %s; replicating it.",
                dim,
                names[dim],
                shape[dim],
                axes,
            )
            spec[dim] = None
    return NamedSharding(mesh, PartitionSpec(*spec))


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """Shardings for a pytree of nnx Variables and arrays (params, optimizer state, train state).

    The result has the structure of `tree` (Variables keep their metadata, their value becomes a
    NamedSharding), so it serves as jit `in_shardings`/`out_shardings` and for `abstract_with_shardings`.
    A Variable is placed as its logical axes say; anything else (step counters, scalars) is replicated.
    Optax moments are copies of the parameter Variables, so they inherit the parameters' shardings.
    """

    def for_leaf(leaf: Any) -> Any:
        if isinstance(leaf, nnx.Variable):
            return leaf.replace(_sharding_for(leaf, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(for_leaf, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def logical_sharding(mesh: Mesh, rules: Rules, logical_axes: Sequence[str | None]) -> NamedSharding:
    """The NamedSharding of an array with the given logical axes (e.g. a batch: ("batch", "length"))."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules))


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh that `tree`'s arrays are placed on (a model loaded by llm/runs), or None when they are not on one."""
    for leaf in jax.tree.leaves(tree):
        mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
        if isinstance(mesh, Mesh):
            return mesh
    return None


def use_mesh_of(tree: Any, rules: Rules) -> contextlib.AbstractContextManager:
    """`use_mesh` on the mesh of `tree`'s arrays (see `mesh_of`), so that what is jitted over them (a model's
    generation steps) shards as `rules` say; nothing for arrays that are not on a mesh."""
    mesh = mesh_of(tree)
    return contextlib.nullcontext() if mesh is None else use_mesh(mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules) -> dict[str, jax.Array]:
    """Assembles each process's slice of a batch into global arrays sharded along `batch`.

    Every process passes the rows it read itself; single-process runs pass the whole batch.
    """
    sharding = logical_sharding(mesh, rules, ("batch", "length"))
    return {
        name: jax.make_array_from_process_local_data(sharding, np.asarray(value)) for name, value in local_batch.items()
    }


def check_rows_split_by_process(mesh: Mesh, rules: Rules, batch_size: int) -> None:
    """Refuses a mesh on which one row of the batch sits on devices of several processes.

    Every process feeds only its own rows (llm/data/loader.py; `global_batch`), so a row that two processes'
    devices hold would get different data from each: the `batch` axes must split the processes apart, as a
    (processes, -1, 1) mesh does, while `tensor` (and any axis within a host) may group a process's own devices.
    """
    if jax.process_count() == 1:
        return
    holders: dict[tuple[int, int], set[int]] = {}
    rows = logical_sharding(mesh, rules, ("batch", "length")).devices_indices_map((batch_size, 1))
    for device, (row_slice, _) in rows.items():
        start, stop, _ = row_slice.indices(batch_size)
        holders.setdefault((start, stop), set()).add(device.process_index)
    for (start, stop), processes in sorted(holders.items()):
        if len(processes) > 1:
            raise ValueError(
                f"mesh_shape {tuple(mesh.shape.values())} on {jax.process_count()} processes: rows {start}-{stop - 1} "
                f"of each batch sit on devices of processes {sorted(processes)}, but every process feeds its own "
                f"rows. Split the batch across the processes: put them along data or fsdp, e.g. mesh_shape="
                f"({jax.process_count()}, -1, 1)."
            )


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings: the target that lets Orbax restore onto any mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
    """How many ways the batch dimension is split (the global batch must be a multiple of it)."""
    axes = logical_to_spec(("batch",), rules)[0]
    axes = (axes,) if isinstance(axes, str) else axes or ()
    return math.prod(mesh.shape[a] for a in axes)
