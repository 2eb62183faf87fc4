"""Test set-up: CPU only, 8 simulated devices, a persistent compilation cache shared across runs."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Must happen before any JAX operation creates the backend.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update(
    "jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "jax")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
