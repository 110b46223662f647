"""GPU detection shared by the kernel tests (`pytest -m gpu` on a GPU machine)."""

import jax


def has_gpu() -> bool:
    """Whether JAX sees a GPU (the CPU-only CI and the conftest's `JAX_PLATFORMS=cpu`: no)."""
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False
