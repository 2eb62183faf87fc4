"""Causal self-attention with multi-head, grouped-query and multi-query variants.

`num_kv_heads` sets the variant: equal to `num_heads` is multi-head, 1 is multi-query, anything that
divides `num_heads` is grouped-query. Packed rows carry segment ids, and a query attends only to earlier
keys of its own segment, so documents packed into one row never see each other. The kernels that compute
it are in llm/model/kernels.py.

For generation, a `LayerCache` (llm/model/kv_cache.py) holds one layer's keys and values: this call's are
written at the cache's `index`, and queries attend to every written position up to their own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from llm import sharding
from llm.model import kernels, layers, lora
from llm.model.kv_cache import LayerCache


class Attention(nnx.Module):
    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, layers.head_dim(cfg)
        self.rope = layers.Rope.from_config(cfg) if cfg.position_encoding == "rope" else None
        self.impl = kernels.choose_impl(cfg.attention_impl, cfg.dtype)
        if self.impl == "splash" and cfg.soft_prompt_length:
            self.impl = "xla"  # Splash masks by segment equality only; a shared soft prompt needs the general mask.
        common = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        # Qwen2 biases only the query, key and value projections (qkv_bias); use_bias biases all four.
        qkv_bias = cfg.use_bias or cfg.qkv_bias
        kv_bias = (self.num_kv_heads, self.head_dim) if qkv_bias else None
        self.query = nnx.Einsum(
            "td,dnh->tnh",
            (cfg.embed_dim, self.num_heads, self.head_dim),
            (self.num_heads, self.head_dim) if qkv_bias else None,
            kernel_init=layers.normal_init(("embed", "heads", "head_dim")),
            bias_init=layers.zeros_init(("heads", "head_dim")),
            **common,
        )
        self.key, self.value = (
            nnx.Einsum(
                "td,dnh->tnh",
                (cfg.embed_dim, self.num_kv_heads, self.head_dim),
                kv_bias,
                kernel_init=layers.normal_init(("embed", "kv_heads", "head_dim")),
                bias_init=layers.zeros_init(("kv_heads", "head_dim")),
                **common,
            )
            for _ in range(2)
        )
        self.out = nnx.Einsum(
            "tnh,nhd->td",
            (self.num_heads, self.head_dim, cfg.embed_dim),
            (cfg.embed_dim,) if cfg.use_bias else None,
            kernel_init=layers.normal_init(("heads", "head_dim", "embed"), layers.residual_std(cfg)),
            bias_init=layers.zeros_init(("embed",)),
            einsum_op=_heads_as_one_axis,
            **common,
        )
        # Qwen3 normalizes each query and key head (RMSNorm over head_dim) before RoPE.
        self.query_norm = layers.make_head_norm(cfg, rngs) if cfg.qk_norm else None
        self.key_norm = layers.make_head_norm(cfg, rngs) if cfg.qk_norm else None
        # LoRA adapters (None unless model.lora_targets matches), created last: see lora.adapter_for.
        embed, heads, kv_heads = (cfg.embed_dim,), (self.num_heads, self.head_dim), (self.num_kv_heads, self.head_dim)
        self.query_lora = lora.adapter_for(cfg, "attention", "query", embed, heads, rngs=rngs)
        self.key_lora = lora.adapter_for(cfg, "attention", "key", embed, kv_heads, rngs=rngs)
        self.value_lora = lora.adapter_for(cfg, "attention", "value", embed, kv_heads, rngs=rngs)
        self.out_lora = lora.adapter_for(cfg, "attention", "out", heads, embed, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        cache: LayerCache | None = None,
        dropout_key: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """Returns the attention output and, when given a cache, the cache with this call's keys written.

        `dropout_key` drives the LoRA adapters' dropout (training only)."""
        query = lora.project(self.query, self.query_lora, x, dropout_key)
        key = lora.project(self.key, self.key_lora, x, dropout_key)
        value = lora.project(self.value, self.value_lora, x, dropout_key)
        if self.query_norm is not None:
            query, key = self.query_norm(query).astype(query.dtype), self.key_norm(key).astype(key.dtype)
        if self.rope is not None:
            query, key = layers.rope(query, positions, self.rope), layers.rope(key, positions, self.rope)
        query = sharding.constrain(query, ("batch", "length", "heads", "head_dim"))
        key = sharding.constrain(key, ("batch", "length", "kv_heads", "head_dim"))
        value = sharding.constrain(value, ("batch", "length", "kv_heads", "head_dim"))
        if cache is None:
            attended = kernels.dot_product_attention(query, key, value, segment_ids, self.impl)
        else:
            cache = cache.store(key, value)
            keys, values = cache.load(query.dtype)
            attended = kernels.attention_over_cache(query, keys, values, segment_ids, cache.segment_ids, cache.index)
        return lora.project(self.out, self.out_lora, attended, dropout_key), cache


def _heads_as_one_axis(subscripts: str, x: jax.Array, kernel: jax.Array, **kwargs) -> jax.Array:
    """The output projection "tnh,nhd->td" as one contraction over heads * head_dim. XLA:CPU computes a
    contraction over two axes about 7x slower than over one (measured on a decoding step, where it took a
    quarter of the time); the reshapes are free."""
    if subscripts != "tnh,nhd->td":
        raise ValueError(f"Expected the output projection's 'tnh,nhd->td', got {subscripts!r}.")
    return jnp.einsum("tk,kd->td", x.reshape(x.shape[0], -1), kernel.reshape(-1, kernel.shape[-1]), **kwargs)
