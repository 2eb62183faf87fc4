"""Post-training quantization of a Transformer with Qwix: int8 or int4 weights, optionally int8 activations.

Modes (`MODES`):
  int8      weights int8, one scale per output channel (weight-only).
  int4      weights int4, one scale per group of `group_size` inputs of each output channel (sub-channel).
  int8_act  weights int8 per channel and the inputs of every matmul int8, one scale per token (dynamic range).

What is quantized: every projection (query, key, value, out, up, gate, down, unembed) through Qwix's PTQ
provider, and the token embedding table (also the tied output projection) through Qwix's array API
(llm/quant/embed.py). Norm scales, biases and a learned position table stay in float: together they are
well under 1% of the parameters. Attention scores and the softmax are not quantized.

Mixture-of-experts models (llm/model/moe.py): attention and any shared experts as above (Qwix); the stacked
expert weights weight-only, through Qwix's array API (llm/quant/experts.py), dequantized before their grouped
matmuls; the router stays float (an (embed, experts) matrix, a few thousand parameters, whose top-k choices
are sensitive to rounding: routing runs in float32). int8_act is refused for them: the expert matmuls'
inputs would stay float.

Qwix replaces a weight by its quantized form the first time a module runs under its provider. The
Transformer runs its blocks through nnx.split/merge (and lax.scan with `scan_layers`), which would hide
that replacement, so each Block (and the unembedding) is quantized on its own, and a stacked model is
first unrolled into a list of blocks. The quantized modules keep Qwix's interception on their `__call__`,
so the model's every entry point (`__call__`, `decode`, `features`, `logits`) runs quantized, jitted or not.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import qwix
from flax import nnx

from llm import sharding
from llm.model import layers
from llm.model.kv_cache import KV_CACHE_DTYPES
from llm.model.moe import MoE, is_moe_layer
from llm.model.transformer import Transformer, create_model
from llm.quant.embed import QuantizedEmbed
from llm.quant.experts import QuantizedExperts

MODES = ("int8", "int4", "int8_act")
DEFAULT_GROUP_SIZE = 128


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How to quantize: the mode, the int4 group size, and the KV cache dtype used when decoding."""

    mode: str
    group_size: int = DEFAULT_GROUP_SIZE  # Inputs per int4 scale (0: one scale per output channel).
    kv_cache: str = "auto"  # "auto" (the compute dtype) or "int8" (llm/model/kv_cache.py).

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"Unsupported quantization mode {self.mode!r}; allowed modes: {', '.join(MODES)}.")
        if self.group_size < 0:
            raise ValueError(f"group_size must be >= 0 (0: per channel), got {self.group_size}.")
        if self.kv_cache not in KV_CACHE_DTYPES:
            raise ValueError(f"Unsupported KV cache dtype {self.kv_cache!r}; allowed: {', '.join(KV_CACHE_DTYPES)}.")

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> QuantConfig:
        """The QuantConfig recorded in a quantized run's config (see `quantized_config`)."""
        return cls(config.quantization.mode, config.quantization.group_size, config.model.get("kv_cache_dtype", "auto"))

    @property
    def weight_qtype(self) -> jnp.dtype:
        return jnp.int4 if self.mode == "int4" else jnp.int8

    @property
    def act_qtype(self) -> jnp.dtype | None:
        return jnp.int8 if self.mode == "int8_act" else None

    def group_for(self, axis_size: int) -> int | None:
        """Group size along a contraction axis of `axis_size` (None: per channel).

        Only int4 uses groups. A group must divide the axis, so an axis that `group_size` does not divide
        (e.g. tiny_es's MLP width 704 with groups of 128) uses the largest group that does: gcd(704, 128) = 64.
        """
        if self.mode != "int4" or not self.group_size:
            return None
        return math.gcd(self.group_size, axis_size)


def is_quantized(config: ml_collections.ConfigDict) -> bool:
    """Whether a run config describes a post-training quantized model (its `quantization.mode` is set)."""
    return config.quantization.mode != "none"


def quantized_config(config: ml_collections.ConfigDict, qconfig: QuantConfig) -> ml_collections.ConfigDict:
    """The run config of the quantized model (a copy): the model section of `_quantized_model_cfg` and a
    `quantization` section, which is how loaders recognise a quantized run."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.model = _quantized_model_cfg(config.model, qconfig)
    config.quantization.update(mode=qconfig.mode, group_size=qconfig.group_size)
    # Its checkpoint holds every parameter (a LoRA run is quantized with its adapters merged).
    config.train.trainable = "all"
    return config


def _quantized_model_cfg(cfg: ml_collections.ConfigDict, qconfig: QuantConfig) -> ml_collections.ConfigDict:
    """The model section with its blocks unrolled (see the module docstring) and its KV cache dtype."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.scan_layers = False
    cfg.kv_cache_dtype = qconfig.kv_cache
    return cfg


def _rules(
    cfg: ml_collections.ConfigDict, qconfig: QuantConfig, names: str, module_path: str = r"(.*/)?{name}"
) -> list[qwix.QuantizationRule]:
    """One Qwix rule per projection, because int4 groups depend on each one's contraction size."""
    # Qwix tiles the innermost contraction axis: embed for the input projections, head_dim for the
    # attention output ("tnh,nhd->td"), mlp for the down projection.
    contraction = {
        "query": cfg.embed_dim,
        "key": cfg.embed_dim,
        "value": cfg.embed_dim,
        "up": cfg.embed_dim,
        "gate": cfg.embed_dim,
        "out": layers.head_dim(cfg),
        "down": cfg.mlp_dim,
        "unembed": cfg.embed_dim,
    }
    return [
        qwix.QuantizationRule(
            module_path=module_path.format(name=name),
            weight_qtype=qconfig.weight_qtype,
            act_qtype=qconfig.act_qtype,
            tile_size=qconfig.group_for(contraction[name]),
        )
        for name in names.split()
    ]


def _unrolled(model: Transformer) -> Transformer:
    """The same model with its stacked (scan_layers) blocks as a list of Blocks."""
    cfg = ml_collections.ConfigDict(model.cfg.to_dict())
    cfg.scan_layers = False
    with sharding.no_eager_sharding():
        unrolled = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0)))
    stacked = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    # With experts, the dense and the MoE layers are two stacks, each in layer order (Transformer._scan_groups).
    stacks = {False: stacked.pop("blocks", None), True: stacked.pop("moe_blocks", None)}
    taken = {False: 0, True: 0}
    stacked["blocks"] = {}
    for layer in range(cfg.num_layers):
        is_moe = is_moe_layer(cfg, layer)
        stacked["blocks"][layer] = jax.tree.map(lambda a, i=taken[is_moe]: a[i], stacks[is_moe])
        taken[is_moe] += 1
    state = nnx.state(unrolled, nnx.Param)
    nnx.replace_by_pure_dict(state, stacked)
    nnx.update(unrolled, state)
    return unrolled


def quantize_model(model: Transformer, qconfig: QuantConfig) -> Transformer:
    """A quantized copy of `model` (which is left untouched); works on abstract models too (nnx.eval_shape)."""
    if model.cfg.num_experts and qconfig.act_qtype is not None:
        # Qwix intercepts Linear layers and einsums, not the experts' grouped matmuls (ragged_dot).
        raise ValueError(
            f"Quantization mode {qconfig.mode!r} does not support mixture-of-experts models (config.model."
            f"num_experts={model.cfg.num_experts}): the inputs of the expert matmuls would stay float. Use int8 "
            "or int4 (weight-only; the expert weights are quantized too)."
        )
    # One compiled program instead of hundreds of eagerly dispatched (and each compiled) small ops.
    return nnx.jit(_quantize, static_argnums=1)(model, qconfig)


def _quantize(model: Transformer, qconfig: QuantConfig) -> Transformer:
    cfg = model.cfg
    model = _unrolled(model) if cfg.scan_layers else nnx.clone(model)
    # Any inputs will do: Qwix runs each module once to find and replace its weights.
    length = 4
    x = jnp.zeros((1, length, cfg.embed_dim), jnp.dtype(cfg.dtype))
    positions, segment_ids = jnp.arange(length)[None], jnp.ones((1, length), jnp.int32)
    block_provider = qwix.PtqProvider(_rules(cfg, qconfig, "query key value out up gate down"))
    for layer, block in enumerate(model.blocks):
        # Qwix derives the quantized kernel's sharding from the einsum it intercepts, which the float model's
        # merged-heads form of the output projection (attention._heads_as_one_axis) hides: use the plain one.
        block.attention.out.einsum_op = jnp.einsum
        model.blocks[layer] = qwix.quantize_model(block, block_provider, x, positions, segment_ids, None)
        if isinstance(block.mlp, MoE):
            _quantize_experts(model.blocks[layer].mlp, qconfig)
    if not cfg.tie_embeddings:
        # Quantized on its own, the unembedding is the root module: its path is "".
        unembed_provider = qwix.PtqProvider(_rules(cfg, qconfig, "unembed", module_path=""))
        model.unembed = qwix.quantize_model(model.unembed, unembed_provider, x)
    model.embed = QuantizedEmbed(
        model.embed, qconfig.weight_qtype, qconfig.group_for(cfg.embed_dim) or 0, qconfig.act_qtype
    )
    model.cfg = ml_collections.FrozenConfigDict(_quantized_model_cfg(cfg, qconfig))
    _replicate_group_axes_of_scales(model)
    return model


def _quantize_experts(layer: MoE, qconfig: QuantConfig) -> None:
    """Replaces the layer's stacked expert weights (experts, in, out) by `QuantizedExperts`, in place."""
    for name in ("gate", "up", "down") if layer.activation == "swiglu" else ("up", "down"):
        weight = getattr(layer, name)
        setattr(layer, name, QuantizedExperts(weight, qconfig.weight_qtype, qconfig.group_for(weight.shape[1])))


def _replicate_group_axes_of_scales(model: nnx.Module) -> None:
    """Keeps a scale's logical axis only where the scale has one entry per channel.

    An int4 scale's contraction axis holds a few groups (2 for 256 inputs in groups of 128), too few to
    split over the devices its weight's axis is split over; replicating it costs little (scales are a
    small fraction of the weights) and spares every load a warning per parameter.
    """
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, scale in params.items():
        qvalue = params.get(path[:-1] + ("qvalue",))
        names = scale.get_metadata().get("out_sharding")
        if path[-1] == "scale" and qvalue is not None and names:
            scale.set_metadata(
                "out_sharding",
                tuple(name if size == full else None for name, size, full in zip(names, scale.shape, qvalue.shape)),
            )


def dequantized_params(model: Transformer) -> nnx.State:
    """The parameters of a quantized model with every quantized weight turned back into a float array, at the
    path and in the dtype the unquantized model has it (QLoRA merges its adapters into these)."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    dtype = jnp.dtype(model.cfg.param_dtype)
    params = {}
    for path, value in flat.items():
        if path[-1] == "qvalue":
            # A Qwix weight lives at <kernel>/array/{qvalue,scale}; the embedding table at embed/{qvalue,scale};
            # a stacked expert weight at <mlp>/<up|gate|down>/{qvalue,scale} (llm/quant/experts.py).
            if path[-2] == "array":
                float_path = path[:-2]
            else:
                float_path = path[:-1] + ("embedding",) if path[:-1] == ("embed",) else path[:-1]
            array = qwix.QArray(value[...], flat[path[:-1] + ("scale",)][...])
            params[float_path] = value.replace(qwix.dequantize(array).astype(dtype))
        elif path[-1] != "scale" or path[:-1] + ("qvalue",) not in flat:
            params[path] = value
    return nnx.from_flat_state(params)


def model_from_config(config: ml_collections.ConfigDict) -> Transformer:
    """The model a run config describes, freshly initialized: quantized if the config has a `quantization`
    section. Under nnx.eval_shape, this is the restore target of the run's checkpoints."""
    model = create_model(config)
    return quantize_model(model, QuantConfig.from_config(config)) if is_quantized(config) else model


def parameter_bytes_by_dtype(model: nnx.Module) -> dict[str, int]:
    """Bytes of the model's parameters by dtype, e.g. {"int8": ..., "float32": ...} (scales are float32).

    Sizes are at the dtype's bit width: int4 counts half a byte, its packed size. (XLA on CPU keeps one
    int4 per byte in memory; the figure is what the weights need where int4 is packed, e.g. on TPU.)
    """
    totals: dict[str, int] = {}
    for x in jax.tree.leaves(nnx.state(model, nnx.Param)):
        name = jnp.dtype(x.dtype).name
        totals[name] = totals.get(name, 0) + math.ceil(x.size * jax.dtypes.itemsize_bits(x.dtype) / 8)
    return totals


def parameter_bytes(model: nnx.Module) -> int:
    """Total bytes of the model's parameters (see `parameter_bytes_by_dtype`); works on abstract models."""
    return sum(parameter_bytes_by_dtype(model).values())
