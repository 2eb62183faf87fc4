"""The Hugging Face architectures a run exports as (llm/hf/exporter.py): for each, the config.model values it
requires, its config.json keys and what else it cannot express; adding an architecture is one entry of
ARCHITECTURES."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections

from llm.hf import weights
from llm.model import layers, moe

# model.rope_scaling -> its rope_parameters entries as transformers 5 writes them (rope_theta beside them).
ROPE_PARAMETERS: dict[str, Callable[[ml_collections.ConfigDict], dict[str, Any]]] = {
    "none": lambda model: {"rope_type": "default"},
    "linear": lambda model: {"rope_type": "linear", "factor": model.rope_scaling_factor},
    "llama3": lambda model: {
        "rope_type": "llama3",
        "factor": model.rope_scaling_factor,
        "low_freq_factor": model.rope_low_freq_factor,
        "high_freq_factor": model.rope_high_freq_factor,
        "original_max_position_embeddings": model.rope_original_max_len,
    },
}


def _llama_keys(model: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config.json keys that describe a Llama-style model (Llama, Qwen2, Qwen3)."""
    rope = {**ROPE_PARAMETERS[model.rope_scaling](model), "rope_theta": float(model.rope_theta)}
    return {
        "hidden_size": model.embed_dim,
        "intermediate_size": model.mlp_dim,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_heads,
        "num_key_value_heads": model.num_kv_heads,
        "head_dim": layers.head_dim(model),
        "hidden_act": "silu",
        "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": model.norm_eps,
        "rope_parameters": rope,  # transformers 5, scaling included
        "rope_theta": rope["rope_theta"],  # transformers 4 (its rope_scaling is not written: 5 would prefer it)
        "attention_bias": model.qkv_bias,
        "attention_dropout": 0.0,
        "mlp_bias": False,
    }


def _qwen_keys(model: ml_collections.ConfigDict) -> dict[str, Any]:
    return {**_llama_keys(model), "use_sliding_window": False, "sliding_window": None}


def hf_router_aux_loss_coef(model: ml_collections.ConfigDict) -> float:
    """Our load-balancing coefficient as transformers' (the inverse of llm/hf/architectures.py's conversion):
    ours weighs the sum of the MoE layers' losses, transformers' one loss pooled over the layers whose expert
    fractions sum to experts_per_token."""
    num_moe_layers = model.num_layers // model.moe_every
    return model.router_aux_loss_coef * num_moe_layers / model.experts_per_token


def _moe_keys(model: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config.json keys of the experts that Mixtral and Qwen3-MoE share (top-k renormalized, as ours)."""
    return {
        "num_local_experts": model.num_experts,  # Mixtral's name, and transformers 5's Qwen3-MoE attribute
        "num_experts_per_tok": model.experts_per_token,
        "router_aux_loss_coef": hf_router_aux_loss_coef(model),
        "output_router_logits": False,
    }


def _mixtral_keys(model: ml_collections.ConfigDict) -> dict[str, Any]:
    keys = {**_llama_keys(model), **_moe_keys(model), "sliding_window": None, "router_jitter_noise": 0.0}
    keys["intermediate_size"] = moe.expert_mlp_dim(model)  # Mixtral's experts are its only MLPs.
    return keys


def _qwen3_moe_keys(model: ml_collections.ConfigDict) -> dict[str, Any]:
    return {
        **_qwen_keys(model),
        **_moe_keys(model),
        "num_experts": model.num_experts,  # the name Qwen's own checkpoints use
        "moe_intermediate_size": moe.expert_mlp_dim(model),
        "decoder_sparse_step": model.moe_every,  # layer i has experts when (i + 1) % step == 0, as ours
        "mlp_only_layers": [],
        "norm_topk_prob": True,
    }


def _moe_refusals(model: ml_collections.ConfigDict) -> list[str]:
    if model.num_shared_experts:
        return [f"model.num_shared_experts={model.num_shared_experts} (it has no shared experts)"]
    return []


def _mixtral_refusals(model: ml_collections.ConfigDict) -> list[str]:
    reasons = _moe_refusals(model)
    if model.moe_every != 1:
        reasons.append(f"model.moe_every={model.moe_every} (every Mixtral layer is an MoE layer: 1)")
    return reasons


def _gpt2_keys(model: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config.json keys of a GPT-2 model. GPT-2's dropouts are ours: embd_pdrop on the embeddings, resid_pdrop
    on the attention and MLP outputs; we do not drop attention probabilities (attn_pdrop)."""
    return {
        "n_embd": model.embed_dim,
        "n_layer": model.num_layers,
        "n_head": model.num_heads,
        "n_positions": model.max_seq_len,
        "n_inner": model.mlp_dim,
        "layer_norm_epsilon": model.norm_eps,
        "activation_function": "gelu_new",  # our "gelu": the tanh approximation
        "embd_pdrop": model.dropout_rate,
        "resid_pdrop": model.dropout_rate,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
    }


def _gpt2_refusals(model: ml_collections.ConfigDict) -> list[str]:
    """What GPT2LMHeadModel cannot express: its heads are all query, key and value heads, embed / heads wide."""
    reasons = []
    if model.num_kv_heads != model.num_heads:
        reasons.append(
            f"model.num_kv_heads={model.num_kv_heads} differs from model.num_heads={model.num_heads} "
            "(GPT2LMHeadModel has no grouped-query attention)"
        )
    if layers.head_dim(model) * model.num_heads != model.embed_dim:
        reasons.append(
            f"model.head_dim={model.head_dim} is not model.embed_dim // model.num_heads = "
            f"{model.embed_dim // model.num_heads} (GPT2LMHeadModel derives it)"
        )
    return reasons


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A transformers architecture a run can be exported as: adding one is one entry of ARCHITECTURES."""

    name: str  # config.json "architectures"
    model_type: str
    mapping: dict  # our parameter paths -> HF tensors (llm/hf/weights.py)
    required: dict[str, Any]  # config.model keys -> the value the architecture needs
    config_keys: Callable[[ml_collections.ConfigDict], dict[str, Any]]  # config.model -> its config.json keys
    # config.model -> what else the architecture cannot express, each naming its keys.
    refusals: Callable[[ml_collections.ConfigDict], list[str]] = lambda model: []
    moe: bool = False  # A mixture of experts (model.num_experts > 0), or dense (0).

    def mismatches(self, model: ml_collections.ConfigDict) -> list[str]:
        """The config.model keys whose values this architecture cannot take, each with the value it needs."""
        reasons = [
            f"model.{key}={model[key]!r} ({self.name} needs {value!r})"
            for key, value in self.required.items()
            if model[key] != value
        ]
        if bool(model.num_experts) != self.moe:
            reasons.append(f"model.num_experts={model.num_experts} ({self.name} needs {'> 0' if self.moe else 0})")
        return reasons


_LLAMA_STYLE = dict(norm="rmsnorm", mlp_activation="swiglu", position_encoding="rope", use_bias=False)
ARCHITECTURES = (
    Architecture(
        "LlamaForCausalLM", "llama", weights.LLAMA, {**_LLAMA_STYLE, "qkv_bias": False, "qk_norm": False}, _llama_keys
    ),
    # Qwen2's q/k/v projections always carry biases, its output projection and MLP never; tied or not.
    Architecture(
        "Qwen2ForCausalLM", "qwen2", weights.QWEN2, {**_LLAMA_STYLE, "qkv_bias": True, "qk_norm": False}, _qwen_keys
    ),
    # Qwen3 has no biases but an RMSNorm on every query and key head; it names head_dim (_llama_keys does).
    Architecture(
        "Qwen3ForCausalLM", "qwen3", weights.QWEN3, {**_LLAMA_STYLE, "qkv_bias": False, "qk_norm": True}, _qwen_keys
    ),
    # GPT-2 biases every projection (use_bias implies qkv_bias, either value computes the same); tied or not.
    Architecture(
        "GPT2LMHeadModel",
        "gpt2",
        weights.GPT2,
        dict(norm="layernorm", mlp_activation="gelu", position_encoding="learned", use_bias=True, qk_norm=False),
        _gpt2_keys,
        _gpt2_refusals,
    ),
    Architecture(
        "MixtralForCausalLM",
        "mixtral",
        weights.MIXTRAL,
        {**_LLAMA_STYLE, "qkv_bias": False, "qk_norm": False},
        _mixtral_keys,
        _mixtral_refusals,
        moe=True,
    ),
    Architecture(
        "Qwen3MoeForCausalLM",
        "qwen3_moe",
        weights.QWEN3_MOE,
        {**_LLAMA_STYLE, "qkv_bias": False, "qk_norm": True},
        _qwen3_moe_keys,
        _moe_refusals,
        moe=True,
    ),
)
# config.model keys every architecture honours, or that do not change what the model computes (the RoPE keys
# change nothing with learned positions). Any other key (one added after this list, say) must keep its
# configs/base.py default: the export would silently drop it.
EXPORTED_KEYS = {
    "vocab_size", "max_seq_len", "num_layers", "embed_dim", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
    "norm_eps", "rope_theta", "rope_scaling", "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
    "rope_original_max_len", "tie_embeddings", "soft_prompt_length", "dropout_rate", "lora_rank", "lora_alpha",
    "lora_dropout", "lora_targets", "scan_layers", "remat_policy", "attention_impl", "kv_cache_dtype", "dtype",
    "param_dtype", "num_experts", "experts_per_token", "moe_every", "moe_mlp_dim", "num_shared_experts",
    "router_aux_loss_coef", "router_z_loss_coef", "moe_impl",
}  # fmt: skip
# (num_experts picks a dense or an MoE architecture, whose refusals name the MoE keys it cannot express; the
# router z-loss is a training term transformers does not have, and moe_impl computes the same function either way.)
