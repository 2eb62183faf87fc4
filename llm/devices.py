"""Device facts from the vendors' data sheets, in one table: what MFU, the decode bandwidth bound and the dry run's
fit check and step-time estimate (llm/train/dry_run.py) divide by.

Peak FLOP/s are dense bfloat16, the figure MFU is customarily reported against whatever the compute dtype
(PaLM, MaxText), so float32 runs show a low MFU. Bandwidth is peak HBM bytes/s; capacity is HBM bytes per device
(chip). Interconnect bandwidth is the data sheet's bidirectional figure per device: ICI for TPUs (the Cloud TPU
system-architecture pages), NVLink for NVIDIA GPUs (the product data sheets; SXM parts), PCIe for a GPU without
NVLink.
"""

from __future__ import annotations

import dataclasses

import jax

GB, GIB = 1e9, 2**30


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    peak_flops: float  # Dense bfloat16 FLOP/s.
    hbm_bytes_per_s: float
    hbm_bytes: float  # Memory capacity of one device.
    interconnect_bytes_per_s: float  # Bidirectional, per device (what it sends plus what it receives at once).


# Matched as a case-insensitive substring of jax.Device.device_kind, in this order.
DEVICE_SPECS = {
    "H200": DeviceSpec(989e12, 4.8e12, 141 * GB, 900 * GB),  # H200 SXM: 141 GB HBM3e, NVLink 900 GB/s.
    "H100": DeviceSpec(989e12, 3.35e12, 80 * GB, 900 * GB),  # H100 SXM: 80 GB HBM3, NVLink 900 GB/s.
    "A100": DeviceSpec(312e12, 2.0e12, 80 * GB, 600 * GB),  # A100 SXM 80GB, NVLink 600 GB/s (40GB part: half).
    "L4": DeviceSpec(121e12, 0.3e12, 24 * GB, 64 * GB),  # 24 GB GDDR6; no NVLink: PCIe Gen4 x16, 64 GB/s.
    "TPU v6": DeviceSpec(918e12, 1.64e12, 32 * GB, 800 * GB),  # v6e (Trillium): 32 GB, ICI 800 GB/s.
    "TPU v5p": DeviceSpec(459e12, 2.76e12, 95 * GIB, 1200 * GB),  # 95 GiB HBM2e, ICI 1200 GB/s (4800 Gbps a way).
    "TPU v5 lite": DeviceSpec(197e12, 0.82e12, 16 * GB, 400 * GB),  # v5e's device_kind: 16 GB, ICI 400 GB/s.
    "TPU v5e": DeviceSpec(197e12, 0.82e12, 16 * GB, 400 * GB),
    "TPU v4": DeviceSpec(275e12, 1.2e12, 32 * GIB, 300 * GB),  # 32 GiB HBM2; ICI: 6 links of 50 GB/s (v4 paper).
}


def device_spec(device: jax.Device | None = None) -> DeviceSpec | None:
    """The data-sheet figures of `device` (default: the first device); None for an unknown kind (e.g. CPU)."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    return next((spec for name, spec in DEVICE_SPECS.items() if name.lower() in kind), None)


def spec_by_name(name: str) -> DeviceSpec:
    """The figures of a device kind named by the user, matched as `device_spec` matches jax's device_kind (so
    "TPU v6e", "H100" and "NVIDIA H100 80GB HBM3" all work); ValueError listing the known kinds otherwise."""
    spec = next((spec for kind, spec in DEVICE_SPECS.items() if kind.lower() in name.lower()), None)
    if spec is None:
        raise ValueError(f"Unknown device kind {name!r}; known kinds: {', '.join(DEVICE_SPECS)}.")
    return spec
