"""Greedy generation speed of an imported run against `transformers` `generate` on the same weights.

Both sides generate exactly `new_tokens` tokens after the same random prompts (no early stop), after one
untimed warm-up call each (our compilation, torch's first-call set-up), on the same machine in float32. The
figure is end to end, prefill included, as a user of either library sees it: tokens generated per second of
`generate`. The share of rows whose tokens agree is reported too: greedy decoding of the same weights must
give the same tokens, so a speed-up bought with a different computation would show.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from llm.infer import generate
from llm.runs import loading


def _timed(fn) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def benchmark_against_transformers(
    run_dir: str,
    hf_dir: str,
    batch_sizes: Sequence[int] = (1, 8),
    prompt_len: int = 32,
    new_tokens: int = 128,
) -> dict[str, Any]:
    """Tokens/s of our generator on `run_dir` and of transformers on `hf_dir` (the checkpoint it was imported
    from), per batch size, and their ratio (ours / transformers)."""
    import torch
    import transformers

    model, config, _ = loading.load_model(run_dir)
    ours = generate.Generator(model)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    result: dict[str, Any] = {
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "torch_threads": torch.get_num_threads(),
    }
    for batch in batch_sizes:
        prompts = rng.integers(4, config.model.vocab_size, (batch, prompt_len))

        def run_ours() -> list[list[int]]:
            return ours.generate(prompts.tolist(), new_tokens)

        def run_theirs() -> list[list[int]]:
            with torch.no_grad():
                out = theirs.generate(
                    torch.tensor(prompts),
                    attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
            return out[:, prompt_len:].tolist()

        run_ours(), run_theirs()  # Warm-up: compilation and first-call costs are not generation speed.
        our_tokens, our_s = _timed(run_ours)
        their_tokens, their_s = _timed(run_theirs)
        ours_per_s, theirs_per_s = batch * new_tokens / our_s, batch * new_tokens / their_s
        result[f"batch_{batch}"] = {
            "ours_tokens_per_sec": ours_per_s,
            "transformers_tokens_per_sec": theirs_per_s,
            "speedup": ours_per_s / theirs_per_s,
            "rows_identical": sum(a == b for a, b in zip(our_tokens, their_tokens)) / batch,
        }
    return result
