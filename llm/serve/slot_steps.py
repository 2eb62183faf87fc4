"""The engine's two jitted programs over the fixed set of slots (llm/serve/engine.py).

`prefill_slot` writes one prompt into its slot's row of the shared KV cache and samples its first token;
`decode_slots` samples one new token for every slot at once, each row at its own cache position. Both donate
the cache and the per-row record of seen tokens (for the repetition penalty), so they update in place, and
both return the chosen token's log-probability and the top alternatives of the model's raw distribution.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from llm.infer.sampling import RowSampling, sample_rows
from llm.model.kv_cache import KVCache
from llm.model.logprobs import log_softmax, target_logprobs

MAX_LOGPROBS = 20  # Most alternatives per token a request may ask for (OpenAI's limit for chat).


@functools.partial(jax.jit, static_argnames=("graphdef", "with_prompt_logprobs"), donate_argnames=("cache", "seen"))
def prefill_slot(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cache: KVCache,
    seen: jax.Array,
    slot: jax.Array,
    tokens: jax.Array,
    length: jax.Array,
    sampling: RowSampling,
    seed: jax.Array,
    with_prompt_logprobs: bool,
):
    """Writes one prompt (tokens (1, bucket), the first `length` real) into row `slot` and samples its first
    new token. Returns (token, logprob, top ids, top logprobs, prompt logprobs or None, cache, seen)."""
    model = nnx.merge(graphdef, params)
    # The slot's row as a batch-1 cache, written from the start (after any soft prompt).
    row = cache.row(slot).with_index(model.prompt_length)
    real = jnp.arange(tokens.shape[1]) < length
    # Padding after the prompt has segment 0 and sits beyond the row's index: decoding overwrites it.
    logits, row = model.decode(tokens, jnp.arange(tokens.shape[1])[None], real[None].astype(jnp.int32), row)
    # The row's next token goes right after the prompt, over its padding.
    cache = cache.with_row(slot, row.with_index(model.prompt_length + length))
    vocab = logits.shape[-1]
    row_seen = jnp.zeros((vocab,), bool).at[jnp.where(real, tokens[0], vocab)].set(True, mode="drop")
    seen = seen.at[slot].set(row_seen)
    logprobs = log_softmax(logits[0])  # (bucket, vocab)
    last_logits = jax.lax.dynamic_index_in_dim(logits[0], length - 1, keepdims=False)
    last = jax.lax.dynamic_index_in_dim(logprobs, length - 1, keepdims=False)
    key = jax.random.fold_in(jax.random.key(seed[0]), 0)
    previous = jax.lax.dynamic_slice_in_dim(tokens[0], length - 1, 1)  # The prompt's last token (watermark).
    token = sample_rows(last_logits[None], key[None], sampling, row_seen[None], previous)[0]
    top_logprobs, top_ids = jax.lax.top_k(last, MAX_LOGPROBS)
    prompt = None
    if with_prompt_logprobs:
        # Position t predicts token t + 1.
        chosen = target_logprobs(logits[0, :-1], tokens[0, 1:])
        prompt_top_logprobs, prompt_top_ids = jax.lax.top_k(logprobs[:-1], MAX_LOGPROBS)
        prompt = (chosen, prompt_top_ids, prompt_top_logprobs)
    return token, last[token], top_ids, top_logprobs, prompt, cache, seen


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache", "seen"))
def decode_slots(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cache: KVCache,
    seen: jax.Array,
    tokens: jax.Array,
    active: jax.Array,
    sampling: RowSampling,
    seeds: jax.Array,
    counts: jax.Array,
):
    """One new token for every slot: tokens (B,) are written at each row's own cache index. Idle rows are
    computed too (the shapes never change) but reset to the start of the row (after any soft prompt), where
    the next prefill overwrites them."""
    model = nnx.merge(graphdef, params)
    rows = jnp.arange(tokens.shape[0])
    seen = seen.at[rows, tokens].set(seen[rows, tokens] | active)
    cache = cache._replace(index=jnp.where(active, cache.index, model.prompt_length))
    logits, cache = model.decode(tokens[:, None], cache.index[:, None], jnp.ones_like(tokens)[:, None], cache)
    logits = logits[:, -1]
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counts)
    next_tokens = sample_rows(logits, keys, sampling, seen, tokens)
    logprobs = log_softmax(logits)
    chosen = target_logprobs(logits, next_tokens)
    top_logprobs, top_ids = jax.lax.top_k(logprobs, MAX_LOGPROBS)
    return next_tokens, chosen, top_ids, top_logprobs, cache, seen
