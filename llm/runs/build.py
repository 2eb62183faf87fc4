"""The model a run config describes, as training builds it and loading rebuilds it.

A run trains all parameters, only its LoRA adapters, or only its soft prompt (`train.trainable`); whatever
does not train is frozen and comes from the run's `init_from` base, quantized by Qwix for QLoRA
(`train.quantize_base`). Checkpoints hold only what trained, so loading a run rebuilds the same model from
its config and its base.
"""

from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from llm import tokenizer
from llm.model.transformer import SoftPromptParam, Transformer, create_model
from llm.quant import ptq

# train.trainable -> the parameter type that trains (and gets optimizer state).
TRAINABLE = {"all": nnx.Param, "lora": nnx.LoRAParam, "soft_prompt": SoftPromptParam}
PROMPT_INIT_PIECES = 5000  # A soft prompt starts from embeddings of the most frequent pieces (Lester et al.).


def base_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config of the model `init_from` holds: the same architecture without adapters or soft prompt."""
    base = ml_collections.ConfigDict(config.to_dict())
    base.model.update(lora_rank=0, soft_prompt_length=0)
    base.train.update(trainable="all", quantize_base="none")
    return base


def trained_model(config: ml_collections.ConfigDict, base: nnx.State | None) -> Transformer:
    """The model as the trainer runs it: fresh parameters, then the pretrained `base` (from `init_from`)
    over them, then for QLoRA the frozen base quantized by Qwix (`train.quantize_base`; the adapters and the
    soft prompt stay in float)."""
    model = create_model(config)
    if base is not None:
        nnx.update(model, base)
        if model.prompt_length:
            model.soft_prompt.value = _prompt_from_vocabulary(model, config.seed)
    if config.train.quantize_base != "none":
        model = ptq.quantize_model(model, ptq.QuantConfig(config.train.quantize_base, config.train.quantize_group_size))
    return model


def _prompt_from_vocabulary(model: Transformer, seed: int) -> jax.Array:
    """Embeddings of frequent text pieces drawn with the run's seed: Lester et al. (2021) found that a soft
    prompt started from real token embeddings trains faster and better than a random one."""
    vocab = model.cfg.vocab_size
    low = tokenizer.FIRST_TEXT_PIECE if vocab > tokenizer.FIRST_TEXT_PIECE else 0
    ids = jax.random.randint(jax.random.key(seed), (model.prompt_length,), low, min(vocab, low + PROMPT_INIT_PIECES))
    return model.embed.embedding[...][ids].astype(model.soft_prompt.dtype)
