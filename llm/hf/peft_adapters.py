"""LoRA runs <-> PEFT adapter folders, both ways.

Export (`export_adapter`) writes what `peft.PeftModel.from_pretrained` reads, with the base beside it:

    OUTPUT/adapter_config.json        peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, lora_dropout,
                                      target_modules in HF names (q_proj, ...), base_model_name_or_path
    OUTPUT/adapter_model.safetensors  the adapters under PEFT's names
    OUTPUT/tokenizer.json, ...        the run's tokenizer
    OUTPUT/base/                      the run's `init_from` exported as a HF model (llm/hf/exporter.py)

base_model_name_or_path is the absolute path of OUTPUT/base, so `AutoPeftModelForCausalLM.from_pretrained(OUTPUT)`
works in place; after moving the folder, load the base yourself:
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(OUTPUT/base), OUTPUT)`. A QLoRA run's adapters
were trained against the int4-quantized base; the base written is the float `init_from` (as when a bitsandbytes
QLoRA adapter is applied to the float model): close, not identical. `--merge` (exporter) gives one model.

PEFT names the adapter of the HF Linear `model.layers.{i}.self_attn.q_proj` with the keys
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (r, in) and `...lora_B.weight` (out, r),
and adds lora_B @ lora_A @ x * lora_alpha / r. Ours adds x @ A @ B * alpha / rank with A (in, r), B (r, out),
their `in` and `out` flattened in the (heads, head_dim) order of the HF weight: lora_A = A.T, lora_B = B.T.
GPT-2's Conv1D layers (stored (in, out), PEFT's fan_in_fan_out) have adapters of the same shapes; its c_attn
fuses query, key and value, and PEFT's adapter of it is one for the fused output: a run adapting any of the
three is refused by model.lora_targets (export it merged instead). target_modules name a module by the
shortest suffix no other one shares: q_proj, but attn.c_proj beside mlp.c_proj.
A mixture of experts' per-expert adapters (A (experts, in, r), B (experts, r, out)) are written under the
per-expert module names of the checkpoints (Mixtral's `model.layers.{i}.block_sparse_moe.experts.{e}.w1`,
Qwen3-MoE's `model.layers.{i}.mlp.experts.{e}.gate_proj`), target_modules w1 / gate_proj ...: transformers 5 fuses
the experts into 3-D parameters, and PEFT converts such adapters to them on loading (the gate's and up's into one
of rank 2r of gate_up_proj), so it needs both or neither of an expert's gate and up adapted.

Import (PEFT folder -> LoRA run): llm/hf/peft_import.py, which reads these names back.
"""

from __future__ import annotations

import math
import os
import re
import shutil

import jax
import ml_collections
import numpy as np
from flax import nnx

from llm import checkpoint, io, sharding
from llm.hf import exporter, safetensors_files, tokenizer_export, weights
from llm.model.lora import LORA_SUFFIX
from llm.runs import build, directory, loading

ADAPTER_FILE = "adapter_model.safetensors"
BASE_DIR = "base"
PEFT_PREFIX = "base_model.model."
LINEAR_LAYOUTS = (weights.TRANSPOSE, weights.HEADS_IN, weights.HEADS_OUT)  # HF nn.Linear weights: (out, in)
CONV1D_LAYOUTS = (weights.COPY, weights.HEADS_ROWS)  # GPT-2's Conv1D weights: (in, out)


def _layer_path(path: tuple) -> tuple:
    """The adapted layer's kernel path of an adapter parameter path (..., 'query_lora', 'adapter', 'lora_a'), or
    the stacked expert weight of a per-expert adapter's (..., 'mlp', 'up_lora', 'lora_a') -> (..., 'mlp', 'up')."""
    if path[-2].endswith(LORA_SUFFIX):
        *parents, owner, _ = path
        return (*parents, owner.removesuffix(LORA_SUFFIX))
    *parents, owner, _, _ = path
    return (*parents, owner.removesuffix(LORA_SUFFIX), "kernel")


def _template(path: tuple) -> str:
    return ".".join("{i}" if isinstance(part, int) else str(part) for part in path)


def layer_name(template: str) -> str:
    """What lora_targets matches of an adapted kernel: blocks.{i}.attention.query.kernel -> attention/query."""
    return "/".join(template.split(".")[2:4])


def adaptable_kernels(arch: exporter.Architecture) -> dict[str, str]:
    """Our kernels PEFT can adapt in `arch` (blocks.{i}.attention.query.kernel, ...) -> the HF module it adapts
    (model.layers.{i}.self_attn.q_proj). A kernel that is one block of a fused HF tensor has none: PEFT's adapter
    of GPT-2's c_attn is one for the fused output, not one per projection as ours."""
    hf_names = [name for name, _ in arch.mapping.values()]
    return {
        template: hf_name.removesuffix(".weight")
        for template, (hf_name, transform) in arch.mapping.items()
        if re.fullmatch(r"blocks\.\{i\}\.(attention|mlp)\.\w+\.kernel", template)
        and transform in LINEAR_LAYOUTS + CONV1D_LAYOUTS
        and hf_names.count(hf_name) == 1
    }


def expert_modules(arch: exporter.Architecture) -> dict[str, str]:
    """Our stacked expert weights (blocks.{i}.mlp.up, ...) -> the per-expert HF module each expert's slice is
    (model.layers.{i}.block_sparse_moe.experts.{e}.w3). Transformers 5 fuses them into 3-D parameters (experts'
    gate_up_proj, down_proj); PEFT converts adapters of these per-expert names to those on loading."""
    return {
        template: hf_name.removesuffix(".weight")
        for template, (hf_name, transform) in arch.mapping.items()
        if re.fullmatch(r"blocks\.\{i\}\.mlp\.\w+", template) and "{e}" in hf_name and transform in LINEAR_LAYOUTS
    }


def target_name(arch: exporter.Architecture, module: str) -> str:
    """The target_modules entry of an adaptable HF module: the shortest dotted suffix of its name that no other
    adaptable module shares (q_proj; GPT-2's attn.c_proj beside mlp.c_proj). PEFT matches entries as suffixes.
    An expert's is its projection's name (w1, gate_proj): the one PEFT's conversion to fused experts reads."""
    if "{e}" in module:
        return module.rsplit(".", 1)[-1]
    parts, others = module.split("."), [m.split(".") for m in adaptable_kernels(arch).values() if m != module]
    length = next(n for n in range(1, len(parts) + 1) if all(other[-n:] != parts[-n:] for other in others))
    return ".".join(parts[-length:])


def _peft_module(arch: exporter.Architecture, layer_path: tuple, expert: int | None = None) -> str:
    """PEFT's module name of one of our adapted kernels, e.g. 'base_model.model.model.layers.0.self_attn.q_proj',
    or of `expert`'s slice of a stacked expert weight ('...layers.0.block_sparse_moe.experts.1.w3')."""
    layer = next(part for part in layer_path if isinstance(part, int))
    modules = {**adaptable_kernels(arch), **expert_modules(arch)}
    return PEFT_PREFIX + modules[_template(layer_path)].format(i=layer, e=expert)


def peft_key(arch: exporter.Architecture, path: tuple, expert: int | None = None) -> str:
    """PEFT's tensor name of one of our (per-layer) adapter parameters, or of `expert`'s slice of one."""
    return f"{_peft_module(arch, _layer_path(path), expert)}.lora_{'A' if path[-1] == 'lora_a' else 'B'}.weight"


def adapter_tensors(
    lora_state: nnx.State, arch: exporter.Architecture, stacks: dict[str, list[int]]
) -> list[safetensors_files.OutTensor]:
    """The adapters as PEFT's tensors: lora_A = our A.T (r, in), lora_B = our B.T (out, r), gathered lazily; a
    per-expert adapter (experts, in, r) makes one per expert. `stacks`: weights.stacked_layers of the run."""
    arrays = exporter.per_layer_arrays(lora_state, stacks)

    def values(get, expert=None):
        return lambda: np.asarray(jax.device_get(get() if expert is None else get()[expert])).T

    tensors = []
    for path, (shape, get) in arrays.items():
        if path[-2].endswith(LORA_SUFFIX):  # A (experts, in, r) or B (experts, r, out)
            tensors += [
                safetensors_files.OutTensor(peft_key(arch, path, e), shape[:0:-1], values(get, e))
                for e in range(shape[0])
            ]
        else:
            tensors.append(safetensors_files.OutTensor(peft_key(arch, path), shape[::-1], values(get)))
    return tensors


def adapter_config(
    config: ml_collections.ConfigDict, arch: exporter.Architecture, paths: list[tuple], base: str
) -> dict:
    """adapter_config.json of a LoRA run whose (per-layer) adapter parameter paths are `paths`."""
    layers = {_template(_layer_path(path)) for path in paths}
    adaptable = {**adaptable_kernels(arch), **expert_modules(arch)}
    modules = {adaptable[template] for template in layers}
    model = config.model
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": model.lora_rank,
        "lora_alpha": model.lora_alpha,
        "lora_dropout": model.lora_dropout,
        "target_modules": sorted(target_name(arch, module) for module in modules),
        "bias": "none",
        # PEFT's flag for Conv1D layers (stored (in, out)); its lora_A and lora_B keep their (r, in), (out, r).
        "fan_in_fan_out": any(arch.mapping[template][1] in CONV1D_LAYOUTS for template in layers),
        "use_rslora": False,  # The scale is lora_alpha / r, as ours.
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }


def check_adapters(config: ml_collections.ConfigDict) -> tuple[exporter.Architecture, nnx.State, list[tuple]]:
    """The base architecture, the abstract adapters of LoRA run `config` and their per-layer paths, once every
    adapted layer is known to be one PEFT can adapt; else UnsupportedRun names model.lora_targets."""
    arch = exporter.architecture(build.base_config(config))
    abstract = _abstract_adapters(config)
    paths = list(exporter.per_layer_arrays(abstract, weights.stacked_layers(config.model)))
    adaptable = adaptable_kernels(arch)
    layers = {_template(_layer_path(path)) for path in paths}
    refused = sorted(layers - set(adaptable) - set(expert_modules(arch)))
    if refused:
        fused = sorted({arch.mapping[template][0] for template in refused})
        ours = sorted(map(layer_name, adaptable))
        raise exporter.UnsupportedRun(
            f"model.lora_targets={config.model.lora_targets!r} adapts {[layer_name(t) for t in refused]}, fused in "
            f"{arch.name}'s {fused}: PEFT's LoRA of a fused tensor is one adapter of its whole output, ours one per "
            f"projection. Export it merged (--merge), or train adapters of {ours} only."
        )
    reason = _expert_refusal(arch, layers)
    if reason:
        raise exporter.UnsupportedRun(f"model.lora_targets={config.model.lora_targets!r} adapts {reason}. Export "
                                      "it merged (--merge).")  # fmt: skip
    return arch, abstract, paths


def _expert_refusal(arch: exporter.Architecture, layers: set[str]) -> str | None:
    """Why PEFT cannot load per-expert adapters of the adapted `layers` on transformers 5's fused experts, or None.
    Loading, PEFT joins the adapters of an expert's gate and up into one of its gate_up_proj (rank 2r), so it needs
    both; and it moves the experts' target_modules names to the fused parameters, so a dense layer's projection of
    the same name (Qwen3-MoE's decoder_sparse_step > 1) would lose its adapter."""
    experts = {template: module for template, module in expert_modules(arch).items() if template in layers}
    gate_up = {"blocks.{i}.mlp.gate", "blocks.{i}.mlp.up"} & set(expert_modules(arch))
    if experts and 0 < len(gate_up & set(experts)) < len(gate_up):
        return (f"{[layer_name(t) for t in sorted(gate_up & set(experts))]} of the experts without "
                f"{[layer_name(t) for t in sorted(gate_up - set(experts))]}: {arch.name}'s experts fuse both in one "
                "gate_up_proj parameter (transformers 5), and PEFT adapts it only with adapters of both")  # fmt: skip
    names = {target_name(arch, module) for module in experts.values()}
    kernels = adaptable_kernels(arch)
    dense = sorted(template for template in layers & set(kernels) if kernels[template].rsplit(".", 1)[-1] in names)
    if dense:
        return (f"the dense layers' {[layer_name(t) for t in dense]} beside the experts': PEFT (loading on "
                f"transformers 5) moves target_modules {sorted(names)} to the fused expert parameters, dropping the "
                "dense layers' adapters of the same names")  # fmt: skip
    return None


def _abstract_adapters(config: ml_collections.ConfigDict) -> nnx.State:
    """The LoRA parameters of a LoRA run's model, abstract, placed on one device (adapters are small)."""
    abstract = nnx.state(nnx.eval_shape(lambda: build.trained_model(config, None)), nnx.LoRAParam)
    mesh = sharding.create_mesh((1, 1, 1), jax.local_devices()[:1])
    return sharding.abstract_with_shardings(
        abstract, sharding.tree_shardings(abstract, mesh, config.logical_axis_rules)
    )


def export_adapter(
    workdir: str,
    output_dir: str,
    dtype: str | None = None,
    step: int | None = None,
    overwrite: bool = False,
    shard_bytes: int = safetensors_files.SHARD_BYTES,
) -> str:
    """Writes the PEFT folder of LoRA run `workdir` (checkpoint `step`, default the latest) and its base (see
    the module docstring) to `output_dir`; returns its absolute path. Checked before any weight is read."""
    output_dir = exporter.check_output(output_dir, overwrite)
    config = exporter.check_run(workdir, step, dtype)
    if config.train.trainable != "lora":
        raise exporter.UnsupportedRun(f"{workdir!r} is not a LoRA run (train.trainable={config.train.trainable!r}).")
    arch, abstract, paths = check_adapters(config)
    settings = adapter_config(config, arch, paths, os.path.join(output_dir, BASE_DIR))
    lora_state, _ = checkpoint.restore_run_params(workdir, abstract, step)
    staging = output_dir + exporter.STAGING_SUFFIX
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(os.path.join(staging, BASE_DIR))
    try:
        base = loading.load_run(config.init_from)
        exporter.write_model(base, os.path.join(staging, BASE_DIR), dtype, shard_bytes)
        io.write_json(os.path.join(staging, exporter.ADAPTER_CONFIG), settings)
        adapters = adapter_tensors(lora_state, arch, weights.stacked_layers(config.model))
        safetensors_files.write_safetensors(
            staging, adapters, dtype or config.model.param_dtype, math.inf, ADAPTER_FILE
        )
        tokenizer_export.write_tokenizer_files(workdir, staging, exporter.chat_template_of(config, base.tokenizer))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    io.replace_dir(staging, output_dir)
    return output_dir


def save_lora_run(
    output_dir: str, config: ml_collections.ConfigDict, tokenizer_path: str | None, adapters: nnx.State
) -> None:
    """Writes a LoRA run directory whose one checkpoint (step 0) holds `adapters` (its LoRA parameters), as
    training's checkpoints do, replacing an existing OUTPUT (the caller checks that it may)."""
    directory.save_params(output_dir, config, tokenizer_path, 0, adapters, overwrite=True)
