"""The test setup's platform choice (tests/conftest.py): CPU with 8 fake devices for the CPU
suite; for `-m gpu` (README: `.venv/bin/python -m pytest -m gpu -n 4 tests` on a GPU machine)
the platform is left to JAX and GPU memory is not preallocated, so the real kernels compile
and xdist workers share the card (before, every GPU test skipped on a GPU machine: the
conftest forced JAX_PLATFORMS=cpu)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from gpu_testing import has_gpu
from conftest import (FILE_CPU_S, GPU_INTERPRET_THREADS, platform_env, pytest_collection_modifyitems,
                      selects_gpu_tests)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
       "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "PJRT_NPROC": str(max(os.cpu_count() or 1, GPU_INTERPRET_THREADS))}
GPU = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


@pytest.mark.parametrize("markexpr, gpu", [
    ("", False), ("not gpu", False), ("slow", False), ("not gpu and slow", False),
    ("gpu", True), ("gpu and not slow", True), ("gpu or slow", True), ("(gpu)", True)])
def test_selects_gpu_tests(markexpr, gpu):
    assert selects_gpu_tests(markexpr) is gpu


def test_platform_env():
    assert platform_env("not gpu", {}) == CPU          # pyproject's default -m
    assert platform_env("", {}) == CPU
    assert platform_env("gpu", {}) == GPU              # no JAX_PLATFORMS: JAX picks the GPU
    # what the user set is kept
    assert platform_env("gpu", {"XLA_PYTHON_CLIENT_PREALLOCATE": "true"}) == {k: GPU[k] for k in ["XLA_FLAGS"]}
    assert platform_env("not gpu", {"JAX_PLATFORMS": "cuda"}) == {k: CPU[k] for k in CPU if k != "JAX_PLATFORMS"}


def test_this_cpu_run_is_on_cpu():
    """This suite (not `-m gpu`) runs on CPU with 8 devices unless the caller said otherwise."""
    if "JAX_PLATFORMS" not in os.environ or os.environ["JAX_PLATFORMS"] == "cpu":
        import jax
        assert jax.default_backend() == "cpu"
        if os.environ.get("XLA_FLAGS") == CPU["XLA_FLAGS"]:
            assert jax.device_count() == 8
        if os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS") == "1":
            assert jax.config.read("jax_disable_most_optimizations")


def test_longest_files_first():
    """The collection is ordered by FILE_CPU_S, longest first, a file not listed counting
    DEFAULT_FILE_CPU_S; the order within a file (and among equals) kept."""
    class Item:
        def __init__(self, nodeid):
            self.nodeid = nodeid

    longest = max(FILE_CPU_S, key=FILE_CPU_S.get)
    ids = ["tests/test_new.py::a", f"tests/{longest}::b", "tests/test_new.py::c[1]", "tests/test_other.py::d",
           f"tests/{longest}::Cls::e"]
    items = [Item(i) for i in ids]
    pytest_collection_modifyitems(None, items)
    assert [i.nodeid for i in items] == [ids[1], ids[4], ids[0], ids[2], ids[3]]


@pytest.mark.gpu
def test_gpu_run_environment():
    """Runs in `-m gpu` runs only (the CPU suite deselects it; the test below runs it in a
    pytest of its own): no preallocation; the platform as the caller left it."""
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    print(f"JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')}")


def test_pytest_m_gpu_sets_the_gpu_environment():
    """A real `pytest -m gpu` (in a subprocess, from an environment without the variables)
    runs the GPU-marked test above with the GPU settings and JAX_PLATFORMS unset."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_PLATFORMS", "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_FLAGS", "PYTEST_XDIST_WORKER",
                        "JAX_DISABLE_MOST_OPTIMIZATIONS")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-m", "gpu",
                           "tests/test_conftest.py::test_gpu_run_environment"],
                          cwd=ROOT, env={**env, "SPARSE_JAX_GPU_OPTIONAL": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-3000:]
    assert "JAX_PLATFORMS=None" in done.stdout
    if not has_gpu():        # this CPU machine: without the opt-in, `-m gpu` is a usage error
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                               "tests/test_conftest.py::test_gpu_run_environment"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout[-3000:]
        assert "JAX sees no GPU" in done.stdout + done.stderr
