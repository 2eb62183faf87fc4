"""Loads a training run's latest (or a chosen) checkpoint for inference: model, config and tokenizer."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence

import jax
import ml_collections
from flax import nnx

from llm import sharding
from llm.infer.generate import Generator
from llm.model import lora
from llm.model.transformer import Transformer
from llm.quant import ptq
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


def find_tokenizer(workdir: str, config: ml_collections.ConfigDict) -> str:
    for path in (os.path.join(workdir, "tokenizer.model"), os.path.join(config.data.path, "tokenizer.model")):
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"No tokenizer.model in {workdir!r} or in the run's data directory "
                            f"{config.data.path!r}.")


def load_run(workdir: str, step: int | None = None, mesh_shape: Sequence[int] = (1, -1, 1)) -> Run:
    """Restores the parameters of `step` (default: the latest checkpoint) onto a mesh of the local devices.

    Only parameters are read, not the optimizer state. A LoRA run's checkpoints hold only its adapters: the
    base weights come from its `init_from` run, and the adapters are merged into them, so the returned
    model (and `Run.config`) is a plain model that decodes as fast as its base.
    """
    config = checkpoint.load_config(workdir)
    tokenizer = Tokenizer.load(find_tokenizer(workdir, config))
    mesh = sharding.create_mesh(mesh_shape, jax.local_devices())

    def placed(abstract: nnx.State) -> nnx.State:
        return sharding.abstract_with_shardings(abstract, sharding.tree_shardings(abstract, mesh,
                                                                                 config.logical_axis_rules))

    # A quantized run (scripts/quantize.py) rebuilds its quantized structure from its config.
    abstract = nnx.eval_shape(lambda: ptq.model_from_config(config))
    trainable = config.train.get("trainable", "all")
    graphdef, abstract_trained, abstract_rest = nnx.split(abstract, step_lib.TRAINABLE[trainable], ...)
    trained, step = checkpoint.restore_run_params(workdir, placed(abstract_trained), step)
    if trainable == "lora":
        base, _ = checkpoint.restore_run_params(config.init_from, placed(abstract_rest))
        adapted = nnx.merge(graphdef, trained, base)
        config = lora.merged_config(config)
        plain_graphdef = nnx.graphdef(nnx.eval_shape(lambda: step_lib.create_model(config)))
        model = nnx.merge(plain_graphdef, lora.merged_params(adapted))
    else:
        model = nnx.merge(graphdef, trained, abstract_rest)
    if config.model.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"The tokenizer has {tokenizer.vocab_size} ids but the model only {config.model.vocab_size}.")
    return Run(model, config, tokenizer, step, workdir)
