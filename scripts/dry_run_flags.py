"""The dry-run flags that scripts/train.py (--dry_run), scripts/benchmark.py (dry_run) and scripts/fit_sweep.py
share (llm/train/dry_run.py), checked before JAX starts."""

from __future__ import annotations

import ml_collections
from absl import app, flags

from llm import devices, io
from llm.train import dry_run

DEVICES = flags.DEFINE_integer(
    "dry_run_devices", 8, "Simulated CPU devices standing in for the mesh of the dry run.", lower_bound=1
)
DEVICE_KIND = flags.DEFINE_string(
    "dry_run_device_kind",
    None,
    f"Device kind to check the fit on and estimate the step time for: one of {', '.join(devices.DEVICE_SPECS)}.",
)


def start_devices() -> str | None:
    """Checks --dry_run_device_kind, then starts JAX on --dry_run_devices simulated CPU devices; returns the kind.

    Call it before any JAX operation (the device count is fixed when JAX's backend starts).
    """
    kind = DEVICE_KIND.value
    if kind is not None:
        try:
            devices.spec_by_name(kind)
        except ValueError as error:
            raise app.UsageError(f"--dry_run_device_kind: {error}") from None
    dry_run.use_simulated_devices(DEVICES.value)
    return kind


def run(config: ml_collections.ConfigDict, json_path: str | None = None) -> dict:
    """Dry-runs `config` as the flags say, prints the report and writes it to `json_path` when given."""
    report = dry_run.dry_run(config, start_devices())
    print(dry_run.format_report(report))
    if json_path:
        io.write_json(json_path, report)
    return report
