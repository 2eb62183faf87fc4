"""What the green-list watermark (llm/infer/watermark.py) buys and costs on a trained run.

Prompts are the first words of Spanish UD sentences; each is continued at temperature 1 with and without the
watermark (no stop token, so every continuation has its full length). Each continuation's first n tokens are
decoded to text and the text re-encoded, as a detector that sees only the text would, then tested. Human text is
the UD sentences that follow, joined and cut into n-token windows. Reported per n: the detection rate (z above the
threshold) of watermarked continuations, the false-positive rate of plain continuations and of human text, and the
mean z of each. The perplexity cost is the mean per-token negative log-likelihood of the continuations under the
unwatermarked model: watermarked minus plain.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llm.infer.generate import run_generator
from llm.infer.sampling import SamplingParams
from llm.infer.watermark import WatermarkParams, detect
from llm.model.logprobs import target_logprobs
from llm.runs.loading import Run
from llm.tokenizer import conllu_texts

PROMPT_WORDS = 4  # A prompt is the first words of a sentence at least twice as long.
NLL_ROWS = 16  # Sequences scored per forward pass (the logits of 16 x 256 positions x 8K tokens: 134 MB).


def _prompts_and_human_text(count: int) -> tuple[list[str], str]:
    """`count` sentence starts, and the text of the sentences after them (never the same sentences)."""
    sentences = conllu_texts()
    long_enough = [i for i, s in enumerate(sentences) if len(s.split()) >= 2 * PROMPT_WORDS]
    if len(long_enough) < count:
        raise ValueError(f"The UD file has only {len(long_enough)} sentences of {2 * PROMPT_WORDS}+ words.")
    chosen = long_enough[:count]
    prompts = [" ".join(sentences[i].split()[:PROMPT_WORDS]) for i in chosen]
    return prompts, " ".join(sentences[chosen[-1] + 1 :])


@functools.partial(jax.jit, static_argnums=0)
def _token_logprobs(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, segment_ids: jax.Array):
    """log p(token t+1 | tokens up to t) (batch, length - 1) of right-padded rows."""
    model = nnx.merge(graphdef, params)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return target_logprobs(model(tokens, positions, segment_ids)[:, :-1], tokens[:, 1:])


def mean_nll(run: Run, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> float:
    """Mean negative log-likelihood per continuation token, given its prompt, under the run's model."""
    graphdef, params = nnx.split(run.model)
    length = max(len(p) + len(c) for p, c in zip(prompts, continuations))
    total, count = 0.0, 0
    for start in range(0, len(prompts), NLL_ROWS):
        rows = list(zip(prompts, continuations))[start : start + NLL_ROWS]
        rows += [rows[0]] * (NLL_ROWS - len(rows))  # Filler rows keep one compiled shape; not counted below.
        tokens = np.zeros((NLL_ROWS, length), np.int32)
        segments = np.zeros((NLL_ROWS, length), np.int32)
        scored = np.zeros((NLL_ROWS, length - 1), bool)
        for i, (prompt, continuation) in enumerate(rows):
            ids = list(prompt) + list(continuation)
            tokens[i, : len(ids)], segments[i, : len(ids)] = ids, 1
            scored[i, len(prompt) - 1 : len(ids) - 1] = start + i < len(prompts)  # Targets: the continuation.
        logprobs = np.asarray(_token_logprobs(graphdef, params, tokens, segments))
        total -= float(logprobs[scored].sum())
        count += int(scored.sum())
    return total / count


def _z_scores(token_lists: Sequence[Sequence[int]], params: WatermarkParams) -> np.ndarray:
    """Each text's z (NaN where it has too few distinct bigrams to score)."""
    scores = []
    for ids in token_lists:
        try:
            scores.append(detect(ids, params).z)
        except ValueError:
            scores.append(math.nan)
    return np.array(scores)


def _rates(z: np.ndarray, threshold: float) -> dict[str, float | int]:
    return {
        "detected": float(np.mean(z > threshold)),  # A text too short to score counts as not detected.
        "mean_z": float(np.nanmean(z)),
        "unscored": int(np.isnan(z).sum()),
    }


def run(
    loaded: Run,
    params: WatermarkParams,
    num_prompts: int = 64,
    lengths: Sequence[int] = (50, 100, 200),
    z_threshold: float = 4.0,
    seed: int = 0,
) -> dict[str, Any]:
    """The figures for `num_prompts` prompts and continuations of max(lengths) tokens (see the module docstring)."""
    tokenizer = loaded.tokenizer
    prompts, human = _prompts_and_human_text(num_prompts)
    encoded = [tokenizer.encode(p, add_bos=True) for p in prompts]
    generator, new_tokens = run_generator(loaded), max(lengths)
    continuations, seconds = {}, {}
    for name, watermark in (("plain", None), ("watermarked", params)):
        sampling = SamplingParams(temperature=1.0, watermark=watermark)
        start = time.perf_counter()
        continuations[name] = generator.generate(encoded, new_tokens, sampling, stop_token_ids=(), seed=seed)
        seconds[f"generate_{name}_s"] = time.perf_counter() - start
    if min(len(c) for c in continuations["plain"]) < new_tokens:
        raise ValueError(f"The run's context leaves room for fewer than {new_tokens} new tokens after a prompt.")
    human_ids = tokenizer.encode(human)
    if len(human_ids) < num_prompts * new_tokens:
        raise ValueError(
            f"The UD text after the prompts has {len(human_ids)} tokens: fewer than {num_prompts * new_tokens}."
        )
    result: dict[str, Any] = {
        "step": loaded.step,
        "prompts": num_prompts,
        "gamma": params.gamma,
        "delta": params.delta,
        "z_threshold": z_threshold,
    }
    for n in lengths:
        # As the detector sees them: the text of the first n tokens, encoded again.
        as_text = {
            name: [tokenizer.encode(tokenizer.decode(c[:n])) for c in generated]
            for name, generated in continuations.items()
        }
        windows = [human_ids[i * new_tokens : i * new_tokens + n] for i in range(num_prompts)]
        result[f"tokens_{n}"] = {
            "watermarked": _rates(_z_scores(as_text["watermarked"], params), z_threshold),
            "plain": _rates(_z_scores(as_text["plain"], params), z_threshold),
            "human": _rates(_z_scores(windows, params), z_threshold),
        }
    start = time.perf_counter()
    nll = {name: mean_nll(loaded, encoded, generated) for name, generated in continuations.items()}
    seconds["nll_s"] = time.perf_counter() - start
    result["nll"] = {
        "plain": nll["plain"],
        "watermarked": nll["watermarked"],
        "increase": nll["watermarked"] - nll["plain"],
        "perplexity_ratio": math.exp(nll["watermarked"] - nll["plain"]),
    }
    return {**result, **seconds}


def table(result: dict) -> str:
    """The figures as a table, one row per length, under the settings and the perplexity cost."""
    lengths = [key for key in result if key.startswith("tokens_")]
    shown = lambda value: f"{value:.4g}" if isinstance(value, float) else str(value)
    head = [f"{key}: {shown(value)}" for key, value in result.items() if key not in lengths and key != "nll"]
    nll = result["nll"]
    head.append(
        f"NLL per token under the plain model: plain {nll['plain']:.3f}, watermarked {nll['watermarked']:.3f} "
        f"(+{nll['increase']:.3f}, perplexity x{nll['perplexity_ratio']:.3f})"
    )
    rows = [["new tokens", "detected (wm)", "FPR plain", "FPR human", "mean z wm", "mean z plain", "mean z human"]]
    for key in lengths:
        figures = result[key]
        rates = [f"{figures[name]['detected']:.3f}" for name in ("watermarked", "plain", "human")]
        means = [f"{figures[name]['mean_z']:.2f}" for name in ("watermarked", "plain", "human")]
        rows.append([key.removeprefix("tokens_"), *rates, *means])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    return "\n".join(head + [""] + lines)
