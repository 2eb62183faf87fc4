"""Generation tasks: the model writes an answer after a few-shot Spanish prompt, and the answer is scored.

  mgsm   exact match of the last number in the completion with the gold integer (1.000, 1 000, 1,000 and
         1000 are all one thousand; 2,5 is two and a half; see text_metrics.extract_final_number)
  xquad  exact match and token F1 after Spanish SQuAD normalization, plus BLEU, chrF and ROUGE of the
         completions against the gold answers

Decoding is greedy and stops at the first newline: every shot answers on one line. Prompts longer than
the model's context lose their beginning (first the shots, then the start of the passage), so a small
model still sees the question.

`run_sampler` draws several sampled continuations per prompt (the toxicity and PII-leakage tasks,
llm/eval/toxicity.py), with prompts fitted to the context the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from llm.eval import tasks, text_metrics
from llm.infer.generate import generate_text
from llm.infer.sampling import SamplingParams
from llm.model.transformer import context_length
from llm.runs.loading import Run

# (prompts, max_new_tokens, stop strings) -> completions, cut before the first stop string.
Generate = Callable[[list[str], int, Sequence[str]], list[str]]
# (prompts, samples_per_prompt K, max_new_tokens) -> K sampled continuations of each prompt, in prompt order.
Sample = Callable[[list[str], int, int], list[list[str]]]
STOP_STRINGS = ("\n",)
NUM_SAMPLES = 3  # completions kept in the report, so a reader sees what the scores are made of


def mgsm_prompts(examples: Sequence[tasks.MathExample], shots: Sequence[tasks.MathExample]) -> list[str]:
    solved = [f"{tasks.mgsm_query(shot)} {shot.answer}" for shot in shots]
    return [tasks.with_shots(tasks.MGSM_INSTRUCTION, solved, tasks.mgsm_query(example)) for example in examples]


def xquad_prompts(examples: Sequence[tasks.QaExample], shots: Sequence[tasks.QaExample]) -> list[str]:
    solved = [f"{tasks.xquad_query(shot)} {shot.answers[0]}" for shot in shots]
    return [tasks.with_shots(tasks.QA_INSTRUCTION, solved, tasks.xquad_query(example)) for example in examples]


def evaluate_mgsm(
    examples: Sequence[tasks.MathExample], shots: Sequence[tasks.MathExample], generate: Generate, max_new_tokens: int
) -> dict[str, Any]:
    """exact_match (percent), answered (percent of completions with a number) and a few samples."""
    if not examples:
        raise ValueError("No MGSM examples to evaluate.")
    completions = generate(mgsm_prompts(examples, shots), max_new_tokens, STOP_STRINGS)
    numbers = [text_metrics.extract_final_number(completion) for completion in completions]
    correct = [text_metrics.numbers_equal(number, example.answer) for number, example in zip(numbers, examples)]
    return {
        "exact_match": 100.0 * sum(correct) / len(examples),
        "answered": 100.0 * sum(number is not None for number in numbers) / len(examples),
        "examples": len(examples),
        "samples": [
            {"question": example.question, "completion": completion, "answer": example.answer}
            for example, completion in zip(examples[:NUM_SAMPLES], completions)
        ],
    }


def evaluate_xquad(
    examples: Sequence[tasks.QaExample], shots: Sequence[tasks.QaExample], generate: Generate, max_new_tokens: int
) -> dict[str, Any]:
    """exact_match and f1 (percent, best over gold answers), BLEU, chrF, ROUGE-1/2/L and a few samples."""
    if not examples:
        raise ValueError("No XQuAD examples to evaluate.")
    completions = [
        completion.strip() for completion in generate(xquad_prompts(examples, shots), max_new_tokens, STOP_STRINGS)
    ]
    references = [example.answers for example in examples]
    return {
        "exact_match": 100.0 * sum(map(text_metrics.exact_match, completions, references)) / len(examples),
        "f1": 100.0 * sum(map(text_metrics.token_f1, completions, references)) / len(examples),
        **text_metrics.overlap_metrics(completions, references),
        "examples": len(examples),
        "samples": [
            {"question": example.question, "completion": completion, "answers": list(example.answers)}
            for example, completion in zip(examples[:NUM_SAMPLES], completions)
        ],
    }


def _fit_prompts(run: Run, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The prompts, each cut to its last tokens when it would leave no room for `max_new_tokens` in the
    model's context (the question is at the end); how many were cut is logged."""
    tokenizer, context = run.tokenizer, context_length(run.model.cfg)
    budget = context - max_new_tokens - 1  # generate_text prepends bos
    if budget < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context of {context} tokens."
        )
    fitted, cut = [], 0
    for prompt, ids in zip(prompts, tokenizer.encode_batch(prompts)):
        if len(ids) > budget:
            cut += 1
            prompt = tokenizer.decode(ids[-budget:])
        fitted.append(prompt)
    if cut:
        logging.info("%d of %d prompts were longer than %d tokens and lost their beginning.", cut, len(prompts), budget)
    return fitted


def run_generator(run: Run, batch_size: int = 16) -> Generate:
    """A `Generate` for a loaded run: greedy, in batches, prompts fitted to the context (`_fit_prompts`)."""

    def generate(prompts: list[str], max_new_tokens: int, stop_strings: Sequence[str]) -> list[str]:
        fitted = _fit_prompts(run, prompts, max_new_tokens)
        completions: list[str] = []
        for start in range(0, len(fitted), batch_size):
            completions += generate_text(
                run, fitted[start : start + batch_size], max_new_tokens, stop_strings=stop_strings
            )
        return completions

    return generate


def run_sampler(run: Run, batch_size: int = 16, temperature: float = 1.0, top_p: float = 0.95, seed: int = 0) -> Sample:
    """A `Sample` for a loaded run: nucleus sampling, prompts fitted to the context as in `run_generator`.

    The K continuations of a prompt are K rows of the batch (rows draw independently); each batch of
    `batch_size` rows gets its own seed derived from (`seed`, batch index), so rows of different batches do not
    share random draws. The result is reproducible for a given seed and batch size (the batch size sets which
    rows share a batch).
    """
    sampling = SamplingParams(temperature=temperature, top_p=top_p)

    def sample(prompts: list[str], samples_per_prompt: int, max_new_tokens: int) -> list[list[str]]:
        if samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}.")
        rows = [prompt for prompt in _fit_prompts(run, prompts, max_new_tokens) for _ in range(samples_per_prompt)]
        continuations: list[str] = []
        for index, start in enumerate(range(0, len(rows), batch_size)):
            batch_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
            continuations += generate_text(
                run, rows[start : start + batch_size], max_new_tokens, sampling, seed=batch_seed
            )
        return [continuations[i : i + samples_per_prompt] for i in range(0, len(continuations), samples_per_prompt)]

    return sample
