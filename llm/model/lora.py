"""Low-rank adapters (LoRA, Hu et al. 2021) beside frozen layers, and merging them back into the weights.

With `model.lora_rank > 0`, every projection whose path (`attention/query`, `attention/key`,
`attention/value`, `attention/out`, `mlp/up`, `mlp/gate`, `mlp/down`) matches the regular expression
`model.lora_targets` gets a sibling `<name>_lora` adapter: y = W x + (alpha / rank) * B A dropout(x).
The modules declare every sibling (`adapter` returns None for a projection left alone).
The adapter's parameters are `nnx.LoRAParam` (Flax NNX's LoRA support), so a filter selects exactly them
for training; the base layer keeps its own name and path, so base weights load unchanged from a pretrained
checkpoint. B starts at zero: an adapted model starts out computing exactly what its base does.

The experts of a mixture-of-experts layer (llm/model/moe.py) are adapted under the same paths (`mlp/up`,
`mlp/gate`, `mlp/down`) by `ExpertLoRA`: one pair A_e (in, rank), B_e (rank, out) per expert, stacked like the
expert weights. The router is never adapted: it is a tiny (embed, experts) matrix, and adapting it would change
which experts a token uses, so a model would no longer start at its base's routing.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from llm import sharding
from llm.model import layers

# An adapter is the attribute `<name of the layer it adapts>_lora` of the same module (`merged_params` relies on it).
LORA_SUFFIX = "_lora"


class LoRA(nnx.Module):
    """dropout(x) @ A @ B * alpha / rank, reshaped from `in_shape` to `out_shape` trailing dimensions."""

    def __init__(
        self,
        name: str,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        cfg: ml_collections.ConfigDict,
        *,
        rngs: nnx.Rngs,
    ):
        self.layer_name = name  # The adapted layer's name within its module: it seeds the adapter's dropout.
        self.in_shape, self.out_shape = in_shape, out_shape
        self.scale = cfg.lora_alpha / cfg.lora_rank
        self.dropout_rate = cfg.lora_dropout
        self.adapter = nnx.LoRA(
            math.prod(in_shape),
            cfg.lora_rank,
            math.prod(out_shape),
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None) -> jax.Array:
        """The update to add to the adapted layer's output; `dropout_key` is the module's (training only)."""
        if dropout_key is not None:
            # crc32, not hash(): Python salts string hashes per process, and resumed runs must draw the same masks.
            dropout_key = jax.random.fold_in(dropout_key, zlib.crc32(self.layer_name.encode()))
        x = layers.dropout(x, self.dropout_rate, dropout_key)
        flat = x.reshape(*x.shape[: x.ndim - len(self.in_shape)], math.prod(self.in_shape))
        update = self.adapter(flat) * self.scale
        return update.reshape(*flat.shape[:-1], *self.out_shape).astype(x.dtype)

    def delta(self) -> jax.Array:
        """The dense weight update B A * alpha / rank, shaped like the base kernel (in_shape + out_shape)."""
        update = self.adapter.lora_a[...] @ self.adapter.lora_b[...] * self.scale
        return update.reshape(*self.in_shape, *self.out_shape)


class ExpertLoRA(nnx.Module):
    """Per-expert adapters of a stacked expert weight (experts, in, out): A (experts, in, rank) and
    B (experts, rank, out), B at zero. The MoE layer applies them in its own two computations: `grouped` for
    rows sorted by expert (the dropless path, same group sizes as the base's `ragged_dot`) and `per_expert`
    for the masked reference. Dropout acts on the adapters' inputs, as `LoRA`'s does."""

    def __init__(
        self, name: str, num_experts: int, in_dim: int, out_dim: int, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs
    ):
        # Seeds the adapter's dropout, as LoRA.layer_name; "experts/" keeps its masks apart from the shared MLP's.
        self.layer_name = f"experts/{name}"
        self.scale = cfg.lora_alpha / cfg.lora_rank
        self.dropout_rate = cfg.lora_dropout
        self.dtype = jnp.dtype(cfg.dtype)
        param_dtype = jnp.dtype(cfg.param_dtype)
        # nnx.LoRA's A initializer (He uniform) with the experts axis as a batch axis, so that fan_in is `in_dim`.
        a_init = nnx.initializers.he_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))
        a_shape = (num_experts, in_dim, cfg.lora_rank)
        self.lora_a = nnx.LoRAParam(
            sharding.with_logical_axes(a_init, ("expert", None, None))(rngs.params(), a_shape, param_dtype)
        )
        self.lora_b = nnx.LoRAParam(
            layers.zeros_init(("expert", None, None))(rngs.params(), (num_experts, cfg.lora_rank, out_dim), param_dtype)
        )

    def dropout_mask(self, shape: tuple[int, ...], dropout_key: jax.Array | None) -> jax.Array | None:
        """Inverted-dropout multipliers (0 or 1 / (1 - rate)) for inputs of `shape`; None when not training."""
        if dropout_key is None or self.dropout_rate == 0.0:
            return None
        dropout_key = jax.random.fold_in(dropout_key, zlib.crc32(self.layer_name.encode()))
        return layers.dropout(jnp.ones(shape, self.dtype), self.dropout_rate, dropout_key)

    def grouped(self, rows: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """The update of rows (slots, in) sorted by expert, `group_sizes[e]` consecutive rows for expert e."""
        a, b = self.lora_a[...].astype(rows.dtype), self.lora_b[...].astype(rows.dtype)
        return jax.lax.ragged_dot(jax.lax.ragged_dot(rows, a, group_sizes), b, group_sizes) * self.scale

    def per_expert(self, x: jax.Array) -> jax.Array:
        """The update (experts, tokens, out) of every expert on x: (tokens, in) for all, or (experts, tokens, in)."""
        a, b = self.lora_a[...].astype(x.dtype), self.lora_b[...].astype(x.dtype)
        low = jnp.einsum("td,edr->etr" if x.ndim == 2 else "etd,edr->etr", x, a)
        return jnp.einsum("etr,erh->eth", low, b) * self.scale

    def delta(self) -> jax.Array:
        """B_e A_e * alpha / rank for every expert, shaped like the stacked weight ((layers,) experts, in, out)."""
        return self.lora_a[...] @ self.lora_b[...] * self.scale


def expert_adapter_for(
    cfg: ml_collections.ConfigDict, name: str, num_experts: int, in_dim: int, out_dim: int, *, rngs: nnx.Rngs
) -> ExpertLoRA | None:
    """The per-expert adapter of the MoE weight `name` when `model.lora_targets` matches `mlp/name`, else None."""
    if not cfg.lora_rank or not re.fullmatch(cfg.lora_targets, f"mlp/{name}"):
        return None
    return ExpertLoRA(name, num_experts, in_dim, out_dim, cfg, rngs=rngs)


def adapter_for(
    cfg: ml_collections.ConfigDict,
    module: str,
    name: str,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    *,
    rngs: nnx.Rngs,
) -> LoRA | None:
    """The adapter of layer `name` of `module` ("attention" or "mlp") when `model.lora_targets` matches
    `module/name` (and `lora_rank` > 0), else None. Its weights are drawn from `rngs`: modules create their
    adapters after their layers, so that the layers' initialization does not depend on the adapters."""
    if not cfg.lora_rank or not re.fullmatch(cfg.lora_targets, f"{module}/{name}"):
        return None
    return LoRA(name, in_shape, out_shape, cfg, rngs=rngs)


def project(
    layer: Callable[[jax.Array], jax.Array], adapter: LoRA | None, x: jax.Array, dropout_key: jax.Array | None
) -> jax.Array:
    """`layer` applied to x (batch, length, ...), plus `adapter`'s update when there is one. The layers see
    one axis of tokens (`layers.over_tokens`): their einsums read "td,..."."""
    if adapter is None:
        return layers.over_tokens(layer, x)
    return layers.over_tokens(lambda tokens: layer(tokens) + adapter(tokens, dropout_key), x)


def merged_params(model: nnx.Module, params: nnx.State | None = None) -> nnx.State:
    """The parameters of the same model without adapters, each adapted kernel replaced by W + B A * scale.

    `params` are the model's parameters with any quantized kernel already dequantized (QLoRA:
    `llm.quant.ptq.dequantized_params`); by default, the model's own. The result loads into the model
    built from the config without adapters (`llm.train.step.base_config`).
    """
    merged = {}
    params = nnx.state(model, nnx.Param) if params is None else params
    for path, value in nnx.to_flat_state(params):
        *parents, leaf = path
        if any(str(part).endswith(LORA_SUFFIX) for part in parents):
            continue
        array = value[...]
        # A Linear's adapter sits beside the Linear (`up/kernel` -> `up_lora`); an MoE layer's beside its stacked
        # expert weight (`up` -> `up_lora`).
        owner_path, name = (parents[:-1], parents[-1]) if leaf == "kernel" else (parents, leaf)
        owner = model
        for part in owner_path:
            owner = owner[part] if isinstance(part, int) else getattr(owner, part)
        adapter = getattr(owner, f"{name}{LORA_SUFFIX}", None) if isinstance(name, str) else None
        if isinstance(adapter, ExpertLoRA):
            array = array + adapter.delta().astype(array.dtype)
        elif isinstance(adapter, LoRA) and leaf == "kernel":
            array = array + _stacked_delta(adapter).astype(array.dtype)
        merged[path] = value.replace(array)
    return nnx.from_flat_state(merged)


def _stacked_delta(adapter: LoRA) -> jax.Array:
    """The adapter's delta; with scanned layers its parameters carry a leading layers axis."""
    if adapter.adapter.lora_a[...].ndim == 2:
        return adapter.delta()
    stacked = jax.vmap(lambda a, b: (a @ b * adapter.scale).reshape(*adapter.in_shape, *adapter.out_shape))
    return stacked(adapter.adapter.lora_a[...], adapter.adapter.lora_b[...])
