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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
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
