"""The training loop: resume or init, step, log, evaluate, checkpoint, stop on NaN.

    python scripts/train.py --config=configs/tiny_es.py --workdir=DIR --config.data.path=DATA

writes DIR/config.json, DIR/metrics.jsonl, DIR/emissions.json, DIR/checkpoints/ and what the trackers of
config.train.trackers write (DIR/tensorboard/, an MLflow run named in DIR/mlflow_run.json). Running it again with
the same DIR resumes from the latest checkpoint and ends exactly where an uninterrupted run would: same
parameters, same data order, same dropout masks, same metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from llm import checkpoint, config_validation, sharding
from llm.data import loader
from llm.runs import directory
from llm.train import (
    emissions,
    evaluation,
    inputs,
    losses,
    metrics as metrics_lib,
    start as start_lib,
    step as step_lib,
    teacher as teacher_lib,
    tracking,
)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss or gradient; the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
    metrics: dict[str, Any]  # The last logged metrics, with the last evaluation's.
    start_step: int  # The checkpoint step this call resumed from; 0 when it started fresh.
    steps_run: int  # Train steps this call ran (num_steps - start_step when it finished).


def is_time(step: int, every: int, last_step: int) -> bool:
    """Whether a cadence of `every` steps (0: never) falls on `step`; the last step always counts."""
    return step == last_step or (every > 0 and step % every == 0)


@dataclasses.dataclass(frozen=True)
class _Run:
    """What the step loop needs besides the train state, fixed for the whole call."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    steps: step_lib.Steps
    frozen: step_lib.Frozen
    data: loader.TrainIterator
    validation: dict[str, list[loader.Batch]]
    checkpointer: checkpoint.Checkpointer
    writer: metrics_lib.MetricsWriter

    def evaluate(self, state: step_lib.TrainState, step: int) -> dict[str, float]:
        perplexity = losses.OBJECTIVES[self.config.train.objective].perplexity
        rules = self.config.logical_axis_rules
        result = evaluation.evaluate_all(self.steps, state, self.frozen, self.validation, self.mesh, rules, perplexity)
        self.log(step, result)
        return result

    def log(self, step: int, values: dict[str, Any]) -> None:
        self.writer.write(step, values)
        logging.info("step %d: %s", step, _format(values))


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
    """Trains (or resumes training) to `config.train.num_steps`."""
    config = start_lib.checked_config(config)
    mesh = sharding.create_mesh(config.mesh_shape)
    rules = config.logical_axis_rules
    config_validation.check_batch_divides_mesh(config, sharding.data_parallel_size(mesh, rules))
    sharding.check_rows_split_by_process(mesh, rules, config.train.batch_size)
    data, validation = inputs.train_iterator(config), inputs.validation_sets(config)
    checkpointer = checkpoint.Checkpointer(
        os.path.join(os.path.abspath(workdir), "checkpoints"), config.train.keep_checkpoints
    )
    with sharding.use_mesh(mesh, rules):
        teacher = teacher_lib.load_teacher(config, mesh) if losses.OBJECTIVES[config.train.objective].teacher else None
        steps = step_lib.build_steps(config, mesh, teacher)
        start, state, frozen = start_lib.restore_or_init(config, steps, checkpointer, data, teacher)
        start_lib.write_run_files(config, workdir)
        trackers = tracking.open_trackers(config, workdir)
        # The writer closes last, so MLflow gets the emissions.json of this session as an artifact.
        with metrics_lib.MetricsWriter(workdir, start, trackers) as writer, emissions.track(config, workdir):
            run = _Run(config, mesh, steps, frozen, data, validation, checkpointer, writer)
            try:
                if start == 0 and config.init_from and validation:
                    run.evaluate(state, 0)  # Fine-tuning logs its starting point: the "before" of before/after.
                last, steps_run = _train_steps(run, state, start)
            finally:
                checkpointer.wait()
                checkpointer.close()
    logging.info("Trained %d steps, from step %d to step %d.", steps_run, start, start + steps_run)
    return TrainResult(last, start, steps_run)


def _train_steps(run: _Run, state: step_lib.TrainState, start: int) -> tuple[dict[str, Any], int]:
    """Steps from `start` to the end, logging, evaluating and saving on their cadences; returns the last
    logged metrics and the number of steps run."""
    cfg, rules = run.config.train, run.config.logical_axis_rules
    config_dict = directory.config_dict(run.config)
    throughput = metrics_lib.Throughput(run.config)
    last, steps_run = {}, 0
    for step in range(start, cfg.num_steps):
        state, step_metrics = run.steps.train(state, run.frozen, sharding.global_batch(next(run.data), run.mesh, rules))
        done, steps_run = step + 1, steps_run + 1
        throughput.step()
        if steps_run == 1:
            # The first step includes compilation: time throughput from the end of it.
            jax.block_until_ready(step_metrics)
            throughput.restart()
        log, save = is_time(done, cfg.log_every, cfg.num_steps), is_time(done, cfg.checkpoint_every, cfg.num_steps)
        if log or save:
            values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
            _check_finite(values, done, run.checkpointer)
        if log:
            last = {**values, **throughput.rates()}
            if losses.OBJECTIVES[cfg.objective].perplexity:
                last["perplexity"] = math.exp(min(values["loss"], 50.0))
            run.log(done, last)
            throughput.restart()
        if run.validation and is_time(done, cfg.eval_every, cfg.num_steps):
            last.update(run.evaluate(state, done))
            throughput.restart()
        if save:
            run.checkpointer.save(done, state, run.data.get_state(), config_dict)
    return last, steps_run


def _check_finite(values: dict[str, float], step: int, checkpointer: checkpoint.Checkpointer) -> None:
    if all(math.isfinite(values[k]) for k in ("loss", "grad_norm", "param_norm")):
        return
    checkpointer.wait()
    raise NonFiniteLossError(
        f"Non-finite training values at step {step}: loss={values['loss']}, grad_norm={values['grad_norm']}, "
        f"param_norm={values['param_norm']}. "
        f"Stopped without saving; the last good checkpoint is step {checkpointer.latest_step()} in "
        f"{checkpointer.directory}. Lower config.optimizer.learning_rate, enable grad clipping or a z-loss, "
        "then re-run to resume from it."
    )


def _format(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
