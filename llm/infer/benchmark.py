"""Decode speed: prefill throughput, time to first token, and decode tokens/s at several batch sizes.

Where time goes is reported in three parts per batch size: the device time of one decode step (timed over
many steps with no host round trip), the same loop as `Generator.generate` runs it (one host round trip per
token, as streaming needs), and the difference, which is host overhead. That difference is reported as
measured, not clamped: it is the difference of two timings, so when the overhead is below their noise it
can come out slightly negative, which reads as "no measurable overhead". At batch 1, decoding is bound by
reading every parameter (and the KV cache) once per token; on devices with a known memory bandwidth the
result includes the fraction of that bound reached.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llm import devices
from llm.infer import generate
from llm.infer.sampling import SamplingParams
from llm.model.kv_cache import new_cache
from llm.model.transformer import Transformer, context_length


def _hbm_bandwidth() -> float | None:
    spec = devices.device_spec()
    return spec.hbm_bytes_per_s if spec else None


def _nbytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def benchmark_decode(
    model: Transformer,
    batch_sizes: Sequence[int] = (1, 8, 64),
    prompt_len: int = 128,
    new_tokens: int = 32,
    vocab_limit: int | None = None,
) -> dict[str, Any]:
    """Times prefill and decode of random prompts; the model's weights need not be trained."""
    cfg = model.cfg
    context = context_length(cfg)
    prompt_len = min(prompt_len, context - new_tokens - 1)
    if prompt_len < 1:
        raise ValueError(f"A context of {context} tokens leaves no room for {new_tokens} new tokens.")
    generator = generate.Generator(model)
    graphdef, params = generator.graphdef, generator.params
    greedy = SamplingParams()
    vocab = vocab_limit or cfg.vocab_size
    rng = np.random.default_rng(0)
    result: dict[str, Any] = {"prompt_len": prompt_len, "new_tokens": new_tokens, "param_bytes": _nbytes(params)}
    bandwidth = _hbm_bandwidth()

    for batch in batch_sizes:
        prompts = rng.integers(4, vocab, (batch, prompt_len)).astype(np.int32)
        cache_len = generate.cache_bucket(prompt_len + new_tokens, context)
        positions = np.broadcast_to(np.arange(prompt_len, dtype=np.int32), prompts.shape)
        segments = np.ones_like(prompts)
        key = jax.random.key(0)

        def prefill():
            cache = new_cache(graphdef, params, batch, cache_len)
            return generator.prefill(params, prompts, positions, segments, cache, key, greedy)

        jax.block_until_ready(prefill())  # Compile.
        start = time.perf_counter()
        next_tokens, _, cache, seen = jax.block_until_ready(prefill())
        prefill_s = time.perf_counter() - start

        def decode_steps(next_tokens, cache, seen, count, host_round_trip):
            for step in range(count):
                next_tokens, _, cache, seen = generator.decode_step(
                    params,
                    next_tokens,
                    jnp.full((batch,), prompt_len + step, jnp.int32),
                    cache,
                    seen,
                    key,
                    greedy,
                )
                if host_round_trip:
                    np.asarray(next_tokens)
            return jax.block_until_ready((next_tokens, cache, seen))

        next_tokens, cache, seen = decode_steps(next_tokens, cache, seen, 1, False)  # Compile.
        start = time.perf_counter()
        next_tokens, cache, seen = decode_steps(next_tokens, cache, seen, new_tokens // 2, False)
        device_step_s = (time.perf_counter() - start) / (new_tokens // 2)
        start = time.perf_counter()
        decode_steps(next_tokens, cache, seen, new_tokens // 2 - 1, True)
        streamed_step_s = (time.perf_counter() - start) / (new_tokens // 2 - 1)

        entry = {
            "prefill_tokens_per_sec": batch * prompt_len / prefill_s,
            "time_to_first_token_s": prefill_s,
            "decode_tokens_per_sec": batch / device_step_s,
            "decode_step_ms": device_step_s * 1e3,
            "streamed_decode_tokens_per_sec": batch / streamed_step_s,
            # Raw, so that it is exactly the difference of the two step times above (see the docstring).
            "host_overhead_ms_per_step": (streamed_step_s - device_step_s) * 1e3,
        }
        if bandwidth:
            # Bytes each step must read: all parameters plus the keys and values written so far.
            kv_bytes = _nbytes((cache.keys, cache.values)) * (prompt_len + new_tokens / 2) / cache_len
            entry["hbm_bound_fraction"] = (result["param_bytes"] + kv_bytes) / device_step_s / bandwidth
        result[f"batch_{batch}"] = entry
    return result
