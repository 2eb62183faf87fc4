"""Pretrains a decoder-only transformer on packed Spanish token shards; re-run with the same workdir to resume.

    python scripts/train.py --config=configs/tiny_es.py --workdir=runs/tiny \
        --config.data.path=data/es_default [--config.train.num_steps=N ...]
"""

from absl import app, flags, logging
from ml_collections import config_flags

from llm import checkpoint, config_validation, sharding
from llm.train import inputs, loop

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny_es.py", "Training config (a configs/*.py file).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, TensorBoard.", required=True)
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "With --distributed: HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --distributed: how many processes the run has.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --distributed: this process's id, 0 to num_processes-1.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
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
