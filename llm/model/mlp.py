"""The feed-forward block: GELU (GPT-2) or SwiGLU (Llama), with optional LoRA adapters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from llm import sharding
from llm.model import layers, lora


class MLP(nnx.Module):
    """Feed-forward block: GELU (up, down) or SwiGLU (gate, up, down)."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        self.activation = cfg.mlp_activation
        linear = dict(
            use_bias=cfg.use_bias, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs
        )
        up = dict(kernel_init=layers.normal_init(("embed", "mlp")), bias_init=layers.zeros_init(("mlp",)), **linear)
        self.up = nnx.Linear(cfg.embed_dim, cfg.mlp_dim, **up)
        if self.activation == "swiglu":
            self.gate = nnx.Linear(cfg.embed_dim, cfg.mlp_dim, **up)
        self.down = nnx.Linear(
            cfg.mlp_dim,
            cfg.embed_dim,
            kernel_init=layers.normal_init(("mlp", "embed"), layers.residual_std(cfg)),
            bias_init=layers.zeros_init(("embed",)),
            **linear,
        )
        # LoRA adapters (None unless model.lora_targets matches), created last: see lora.adapter_for.
        embed, hidden = (cfg.embed_dim,), (cfg.mlp_dim,)
        self.up_lora = lora.adapter_for(cfg, "mlp", "up", embed, hidden, rngs=rngs)
        if self.activation == "swiglu":
            self.gate_lora = lora.adapter_for(cfg, "mlp", "gate", embed, hidden, rngs=rngs)
        self.down_lora = lora.adapter_for(cfg, "mlp", "down", hidden, embed, rngs=rngs)

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """`dropout_key` drives the LoRA adapters' dropout (training only)."""
        up = lora.project(self.up, self.up_lora, x, dropout_key)
        if self.activation == "swiglu":
            hidden = jax.nn.silu(lora.project(self.gate, self.gate_lora, x, dropout_key)) * up
        else:
            hidden = jax.nn.gelu(up, approximate=True)  # The tanh approximation: GPT-2's gelu_new.
        hidden = sharding.constrain(hidden, ("batch", "length", "mlp"))
        return lora.project(self.down, self.down_lora, hidden, dropout_key)
