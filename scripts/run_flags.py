"""`--mesh_shape`, which the scripts that load a run to generate, score or serve share (sample, chat, evaluate,
serve, ask): a tensor-parallel mesh splits the model's heads and MLP, and the KV cache with them, over the local
devices, e.g. `--mesh_shape=1,1,8` on one 8-GPU host."""

from __future__ import annotations

from absl import app, flags

from llm import sharding
from llm.runs import loading

MESH_SHAPE = flags.DEFINE_list(
    "mesh_shape",
    ["1", "-1", "1"],
    "The (data, fsdp, tensor) mesh over this host's devices the run is loaded onto; one entry may be -1.",
)


def mesh_shape() -> tuple[int, ...]:
    """--mesh_shape as integers, checked against this host's devices; a bad value is a UsageError naming the flag."""
    import jax

    try:
        shape = tuple(int(entry) for entry in MESH_SHAPE.value)
        return sharding.resolve_mesh_shape(shape, jax.local_device_count())
    except ValueError as error:
        raise app.UsageError(f"--mesh_shape={','.join(MESH_SHAPE.value)}: {error}") from None


def load_run(workdir: str, step: int | None) -> loading.Run:
    """The run at `workdir` (checkpoint `step`, default the latest) on the --mesh_shape mesh."""
    return loading.load_run(workdir, step, mesh_shape())
