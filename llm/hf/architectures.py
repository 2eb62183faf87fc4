"""Hugging Face config.json -> our `configs.base` model keys, one small table per architecture.

Every HF key we cannot honour is refused by name before any weight is read: a converted model that silently
ignored, say, a YaRN RoPE scaling or a sliding window would load fine and then compute something else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any


class UnsupportedCheckpoint(ValueError):
    """The checkpoint's architecture or one of its config keys cannot be imported faithfully."""


Check = Callable[[Mapping[str, Any]], str | None]  # A config -> the reason it is refused, or None.

# RoPE types we compute (llm/model/layers.py) -> the rope_parameters keys each one needs.
ROPE_TYPES = {"default": (), "linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
# GPT-2's tanh-approximated GELU under both of its transformers names; our "gelu" is that approximation.
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")


def _flag_off(key: str) -> Check:
    return lambda hf: f"{key}={hf[key]!r} (only false is supported)" if hf.get(key) else None


def _rope_parameters(hf: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The RoPE parameters and the key that holds them. transformers 5 writes rope_parameters (rope_theta
    inside); older configs say rope_scaling beside a top-level rope_theta, and transformers lets rope_scaling
    win when both are there. Old rope_scaling dicts name the type "type"."""
    source = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    params = dict(hf.get(source) or {})
    params.setdefault("rope_type", params.get("type", "default"))
    return source, params


def _rope(hf: Mapping[str, Any]) -> str | None:
    source, params = _rope_parameters(hf)
    rope_type = params["rope_type"]
    if rope_type not in ROPE_TYPES:
        return f"{source}.rope_type={rope_type!r} (supported: {sorted(ROPE_TYPES)})"
    missing = [key for key in ROPE_TYPES[rope_type] if key not in params]
    if missing:
        return f"{source} of rope_type={rope_type!r} lacks {missing}"
    factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    return None if factor == 1.0 else f"partial_rotary_factor={factor!r} (only 1.0 is supported)"


def _silu(hf: Mapping[str, Any]) -> str | None:
    act = hf.get("hidden_act", "silu")
    return None if act == "silu" else f"hidden_act={act!r} (only 'silu' is supported: SwiGLU)"


def _full_window(hf: Mapping[str, Any]) -> str | None:
    # A window at least as long as the context never masks anything: plain causal attention.
    window = hf.get("sliding_window")
    if window is not None and window < hf["max_position_embeddings"]:
        return (
            f"sliding_window={window} is smaller than max_position_embeddings={hf['max_position_embeddings']} "
            "(sliding-window attention is not supported)"
        )
    return None


def _full_attention_layers(hf: Mapping[str, Any]) -> str | None:
    if hf.get("use_sliding_window"):
        return "use_sliding_window=True (sliding-window attention is not supported)"
    kinds = sorted(set(hf.get("layer_types") or ["full_attention"]) - {"full_attention"})
    return f"layer_types contains {kinds} (only 'full_attention' is supported)" if kinds else None


def _gelu_tanh(hf: Mapping[str, Any]) -> str | None:
    act = hf.get("activation_function", "gelu_new")
    return None if act in GPT2_ACTIVATIONS else f"activation_function={act!r} (supported: {list(GPT2_ACTIVATIONS)})"


def _scaled_scores(hf: Mapping[str, Any]) -> str | None:
    if not hf.get("scale_attn_weights", True):
        return "scale_attn_weights=False (only scores scaled by 1/sqrt(head_dim) are supported)"
    return None


def _rope_keys(hf: Mapping[str, Any]) -> dict[str, Any]:
    _, params = _rope_parameters(hf)
    rope_type = params["rope_type"]
    keys: dict[str, Any] = dict(
        position_encoding="rope",
        rope_theta=float(params.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_scaling="none" if rope_type == "default" else rope_type,
    )
    if rope_type != "default":
        keys["rope_scaling_factor"] = float(params["factor"])
    if rope_type == "llama3":
        # As transformers: a top-level original_max_position_embeddings wins, then the parameters', then the context.
        original = hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
        keys.update(
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
            rope_original_max_len=int(original or hf["max_position_embeddings"]),
        )
    return keys


def _llama_keys(hf: Mapping[str, Any], qkv_bias: bool = False, qk_norm: bool = False) -> dict[str, Any]:
    heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"],
        max_seq_len=hf["max_position_embeddings"],
        num_layers=hf["num_hidden_layers"],
        embed_dim=hf["hidden_size"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp_dim=hf["intermediate_size"],
        mlp_activation="swiglu",
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        **_rope_keys(hf),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        use_bias=False,
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
    )


def _gpt2_keys(hf: Mapping[str, Any]) -> dict[str, Any]:
    embed, heads = hf["n_embd"], hf["n_head"]
    return dict(
        vocab_size=hf["vocab_size"],
        max_seq_len=hf["n_positions"],
        num_layers=hf["n_layer"],
        embed_dim=embed,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=embed // heads,
        mlp_dim=hf.get("n_inner") or 4 * embed,
        mlp_activation="gelu",
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        position_encoding="learned",
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        use_bias=True,
        qkv_bias=False,
        qk_norm=False,
    )


def _experts(hf: Mapping[str, Any]) -> int:
    # Qwen's own Qwen3-MoE checkpoints say num_experts; transformers 5 writes num_local_experts (Mixtral's name).
    return hf.get("num_local_experts", hf.get("num_experts", 0))


def _norm_topk(hf: Mapping[str, Any]) -> str | None:
    # Our router always renormalizes the top-k probabilities (llm/model/moe.py), as norm_topk_prob=True does.
    return None if hf.get("norm_topk_prob") else f"norm_topk_prob={hf.get('norm_topk_prob')!r} (only true is supported)"


def _sparse_layers(hf: Mapping[str, Any]) -> str | None:
    """Qwen3-MoE's layer i has experts when (i + 1) % decoder_sparse_step == 0 and i is not in mlp_only_layers;
    ours are every moe_every-th layer, moe_every dividing the depth."""
    if hf.get("mlp_only_layers"):
        return f"mlp_only_layers={hf['mlp_only_layers']!r} (only [] is supported)"
    step, depth = hf.get("decoder_sparse_step", 1), hf["num_hidden_layers"]
    if _experts(hf) and (step < 1 or depth % step):
        return f"decoder_sparse_step={step} does not divide num_hidden_layers={depth}"
    return None


def _moe_keys(hf: Mapping[str, Any], moe_every: int, expert_dim: int) -> dict[str, Any]:
    """Our MoE keys. transformers' load-balancing loss pools the expert fractions (summing to
    num_experts_per_tok) and probabilities over the MoE layers; ours sums the layers' losses, each with fractions
    summing to 1: router_aux_loss_coef * k / (MoE layers) puts the same weight on it (exactly for identical
    layers). transformers has no router z-loss."""
    k, num_moe_layers = hf["num_experts_per_tok"], hf["num_hidden_layers"] // moe_every
    return dict(
        num_experts=_experts(hf),
        experts_per_token=k,
        moe_every=moe_every,
        moe_mlp_dim=expert_dim,
        num_shared_experts=0,
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)) * k / num_moe_layers,
        router_z_loss_coef=0.0,
    )


def _mixtral_keys(hf: Mapping[str, Any]) -> dict[str, Any]:
    return {**_llama_keys(hf), **_moe_keys(hf, 1, hf["intermediate_size"])}


def _qwen3_moe_keys(hf: Mapping[str, Any]) -> dict[str, Any]:
    keys = _llama_keys(hf, qk_norm=True)
    if _experts(hf):
        keys.update(_moe_keys(hf, hf.get("decoder_sparse_step", 1), hf["moe_intermediate_size"]))
    return keys


@dataclasses.dataclass(frozen=True)
class Architecture:
    checks: tuple[Check, ...]  # Each names a config key it cannot honour, or passes.
    keys: Callable[[Mapping[str, Any]], dict[str, Any]]  # HF config -> our config.model keys.


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture((_rope, _silu, _flag_off("attention_bias"), _flag_off("mlp_bias")), _llama_keys),
    "MistralForCausalLM": Architecture((_rope, _silu, _full_window), _llama_keys),
    # Qwen2's q/k/v projections always have biases; Qwen3 has none but normalizes each query and key head.
    "Qwen2ForCausalLM": Architecture((_rope, _silu, _full_attention_layers), lambda hf: _llama_keys(hf, qkv_bias=True)),
    "Qwen3ForCausalLM": Architecture(
        (_rope, _silu, _full_attention_layers, _flag_off("attention_bias")), lambda hf: _llama_keys(hf, qk_norm=True)
    ),
    # Mixture of experts: softmax, top-k, the k probabilities renormalized (Mixtral always; Qwen3-MoE with
    # norm_topk_prob), as our router. Mixtral's layers all have experts; Qwen3-MoE's every decoder_sparse_step-th.
    "MixtralForCausalLM": Architecture((_rope, _silu, _full_window), _mixtral_keys),
    "Qwen3MoeForCausalLM": Architecture(
        (_rope, _silu, _full_attention_layers, _flag_off("attention_bias"), _norm_topk, _sparse_layers),
        _qwen3_moe_keys,
    ),
    "GPT2LMHeadModel": Architecture(
        (_gelu_tanh, _scaled_scores, _flag_off("scale_attn_by_inverse_layer_idx"), _flag_off("add_cross_attention")),
        _gpt2_keys,
    ),
}


def architecture(hf: Mapping[str, Any]) -> str:
    """The supported architecture a HF config names; refuses remote code and anything not in ARCHITECTURES."""
    if hf.get("auto_map") or hf.get("trust_remote_code"):
        raise UnsupportedCheckpoint(
            f"The checkpoint needs remote code (auto_map={hf.get('auto_map')!r}); only the built-in "
            f"architectures {sorted(ARCHITECTURES)} can be imported."
        )
    names = hf.get("architectures") or []
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise UnsupportedCheckpoint(f"config.json has architectures={names!r}; supported: {sorted(ARCHITECTURES)}.")
    return names[0]


def model_keys(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The `config.model` keys of configs/base.py that describe the HF model; raises UnsupportedCheckpoint
    naming every HF key it cannot honour."""
    name = architecture(hf)
    refused = [reason for reason in (check(hf) for check in ARCHITECTURES[name].checks) if reason]
    if refused:
        raise UnsupportedCheckpoint(f"Cannot import this {name}: " + "; ".join(refused) + ".")
    try:
        return ARCHITECTURES[name].keys(hf)
    except KeyError as error:
        raise UnsupportedCheckpoint(f"config.json of this {name} lacks the key {error.args[0]!r}.") from None
