"""The pretraining loop: resume or init, step, log, evaluate, checkpoint, stop on NaN.

    python scripts/train.py --config=configs/tiny_es.py --workdir=DIR --config.data.path=DATA

writes DIR/config.json, DIR/metrics.jsonl, DIR/tensorboard/ and DIR/checkpoints/. Running it again with
the same DIR resumes from the latest checkpoint and ends exactly where an uninterrupted run would: same
parameters, same data order, same dropout masks, same metrics.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import jax
import ml_collections

from llm import checkpoint, config_validation, sharding
from llm.data import loader
from llm.runs import directory
from llm.train import metrics as metrics_lib, optimizer as optimizer_lib, step as step_lib


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss or gradient; the last good checkpoint is kept."""


def check_data_path(config: ml_collections.ConfigDict) -> None:
    """Fails before any compilation when the data directory or one of its splits is missing."""
    path = config.data.path
    if not path:
        raise config_validation.ConfigError(
            "config.data.path is empty: pass --config.data.path=DIR, a directory made by scripts/prepare_data.py "
            "with train/ and validation/ shards."
        )
    sources = {"data.path": path}
    if config.data.replay_fraction > 0:
        sources["data.replay_path"] = config.data.replay_path
    for key, data_dir in sources.items():
        for split in ("train", "validation") if config.train.eval_every else ("train",):
            records_dir = loader.split_dir(data_dir, split)
            if not os.path.isdir(records_dir):
                raise FileNotFoundError(
                    f"config.{key}={data_dir!r} has no {split}/ directory ({records_dir!r} "
                    "is missing); prepare it with scripts/prepare_data.py."
                )


def check_init_from(config: ml_collections.ConfigDict) -> None:
    """`init_from` must be a run whose model is this one's (adapters aside); fails before any compilation."""
    if not config.init_from:
        return
    try:
        source = directory.load_config(config.init_from)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"config.init_from={config.init_from!r}: {error}") from None
    if source.train.trainable != "all":
        raise config_validation.ConfigError(
            f"config.init_from={config.init_from!r} is a {source.train.trainable} run whose checkpoints hold only "
            "what it trained; start from a full run (a LoRA run can be merged first: scripts/merge_lora.py)."
        )
    for key, value in source.model.items():
        adapter = key.startswith("lora_") or key == "soft_prompt_length"
        if (
            not adapter
            and key in config.model
            and config.model[key] != value
            and key not in ("dropout_rate", "remat_policy", "scan_layers", "attention_impl", "dtype")
        ):
            raise config_validation.ConfigError(
                f"config.model.{key}={config.model[key]!r} differs from the run in config.init_from "
                f"({value!r}); fine-tuning keeps the pretrained architecture."
            )


def load_base_params(config: ml_collections.ConfigDict, abstract_base: Any) -> Any:
    """The parameters of `init_from`'s latest checkpoint, placed as `abstract_base` says; None without it."""
    if not config.init_from:
        return None
    params, step = checkpoint.restore_run_params(config.init_from, abstract_base)
    logging.info("Initialized from step %d of %s.", step, config.init_from)
    return params


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (or resumes training) to `config.train.num_steps`; returns the last logged metrics."""
    config_validation.validate(config)
    check_data_path(config)
    check_init_from(config)
    mesh = sharding.create_mesh(config.mesh_shape)
    rules = config.logical_axis_rules
    config_validation.check_batch_divides_mesh(config, sharding.data_parallel_size(mesh, rules))

    if not config.chat and directory.chat_tuned(config):
        config = ml_collections.ConfigDict(config.to_dict())
        config.chat = True  # Recorded in config.json, so every tool prompts the run through the chat template.
    config_dict = directory.config_dict(config)
    if jax.process_index() == 0:
        # A run directory is self-contained: inference and evaluation find the tokenizer next to the weights.
        directory.write_run_files(workdir, config, _tokenizer_source(config))

    train_cfg = config.train
    num_steps = train_cfg.num_steps
    schedule = optimizer_lib.learning_rate_schedule(config.optimizer, num_steps)
    optimizer = optimizer_lib.make_optimizer(config.optimizer, num_steps)
    local_batch = train_cfg.batch_size // jax.process_count()
    pairs = train_cfg.objective == "dpo"
    replay = config.data.replay_path if config.data.replay_fraction > 0 else ""
    data = loader.TrainIterator(
        loader.split_dir(config.data.path, "train"),
        config.data.seq_len,
        local_batch,
        config.seed,
        config.data.num_workers,
        config.data.prefetch_buffer_size,
        jax.process_index(),
        jax.process_count(),
        pairs,
        replay and loader.split_dir(replay, "train"),
        config.data.replay_fraction,
    )
    # Validation sets by metric prefix: the run's own, and with replay the earlier corpus's ("replay_eval_"),
    # which shows how much of the old distribution continued pretraining forgets.
    validation = {}
    if train_cfg.eval_every:
        for prefix, path in (("", config.data.path), ("replay_", replay)):
            if path:
                validation[prefix] = loader.validation_batches(
                    loader.split_dir(path, "validation"),
                    config.data.seq_len,
                    local_batch,
                    train_cfg.eval_batches,
                    jax.process_index(),
                    jax.process_count(),
                    pairs,
                )
    checkpointer = checkpoint.Checkpointer(
        os.path.join(os.path.abspath(workdir), "checkpoints"), train_cfg.keep_checkpoints
    )

    with sharding.use_mesh(mesh, rules):
        steps = step_lib.build_steps(config, mesh, optimizer, schedule)
        # Frozen parameters (the pretrained base, the DPO reference) are rebuilt, never checkpointed.
        base = load_base_params(config, steps.abstract_base)
        start = checkpointer.latest_step()
        if start is None:
            start, (state, frozen) = 0, steps.init(base)
        else:
            _check_same_model(checkpointer.restore_config(start), config_dict)
            frozen = steps.init_frozen(base)
            state, data_state, _ = checkpointer.restore(start, steps.abstract_state)
            data.set_state(data_state)
            logging.info("Resumed from step %d in %s.", start, checkpointer.directory)
        writer = metrics_lib.MetricsWriter(workdir, resume_step=start)
        if start == 0 and config.init_from and validation:
            # Fine-tuning and continued pretraining log the starting point: the "before" of before/after.
            initial = evaluate_all(steps, state, frozen, validation, mesh, rules)
            writer.write(0, initial)
            logging.info("step 0: %s", _format(initial))
        flops_per_token = metrics_lib.train_flops_per_token(config.model, config.data.seq_len)
        peak = metrics_lib.peak_flops_per_device(train_cfg.peak_tflops_per_device)
        tokens_per_step = train_cfg.batch_size * config.data.seq_len

        last = {}
        interval_start, interval_steps = time.perf_counter(), 0
        try:
            for step in range(start, num_steps):
                batch = sharding.global_batch(next(data), mesh, rules)
                state, step_metrics = steps.train(state, frozen, batch)
                done = step + 1
                interval_steps += 1
                if done == start + 1:
                    # The first step includes compilation: time throughput from the end of it.
                    jax.block_until_ready(step_metrics)
                    interval_start, interval_steps = time.perf_counter(), 0
                is_last = done == num_steps
                if done % train_cfg.log_every == 0 or is_last or done % train_cfg.checkpoint_every == 0:
                    values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                    _check_finite(values, done, checkpointer)
                if done % train_cfg.log_every == 0 or is_last:
                    elapsed = time.perf_counter() - interval_start
                    tokens_per_sec = tokens_per_step * interval_steps / elapsed if interval_steps else None
                    last = {
                        **values,
                        "tokens_per_sec": tokens_per_sec,
                        "mfu": metrics_lib.mfu(tokens_per_sec, flops_per_token, peak) if tokens_per_sec else None,
                    }
                    if config.train.objective == "lm":
                        last["perplexity"] = math.exp(min(values["loss"], 50.0))
                    writer.write(done, last)
                    logging.info("step %d: %s", done, _format(last))
                    interval_start, interval_steps = time.perf_counter(), 0
                if validation and (done % train_cfg.eval_every == 0 or is_last):
                    evaluation = evaluate_all(steps, state, frozen, validation, mesh, rules)
                    writer.write(done, evaluation)
                    logging.info("step %d: %s", done, _format(evaluation))
                    last.update(evaluation)
                    interval_start, interval_steps = time.perf_counter(), 0
                if done % train_cfg.checkpoint_every == 0 or is_last:
                    checkpointer.save(done, state, data.get_state(), config_dict)
        finally:
            checkpointer.wait()
            checkpointer.close()
            writer.close()
    return last


def evaluate(
    steps: step_lib.Steps,
    state: step_lib.TrainState,
    frozen: step_lib.Frozen,
    batches: list[loader.Batch],
    mesh: Any,
    rules: Any,
) -> dict[str, float]:
    """Every training metric averaged over the validation batches, as eval_<name> (plus eval_perplexity)."""
    sums: dict[str, float] = {}
    weight = 0.0
    for batch in batches:
        result = jax.device_get(steps.eval(state, frozen, sharding.global_batch(batch, mesh, rules)))
        for name, value in result["sums"].items():
            sums[name] = sums.get(name, 0.0) + float(value)
        weight += float(result["weight"])
    evaluation = {f"eval_{name}": value / max(weight, 1.0) for name, value in sums.items()}
    if "loss" in sums and "reward_accuracy" not in sums:
        evaluation["eval_perplexity"] = math.exp(min(evaluation["eval_loss"], 50.0))
    return evaluation


def evaluate_all(
    steps: step_lib.Steps,
    state: step_lib.TrainState,
    frozen: step_lib.Frozen,
    validation: dict[str, list[loader.Batch]],
    mesh: Any,
    rules: Any,
) -> dict[str, float]:
    return {
        prefix + name: value
        for prefix, batches in validation.items()
        for name, value in evaluate(steps, state, frozen, batches, mesh, rules).items()
    }


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


def _check_same_model(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Resuming with another architecture or seed would not be the same run: refuse, naming the key."""
    for section in ("model", "seed"):
        if saved.get(section) != current.get(section):
            diff = section
            if isinstance(current.get(section), dict):
                diff = next(f"model.{k}" for k in current[section] if saved[section].get(k) != current[section][k])
            raise config_validation.ConfigError(
                f"The workdir holds a checkpoint of a different run: config.{diff} differs from the saved "
                "config. Use a new --workdir, or restore the saved value."
            )


def _tokenizer_source(config: ml_collections.ConfigDict) -> str | None:
    """The tokenizer of the training data, else that of the `init_from` run; None if neither has one."""
    for source_dir in (config.data.path, config.init_from):
        path = os.path.join(source_dir, directory.TOKENIZER_FILE)
        if source_dir and os.path.exists(path):
            return path
    return None


def _format(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
