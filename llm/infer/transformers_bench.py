"""Greedy generation speed of an imported run against `transformers` `generate` on the same weights.

Both sides generate exactly `new_tokens` tokens after the same random prompts (no early stop), after one
untimed warm-up call each (our compilation, torch's first-call set-up), on the same machine in float32. Two
figures per side, each the median of `repeats` timings: end to end, prefill included, as a user of either
library sees it (tokens generated per second of `generate`), and decoding alone: the `new_tokens - 1` tokens
after the first, per second of the time `generate` takes beyond a call for one token (prefill and first
token; None when timing noise exceeds that difference). The share of rows whose tokens agree is reported too:
greedy decoding of the same weights must give the same tokens, so a speed-up bought with a different
computation would show.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from llm.infer import generate
from llm.runs import loading


def _median_time(fn, repeats: int) -> tuple[Any, float]:
    """The result of fn() and the median of `repeats` timings of it."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, float(np.median(times))


def benchmark_against_transformers(
    run_dir: str,
    hf_dir: str,
    batch_sizes: Sequence[int] = (1, 8),
    prompt_len: int = 32,
    new_tokens: int = 128,
    repeats: int = 1,
) -> dict[str, Any]:
    """Tokens/s of our generator on `run_dir` and of transformers on `hf_dir` (the checkpoint it was imported
    from), end to end and decoding alone, per batch size, and their ratios (ours / transformers)."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 (decoding is timed after the first token), got {new_tokens}.")
    import torch
    import transformers

    model, config, _ = loading.load_model(run_dir)
    ours = generate.Generator(model)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    result: dict[str, Any] = {
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
    }
    for batch in batch_sizes:
        prompts = rng.integers(4, config.model.vocab_size, (batch, prompt_len))

        def run_ours(count: int = new_tokens) -> list[list[int]]:
            return ours.generate(prompts.tolist(), count)

        def run_theirs(count: int = new_tokens) -> list[list[int]]:
            with torch.no_grad():
                out = theirs.generate(
                    torch.tensor(prompts),
                    attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                    max_new_tokens=count,
                    min_new_tokens=count,
                    do_sample=False,
                    pad_token_id=0,
                )
            return out[:, prompt_len:].tolist()

        run_ours(), run_theirs(), run_ours(1)  # Warm-up: compilation and first-call costs are not generation speed.
        our_tokens, our_s = _median_time(run_ours, repeats)
        their_tokens, their_s = _median_time(run_theirs, repeats)
        our_first_s = _median_time(lambda: run_ours(1), repeats)[1]
        their_first_s = _median_time(lambda: run_theirs(1), repeats)[1]
        ours_per_s, theirs_per_s = batch * new_tokens / our_s, batch * new_tokens / their_s
        decoded = batch * (new_tokens - 1)
        ours_decode, theirs_decode = _rate(decoded, our_s - our_first_s), _rate(decoded, their_s - their_first_s)
        result[f"batch_{batch}"] = {
            "ours_tokens_per_sec": ours_per_s,
            "transformers_tokens_per_sec": theirs_per_s,
            "speedup": ours_per_s / theirs_per_s,
            "ours_decode_tokens_per_sec": ours_decode,
            "transformers_decode_tokens_per_sec": theirs_decode,
            "decode_speedup": ours_decode / theirs_decode if ours_decode and theirs_decode else None,
            "rows_identical": sum(a == b for a, b in zip(our_tokens, their_tokens)) / batch,
        }
    return result


def _rate(count: int, seconds: float) -> float | None:
    """count / seconds, or None when the difference of two timings is not positive: on a busy machine with few
    new tokens, the noise of the one-token call can exceed the decoding time, and no figure is better than a
    negative one."""
    return count / seconds if seconds > 0 else None
