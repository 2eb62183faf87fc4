"""The compute a run took: wall time, devices, and (with `config.train.track_emissions`) energy and emissions.

RUN/emissions.json holds one session per call of the trainer (a resumed run adds one) and their total:

    {"total": {"duration_s", "energy_kwh", "emissions_kg_co2eq", "measurement", "sessions"},
     "sessions": [{"duration_s", "device_kind", "device_count", "process_count", "energy_kwh", ...}, ...]}

Energy comes from codecarbon's offline tracker (no network: the carbon intensity is its table's figure for
`config.train.emissions_country`), which writes nothing itself: no CSV, no logs below errors. codecarbon reads
hardware energy counters where it can (RAPL, NVIDIA/AMD GPUs, Apple powermetrics) and otherwise estimates power
from the CPU's TDP and load; "measurement" says which ("measured" only when every CPU and GPU was read from
counters; RAM is always estimated from its size). Only process 0 measures, so a multi-host run's figures cover
its first host (process_count says how many there were). A session killed with SIGKILL is not recorded.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections

from llm import config_validation, io

EMISSIONS_FILE = "emissions.json"
# codecarbon's CPU modes that read energy counters; "constant" (TDP) and "cpu_load" (TDP x load) estimate.
MEASURED_CPU_MODES = ("intel_rapl", "intel_power_gadget", "windows_emi")


def check_config(config: ml_collections.ConfigDict) -> None:
    """With `track_emissions`: codecarbon knows `emissions_country`."""
    if not config.train.track_emissions:
        return
    from codecarbon.input import DataSource

    countries = DataSource().get_global_energy_mix_data()
    if config.train.emissions_country not in countries:
        raise config_validation.ConfigError(
            f"config.train.emissions_country={config.train.emissions_country!r} is not an ISO 3166-1 alpha-3 code "
            f"codecarbon has a carbon intensity for (e.g. 'ESP', 'FRA', 'USA')."
        )


@contextlib.contextmanager
def track(config: ml_collections.ConfigDict, workdir: str) -> Iterator[None]:
    """Measures the enclosed training and adds it as a session to RUN/emissions.json, also when it fails."""
    if jax.process_index() != 0:
        yield
        return
    started, start = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), time.perf_counter()
    tracker = _start_codecarbon(config, workdir) if config.train.track_emissions else None
    try:
        yield
    finally:
        session = {
            "started": started,
            "duration_s": time.perf_counter() - start,
            "device_kind": jax.devices()[0].device_kind,
            "device_count": jax.device_count(),
            "process_count": jax.process_count(),
            **(_stop_codecarbon(tracker) if tracker else _unmeasured(config)),
        }
        sessions = [*(read(workdir) or {}).get("sessions", []), session]
        io.write_json(os.path.join(workdir, EMISSIONS_FILE), {"total": _total(sessions), "sessions": sessions})


def _unmeasured(config: ml_collections.ConfigDict) -> dict[str, Any]:
    why = "codecarbon could not start" if config.train.track_emissions else "config.train.track_emissions=False"
    return {"energy_kwh": None, "emissions_kg_co2eq": None, "not_measured": why}


def read(workdir: str) -> dict[str, Any] | None:
    """RUN/emissions.json, or None when training wrote none (a run made before it existed, or imported)."""
    return io.read_json(os.path.join(workdir, EMISSIONS_FILE))


def _start_codecarbon(config: ml_collections.ConfigDict, workdir: str) -> Any:
    """A started tracker, or None when codecarbon cannot start here (odd hardware, a sandbox): the energy is then
    unknown, which is no reason to refuse to train."""
    try:
        return _started_tracker(config, workdir)
    except Exception:  # noqa: BLE001  (any failure of a measuring tool must not stop training)
        logging.exception("codecarbon could not start; this session's energy is not recorded.")
        return None


def _started_tracker(config: ml_collections.ConfigDict, workdir: str) -> Any:
    from codecarbon import OfflineEmissionsTracker

    # Its INFO and WARNING lines (hardware probing, fallbacks) would bury the training log; the file says it all.
    logging.getLogger("codecarbon").setLevel(logging.ERROR)
    tracker = OfflineEmissionsTracker(
        country_iso_code=config.train.emissions_country,
        project_name=os.path.basename(os.path.abspath(workdir)),
        output_dir=workdir,  # Only where codecarbon would write; with no output methods it writes nothing.
        output_methods=[],
        log_level="error",
    )
    tracker.start()
    return tracker


def _stop_codecarbon(tracker: Any) -> dict[str, Any]:
    tracker.stop()
    data = tracker.final_emissions_data
    methods = _methods(tracker)
    measured = all(method.startswith("measured") for name, method in methods.items() if name != "RAM")
    return {
        "energy_kwh": data.energy_consumed,
        "emissions_kg_co2eq": data.emissions,
        "measurement": "measured" if measured else "estimated",
        "methods": methods,
        "country": data.country_iso_code,
        "cpu_model": data.cpu_model,
        "gpu_model": data.gpu_model,
        "codecarbon_tracking_mode": data.tracking_mode,
        "codecarbon_version": data.codecarbon_version,
    }


def _methods(tracker: Any) -> dict[str, str]:
    """How codecarbon got each component's power, by component. It reports no mode of its own, so this reads
    the hardware objects it chose (codecarbon 3.3.2's `_hardware`, and the CPU's `_mode`)."""
    from codecarbon.external.hardware import CPU, GPU, AppleSiliconChip

    methods = {}
    for hardware in tracker._hardware:
        if isinstance(hardware, CPU):
            mode = hardware._mode
            methods["CPU"] = f"{'measured' if mode in MEASURED_CPU_MODES else 'estimated'} ({mode})"
        elif isinstance(hardware, GPU):
            methods["GPU"] = "measured (GPU energy counters)"
        elif isinstance(hardware, AppleSiliconChip):
            methods[hardware.chip_part] = "measured (powermetrics)"
        else:
            methods[type(hardware).__name__] = "estimated"
    return methods


def _total(sessions: list[dict[str, Any]]) -> dict[str, Any]:
    """The sums over sessions; energy over the sessions that measured it ("measurement" None when none did)."""
    tracked = [s for s in sessions if s.get("energy_kwh") is not None]
    measurement = None
    if tracked:
        measurement = "measured" if all(s["measurement"] == "measured" for s in tracked) else "estimated"
    return {
        "duration_s": sum(s["duration_s"] for s in sessions),
        "energy_kwh": sum(s["energy_kwh"] for s in tracked) if tracked else None,
        "emissions_kg_co2eq": sum(s["emissions_kg_co2eq"] for s in tracked) if tracked else None,
        "measurement": measurement,
        "sessions": len(sessions),
        "sessions_with_energy": len(tracked),
    }
