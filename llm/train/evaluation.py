"""Validation passes: every training metric averaged over fixed validation batches."""

from __future__ import annotations

import math
from typing import Any

import jax

from llm import sharding
from llm.data import loader
from llm.train import step as step_lib


def evaluate(
    steps: step_lib.Steps,
    state: step_lib.TrainState,
    frozen: step_lib.Frozen,
    batches: list[loader.Batch],
    mesh: Any,
    rules: Any,
    perplexity: bool,
) -> dict[str, float]:
    """Every training metric averaged over the batches, as eval_<name> (plus eval_perplexity if asked)."""
    sums: dict[str, float] = {}
    weight = 0.0
    for batch in batches:
        result = jax.device_get(steps.eval(state, frozen, sharding.global_batch(batch, mesh, rules)))
        for name, value in result["sums"].items():
            sums[name] = sums.get(name, 0.0) + float(value)
        weight += float(result["weight"])
    evaluation = {f"eval_{name}": value / max(weight, 1.0) for name, value in sums.items()}
    if perplexity:
        evaluation["eval_perplexity"] = math.exp(min(evaluation["eval_loss"], 50.0))
    return evaluation


def evaluate_all(
    steps: step_lib.Steps,
    state: step_lib.TrainState,
    frozen: step_lib.Frozen,
    validation: dict[str, list[loader.Batch]],
    mesh: Any,
    rules: Any,
    perplexity: bool,
) -> dict[str, float]:
    """`evaluate` on each validation set, its metrics named with the set's prefix (e.g. replay_eval_loss)."""
    return {
        prefix + name: value
        for prefix, batches in validation.items()
        for name, value in evaluate(steps, state, frozen, batches, mesh, rules, perplexity).items()
    }
