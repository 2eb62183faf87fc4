"""A decoder-only transformer in Flax NNX, read top to bottom.

    tokens -> embedding (+ learned or sinusoidal positions) -> N x Block -> final norm -> logits
    Block: x + Attention(Norm(x)), then x + MLP(Norm(x))          (pre-norm residual blocks)

The configuration (`configs/base.py`, section `model`) picks GPT-2 or Llama style pieces. Blocks are either
a Python list or, with `scan_layers`, one stacked Block whose parameters carry a leading `layers` axis and
run under `lax.scan` (compile time independent of depth). `remat_policy` rematerializes block activations.
With `num_experts`, every moe_every-th block's MLP is a mixture of experts (llm/model/moe.py); scanned, the dense
blocks and the MoE blocks are two stacks (`blocks`, `moe_blocks`) and the scan runs a group of moe_every layers
per step. The MoE layers' router statistics come back beside the hidden states (`features_and_router_stats`).
For generation, `decode` threads a `KVCache` (llm/model/kv_cache.py) through the blocks (see llm/infer/).

Prompt tuning (Lester et al. 2021) adds `soft_prompt_length` learned embeddings that every document reads
first, as if they were tokens in front of it. They sit once at the start of a row with the segment id
PROMPT_SEGMENT, which every segment of the row may attend to, and each document's positions are shifted past
them: exactly what prepending the prompt to each document computes, and packing keeps working. For
decoding, `init_cache` writes the prompt's keys and values into the first positions of every cache row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from llm import sharding
from llm.model import layers, mlp, moe
from llm.model.attention import Attention
from llm.model.kernels import PROMPT_SEGMENT
from llm.model.kv_cache import KVCache, LayerCache

REMAT_POLICIES = {
    "full": None,  # Save nothing: recompute the whole block in the backward pass.
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # Keep matmul outputs.
}


class DropoutKeys(NamedTuple):
    """The dropout keys of one block, split from its key in this order (which fixes the masks of a run)."""

    attention: jax.Array | None  # the attention output, before the residual add
    mlp: jax.Array | None  # the MLP output, before the residual add
    attention_lora: jax.Array | None  # the inputs of the attention's LoRA adapters
    mlp_lora: jax.Array | None  # the inputs of the MLP's LoRA adapters

    @classmethod
    def split(cls, key: jax.Array | None) -> DropoutKeys:
        """Four keys from `key`; all None (no dropout) without one."""
        return cls(None, None, None, None) if key is None else cls(*jax.random.split(key, 4))


class Block(nnx.Module):
    """A pre-norm residual block: x + dropout(attention(norm(x))), then x + dropout(mlp(norm(x))), where the
    MLP is a mixture of experts (llm/model/moe.py) in an MoE layer."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, moe_layer: bool = False):
        self.dropout_rate = cfg.dropout_rate
        self.attention_norm = layers.make_norm(cfg, rngs)
        self.attention = Attention(cfg, rngs=rngs)
        self.mlp_norm = layers.make_norm(cfg, rngs)
        self.mlp = moe.MoE(cfg, rngs=rngs) if moe_layer else mlp.MLP(cfg, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        dropout_key: jax.Array | None,
        cache: LayerCache | None = None,
    ) -> tuple[jax.Array, LayerCache | None, moe.RouterStats | None]:
        """The block's output, its cache and, in an MoE layer, its router statistics (else None)."""
        keys = DropoutKeys.split(dropout_key)
        norm = lambda layer_norm, x: layer_norm(x).astype(x.dtype)  # The norms compute in float32.
        dropout = lambda x, key: layers.dropout(x, self.dropout_rate, key)
        # The attention also writes this call's keys and values into the cache, when there is one.
        attended, cache = self.attention(
            norm(self.attention_norm, x), positions, segment_ids, cache, dropout_key=keys.attention_lora
        )
        x = x + dropout(attended, keys.attention)
        x = sharding.constrain(x, ("batch", "length", "embed"))
        if isinstance(self.mlp, moe.MoE):  # Padding (segment 0) is left out of the router statistics.
            hidden, stats = self.mlp(norm(self.mlp_norm, x), keys.mlp_lora, token_mask=segment_ids > 0)
        else:
            hidden, stats = self.mlp(norm(self.mlp_norm, x), keys.mlp_lora), None
        x = x + dropout(hidden, keys.mlp)
        return sharding.constrain(x, ("batch", "length", "embed")), cache, stats


class SoftPromptParam(nnx.Param):
    """The soft prompt's embeddings: a type of their own, so `train.trainable="soft_prompt"` selects them."""


class Transformer(nnx.Module):
    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        # A frozen copy: hashable, and safe from later edits of the caller's config.
        self.cfg = cfg = ml_collections.FrozenConfigDict(cfg)
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.embed = layers.Embed(
            cfg.vocab_size,
            cfg.embed_dim,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=layers.normal_init(("vocab", "embed")),
            rngs=rngs,
        )
        self.prompt_length = cfg.soft_prompt_length
        if self.prompt_length:
            init = layers.normal_init(("length", "embed"))
            self.soft_prompt = SoftPromptParam(init(rngs.params(), (self.prompt_length, cfg.embed_dim), param_dtype))
        if cfg.position_encoding == "learned":
            self.position_embed = nnx.Embed(
                cfg.max_seq_len,
                cfg.embed_dim,
                dtype=dtype,
                param_dtype=param_dtype,
                embedding_init=layers.normal_init(("length", "embed")),
                rngs=rngs,
            )
        if cfg.scan_layers:
            # The dense blocks in one stack and, with experts, the MoE blocks in another (see _scan_groups).
            num_moe = cfg.num_layers // cfg.moe_every if cfg.num_experts else 0
            self.blocks = _stacked_blocks(cfg, rngs, cfg.num_layers - num_moe) if num_moe < cfg.num_layers else None
            if num_moe:
                self.moe_blocks = _stacked_blocks(cfg, rngs, num_moe, moe_layer=True)
        else:
            self.blocks = nnx.List(
                [Block(cfg, rngs=rngs, moe_layer=moe.is_moe_layer(cfg, i)) for i in range(cfg.num_layers)]
            )
        self.final_norm = layers.make_norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.unembed = nnx.Linear(
                cfg.embed_dim,
                cfg.vocab_size,
                use_bias=False,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=layers.normal_init(("embed", "vocab")),
                rngs=rngs,
            )

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """Logits (batch, length, vocab) for int tokens (batch, length).

        `positions` default to 0..length-1 and `segment_ids` to one segment per row. `dropout_key` turns
        dropout on (training); without it the model is deterministic.
        """
        return self.logits(self.features(tokens, positions, segment_ids, dropout_key=dropout_key))

    def decode(
        self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """Logits for `tokens` written at `cache.index` (a whole prompt, or one token per row), and the cache
        with their keys and values added. Earlier positions are attended to through the cache."""
        hidden, cache = self.decode_features(tokens, positions, segment_ids, cache)
        return self.logits(hidden), cache

    def decode_features(
        self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """`decode`'s final hidden states (batch, length, embed), before the output projection: a caller that
        needs the logits of a few positions (a prompt's last) projects only those."""
        hidden, cache, _ = self._forward(tokens, positions, segment_ids, None, cache.with_segments(segment_ids))
        return hidden, cache.advance(tokens.shape[1])

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache with room for `max_len` tokens per row. With a soft prompt, the cache is longer by
        its length and already holds the prompt's keys and values: rows start writing after it."""
        cache = KVCache.create(self.cfg, batch, max_len + self.prompt_length)
        if not self.prompt_length:
            return cache
        x, positions, segment_ids = self._prompt_inputs(batch, x_dtype=jnp.dtype(self.cfg.dtype))
        _, cache, _ = self._run(x, positions, segment_ids, None, cache.with_segments(segment_ids))
        return cache.advance(self.prompt_length)

    def features(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """The final normalized hidden states (batch, length, embed), before the output projection."""
        return self._forward(tokens, positions, segment_ids, dropout_key, None)[0]

    def features_and_router_stats(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        dropout_key: jax.Array | None = None,
    ) -> tuple[jax.Array, moe.RouterStats | None]:
        """`features`, and the RouterStats of the MoE layers stacked along a leading axis (one entry per MoE
        layer, in depth order; None for a dense model): what training adds to the loss and logs."""
        hidden, _, stats = self._forward(tokens, positions, segment_ids, dropout_key, None)
        return hidden, stats

    def _forward(
        self,
        tokens: jax.Array,
        positions: jax.Array | None,
        segment_ids: jax.Array | None,
        dropout_key: jax.Array | None,
        cache: KVCache | None,
    ) -> tuple[jax.Array, KVCache | None, moe.RouterStats | None]:
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        x = self.embed(tokens)
        # Every document reads the soft prompt first, so its own positions start after it.
        positions = positions + self.prompt_length
        prepend = self.prompt_length and cache is None  # (a cache already holds the prompt: init_cache)
        if prepend:
            prompt, prompt_positions, prompt_segments = self._prompt_inputs(tokens.shape[0], x.dtype)
            x = jnp.concatenate([prompt, x], axis=1)
            positions = jnp.concatenate([prompt_positions, positions], axis=1)
            segment_ids = jnp.concatenate([prompt_segments, segment_ids], axis=1)
        hidden, cache, stats = self._run(x, positions, segment_ids, dropout_key, cache)
        return (hidden[:, self.prompt_length :] if prepend else hidden), cache, stats

    def _prompt_inputs(self, batch: int, x_dtype: jnp.dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The soft prompt as a (batch, P) prefix: embeddings, positions 0..P-1 and the prompt's segment."""
        shape = (batch, self.prompt_length)
        prompt = jnp.broadcast_to(self.soft_prompt[...].astype(x_dtype), (*shape, self.cfg.embed_dim))
        positions = jnp.broadcast_to(jnp.arange(self.prompt_length), shape)
        return prompt, positions, jnp.full(shape, PROMPT_SEGMENT, jnp.int32)

    def _run(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        dropout_key: jax.Array | None,
        cache: KVCache | None,
    ) -> tuple[jax.Array, KVCache | None, moe.RouterStats | None]:
        """Position encodings, the blocks and the final norm over input embeddings x (batch, length, embed)."""
        if self.cfg.position_encoding == "learned":
            x = x + self.position_embed(positions)
        elif self.cfg.position_encoding == "sinusoidal":
            x = x + layers.sinusoidal(positions, self.cfg.embed_dim).astype(x.dtype)
        embed_key, blocks_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        x = layers.dropout(x, self.cfg.dropout_rate, embed_key)
        x = sharding.constrain(x, ("batch", "length", "embed"))
        x, cache, stats = self._run_blocks(x, positions, segment_ids, blocks_key, cache)
        return self.final_norm(x).astype(x.dtype), cache, stats

    def logits(self, features: jax.Array) -> jax.Array:
        project = self.embed.attend if self.cfg.tie_embeddings else self.unembed
        logits = layers.over_tokens(project, features)
        return sharding.constrain(logits, ("batch", "length", "vocab"))

    def _run_blocks(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        dropout_key: jax.Array | None,
        cache: KVCache | None,
    ) -> tuple[jax.Array, KVCache | None, moe.RouterStats | None]:
        def apply(
            graphdef: nnx.GraphDef,
            params: nnx.State,
            x: jax.Array,
            layer: int | jax.Array,
            layer_cache: LayerCache | None,
        ) -> tuple[jax.Array, LayerCache | None, moe.RouterStats | None]:
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, layer)
            return nnx.merge(graphdef, params)(x, positions, segment_ids, key, layer_cache)

        if self.cfg.remat_policy != "none" and cache is None:
            apply = jax.checkpoint(apply, policy=REMAT_POLICIES[self.cfg.remat_policy], static_argnums=(0,))

        def run_layer(
            graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array, cache: KVCache | None, layer: int | jax.Array
        ) -> tuple[jax.Array, KVCache | None, moe.RouterStats | None]:
            if cache is None:
                return apply(graphdef, params, x, layer, None)
            x, layer_cache, stats = apply(graphdef, params, x, layer, cache.layer(layer))
            return x, cache.with_layer(layer_cache), stats

        if not self.cfg.scan_layers:
            stats = []
            for layer, block in enumerate(self.blocks):
                x, cache, layer_stats = run_layer(*nnx.split(block), x, cache, layer)
                stats += [layer_stats] if layer_stats is not None else []
            return x, cache, jax.tree.map(lambda *s: jnp.stack(s), *stats) if stats else None
        if self.cfg.num_experts:
            return self._scan_groups(run_layer, x, cache)
        # The cache rides in the carry, each layer updating its slice in place; scanned over as inputs and
        # outputs, it would be rebuilt into a second whole cache.
        graphdef, params = nnx.split(self.blocks)

        def body(carry: tuple, inputs: tuple) -> tuple[tuple, None]:
            layer, layer_params = inputs
            return run_layer(graphdef, layer_params, *carry, layer)[:2], None

        (x, cache), _ = jax.lax.scan(body, (x, cache), (jnp.arange(self.cfg.num_layers), params))
        return x, cache, None

    def _scan_groups(
        self, run_layer: Callable, x: jax.Array, cache: KVCache | None
    ) -> tuple[jax.Array, KVCache | None, moe.RouterStats]:
        """Scanned MoE layers: one scan step per group of moe_every layers, its moe_every - 1 dense blocks (from
        the dense stack, regrouped) then its MoE block, so the scan stays homogeneous. The groups' router
        statistics come out stacked by the scan."""
        k = self.cfg.moe_every
        groups = self.cfg.num_layers // k
        moe_graphdef, moe_params = nnx.split(self.moe_blocks)
        dense_graphdef, dense_params = nnx.split(self.blocks) if k > 1 else (None, None)
        grouped = lambda a: a.reshape(groups, k - 1, *a.shape[1:])
        dense_params = jax.tree.map(grouped, dense_params) if k > 1 else None

        def body(carry: tuple, inputs: tuple) -> tuple[tuple, moe.RouterStats]:
            x, cache = carry
            group, group_dense, group_moe = inputs
            for j in range(k - 1):
                layer_params = jax.tree.map(lambda a, j=j: a[j], group_dense)
                x, cache, _ = run_layer(dense_graphdef, layer_params, x, cache, group * k + j)
            x, cache, stats = run_layer(moe_graphdef, group_moe, x, cache, group * k + k - 1)
            return (x, cache), stats

        (x, cache), stats = jax.lax.scan(body, (x, cache), (jnp.arange(groups), dense_params, moe_params))
        return x, cache, stats


def _stacked_blocks(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs, count: int, moe_layer: bool = False) -> Block:
    """One Block whose every parameter has a leading axis of size `count` (logical axis `layers`)."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=sharding.stacked_layers_metadata())
    def create(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs=rngs, moe_layer=moe_layer)

    return create(rngs)


def context_length(cfg: ml_collections.ConfigDict) -> int:
    """Tokens one sequence may hold: the model's context less its soft prompt."""
    return cfg.max_seq_len - cfg.soft_prompt_length


def create_model(config: ml_collections.ConfigDict) -> Transformer:
    """The model of a run config with freshly initialized parameters (seeded by `config.seed`), unsharded."""
    with sharding.no_eager_sharding():
        return Transformer(config.model, rngs=nnx.Rngs(params=config.seed))


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
