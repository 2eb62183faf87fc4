"""Start-up validation of a training config: fail at once, naming the key and what it may be.

`configs/base.py` is the schema: a config may not add a key it lacks, and every value must have the type
of the base default. On top of that, each choice key must take one of its allowed values (`base.CHOICES`), and
this module holds the constraints that tie keys together. Nothing here touches devices or compiles anything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from configs import base

POSITIVE = (
    "model.vocab_size",
    "model.max_seq_len",
    "model.num_layers",
    "model.embed_dim",
    "model.num_heads",
    "model.num_kv_heads",
    "model.mlp_dim",
    "model.norm_eps",
    "model.rope_theta",
    "model.rope_scaling_factor",
    "model.rope_low_freq_factor",
    "model.rope_high_freq_factor",
    "model.rope_original_max_len",
    "data.seq_len",
    "train.num_steps",
    "train.batch_size",
    "train.grad_accum_steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "optimizer.learning_rate",
    "train.contrastive_temperature",
)
NON_NEGATIVE = (
    "model.head_dim",
    "data.num_workers",
    "train.z_loss",
    "train.loss_chunk_size",
    "train.eval_every",
    "train.eval_batches",
    "optimizer.warmup_steps",
    "optimizer.weight_decay",
    "optimizer.grad_clip_norm",
    "train.peak_tflops_per_device",
    "data.prefetch_buffer_size",
    "model.lora_rank",
    "model.lora_alpha",
    "train.dpo_beta",
    "model.soft_prompt_length",
    "train.quantize_group_size",
    "model.num_experts",
    "model.moe_mlp_dim",
    "model.num_shared_experts",
    "model.router_aux_loss_coef",
    "model.router_z_loss_coef",
)


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or a value outside what it allows."""


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first offending key."""
    _check_schema(config, base.get_config(), prefix="")
    for key, allowed in base.CHOICES.items():
        if _get(config, key) not in allowed:
            raise ConfigError(f"config.{key}={_get(config, key)!r} is not one of {allowed}.")
    for key in POSITIVE:
        if not _get(config, key) > 0:
            raise ConfigError(f"config.{key}={_get(config, key)!r} must be > 0.")
    for key in NON_NEGATIVE:
        if not _get(config, key) >= 0:
            raise ConfigError(f"config.{key}={_get(config, key)!r} must be >= 0.")
    _check_relations(config)


def _check_schema(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str) -> None:
    for key in config.keys():
        name = prefix + key
        if key not in schema:
            raise ConfigError(f"Unknown config key config.{name}; known keys here: {sorted(schema.keys())}.")
        value, default = config[key], schema[key]
        if isinstance(default, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f"config.{name} must be a section (ConfigDict), got {value!r}.")
            _check_schema(value, default, name + ".")
        elif not _same_type(value, default):
            raise ConfigError(
                f"config.{name}={value!r} has type {type(value).__name__}; "
                f"expected {type(default).__name__} like the default {default!r}."
            )
    missing = sorted(set(schema.keys()) - set(config.keys()))
    if missing:
        raise ConfigError(f"config.{prefix}{missing[0]} is missing (a recipe must start from configs/base.py).")


def _same_type(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list))
    return isinstance(value, type(default))


def _check_relations(config: ml_collections.ConfigDict) -> None:
    model, train = config.model, config.train
    if model.num_heads % model.num_kv_heads:
        raise ConfigError(
            f"config.model.num_kv_heads={model.num_kv_heads} must divide "
            f"config.model.num_heads={model.num_heads} (grouped-query attention)."
        )
    if not model.head_dim and model.embed_dim % model.num_heads:
        raise ConfigError(
            f"config.model.embed_dim={model.embed_dim} is not divisible by config.model.num_heads="
            f"{model.num_heads}; set config.model.head_dim explicitly."
        )
    if model.position_encoding == "rope" and (model.head_dim or model.embed_dim // model.num_heads) % 2:
        raise ConfigError("RoPE needs an even head dimension (config.model.head_dim / embed_dim // num_heads).")
    if model.rope_scaling == "llama3" and model.rope_high_freq_factor <= model.rope_low_freq_factor:
        raise ConfigError(
            f"config.model.rope_high_freq_factor={model.rope_high_freq_factor} must exceed "
            f"config.model.rope_low_freq_factor={model.rope_low_freq_factor} (rope_scaling='llama3')."
        )
    if config.data.seq_len + model.soft_prompt_length > model.max_seq_len:
        prompt = f" + config.model.soft_prompt_length={model.soft_prompt_length}" if model.soft_prompt_length else ""
        raise ConfigError(
            f"config.data.seq_len={config.data.seq_len}{prompt} exceeds config.model.max_seq_len={model.max_seq_len}."
        )
    if train.batch_size % train.grad_accum_steps:
        raise ConfigError(
            f"config.train.batch_size={train.batch_size} must be divisible by "
            f"config.train.grad_accum_steps={train.grad_accum_steps}."
        )
    if config.optimizer.warmup_steps > train.num_steps:
        raise ConfigError(
            f"config.optimizer.warmup_steps={config.optimizer.warmup_steps} exceeds "
            f"config.train.num_steps={train.num_steps}."
        )
    if not 0.0 <= config.optimizer.final_lr_ratio <= 1.0:
        raise ConfigError(f"config.optimizer.final_lr_ratio={config.optimizer.final_lr_ratio} must be in [0, 1].")
    if not 0.0 <= model.dropout_rate < 1.0:
        raise ConfigError(f"config.model.dropout_rate={model.dropout_rate} must be in [0, 1).")
    if config.train.trainable == "lora" and not model.lora_rank:
        raise ConfigError("config.train.trainable='lora' needs config.model.lora_rank > 0.")
    if config.train.trainable == "soft_prompt" and not model.soft_prompt_length:
        raise ConfigError("config.train.trainable='soft_prompt' needs config.model.soft_prompt_length > 0.")
    if config.train.quantize_base != "none" and config.train.trainable == "all":
        raise ConfigError(
            f"config.train.quantize_base={config.train.quantize_base!r} freezes a quantized base: "
            "it needs config.train.trainable='lora' (QLoRA) or 'soft_prompt'."
        )
    if config.train.objective == "dpo" and not config.init_from:
        raise ConfigError(
            "config.train.objective='dpo' needs config.init_from (the model to align, which is "
            "also the frozen reference)."
        )
    for key in ("model.lora_dropout", "train.dpo_label_smoothing", "data.replay_fraction"):
        if not 0.0 <= _get(config, key) < 1.0:
            raise ConfigError(f"config.{key}={_get(config, key)} must be in [0, 1).")
    matryoshka_dims(train.matryoshka_dims, model.embed_dim)
    if config.data.replay_fraction > 0 and not config.data.replay_path:
        raise ConfigError("config.data.replay_fraction > 0 needs config.data.replay_path.")
    _check_moe(model)
    _check_axis_rules(config.logical_axis_rules)


def _check_moe(model: ml_collections.ConfigDict) -> None:
    """The mixture-of-experts keys (llm/model/moe.py), checked only when the model has experts."""
    if not model.num_experts:
        return
    if not 1 <= model.experts_per_token <= model.num_experts:
        raise ConfigError(
            f"config.model.experts_per_token={model.experts_per_token} must be between 1 and "
            f"config.model.num_experts={model.num_experts}."
        )
    if model.moe_every < 1 or model.num_layers % model.moe_every:
        raise ConfigError(
            f"config.model.moe_every={model.moe_every} must be >= 1 and divide config.model.num_layers="
            f"{model.num_layers} (layers i with (i + 1) % moe_every == 0 are MoE; scanned layers run in groups)."
        )
    if model.use_bias:
        raise ConfigError("config.model.use_bias=True: expert projections have no biases (num_experts > 0).")
    if model.moe_impl == "megablox" and model.dtype == "float16":
        raise ConfigError(
            "config.model.moe_impl='megablox' with config.model.dtype='float16': the Pallas kernel multiplies "
            "float32 or bfloat16 only."
        )


def matryoshka_dims(value: str, embed_dim: int) -> tuple[int, ...]:
    """The widths of `train.matryoshka_dims` ("32,64"), ascending; a bad entry is a ConfigError naming the key."""
    dims = set()
    for part in value.split(",") if value.strip() else []:
        try:
            dim = int(part)
        except ValueError:
            dim = 0
        if not 0 < dim < embed_dim:
            raise ConfigError(
                f"config.train.matryoshka_dims={value!r}: {part.strip()!r} is not a width between 1 and "
                f"config.model.embed_dim - 1 = {embed_dim - 1} (the full width always counts; '' for none)."
            )
        dims.add(dim)
    return tuple(sorted(dims))


def _check_axis_rules(rules: Any) -> None:
    rule_names = [rule[0] for rule in rules]
    for rule in rules:
        axes = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
        unknown = [a for a in axes if a is not None and a not in ("data", "fsdp", "tensor")]
        if unknown:
            raise ConfigError(
                f"config.logical_axis_rules maps {rule[0]!r} to unknown mesh axes {unknown}; "
                "mesh axes are ('data', 'fsdp', 'tensor')."
            )
    for name in ("batch", "embed", "vocab", "mlp", "heads", "kv_heads", "head_dim", "layers", "length", "norm"):
        if name not in rule_names:
            raise ConfigError(f"config.logical_axis_rules has no rule for the logical axis {name!r}.")


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def check_batch_divides_mesh(config: ml_collections.ConfigDict, data_parallel: int) -> None:
    """The global batch (per microbatch) must split evenly over the data-parallel devices."""
    micro = config.train.batch_size // config.train.grad_accum_steps
    if micro % data_parallel:
        raise ConfigError(
            f"config.train.batch_size={config.train.batch_size} / grad_accum_steps="
            f"{config.train.grad_accum_steps} = {micro} rows per microbatch is not divisible by the "
            f"{data_parallel} data-parallel devices of mesh_shape={tuple(config.mesh_shape)}."
        )


def require_same(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    source: str,
    advice: str,
    prefix: str = "config",
    ignore: Callable[[str], bool] = lambda key: False,
) -> None:
    """Raises ConfigError naming the first key, dotted (e.g. config.model.num_layers), whose value differs
    between two nested mappings of plain values; a key only one of them has differs too.

    `ignore` skips keys by their dotted name without the prefix ("model.dropout_rate"). The error reads
    "{key}={current value} differs from {source} ({saved value}); {advice}".
    """
    saved_flat, current_flat = _flatten(saved), _flatten(current)
    for key in [*current_flat, *(k for k in saved_flat if k not in current_flat)]:
        was, now = saved_flat.get(key, _ABSENT), current_flat.get(key, _ABSENT)
        if was != now and not ignore(key):
            raise ConfigError(f"{prefix}.{key}={now!r} differs from {source} ({was!r}); {advice}")


class _Absent:
    def __repr__(self) -> str:
        return "absent"


_ABSENT = _Absent()


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"num_layers": 2}} -> {"model.num_layers": 2}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat
