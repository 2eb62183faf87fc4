"""Orbax checkpoints: model, optimizer, step, data-iterator state and config in one atomic unit.

Saves are asynchronous (training continues while the arrays are written) and atomic: Orbax writes into a
temporary directory and renames it when complete, so a crash mid-save never leaves a half-written
checkpoint as the latest one. Restoring onto another mesh or device count works because the restore target
carries the new shardings.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class _HideOrbaxInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def quiet_orbax_logs() -> None:
    """Orbax narrates every save at INFO level through absl; keep its warnings, drop the narration."""
    for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
        handler.addFilter(_HideOrbaxInfo())


class Checkpointer:
    def __init__(self, directory: str, keep: int, compress: bool = True):
        """`compress`: zstd-compress the arrays (a quarter smaller for bfloat16 weights). Writing a whole model
        once (an import, a merge) turns it off: compression triples the time of the write and holds a second
        host copy of the model meanwhile."""
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
        handlers = {
            "state": ocp.PyTreeCheckpointHandler(use_compression=compress),
            "data": ocp.JsonCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)
        self.directory = directory

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict[str, Any], config: dict[str, Any]) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config)
            ),
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """Restores (state, data-iterator state, config) of `step` onto the shardings of `abstract_state`."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)
                ),
                data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, restored.data, restored.config

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the model parameters of `step` (no optimizer state): what inference and evaluation need."""
        target = {"params": abstract_params}
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
                )
            ),
        )
        # A partial restore leaves placeholders where the checkpoint has no value: refuse rather than run on them.
        leaves = jax.tree_util.tree_flatten_with_path(restored.state["params"])[0]
        missing = [jax.tree_util.keystr(path) for path, leaf in leaves if isinstance(leaf, jax.ShapeDtypeStruct)]
        if missing:
            raise ValueError(
                f"Checkpoint {step} in {self.directory!r} has no values for {len(missing)} parameters "
                f"(e.g. {missing[:3]}): it was written by a model with another config."
            )
        return restored.state["params"]

    def restore_config(self, step: int) -> dict[str, Any]:
        return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def require_checkpoint(run_dir: str, step: int | None = None) -> int:
    """The checkpoint step to read from a run directory (`step`, or the latest), checked without loading
    anything: a missing directory or step raises FileNotFoundError naming what is there."""
    directory = os.path.join(os.path.abspath(run_dir), "checkpoints")
    steps = sorted(int(name) for name in os.listdir(directory) if name.isdigit()) if os.path.isdir(directory) else []
    if not steps:
        raise FileNotFoundError(f"No checkpoints in {directory!r}: train first (scripts/train.py).")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"No checkpoint for step {step} in {directory!r} (available: {steps}).")
    return steps[-1] if step is None else step


def restore_run_params(run_dir: str, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
    """The trained parameters of a run directory's checkpoint `step` (default: the latest), placed as the
    ShapeDtypeStructs of `abstract_params` say, and the step they come from."""
    step = require_checkpoint(run_dir, step)
    checkpointer = Checkpointer(os.path.join(os.path.abspath(run_dir), "checkpoints"), keep=1_000_000)
    try:
        return checkpointer.restore_params(step, abstract_params), step
    finally:
        checkpointer.close()
