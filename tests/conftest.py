"""Test-wide setup: 8 fake CPU devices, CPU platform, hypothesis profiles.

The environment variables must be set before jax is imported anywhere, which is why
they live at the top of the conftest (pytest imports it before any test module).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from hypothesis import HealthCheck, settings  # noqa: E402

# No `jax_default_matmul_precision` override: on the CPU backend float32 matmuls already run
# at full float32 precision, and a global override would hide precision bugs from the GPU
# tests that share this conftest.

settings.register_profile(
    "ci", max_examples=40, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=10, deadline=None)
settings.register_profile(
    "thorough", max_examples=500, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
