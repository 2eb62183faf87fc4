"""Loads a training run's latest (or a chosen) checkpoint for inference: model, config and tokenizer."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import ml_collections
from flax import nnx

from llm import checkpoint, sharding
from llm.model import lora
from llm.model.transformer import Transformer, create_model
from llm.quant import ptq
from llm.runs import build, directory
from llm.tokenizer import AnyTokenizer, load_tokenizer


@dataclasses.dataclass
class Run:
    model: Transformer
    config: ml_collections.ConfigDict
    tokenizer: AnyTokenizer
    step: int
    workdir: str


def load_run(workdir: str, step: int | None = None, mesh_shape: Sequence[int] = (1, -1, 1)) -> Run:
    """The run's model (see `load_model`) with its tokenizer."""
    config = directory.load_config(workdir)
    tokenizer = load_tokenizer(directory.find_tokenizer(workdir, config))
    model, config, step = load_model(workdir, step, mesh_shape)
    if config.model.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"The tokenizer has {tokenizer.vocab_size} ids but the model only {config.model.vocab_size}.")
    return Run(model, config, tokenizer, step, workdir)


def load_model(
    workdir: str, step: int | None = None, mesh_shape: Sequence[int] = (1, -1, 1)
) -> tuple[Transformer, ml_collections.ConfigDict, int]:
    """Restores the parameters of `step` (default: the latest checkpoint) onto a mesh of the local devices;
    returns the model, its config and the step.

    Only parameters are read, not the optimizer state. LoRA, QLoRA and prompt-tuning runs' checkpoints hold
    only what they trained; the base weights come from their `init_from` run. Adapters are merged into the
    base (for QLoRA, into its dequantized weights), so the returned model (and config) is a plain model
    that decodes as fast as its base; a soft prompt stays in front of the base model, as it was trained.
    """
    config = directory.load_config(workdir)
    mesh = sharding.create_mesh(mesh_shape, jax.local_devices())

    def placed(abstract: nnx.State) -> nnx.State:
        return sharding.abstract_with_shardings(
            abstract, sharding.tree_shardings(abstract, mesh, config.logical_axis_rules)
        )

    if config.train.trainable == "all":
        # A quantized run (scripts/quantize.py) rebuilds its quantized structure from its config.
        abstract = nnx.eval_shape(lambda: ptq.model_from_config(config))
        graphdef, abstract_params = nnx.split(abstract, nnx.Param)
        params, step = checkpoint.restore_run_params(workdir, placed(abstract_params), step)
        model = nnx.merge(graphdef, params)
    else:
        model, step = _trained_on_base(workdir, config, step, placed)
        if config.train.trainable == "lora":
            model, config = _merged(model, config)
    return model, config, step


def _trained_on_base(
    workdir: str, config: ml_collections.ConfigDict, step: int | None, placed: Callable[[nnx.State], nnx.State]
) -> tuple[Transformer, int]:
    """The model as it was trained: the run's trained parameters over its `init_from` base."""
    trainable = build.TRAINABLE[config.train.trainable]
    graphdef, abstract_trained, _ = nnx.split(nnx.eval_shape(lambda: build.trained_model(config, None)), trainable, ...)
    trained, step = checkpoint.restore_run_params(workdir, placed(abstract_trained), step)
    abstract_base = nnx.state(nnx.eval_shape(lambda: create_model(build.base_config(config))), nnx.Param)
    base, _ = checkpoint.restore_run_params(config.init_from, placed(abstract_base))
    # One compiled program: XLA drops the unused fresh initialization of what the base replaces.
    frozen = jax.jit(lambda base: nnx.split(build.trained_model(config, base), trainable, ...)[2])(base)
    return nnx.merge(graphdef, trained, frozen), step


def _merged(adapted: Transformer, config: ml_collections.ConfigDict) -> tuple[Transformer, ml_collections.ConfigDict]:
    """The adapted model with its adapters merged into its (dequantized, for QLoRA) weights, and its config."""
    quantized = config.train.quantize_base != "none"
    params = ptq.dequantized_params(adapted) if quantized else nnx.state(adapted, nnx.Param)
    config = build.base_config(config)
    if quantized:
        config.model.scan_layers = False  # Quantization unrolled the blocks (llm/quant/ptq.py).
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: create_model(config)))
    return nnx.merge(graphdef, lora.merged_params(adapted, params)), config
