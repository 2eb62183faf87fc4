"""Dry-runs a grid of variants of a config and tabulates which fit a device kind's memory (llm/train/fit_sweep.py).

    python scripts/fit_sweep.py --config=configs/gpt2_small_es.py --device_kind="TPU v5p" --dry_run_devices=64 \
        --grid='mesh_shape=(1,-1,1),(1,-1,2);model.remat_policy=none,full;train.batch_size=8,16;train.loss_chunk_size=0,512'

The grid is `;`-separated axes `KEY=VALUE,VALUE,...` over dotted config keys, every combination one point; commas
inside parentheses belong to the value. Each point is compiled on the simulated devices (nothing is allocated)
and gets a row: memory per device, fits (yes/NO), estimated step time and tokens/s, or the error its config raised.
"""

import dry_run_flags
from absl import app, flags
from ml_collections import config_flags

from llm.train import fit_sweep

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny_es.py", "Training config (a configs/*.py file).")
_GRID = flags.DEFINE_string("grid", None, "KEY=VALUE,...;KEY=VALUE,... (see the docstring).", required=True)
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the rows to this JSON file.")
flags.adopt_module_key_flags(dry_run_flags)  # --dry_run_devices, --dry_run_device_kind.
flags.DEFINE_alias("device_kind", "dry_run_device_kind")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not dry_run_flags.DEVICE_KIND.value:
        raise app.UsageError("fit_sweep.py needs --device_kind (the memory to fit), e.g. --device_kind='TPU v5p'.")
    try:
        grid = fit_sweep.parse_grid(_GRID.value)
    except ValueError as error:
        raise app.UsageError(f"--grid: {error}") from None
    kind = dry_run_flags.start_devices()
    rows = fit_sweep.sweep(_CONFIG.value, grid, kind)
    print(fit_sweep.format_sweep(rows, kind))
    if _JSON_OUT.value:
        from llm import io

        io.write_json(_JSON_OUT.value, rows)


if __name__ == "__main__":
    app.run(main)
