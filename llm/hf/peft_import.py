"""PEFT adapter folders -> LoRA runs: the inverse of llm/hf/peft_adapters.py's export.

`import_adapter` turns a PEFT folder into a LoRA run on an existing run (e.g. an imported model): config
lora_rank / lora_alpha / lora_dropout / lora_targets from the adapter config, init_from the base run, trainable
"lora", and one checkpoint holding the adapters. PEFT features we lack are refused by key.

The adapters of a mixture of experts come in one of two namings:
- per expert (what our export writes, and PEFT on transformers 4 saved): target_modules w1 / w3 / w2 (Mixtral) or
  gate_proj / up_proj / down_proj (Qwen3-MoE), one adapter per expert at `...experts.{e}.w1`, each stacked back into
  our A (experts, in, r), B (experts, r, out);
- fused (PEFT's `target_parameters`, what it saves for adapters trained on transformers 5's fused experts):
  `gate_up_proj` and `down_proj` of the module `model.layers.{i}.mlp.experts`, one lora_A (experts * r, in),
  expert-major, and one lora_B (out, r * experts), expert-minor, per parameter (peft.tuners.lora.ParamWrapper).
  gate_up_proj's adapter is one of the gate and up outputs concatenated (gate first): ours for gate and up share
  its A and split its B. PEFT nests one wrapper per targeted parameter in their order on the module, the last one
  outermost, so an earlier parameter's tensors sit one `.base_layer` deeper per targeted parameter after it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from llm import checkpoint, config_validation
from llm.hf import exporter, importer, peft_adapters, safetensors_files, weights
from llm.model.lora import LORA_SUFFIX
from llm.model.transformer import create_model
from llm.runs import directory

# PEFT config keys we honour, or that only shape training or initialization; every other key must be unset
# (null, false, empty), else the adapter computes something our LoRA does not.
HONOURED_KEYS = {
    "peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "target_parameters", "bias",
    "base_model_name_or_path", "revision", "inference_mode", "init_lora_weights", "peft_version", "auto_mapping",
    "megatron_core", "qalora_group_size", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "layers_pattern",
    "fan_in_fan_out",  # PEFT itself sets it false for nn.Linear layers
}  # fmt: skip
# transformers 5's fused experts (Mixtral's and Qwen3-MoE's alike): the module, and its 3-D parameters in their
# order on it -> the projections of ours each one's output holds, in order.
FUSED_EXPERTS = "model.layers.{i}.mlp.experts"
FUSED_PARAMETERS = {"gate_up_proj": ("gate", "up"), "down_proj": ("down",)}


class UnsupportedAdapter(ValueError):
    """A PEFT adapter that our LoRA cannot reproduce (the message names the adapter_config.json key)."""


def read_adapter_config(adapter_dir: str) -> dict[str, Any]:
    """ADAPTER_DIR/adapter_config.json, refused by key when it asks for anything our LoRA does not compute."""
    path = os.path.join(adapter_dir, exporter.ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} not found: a PEFT adapter folder has an adapter_config.json.")
    with open(path, encoding="utf-8") as f:
        settings = json.load(f)
    refused = [f"peft_type={settings.get('peft_type')!r} (only 'LORA')"] if settings.get("peft_type") != "LORA" else []
    if settings.get("bias", "none") != "none":
        refused.append(f"bias={settings['bias']!r} (only 'none')")
    for key in ("target_modules", "target_parameters"):  # PEFT also takes a regular expression: not ours to match.
        if not isinstance(settings.get(key) or [], list):
            refused.append(f"{key}={settings[key]!r} (only a list of names)")
    if not settings.get("target_modules") and not settings.get("target_parameters"):
        refused.append("target_modules=None with no target_parameters (nothing is adapted)")
    refused += [f"{key}={value!r}" for key, value in settings.items() if key not in HONOURED_KEYS and value]
    if refused:
        raise UnsupportedAdapter(f"{path}: cannot import " + "; ".join(refused) + ".")
    return settings


def adaptable_modules(arch: exporter.Architecture) -> dict[str, set[str]]:
    """target_modules entry (q_proj, w1, ...) -> the paths our lora_targets matches (attention/query, mlp/gate...).
    Qwen3-MoE's gate_proj names both a dense layer's and the experts' gate projection, both ours mlp/gate."""
    modules: dict[str, set[str]] = {}
    for template, module in {**peft_adapters.adaptable_kernels(arch), **peft_adapters.expert_modules(arch)}.items():
        modules.setdefault(peft_adapters.target_name(arch, module), set()).add(peft_adapters.layer_name(template))
    return modules


def fused_parameters(settings: dict[str, Any], arch: exporter.Architecture) -> set[str]:
    """The fused expert parameters (gate_up_proj, down_proj) the adapter's target_parameters adapt; each entry must
    name one in every MoE layer (a dotted suffix of mlp.experts.gate_up_proj), else UnsupportedAdapter."""
    entries = settings.get("target_parameters") or []
    names = {entry: entry.rsplit(".", 1)[-1] for entry in entries}
    refused = [
        entry
        for entry, name in names.items()
        if name not in FUSED_PARAMETERS or not f"mlp.experts.{name}".endswith(entry)
    ]
    if (entries and not arch.moe) or refused:
        raise UnsupportedAdapter(
            f"target_parameters={entries!r}: {refused or entries} name no fused expert parameter of every layer of a "
            f"{arch.name} (ours: {sorted(FUSED_PARAMETERS) if arch.moe else []}, optionally after 'mlp.experts.')."
        )
    return set(names.values())


def lora_run_config(settings: dict[str, Any], base_run: str) -> tuple[ml_collections.ConfigDict, exporter.Architecture]:
    """The config of a LoRA run on `base_run` with the adapter's rank, alpha, dropout and targets; validated."""
    base = directory.load_config(base_run)
    if base.train.trainable != "all":
        raise ValueError(f"The base run {base_run!r} has train.trainable={base.train.trainable!r}; it must hold full "
                         "weights (merge a LoRA run first: scripts/merge_lora.py).")  # fmt: skip
    arch = exporter.architecture(base)
    modules = adaptable_modules(arch)
    target_modules = settings.get("target_modules") or []
    unknown = [name for name in target_modules if name not in modules]
    if unknown:
        raise UnsupportedAdapter(f"target_modules={target_modules!r}: {unknown} are not among the projections our "
                                 f"LoRA adapts in a {arch.name}: {sorted(modules)}.")  # fmt: skip
    fused = [f"mlp/{ours}" for name in fused_parameters(settings, arch) for ours in FUSED_PARAMETERS[name]]
    config = ml_collections.ConfigDict(base.to_dict())
    config.init_from = os.path.abspath(base_run)
    targets = sorted({path for name in target_modules for path in modules[name]} | set(fused))
    config.model.update(
        lora_rank=int(settings["r"]),
        lora_alpha=float(settings["lora_alpha"]),
        lora_dropout=float(settings.get("lora_dropout") or 0.0),
        lora_targets="|".join(targets),
    )
    config.train.update(trainable="lora", quantize_base="none")
    config_validation.validate(config)
    return config, arch


class _Tensors:
    """The tensors of one adapter file, each read at most as the shape asked, and which of them were read."""

    def __init__(self, file: str):
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file!r} not found: only safetensors adapters can be imported.")
        self.file, self.tensors, self.used = file, safetensors_files.open_file(file), set()

    def read(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in self.tensors:
            raise KeyError(f"{self.file} has no tensor {key!r}, which target_modules, target_parameters and r call "
                           "for (our lora_targets adapt a projection in every layer that has it).")  # fmt: skip
        if tuple(self.tensors[key].shape) != shape:
            raise ValueError(
                f"Tensor {key!r} in {self.file} has shape {tuple(self.tensors[key].shape)}, expected {shape}."
            )
        self.used.add(key)
        return np.asarray(self.tensors[key])

    def check_all_used(self) -> None:
        extra = sorted(set(self.tensors) - self.used)
        if extra:
            raise UnsupportedAdapter(f"{self.file} holds {len(extra)} tensors no adapter of ours takes, e.g. "
                                     f"{extra[0]!r}.")  # fmt: skip


def _fused_expert_array(tensors: _Tensors, layer_path: tuple, shape: tuple, fused: set[str]) -> np.ndarray:
    """Our A (experts, in, r) or B (experts, r, out) of expert adapter `layer_path` (('blocks', i, 'mlp', 'up_lora',
    'lora_b')) from PEFT's adapter of the fused parameter holding that projection (see the module docstring)."""
    owner = layer_path[-2].removesuffix(LORA_SUFFIX)
    name = next(name for name, owners in FUSED_PARAMETERS.items() if owner in owners)
    later = list(FUSED_PARAMETERS)[list(FUSED_PARAMETERS).index(name) + 1 :]
    module = peft_adapters.PEFT_PREFIX + FUSED_EXPERTS.format(i=layer_path[1])
    module += ".base_layer" * sum(other in fused for other in later)
    experts = shape[0]
    if layer_path[-1] == "lora_a":
        _, width, rank = shape
        a = tensors.read(f"{module}.lora_A.weight", (experts * rank, width))
        return a.reshape(experts, rank, width).transpose(0, 2, 1)
    _, rank, width = shape
    owners = FUSED_PARAMETERS[name]
    b = tensors.read(f"{module}.lora_B.weight", (width * len(owners), rank * experts))
    b = b.reshape(width * len(owners), rank, experts).transpose(2, 1, 0)  # (experts, r, out of all owners)
    start = owners.index(owner) * width
    return b[..., start : start + width]


def _layer_array(
    tensors: _Tensors, arch: exporter.Architecture, layer_path: tuple, shape: tuple, fused: set[str]
) -> np.ndarray:
    """Our adapter parameter `layer_path` of one layer (shape `shape`) from PEFT's tensors: lora_A = our A.T,
    lora_B = our B.T, per expert for a per-expert adapter unless the file holds the fused experts' one."""
    if not layer_path[-2].endswith(LORA_SUFFIX):  # A dense layer's adapter: (..., 'query_lora', 'adapter', 'lora_a')
        return tensors.read(peft_adapters.peft_key(arch, layer_path), shape[::-1]).T
    owner = layer_path[-2].removesuffix(LORA_SUFFIX)
    if any(owner in FUSED_PARAMETERS[name] for name in fused):
        return _fused_expert_array(tensors, layer_path, shape, fused)
    return np.stack(
        [tensors.read(peft_adapters.peft_key(arch, layer_path, e), shape[:0:-1]).T for e in range(shape[0])]
    )


def adapter_state(
    adapter_dir: str, config: ml_collections.ConfigDict, arch: exporter.Architecture, fused: set[str]
) -> nnx.State:
    """Our LoRA parameters of `config` read from ADAPTER_DIR/adapter_model.safetensors, whose experts' adapters are
    those of the `fused` parameters (fused_parameters) or else per expert; every tensor of the file must be used and
    every one we need present with its shape. Scanned stacks (`blocks`, `moe_blocks`) are read layer by layer."""
    tensors = _Tensors(os.path.join(adapter_dir, peft_adapters.ADAPTER_FILE))
    abstract = nnx.state(nnx.eval_shape(lambda: create_model(config)), nnx.LoRAParam)
    stacks = weights.stacked_layers(config.model)
    flat = []
    for path, variable in nnx.to_flat_state(abstract):
        stacked = path[0] in stacks and not isinstance(path[1], int)  # scan_layers: a leading layers axis
        shape = variable.value.shape[1:] if stacked else variable.value.shape
        layer_paths = [("blocks", i, *path[1:]) for i in stacks[path[0]]] if stacked else [path]
        per_layer = [_layer_array(tensors, arch, layer_path, shape, fused) for layer_path in layer_paths]
        array = np.stack(per_layer) if stacked else per_layer[0]
        flat.append((path, variable.replace(jax.numpy.asarray(array, variable.value.dtype))))
    tensors.check_all_used()
    return nnx.from_flat_state(flat)


def import_adapter(adapter_dir: str, base_run: str, output_dir: str, overwrite: bool = False) -> str:
    """Writes the LoRA run `output_dir` (on `base_run`) holding the PEFT adapter of `adapter_dir`; returns its
    absolute path. Its config is checked before the tensors are read; the run appears complete or not at all."""
    output_dir = importer.check_output(output_dir, overwrite)
    settings = read_adapter_config(adapter_dir)
    config, arch = lora_run_config(settings, base_run)
    checkpoint.require_checkpoint(base_run)
    adapters = adapter_state(adapter_dir, config, arch, fused_parameters(settings, arch))
    peft_adapters.save_lora_run(output_dir, config, directory.tokenizer_in(base_run), adapters)
    return output_dir
