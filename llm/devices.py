"""Device facts from the vendors' data sheets, in one table: what MFU and the decode bandwidth bound divide by.

Peak FLOP/s are dense bfloat16, the figure MFU is customarily reported against whatever the compute dtype
(PaLM, MaxText), so float32 runs show a low MFU. Bandwidth is peak HBM bytes/s.
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    peak_flops: float  # Dense bfloat16 FLOP/s.
    hbm_bytes_per_s: float


# Matched as a case-insensitive substring of jax.Device.device_kind, in this order.
DEVICE_SPECS = {
    "H200": DeviceSpec(989e12, 4.8e12),
    "H100": DeviceSpec(989e12, 3.35e12),
    "A100": DeviceSpec(312e12, 2.0e12),
    "L4": DeviceSpec(121e12, 0.3e12),
    "TPU v6": DeviceSpec(918e12, 1.64e12),
    "TPU v5p": DeviceSpec(459e12, 2.76e12),
    "TPU v5 lite": DeviceSpec(197e12, 0.82e12),
    "TPU v5e": DeviceSpec(197e12, 0.82e12),
    "TPU v4": DeviceSpec(275e12, 1.2e12),
}


def device_spec(device: jax.Device | None = None) -> DeviceSpec | None:
    """The data-sheet figures of `device` (default: the first device); None for an unknown kind (e.g. CPU)."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    return next((spec for name, spec in DEVICE_SPECS.items() if name.lower() in kind), None)
