"""Test-wide setup: the JAX platform (CPU with 8 fake devices, or the GPU for `-m gpu`),
hypothesis profiles.

The environment variables must be set before jax is imported anywhere: `pytest_configure`
runs before any test module is collected (and imported), in every xdist worker too.

    pytest tests                          # CPU: JAX_PLATFORMS=cpu, 8 fake CPU devices
    pytest -m gpu tests                   # GPU machine: JAX picks the GPU; no preallocation,
    pytest -m gpu -n 4 tests              # so xdist workers can share it
"""

import os

from hypothesis import HealthCheck, settings


def selects_gpu_tests(markexpr: str) -> bool:
    """Whether the `-m` expression `markexpr` selects tests marked only `gpu` (pyproject's
    default `-m 'not gpu'`, or none: no)."""
    if not markexpr.strip():
        return False
    from _pytest.mark.expression import Expression
    return Expression.compile(markexpr).evaluate(lambda name, /, **kwargs: name == "gpu" and not kwargs)


def platform_env(markexpr: str, environ) -> dict[str, str]:
    """The variables to set (those not already in `environ`) for a run with the `-m`
    expression `markexpr`: 8 fake CPU devices always (they only shape the CPU backend);
    CPU only (JAX_PLATFORMS=cpu) unless GPU tests are selected, in which case the platform is
    left to JAX (its GPU when present) and XLA_PYTHON_CLIENT_PREALLOCATE=false, so that each
    xdist worker takes GPU memory as it needs it rather than 75% of it at start."""
    wanted = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    if selects_gpu_tests(markexpr):
        wanted["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    else:
        wanted["JAX_PLATFORMS"] = "cpu"
    return {k: v for k, v in wanted.items() if k not in environ}


def pytest_configure(config):
    os.environ.update(platform_env(config.getoption("markexpr", "") or "", os.environ))


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
