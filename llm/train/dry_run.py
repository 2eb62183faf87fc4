"""Will it fit? Compiles the train step for the configured mesh from abstract shapes and reports, per device,
the memory, FLOPs, collectives and an estimated step time on a named device kind; nothing is allocated.

    python scripts/train.py --config=configs/gpt2_small_es.py --dry_run --dry_run_devices=256 \
        --dry_run_device_kind="TPU v5p"

The state, frozen parameters and batch are `jax.ShapeDtypeStruct`s carrying the shardings the rules table gives
them (the same `build_steps` a run uses), so XLA partitions the step exactly as for the real mesh; simulated CPU
devices stand in for the accelerators (`use_simulated_devices`, before JAX starts its backend).

Where the figures come from (all per device):
  * memory: XLA's buffer assignment of the compiled step (`compiled.memory_analysis()`): arguments (parameters,
    optimizer state, batch), outputs, the outputs aliased to donated arguments (the new state overwrites the
    old), and temporaries (activations kept for the backward pass, gradients, workspace). The peak is
    arguments + outputs - aliased + temporaries. Parameters and optimizer state are split out of the arguments
    from their shardings (each leaf's shard shape times its item size).
  * FLOPs, bytes accessed and collectives: the optimized HLO, with loop bodies counted as often as they run
    (llm/train/hlo_stats.py); XLA's own cost analysis, which counts a loop body once, is reported beside them.
  * step time, an estimate from the device table (llm/devices.py), a roofline with serialized communication:
        max(matmul FLOPs / peak FLOP/s, bytes accessed / HBM bandwidth) + bytes sent / (interconnect / 2)
    (a device sends at half its bidirectional bandwidth while it receives at the other half). It assumes no
    overlap of communication with compute and full peak otherwise, and the HLO is the CPU compiler's (its
    fusion and layout choices differ from a TPU's or GPU's), so it is a first-order estimate, not a promise.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from llm import config_validation, devices, sharding
from llm.train import hlo_stats, losses, metrics, step as step_lib

ESTIMATE_NOTE = (
    "estimate: roofline max(compute, HBM) + serialized collectives at data-sheet peaks, from the CPU compiler's HLO"
)


def use_simulated_devices(num_devices: int) -> None:
    """Makes JAX run on `num_devices` simulated CPU devices; call it before anything starts JAX's backend."""
    if num_devices <= 0:
        raise ValueError(f"The number of simulated devices must be positive, got {num_devices}.")
    # JAX itself refuses both updates, with a clear message, once its backend has started.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", num_devices)


def compile_train_step(config: ml_collections.ConfigDict) -> tuple[Any, Any, Any]:
    """(compiled train step, abstract train state, abstract frozen parameters) of `config` on all devices."""
    config_validation.validate(config)
    if losses.OBJECTIVES[config.train.objective].teacher:
        raise config_validation.ConfigError(
            "config.train.objective='distill' needs its teacher loaded; the dry run compiles without parameters."
        )
    mesh = sharding.create_mesh(config.mesh_shape)
    rules = config.logical_axis_rules
    config_validation.check_batch_divides_mesh(config, sharding.data_parallel_size(mesh, rules))
    with sharding.use_mesh(mesh, rules):
        steps = step_lib.build_steps(config, mesh)
        # The jitted init's output shardings come with its shapes: the frozen part's as well as the state's.
        state, frozen = jax.eval_shape(steps.init, None)
        rows = sharding.logical_sharding(mesh, rules, ("batch", "length"))
        shape = (config.train.batch_size, config.data.seq_len)
        batch = {name: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rows) for name in step_lib.batch_fields(config)}
        return steps.train.lower(state, frozen, batch).compile(), state, frozen


def sharded_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs with shardings (the largest shard of each leaf)."""
    return sum(
        math.prod(leaf.sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
        for leaf in jax.tree.leaves(tree)
    )


def dry_run(config: ml_collections.ConfigDict, device_kind: str | None = None) -> dict[str, Any]:
    """The dry-run report of `config` on the current devices (see the module docstring); with `device_kind` (a key of
    llm/devices.py's DEVICE_SPECS) also whether it fits that device's memory and the estimated step time."""
    spec = devices.spec_by_name(device_kind) if device_kind else None  # An unknown kind fails before compiling.
    compiled, state, frozen = compile_train_step(config)
    stats = hlo_stats.analyze(compiled.as_text(), jax.device_count())
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # Older JAX returns one dict per program.
    tokens = config.train.batch_size * config.data.seq_len
    report = {
        "devices": jax.device_count(),
        "mesh_shape": list(sharding.resolve_mesh_shape(config.mesh_shape, jax.device_count())),
        "batch_size": config.train.batch_size,
        "seq_len": config.data.seq_len,
        "tokens_per_step": tokens,
        "memory_per_device": {
            "parameters": sharded_bytes((state["params"], frozen)),
            "optimizer_state": sharded_bytes(state["opt_state"]),
            "arguments": memory.argument_size_in_bytes,
            "outputs": memory.output_size_in_bytes,
            "aliased": memory.alias_size_in_bytes,
            "activations_and_temporaries": memory.temp_size_in_bytes,
            "total": peak_bytes(memory),
        },
        "flops_per_device": stats.matmul_flops,
        "xla_cost_analysis_flops": cost.get("flops"),  # Counts each loop body once.
        "model_flops_per_step": metrics.train_flops_per_token(config.model, config.data.seq_len) * tokens,
        "bytes_accessed_per_device": stats.bytes_accessed,
        "collectives": {kind: dataclasses.asdict(c) for kind, c in stats.collectives.items()},
        "loops_of_unknown_trip_count": stats.unknown_trip_counts,
    }
    report["estimate"] = estimate(report, device_kind, spec) if spec else None
    return report


def peak_bytes(memory: Any) -> int:
    """Peak device memory of a compiled step from its memory analysis: what it takes in, gives out (less what
    overwrites donated inputs) and needs meanwhile."""
    return (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )


def estimate(report: dict[str, Any], device_kind: str, spec: devices.DeviceSpec) -> dict[str, Any]:
    """Fit and step time of a dry-run `report` on devices of `spec` (the model in the module docstring)."""
    compute_s = report["flops_per_device"] / spec.peak_flops
    memory_s = report["bytes_accessed_per_device"] / spec.hbm_bytes_per_s
    sent = sum(c["sent_bytes"] for c in report["collectives"].values())
    collective_s = sent / (spec.interconnect_bytes_per_s / 2)
    step_s = max(compute_s, memory_s) + collective_s
    total = report["memory_per_device"]["total"]
    return {
        "device_kind": device_kind,
        "hbm_bytes": spec.hbm_bytes,
        "fits": total <= spec.hbm_bytes,
        "memory_used_fraction": total / spec.hbm_bytes,
        "compute_s": compute_s,
        "memory_s": memory_s,
        "collective_s": collective_s,
        "step_time_s": step_s,
        "tokens_per_s": report["tokens_per_step"] / step_s,
        "mfu": report["model_flops_per_step"] / (step_s * spec.peak_flops * report["devices"]),
        "note": ESTIMATE_NOTE,
    }


def _size(n: float) -> str:
    """Bytes in the largest binary unit that keeps the figure at least 1."""
    exponent = max((e for e in range(4) if n >= 1024**e), default=0)
    return f"{n / 1024**exponent:.3f} {('B', 'KiB', 'MiB', 'GiB')[exponent]}"


def format_report(report: dict[str, Any]) -> str:
    """The report as a readable table."""
    lines = [
        f"dry run: {report['devices']} devices, mesh (data, fsdp, tensor) = {tuple(report['mesh_shape'])}, "
        f"batch {report['batch_size']} x {report['seq_len']} tokens",
        "memory per device:",
    ]
    lines += [f"  {name:<28} {_size(value):>14}" for name, value in report["memory_per_device"].items()]
    lines += [
        f"matmul FLOPs per device       {report['flops_per_device']:.4g} (XLA cost analysis, loops once: "
        f"{report['xla_cost_analysis_flops'] or 0:.4g}; model 6NT+attention, all devices: "
        f"{report['model_flops_per_step']:.4g})",
        f"bytes accessed per device     {report['bytes_accessed_per_device']:.4g}",
        "collectives per device         count      operand      result        sent",
    ]
    for kind, c in report["collectives"].items():
        lines.append(
            f"  {kind:<26} {c['count']:>7} {_size(c['operand_bytes']):>12} {_size(c['result_bytes']):>12} "
            f"{_size(c['sent_bytes']):>12}"
        )
    est = report["estimate"]
    if est is None:
        lines.append("no device kind named (--dry_run_device_kind): no fit check or step-time estimate")
        return "\n".join(lines)
    lines += [
        f"on {est['device_kind']} ({_size(est['hbm_bytes'])} each): fits: {'yes' if est['fits'] else 'no'} "
        f"({est['memory_used_fraction']:.0%} of its memory)",
        f"  step time {est['step_time_s'] * 1e3:.4g} ms = max(compute {est['compute_s'] * 1e3:.4g} ms, "
        f"HBM {est['memory_s'] * 1e3:.4g} ms) + collectives {est['collective_s'] * 1e3:.4g} ms",
        f"  {est['tokens_per_s']:,.0f} tokens/s, MFU {est['mfu']:.1%} ({est['note']})",
    ]
    return "\n".join(lines)
