"""Pretrains a decoder-only transformer on packed Spanish token shards; re-run with the same workdir to resume.

    python scripts/train.py --config=configs/tiny_es.py --workdir=runs/tiny \
        --config.data.path=data/es_default [--config.train.num_steps=N ...]

Will it fit? `--dry_run` compiles the train step for the configured mesh on simulated CPU devices, without
parameters, prints the memory, FLOPs and collectives per device and an estimated step time, and trains nothing;
it needs no data and no --workdir, and writes only WORKDIR/dry_run.json when --workdir is given:

    python scripts/train.py --config=configs/gpt2_small_es.py --dry_run --dry_run_devices=256 \
        --dry_run_device_kind="TPU v5p"

Several processes (hosts): the same command in each with `--distributed`; JAX finds the others on a TPU pod slice or
under SLURM (scripts/launch/), elsewhere name them: `--coordinator_address=HOST:PORT --num_processes=N
--process_id=I` (README "Sharding and multi-host").
"""

import os

import dry_run_flags
from absl import app, flags, logging
from ml_collections import config_flags

from llm import checkpoint, config_validation, sharding
from llm.train import inputs, loop

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny_es.py", "Training config (a configs/*.py file).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, TensorBoard (required).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs).")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Compile the step on --dry_run_devices simulated devices, print what it needs; train nothing."
)
flags.adopt_module_key_flags(dry_run_flags)  # --dry_run_devices, --dry_run_device_kind.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "With --distributed: HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --distributed: how many processes the run has.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --distributed: this process's id, 0 to num_processes-1.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if _DRY_RUN.value:
        workdir = _WORKDIR.value
        dry_run_flags.run(config, os.path.join(workdir, "dry_run.json") if workdir else None)
        return
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required (except with --dry_run).")
    # Validate before touching devices, so a typo costs a second, not a compilation.
    config_validation.validate(config)
    inputs.check_data_path(config)
    _initialize_distributed()
    checkpoint.quiet_orbax_logs()
    logging.info("Config:\n%s", config)
    loop.train(config, _WORKDIR.value)


def _initialize_distributed() -> None:
    """Joins the run's other processes; without the layout flags JAX detects it (TPU pod, SLURM, ...)."""
    layout = {
        "coordinator_address": _COORDINATOR.value,
        "num_processes": _NUM_PROCESSES.value,
        "process_id": _PROCESS_ID.value,
    }
    given = [f"--{name}" for name, value in layout.items() if value is not None]
    if not _DISTRIBUTED.value:
        if given:
            raise app.UsageError(f"{', '.join(given)} only apply to a multi-process run: add --distributed.")
        return
    try:
        sharding.check_distributed_args(**layout)
    except ValueError as error:
        raise app.UsageError(f"--{error}") from None
    sharding.initialize_distributed(**layout)


if __name__ == "__main__":
    app.run(main)
