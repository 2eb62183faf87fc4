"""Mixture-of-experts feed-forward layer (Switch, Mixtral, Qwen3-MoE, DeepSeek-MoE): each token runs through
the `experts_per_token` of `num_experts` MLPs its router picks, plus any shared experts every token runs through.

    router logits = x W_router                         in float32, (tokens, experts)
    probabilities = softmax(logits); top-k experts; their probabilities renormalized to sum to 1 (Mixtral;
                    Qwen3-MoE's norm_topk_prob=True). With top-1 the weight is then always 1 and the router
                    learns from the auxiliary losses alone (Switch instead scales by the raw probability).
    y = sum over the k chosen experts e of weight_e * MLP_e(x)  [+ shared MLP(x)]

Parameters, named and shaped for the Hugging Face mappings: `router` (embed, experts), and per-expert stacked
`gate`, `up` (experts, embed, mlp) and `down` (experts, mlp, embed) (`gate` with SwiGLU only); the shared
experts are one ordinary `mlp.MLP` of width num_shared_experts * moe_mlp_dim (DeepSeek's fused shared experts,
added ungated).

Two computations of the same function, chosen by `model.moe_impl` (`IMPLEMENTATIONS`):
  * "dropless": the (token, choice) slots sorted by expert, each expert's contiguous run multiplied by its
    weights in one grouped matmul (`jax.lax.ragged_dot`), the results put back in token order and combined.
    No token is ever dropped (no capacity factor), so a token's output does not depend on the other tokens of
    the batch: decoding one token at a time gives what the full forward pass gives.
  * "megablox": the dropless computation with TPUs' Pallas grouped-matmul kernel, run per device (`megablox`).
  * "masked": the reference: every expert on every token, weighted by the routing (zero for the experts not
    chosen). num_experts / experts_per_token times the FLOPs; the tests compare the two.

LoRA (llm/model/lora.py `ExpertLoRA`): with `model.lora_targets` matching `mlp/up`, `mlp/gate` or `mlp/down`,
each expert e of that weight gets its own A_e, B_e, applied in both computations (grouped matmuls with the same
group sizes; einsums); the shared experts are an `mlp.MLP` with its own adapters; the router is not adapted.

Router statistics (`RouterStats`) come back beside the output, for the training loss and the metrics:
  * load-balancing loss (Switch, Fedus et al. 2021): num_experts * sum_e f_e * P_e, where f_e is the fraction
    of the token-slots routed to expert e and P_e the mean router probability of e; 1 when perfectly balanced.
    (transformers' Mixtral counts f_e per token rather than per slot: its value is experts_per_token times this.)
  * router z-loss (ST-MoE, Zoph et al. 2022): the mean over tokens of logsumexp(router logits)^2.
  * load: f_e itself, for the busiest/idlest-expert metrics.
Only real tokens count: padding (segment id 0) is routed and computed like any token, but left out of the
statistics, so a batch's padding neither skews the load nor is balanced by the loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from llm import sharding
from llm.model import layers, lora, mlp


class RouterStats(NamedTuple):
    """One MoE layer's routing statistics (or, summed/stacked, a model's: see transformer.py)."""

    aux_loss: jax.Array  # () load-balancing loss
    z_loss: jax.Array  # () router z-loss
    load: jax.Array  # (experts,) fraction of the token-slots routed to each expert


def router_losses(cfg: ml_collections.ConfigDict, stats: RouterStats) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training term of a model's router statistics (stacked over its MoE layers): the coefficients times
    the load-balancing and z-losses summed over the layers, and the metrics moe_aux_loss and moe_z_loss (without
    their coefficients) and the share of routed token-slots of the busiest and idlest expert over all MoE layers
    (moe_load_max, moe_load_min; 1 / num_experts each when balanced)."""
    aux_loss, z_loss = jnp.sum(stats.aux_loss), jnp.sum(stats.z_loss)
    value = cfg.router_aux_loss_coef * aux_loss + cfg.router_z_loss_coef * z_loss
    metrics = {
        "moe_aux_loss": aux_loss,
        "moe_z_loss": z_loss,
        "moe_load_max": jnp.max(stats.load),
        "moe_load_min": jnp.min(stats.load),
    }
    return value, metrics


def add_router_losses(
    cfg: ml_collections.ConfigDict,
    stats: RouterStats | None,
    value: jax.Array,
    sums: dict[str, jax.Array],
    weight: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """A training objective's (value, metric sums) with a model's `router_losses` added, both scaled by the
    batch's `weight` as the objective's own sums are (dividing by the total weight then gives coefficient * loss,
    and gradient accumulation a weighted mean over microbatches); unchanged for a dense model (`stats` None)."""
    if stats is None:
        return value, sums
    router_value, metrics = router_losses(cfg, stats)
    return value + weight * router_value, {**sums, **{name: weight * metric for name, metric in metrics.items()}}


class Routing(NamedTuple):
    experts: jax.Array  # (tokens, k) int32: the chosen experts of each token, best first
    weights: jax.Array  # (tokens, k) float32: their renormalized probabilities
    stats: RouterStats


def expert_mlp_dim(cfg: ml_collections.ConfigDict) -> int:
    return cfg.moe_mlp_dim or cfg.mlp_dim


def is_moe_layer(cfg: ml_collections.ConfigDict, layer: int) -> bool:
    """Whether block `layer` (0-based) has experts: every moe_every-th layer, the last of each group."""
    return cfg.num_experts > 0 and (layer + 1) % cfg.moe_every == 0


def route(logits: jax.Array, k: int, token_mask: jax.Array | None = None) -> Routing:
    """Top-k routing of float32 router logits (tokens, experts), with the layer's statistics over the tokens
    `token_mask` (tokens,) marks (all of them when None)."""
    num_experts = logits.shape[-1]
    probs = jax.nn.softmax(logits, axis=-1)
    top_probs, experts = jax.lax.top_k(probs, k)
    weights = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
    counted = jnp.ones(logits.shape[0], jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
    num_counted = jnp.maximum(jnp.sum(counted), 1.0)
    # Slots per expert over the counted (token, choice) pairs; integer counts, so no gradient flows through f_e.
    slots = jnp.bincount(experts.reshape(-1), weights=jnp.repeat(counted, k), length=num_experts)
    load = slots / (k * num_counted)
    mean_probs = jnp.sum(probs * counted[:, None], axis=0) / num_counted
    aux_loss = num_experts * jnp.sum(load * mean_probs)
    z_loss = jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1)) * counted) / num_counted
    return Routing(experts, weights, RouterStats(aux_loss, z_loss, load))


class MoE(nnx.Module):
    """Routed experts (and optional shared experts) in place of a block's MLP."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        self.activation, self.impl = cfg.mlp_activation, cfg.moe_impl
        self.experts_per_token = cfg.experts_per_token
        self.dtype = jnp.dtype(cfg.dtype)
        num, embed, hidden = cfg.num_experts, cfg.embed_dim, expert_mlp_dim(cfg)
        self.mlp_dim = hidden
        param_dtype = jnp.dtype(cfg.param_dtype)

        def param(axes: tuple[str, ...], shape: tuple[int, ...], std: float = layers.INIT_STD) -> nnx.Param:
            return nnx.Param(layers.normal_init(axes, std)(rngs.params(), shape, param_dtype))

        self.router = param(("embed", None), (embed, num))  # tiny: split like the other embed-input weights
        if self.activation == "swiglu":
            self.gate = param(("expert", "expert_embed", "mlp"), (num, embed, hidden))
        self.up = param(("expert", "expert_embed", "mlp"), (num, embed, hidden))
        self.down = param(("expert", "mlp", "expert_embed"), (num, hidden, embed), layers.residual_std(cfg))
        shared_cfg = ml_collections.ConfigDict(cfg.to_dict())
        shared_cfg.mlp_dim = cfg.num_shared_experts * hidden
        self.shared = mlp.MLP(shared_cfg, rngs=rngs) if cfg.num_shared_experts else None
        # Per-expert LoRA adapters (None unless model.lora_targets matches), created last: see lora.adapter_for.
        adapter = lambda name, in_dim, out_dim: lora.expert_adapter_for(cfg, name, num, in_dim, out_dim, rngs=rngs)
        self.up_lora = adapter("up", embed, hidden)
        self.gate_lora = adapter("gate", embed, hidden) if self.activation == "swiglu" else None
        self.down_lora = adapter("down", hidden, embed)

    def __call__(
        self, x: jax.Array, dropout_key: jax.Array | None = None, token_mask: jax.Array | None = None
    ) -> tuple[jax.Array, RouterStats]:
        """x (batch, length, embed) -> (output of the same shape, the layer's RouterStats over the tokens
        `token_mask` (batch, length) marks, all when None). `dropout_key` drives the LoRA adapters' dropout (of
        the experts and the shared MLP), as `mlp.MLP`'s."""
        tokens = x.reshape(-1, x.shape[-1])
        # Routing in float32, whatever the compute dtype: top-k choices are sensitive to rounding.
        logits = tokens.astype(jnp.float32) @ self.router[...].astype(jnp.float32)
        routing = route(logits, self.experts_per_token, None if token_mask is None else token_mask.reshape(-1))
        out = IMPLEMENTATIONS[self.impl](self, tokens.astype(self.dtype), routing, dropout_key).reshape(x.shape)
        if self.shared is not None:
            out = out + self.shared(x, dropout_key)
        return sharding.constrain(out, ("batch", "length", "embed")), routing.stats

    def _weights(self) -> tuple[jax.Array | None, jax.Array, jax.Array]:
        gate = self.gate[...].astype(self.dtype) if self.activation == "swiglu" else None
        return gate, self.up[...].astype(self.dtype), self.down[...].astype(self.dtype)

    def _hidden(self, up: jax.Array, gate: jax.Array | None) -> jax.Array:
        if self.activation == "swiglu":
            return jax.nn.silu(gate) * up
        return jax.nn.gelu(up, approximate=True)  # GPT-2's gelu_new, as mlp.MLP.

    def _masks(
        self, tokens: jax.Array, k: int, dropout_key: jax.Array | None
    ) -> tuple[jax.Array | None, jax.Array | None, jax.Array | None]:
        """The adapters' dropout multipliers, drawn in token order for up and gate (tokens, embed) and in slot
        order for down (tokens, k, mlp), so that both computations drop exactly the same inputs."""

        def mask(adapter: lora.ExpertLoRA | None, shape: tuple[int, ...]) -> jax.Array | None:
            return None if adapter is None else adapter.dropout_mask(shape, dropout_key)

        return (
            mask(self.gate_lora, tokens.shape),
            mask(self.up_lora, tokens.shape),
            mask(self.down_lora, (tokens.shape[0], k, self.mlp_dim)),
        )


def _drop(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    return x if mask is None else x * mask


def dropless(layer: MoE, tokens: jax.Array, routing: Routing, dropout_key: jax.Array | None = None) -> jax.Array:
    """Sort the token-slots by expert, one grouped matmul (XLA's `ragged_dot`) per projection, unsort, combine."""
    masks = layer._masks(tokens, routing.experts.shape[-1], dropout_key)
    return _sorted_dispatch(layer, tokens, routing.experts, routing.weights, masks, jax.lax.ragged_dot)


def megablox(layer: MoE, tokens: jax.Array, routing: Routing, dropout_key: jax.Array | None = None) -> jax.Array:
    """The dropless computation with the grouped matmul of TPUs' Pallas megablox kernel (`gmm`, whose custom
    backward computes the weights' gradient with its transposed kernel `tgmm`).

    A Pallas kernel is opaque to XLA's partitioner, so the dispatch runs per device (`sharding.per_shard`): each
    device sorts its own tokens and multiplies them by all of the layer's experts, which are gathered as FSDP
    gathers any weight (there is no expert parallelism: no all-to-all of tokens). Off TPU the kernel runs in
    Pallas' interpret mode, which is how the tests check it against the other paths on CPU; it is slow.
    """
    masks = layer._masks(tokens, routing.experts.shape[-1], dropout_key)  # drawn globally: the same as dropless's

    def local(tokens: jax.Array, experts: jax.Array, weights: jax.Array, *masks: jax.Array | None) -> jax.Array:
        return _sorted_dispatch(layer, tokens, experts, weights, masks, _megablox_gmm)

    rows, slots = ("batch", None), ("batch", None, None)  # (tokens, ...) split as the batch is; None: no adapter
    run = sharding.per_shard(local, (rows, rows, rows, rows, rows, slots), rows)
    return run(tokens, routing.experts, routing.weights, *masks)


# The megablox kernel's (rows, contraction, output) tile, clipped to the problem; MaxText's defaults for TPU.
MEGABLOX_TILING = (512, 1024, 1024)


def _megablox_gmm(rows: jax.Array, weight: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """`ragged_dot(rows, weight, group_sizes)` by the megablox kernel. The kernel takes whole row tiles (of a
    multiple of 8 rows, the TPU's sublanes), so the rows are padded with zeros that belong to no group."""
    from jax.experimental.pallas.ops.tpu.megablox import ops as megablox_ops

    count, contraction, out = rows.shape[0], weight.shape[1], weight.shape[2]
    row_tile = min(MEGABLOX_TILING[0], -(-count // 8) * 8)
    padded = jnp.pad(rows, ((0, -count % row_tile), (0, 0)))
    tiling = (row_tile, min(MEGABLOX_TILING[1], contraction), min(MEGABLOX_TILING[2], out))
    interpret = jax.default_backend() != "tpu"
    product = megablox_ops.gmm(padded, weight, group_sizes, rows.dtype, tiling, None, None, False, interpret)
    return product[:count]


def _sorted_dispatch(
    layer: MoE,
    tokens: jax.Array,
    experts: jax.Array,
    weights: jax.Array,
    masks: tuple[jax.Array | None, jax.Array | None, jax.Array | None],
    grouped_matmul: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
) -> jax.Array:
    """Sort the token-slots by expert, one `grouped_matmul` per projection, unsort, combine: (tokens, embed).
    experts, weights: the routing's (tokens, k); masks: the adapters' dropout multipliers (`MoE._masks`)."""
    gate_w, up_w, down_w = layer._weights()
    num_experts, k = up_w.shape[0], experts.shape[-1]
    slot_experts = experts.reshape(-1)  # slot t * k + j is token t's j-th choice
    order = jnp.argsort(slot_experts, stable=True)
    group_sizes = jnp.bincount(slot_experts, length=num_experts).astype(jnp.int32)
    gate_mask, up_mask, down_mask = masks

    def project(rows: jax.Array, weight: jax.Array, adapter: lora.ExpertLoRA | None, adapter_rows: jax.Array):
        out = grouped_matmul(rows, weight, group_sizes)
        return out if adapter is None else out + adapter.grouped(adapter_rows, group_sizes)

    sorted_tokens = tokens[order // k]
    gate = None
    if gate_w is not None:
        gate = project(sorted_tokens, gate_w, layer.gate_lora, _drop(tokens, gate_mask)[order // k])
    hidden = layer._hidden(project(sorted_tokens, up_w, layer.up_lora, _drop(tokens, up_mask)[order // k]), gate)
    down_rows = hidden if down_mask is None else hidden * down_mask.reshape(-1, down_mask.shape[-1])[order]
    outputs = project(hidden, down_w, layer.down_lora, down_rows)[jnp.argsort(order)]  # back in slot order
    outputs = outputs.reshape(tokens.shape[0], k, -1)
    return jnp.einsum("tkd,tk->td", outputs, weights.astype(outputs.dtype))


def masked(layer: MoE, tokens: jax.Array, routing: Routing, dropout_key: jax.Array | None = None) -> jax.Array:
    """The reference: every expert on every token, each output weighted by its routing weight (0 if unchosen)."""
    gate_w, up_w, down_w = layer._weights()
    one_hot = jax.nn.one_hot(routing.experts, up_w.shape[0], dtype=jnp.float32)  # (tokens, k, experts)
    gate_mask, up_mask, down_mask = layer._masks(tokens, routing.experts.shape[-1], dropout_key)

    def project(spec: str, x: jax.Array, weight: jax.Array, adapter: lora.ExpertLoRA | None, adapter_x: jax.Array):
        out = jnp.einsum(spec, x, weight)
        return out if adapter is None else out + adapter.per_expert(adapter_x)

    gate = None
    if gate_w is not None:
        gate = project("td,edh->eth", tokens, gate_w, layer.gate_lora, _drop(tokens, gate_mask))
    hidden = layer._hidden(project("td,edh->eth", tokens, up_w, layer.up_lora, _drop(tokens, up_mask)), gate)
    # A slot's mask goes to the expert it chose; the experts a token did not choose are weighted by 0 below.
    down_x = (
        hidden if down_mask is None else hidden * jnp.einsum("tke,tkh->eth", one_hot.astype(hidden.dtype), down_mask)
    )
    outputs = project("eth,ehd->etd", hidden, down_w, layer.down_lora, down_x)
    combine = jnp.einsum("tke,tk->te", one_hot, routing.weights).astype(outputs.dtype)
    return jnp.einsum("etd,te->td", outputs, combine)


# model.moe_impl -> its computation; the keys are exactly configs.base.CHOICES["model.moe_impl"] (tested).
IMPLEMENTATIONS: dict[str, Callable[[MoE, jax.Array, Routing, jax.Array | None], jax.Array]] = {
    "dropless": dropless,
    "megablox": megablox,
    "masked": masked,
}
