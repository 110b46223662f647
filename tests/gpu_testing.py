"""GPU detection shared by the kernel tests (`pytest -m gpu` on a GPU machine), and the
condition of the CPU tests that run Mosaic GPU kernels in JAX's GPU interpret mode."""

import os

import jax
import pytest

from conftest import GPU_INTERPRET_THREADS


def has_gpu() -> bool:
    """Whether JAX sees a GPU (the CPU-only CI and the conftest's `JAX_PLATFORMS=cpu`: no)."""
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def hopper_device():
    """The first sm_90 (Hopper) GPU JAX sees, or None (the compiled Mosaic GPU tests' condition)."""
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return None
    return next((d for d in gpus if getattr(d, "compute_capability", "") == "9.0"), None)


# Mosaic GPU's interpret mode (`plgpu.InterpretGPUParams`) runs each warpgroup of a CTA as its
# own CPU program blocked in barrier callbacks: with fewer XLA CPU pool threads than that
# (conftest sets PJRT_NPROC) it hangs.
needs_gpu_interpret_pool = pytest.mark.skipif(
    int(os.environ.get("PJRT_NPROC") or os.cpu_count() or 1) < GPU_INTERPRET_THREADS,
    reason=f"GPU interpret mode needs PJRT_NPROC >= {GPU_INTERPRET_THREADS}")
