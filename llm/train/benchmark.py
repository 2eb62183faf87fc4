"""Training throughput: tokens/s, step time, model TFLOP/s, MFU, memory, compile time, and with data the
validation loss reached.

Synthetic rows (random tokens, one document per row) exercise exactly the production train step, so the
figures need no prepared data and are comparable across machines. With `config.data.path` set, the steps train
on that data instead (every batch read before the clock starts) and the result adds the validation loss after
them (`train.eval_batches` batches): the way to compare models for quality at equal steps, e.g. a mixture of
experts against the dense model of the same active parameters (configs/moe_tiny_es.py vs tiny_es.py). Report
the figures with the machine they came from (the result carries device kind, count and JAX version).
"""

from __future__ import annotations

import resource
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from llm import config_validation, sharding
from llm.model.transformer import count_params, create_model
from llm.train import (
    evaluation as evaluation_lib,
    inputs,
    metrics as metrics_lib,
    step as step_lib,
)


def machine() -> dict[str, Any]:
    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "jax_version": jax.__version__,
    }


def _synthetic_batch(config: ml_collections.ConfigDict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (config.train.batch_size, config.data.seq_len)
    return {
        "tokens": rng.integers(0, config.model.vocab_size, shape, dtype=np.int32),
        "segment_ids": np.ones(shape, np.int32),
        "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy(),
        "loss_mask": np.ones(shape, np.int32),
    }


def _local_batches(config: ml_collections.ConfigDict, count: int) -> list[dict[str, np.ndarray]]:
    """`count` batches of the training data when config.data.path is set; else two synthetic ones, alternated."""
    if not config.data.path:
        return [_synthetic_batch(config, i) for i in range(2)]
    inputs.check_data_path(config)
    data = inputs.train_iterator(config)
    return [next(data) for _ in range(count)]


def peak_memory() -> dict[str, float | None]:
    """Peak accelerator memory per device (from the runtime) and the host process's peak RSS, in GiB."""
    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    device_peaks = [s.get("peak_bytes_in_use") for s in stats if s.get("peak_bytes_in_use") is not None]
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "peak_device_memory_gib": max(device_peaks) / 2**30 if device_peaks else None,
        "host_peak_rss_gib": rss_kib / 2**20,
    }


def benchmark_train(config: ml_collections.ConfigDict, num_steps: int = 10, warmup_steps: int = 2) -> dict[str, Any]:
    """Times `num_steps` train steps after `warmup_steps` (the first of which compiles)."""
    config_validation.validate(config)
    mesh = sharding.create_mesh(config.mesh_shape)
    rules = config.logical_axis_rules
    config_validation.check_batch_divides_mesh(config, sharding.data_parallel_size(mesh, rules))
    with sharding.use_mesh(mesh, rules):
        steps = step_lib.build_steps(config, mesh)
        batches = [sharding.global_batch(b, mesh, rules) for b in _local_batches(config, warmup_steps + num_steps)]
        state, frozen = steps.init(None)
        start = time.perf_counter()
        state, step_metrics = steps.train(state, frozen, batches[0])
        jax.block_until_ready(step_metrics)
        compile_seconds = time.perf_counter() - start
        for i in range(1, warmup_steps):
            state, step_metrics = steps.train(state, frozen, batches[i % len(batches)])
        jax.block_until_ready(step_metrics)
        start = time.perf_counter()
        for i in range(warmup_steps, warmup_steps + num_steps):
            state, step_metrics = steps.train(state, frozen, batches[i % len(batches)])
        jax.block_until_ready(step_metrics)
        elapsed = time.perf_counter() - start
        validation = inputs.validation_sets(config) if config.data.path else {}
        evaluation = evaluation_lib.evaluate_all(steps, state, frozen, validation, mesh, rules, perplexity=True)

    tokens_per_step = config.train.batch_size * config.data.seq_len
    tokens_per_sec = tokens_per_step * num_steps / elapsed
    flops_per_token = metrics_lib.train_flops_per_token(config.model, config.data.seq_len)
    peak = metrics_lib.peak_flops_per_device(config.train.peak_tflops_per_device)
    with sharding.no_eager_sharding():
        parameters = count_params(jax.eval_shape(lambda: create_model(config)))
    return {
        "benchmark": "train",
        **machine(),
        "parameters": parameters,
        # Those a token's forward pass multiplies by (an MoE layer's router and chosen experts only): MFU's basis.
        "active_matmul_parameters": metrics_lib.matmul_params(config.model),
        "num_experts": config.model.num_experts,
        "experts_per_token": config.model.experts_per_token if config.model.num_experts else None,
        "data": config.data.path or "synthetic",
        "train_steps": warmup_steps + num_steps,
        "batch_size": config.train.batch_size,
        "seq_len": config.data.seq_len,
        "dtype": config.model.dtype,
        "tokens_per_sec": tokens_per_sec,
        "step_time_s": elapsed / num_steps,
        "model_tflops_per_sec_per_device": tokens_per_sec * flops_per_token / jax.device_count() / 1e12,
        "mfu": metrics_lib.mfu(tokens_per_sec, flops_per_token, peak),
        "compile_time_s": compile_seconds,
        **peak_memory(),
        "final_loss": float(step_metrics["loss"]),
        "eval_loss": evaluation.get("eval_loss"),
    }
