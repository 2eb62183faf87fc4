"""Pretrains a decoder-only transformer on packed Spanish token shards; re-run with the same workdir to resume.

    python scripts/train.py --config=configs/tiny_es.py --workdir=runs/tiny \
        --config.data.path=data/es_default [--config.train.num_steps=N ...]

Will it fit? `--dry_run` compiles the train step for the configured mesh on simulated CPU devices, without
parameters, prints the memory, FLOPs and collectives per device and an estimated step time, and trains nothing;
it needs no data and no --workdir, and writes only WORKDIR/dry_run.json when --workdir is given:

    python scripts/train.py --config=configs/gpt2_small_es.py --dry_run --dry_run_devices=256 \
        --dry_run_device_kind="TPU v5p"
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
    if _DISTRIBUTED.value:
        sharding.initialize_distributed()
    checkpoint.quiet_orbax_logs()
    logging.info("Config:\n%s", config)
    loop.train(config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
