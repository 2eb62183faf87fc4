"""Hugging Face config.json -> our `configs.base` model keys, one small table per architecture.

Every HF key we cannot honour is refused by name before any weight is read: a converted model that silently
ignored, say, RoPE scaling or a sliding window would load fine and then compute something else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


class UnsupportedCheckpoint(ValueError):
    """The checkpoint's architecture or one of its config keys cannot be imported faithfully."""


Check = Callable[[Mapping[str, Any]], str | None]  # A config -> the reason it is refused, or None.


def _flag_off(key: str) -> Check:
    return lambda hf: f"{key}={hf[key]!r} (only false is supported)" if hf.get(key) else None


def _rope_default(hf: Mapping[str, Any]) -> str | None:
    # Older configs say rope_scaling; transformers 5 writes rope_parameters with a rope_type.
    if hf.get("rope_scaling") is not None:
        return f"rope_scaling={hf['rope_scaling']!r} (only null is supported: plain RoPE)"
    rope_type = (hf.get("rope_parameters") or {}).get("rope_type", "default")
    if rope_type != "default":
        return f"rope_parameters.rope_type={rope_type!r} (only 'default' is supported: plain RoPE)"
    factor = hf.get("partial_rotary_factor", 1.0)
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


# architectures value -> (checks, whether q/k/v carry biases). Qwen2's q/k/v projections always have biases.
ARCHITECTURES: dict[str, tuple[tuple[Check, ...], bool]] = {
    "LlamaForCausalLM": ((_rope_default, _silu, _flag_off("attention_bias"), _flag_off("mlp_bias")), False),
    "MistralForCausalLM": ((_rope_default, _silu, _full_window), False),
    "Qwen2ForCausalLM": ((_rope_default, _silu, _full_attention_layers), True),
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
    checks, qkv_bias = ARCHITECTURES[name]
    refused = [reason for reason in (check(hf) for check in checks) if reason]
    if refused:
        raise UnsupportedCheckpoint(f"Cannot import this {name}: " + "; ".join(refused) + ".")
    heads = hf["num_attention_heads"]
    rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
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
        position_encoding="rope",
        rope_theta=float(rope_theta),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        use_bias=False,
        qkv_bias=qkv_bias,
    )
