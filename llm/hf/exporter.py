"""A run directory -> a Hugging Face model folder that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    OUTPUT/config.json                  the HF config (architectures, sizes, RoPE, norms, special token ids, dtype)
    OUTPUT/model.safetensors            the weights, or model-0000K-of-0000N.safetensors shards (5 GB each by
                                        default) with model.safetensors.index.json
    OUTPUT/generation_config.json       the special token ids (an imported run's own file, copied)
    OUTPUT/tokenizer.json, ...          the tokenizer (llm/hf/tokenizer_export.py)

A run with RMSNorm, SwiGLU and RoPE (scaled or not) exports as LlamaForCausalLM, with `qkv_bias` as
Qwen2ForCausalLM, with `qk_norm` as Qwen3ForCausalLM; one with LayerNorm, GELU, learned positions and biases as
GPT2LMHeadModel (query, key and value joined into its fused c_attn). With experts (model.num_experts) the
Llama-style run exports as MixtralForCausalLM (every layer MoE) or, with `qk_norm`, Qwen3MoeForCausalLM (MoE
every moe_every-th layer: decoder_sparse_step). A config with no Hugging Face equivalent is
refused, naming the key, before anything is written. A LoRA run exports merged here (`merge=True`); its PEFT
adapter is llm/hf/peft_adapters.py. A quantized run is refused: export the float run it was made from (its
`quantization.source_workdir`), which is what its weights approximate.

Weights leave the devices one tensor at a time and go straight into the file (the safetensors format is
written here: an 8-byte header length, a JSON header, then the raw data), so the host never holds the model
twice. The folder appears complete or not at all: it is written into OUTPUT.exporting and renamed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from configs import base
from llm import chat_template, checkpoint, io
from llm.hf import safetensors_files, tokenizer_export, weights
from llm.hf.export_architectures import ARCHITECTURES, EXPORTED_KEYS, Architecture
from llm.quant import ptq
from llm.runs import build, directory, loading
from llm.tokenizer import AnyTokenizer

GENERATION_CONFIG = "generation_config.json"
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's; an output holding one is an export too (llm/hf/peft_adapters.py)
STAGING_SUFFIX = ".exporting"


class UnsupportedRun(ValueError):
    """The run has no faithful Hugging Face equivalent (the message names the config key)."""


def _unexported_keys(model: ml_collections.ConfigDict) -> list[str]:
    known = EXPORTED_KEYS.union(*(arch.required for arch in ARCHITECTURES))
    defaults = base.get_config().model
    return [f"model.{key}={model[key]!r}" for key in model.keys() if key not in known and model[key] != defaults[key]]


def _refuse(config: ml_collections.ConfigDict) -> None:
    """Refuses, naming the key, what no architecture can express before any is matched."""
    if ptq.is_quantized(config):
        raise UnsupportedRun(
            f"The run is quantized (quantization.mode={config.quantization.mode!r}): export the float run it was "
            f"made from, quantization.source_workdir={config.quantization.source_workdir!r}, instead."
        )
    model = config.model
    if model.soft_prompt_length:
        raise UnsupportedRun(
            f"model.soft_prompt_length={model.soft_prompt_length}: a soft prompt has no Hugging Face equivalent."
        )
    if model.qkv_bias and model.qk_norm:
        raise UnsupportedRun(
            "model.qkv_bias=True with model.qk_norm=True: no Hugging Face architecture has both "
            "(Qwen2ForCausalLM biases the query, key and value projections, Qwen3ForCausalLM normalizes them)."
        )
    unexported = _unexported_keys(model)
    if unexported:
        raise UnsupportedRun(f"{'; '.join(unexported)}: not exported to Hugging Face yet (llm/hf/exporter.py).")


def architecture(config: ml_collections.ConfigDict) -> Architecture:
    """The architecture a (float, unadapted or merged) run config exports as; UnsupportedRun names the key."""
    _refuse(config)
    model = config.model
    mismatches = {arch.name: arch.mismatches(model) for arch in ARCHITECTURES}
    matching = [arch for arch in ARCHITECTURES if not mismatches[arch.name]]
    if matching:
        refused = matching[0].refusals(model)
        if refused:
            raise UnsupportedRun(f"Cannot export this run as {matching[0].name}: " + "; ".join(refused) + ".")
        return matching[0]
    # The nearest of the architectures of the same kind (dense or MoE): a run with experts wants to hear what
    # keeps it from being a Mixtral, not that it has experts.
    nearest = min(ARCHITECTURES, key=lambda arch: (arch.moe != bool(model.num_experts), len(mismatches[arch.name])))
    raise UnsupportedRun("No Hugging Face architecture matches this run: " + "; ".join(mismatches[nearest.name]) + ".")


def hf_config(
    config: ml_collections.ConfigDict, arch: Architecture, tokenizer: AnyTokenizer, dtype: str
) -> dict[str, Any]:
    """The config.json of the exported model."""
    model = config.model
    return {
        "architectures": [arch.name],
        "model_type": arch.model_type,
        "vocab_size": model.vocab_size,
        **arch.config_keys(model),
        "tie_word_embeddings": model.tie_embeddings,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "dtype": dtype,  # transformers 5
        "torch_dtype": dtype,  # transformers 4
        "use_cache": True,
    }


def per_layer_arrays(
    state: nnx.State, stacks: dict[str, list[int]] | None = None
) -> dict[tuple, tuple[tuple[int, ...], Callable[[], jax.Array]]]:
    """Path -> (shape, getter) of every array in `state`, with scanned blocks (a leading `layers` axis, path
    ('blocks', 'mlp', ...)) split into layers ('blocks', i, 'mlp', ...): the paths of the HF tables. `stacks`
    (weights.stacked_layers) gives the layer of each entry of every scanned stack (`blocks`, `moe_blocks`);
    without it `blocks` holds every layer. A getter reads the array (or one layer of it) only when called."""
    split: dict[str, list[int] | None] = stacks or {"blocks": None}
    arrays = {}
    for path, variable in nnx.to_flat_state(state):
        value = variable.value
        if path[0] in split and not isinstance(path[1], int):
            layers = range(value.shape[0]) if split[path[0]] is None else split[path[0]]
            for position, layer in enumerate(layers):
                arrays[("blocks", layer, *path[1:])] = (value.shape[1:], lambda v=value, i=position: v[i])
        else:
            arrays[path] = (value.shape, lambda v=value: v)
    return arrays


def model_tensors(model: nnx.Module, arch: Architecture) -> list[safetensors_files.OutTensor]:
    """The HF tensors of `model` (a plain model: no adapters, no quantization), gathered lazily (an expert's
    tensor: only its slice leaves the devices)."""
    arrays = per_layer_arrays(nnx.state(model, nnx.Param), weights.stacked_layers(model.cfg))
    shapes = {path: shape for path, (shape, _) in arrays.items()}

    def values(tensor: weights.HFTensor) -> Callable[[], np.ndarray]:
        gather = lambda path: np.asarray(jax.device_get(tensor.select(arrays[path][1]())))
        return lambda: tensor.assemble([gather(path) for path, _ in tensor.parts])

    return [
        safetensors_files.OutTensor(t.name, t.shape(shapes), values(t))
        for t in weights.export_tensors(arch.mapping, list(arrays), model.cfg.num_experts)
    ]


def check_output(output_dir: str, overwrite: bool) -> str:
    """The absolute output path; an existing one is replaced only with `overwrite`, and only if it holds an
    export (config.json or adapter_config.json): a mistyped path must not delete anything else."""
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and not overwrite:
        raise FileExistsError(f"{output_dir!r} already exists; choose another directory or overwrite it.")
    markers = (directory.CONFIG_FILE, ADAPTER_CONFIG)
    if os.path.exists(output_dir) and not any(os.path.isfile(os.path.join(output_dir, m)) for m in markers):
        raise FileExistsError(f"{output_dir!r} exists and is not an exported model; refusing to overwrite it.")
    return output_dir


def check_run(workdir: str, step: int | None, dtype: str | None) -> ml_collections.ConfigDict:
    """The run's config after every check that needs no weights: its architecture (a LoRA run's once merged),
    its checkpoint (and its base's, for a LoRA run), its tokenizer, the dtype. Raises UnsupportedRun,
    FileNotFoundError or ValueError."""
    config = directory.load_config(workdir)
    if dtype is not None and dtype not in safetensors_files.WRITE_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {tuple(safetensors_files.WRITE_DTYPES)}.")
    lora = config.train.trainable == "lora"
    architecture(build.base_config(config) if lora else config)
    checkpoint.require_checkpoint(workdir, step)
    if lora:
        checkpoint.require_checkpoint(config.init_from)
    directory.find_tokenizer(workdir, config)
    return config


def chat_template_of(config: ml_collections.ConfigDict, tokenizer: AnyTokenizer) -> str | None:
    """The Jinja chat template an export of a chat-tuned run with our tokenizer carries; None otherwise (an
    imported run keeps the template it came with)."""
    return chat_template.JINJA_TEMPLATE if directory.chat_tuned(config) and tokenizer.has_role_tokens else None


def write_model(
    run: loading.Run, output_dir: str, dtype: str | None, shard_bytes: int = safetensors_files.SHARD_BYTES
) -> None:
    """Writes the HF folder of a loaded plain (or merged) run into the existing directory `output_dir`."""
    arch = architecture(run.config)
    dtype = dtype or run.config.model.param_dtype
    io.write_json(os.path.join(output_dir, directory.CONFIG_FILE), hf_config(run.config, arch, run.tokenizer, dtype))
    safetensors_files.write_safetensors(output_dir, model_tensors(run.model, arch), dtype, shard_bytes)
    imported = os.path.join(run.workdir, GENERATION_CONFIG)
    if os.path.isfile(imported):
        shutil.copyfile(imported, os.path.join(output_dir, GENERATION_CONFIG))
    else:
        ids = {"bos_token_id": run.tokenizer.bos_id, "eos_token_id": run.tokenizer.eos_id}
        io.write_json(os.path.join(output_dir, GENERATION_CONFIG), {**ids, "pad_token_id": run.tokenizer.pad_id})
    tokenizer_export.write_tokenizer_files(run.workdir, output_dir, chat_template_of(run.config, run.tokenizer))


def export_run(
    workdir: str,
    output_dir: str,
    dtype: str | None = None,
    step: int | None = None,
    merge: bool = False,
    overwrite: bool = False,
    shard_bytes: int = safetensors_files.SHARD_BYTES,
) -> str:
    """Writes the HF folder of run `workdir` (checkpoint `step`, default the latest) to `output_dir`; returns
    its absolute path. `dtype` defaults to the run's param_dtype; a LoRA run needs `merge` (adapters merged
    into the base weights, as scripts/merge_lora.py does). Everything is checked before any weight is read."""
    output_dir = check_output(output_dir, overwrite)
    config = check_run(workdir, step, dtype)
    if config.train.trainable == "lora" and not merge:
        raise UnsupportedRun("A LoRA run exports as a PEFT adapter (llm/hf/peft_adapters.py) or merged (merge=True).")
    run = loading.load_run(workdir, step)  # A LoRA run comes back merged.
    staging = output_dir + STAGING_SUFFIX
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        write_model(run, staging, dtype, shard_bytes)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    io.replace_dir(staging, output_dir)
    return output_dir
