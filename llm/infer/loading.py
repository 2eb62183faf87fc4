"""Loads a training run's latest (or a chosen) checkpoint for inference: model, config and tokenizer."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence

import jax
import ml_collections
from flax import nnx

from llm import sharding
from llm.infer.generate import Generator
from llm.model.transformer import Transformer
from llm.tokenizer import Tokenizer
from llm.train import checkpoint, step as step_lib


@dataclasses.dataclass
class Run:
    model: Transformer
    config: ml_collections.ConfigDict
    tokenizer: Tokenizer
    step: int
    workdir: str

    @functools.cached_property
    def generator(self) -> Generator:
        """Shared by every generation call on this run (the split parameters are reused)."""
        return Generator(self.model)


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} not found: --workdir must be a directory written by scripts/train.py.")
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(json.load(f))


def find_tokenizer(workdir: str, config: ml_collections.ConfigDict) -> str:
    for path in (os.path.join(workdir, "tokenizer.model"), os.path.join(config.data.path, "tokenizer.model")):
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"No tokenizer.model in {workdir!r} or in the run's data directory "
                            f"{config.data.path!r}.")


def load_run(workdir: str, step: int | None = None, mesh_shape: Sequence[int] = (1, -1, 1)) -> Run:
    """Restores the parameters of `step` (default: the latest checkpoint) onto a mesh of the local devices.

    Only parameters are read, not the optimizer state, so loading needs a third of the training memory.
    """
    config = load_config(workdir)
    tokenizer = Tokenizer.load(find_tokenizer(workdir, config))
    checkpoint_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"No checkpoints in {checkpoint_dir!r}: train first (scripts/train.py).")
    checkpointer = checkpoint.Checkpointer(checkpoint_dir, keep=1_000_000)
    try:
        available = checkpointer.all_steps()
        step = available[-1] if step is None and available else step
        if step is None or step not in available:
            raise FileNotFoundError(f"No checkpoint for step {step} in {checkpoint_dir!r} (available: {available}).")
        abstract = nnx.eval_shape(lambda: step_lib.create_model(config))
        graphdef, abstract_params = nnx.split(abstract, nnx.Param)
        mesh = sharding.make_mesh(mesh_shape, jax.local_devices())
        shardings = sharding.tree_shardings(abstract_params, mesh, config.logical_axis_rules)
        params = checkpointer.restore_params(step, sharding.abstract_with_shardings(abstract_params, shardings))
    finally:
        checkpointer.close()
    if config.model.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"The tokenizer has {tokenizer.vocab_size} ids but the model only {config.model.vocab_size}.")
    return Run(nnx.merge(graphdef, params), config, tokenizer, step, workdir)
