"""Test-wide setup: the JAX platform (CPU with 8 fake devices, or the GPU for `-m gpu`),
XLA's optimisations off for the CPU suite, the longest test files first, hypothesis profiles.

The environment variables must be set before jax is imported anywhere: `pytest_configure`
runs before any test module is collected (and imported), in every xdist worker too.

    pytest tests                          # CPU: JAX_PLATFORMS=cpu, 8 fake CPU devices,
                                          # JAX_DISABLE_MOST_OPTIMIZATIONS=1
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


GPU_INTERPRET_THREADS = 4


def platform_env(markexpr: str, environ) -> dict[str, str]:
    """The variables to set (those not already in `environ`) for a run with the `-m`
    expression `markexpr`: 8 fake CPU devices always (they only shape the CPU backend);
    CPU only (JAX_PLATFORMS=cpu) unless GPU tests are selected, in which case the platform is
    left to JAX (its GPU when present) and XLA_PYTHON_CLIENT_PREALLOCATE=false, so that each
    xdist worker takes GPU memory as it needs it rather than 75% of it at start.

    The CPU suite also sets JAX_DISABLE_MOST_OPTIMIZATIONS=1 (XLA backend optimisation level
    0, no expensive LLVM passes): it is compile-bound (interpret-mode kernels, hundreds of
    small programs), and XLA's CPU optimisations cost more than they save there; the
    semantics, and so every assertion, are the same. Subprocesses inherit it; the
    training-bound notebooks set it back to 0 (tests/test_notebooks.py).

    And PJRT_NPROC (the XLA CPU client's thread pools, default: the core count) to at least
    4: Mosaic GPU's interpret mode runs each warpgroup of a CTA as its own CPU program,
    blocked in barrier callbacks until the others arrive, beside the program looping over
    the grid; with fewer pool threads than that (2 on a 2-core machine) the flash kernels
    (3 warpgroups) hang (tests/test_flash_mosaic_gpu.py)."""
    wanted = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    if selects_gpu_tests(markexpr):
        wanted["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    else:
        wanted["JAX_PLATFORMS"] = "cpu"
        wanted["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
        wanted["PJRT_NPROC"] = str(max(os.cpu_count() or 1, GPU_INTERPRET_THREADS))
    return {k: v for k, v in wanted.items() if k not in environ}


def pytest_configure(config):
    os.environ.update(platform_env(config.getoption("markexpr", "") or "", os.environ))


GPU_OPTIONAL = "SPARSE_JAX_GPU_OPTIONAL"


def pytest_sessionstart(session):
    """`-m gpu` where JAX sees no GPU (no CUDA plugin, a wrong JAX_PLATFORMS) stops with a
    usage error instead of reporting every GPU test as skipped; `SPARSE_JAX_GPU_OPTIONAL=1`
    lets them skip (e.g. checking the GPU run's setup on a CPU machine)."""
    if not selects_gpu_tests(session.config.getoption("markexpr", "") or "") or os.environ.get(GPU_OPTIONAL) == "1":
        return
    import pytest
    from gpu_testing import has_gpu
    if not has_gpu():
        pytest.exit(f"-m gpu selects the GPU tests, but JAX sees no GPU (is its CUDA plugin installed? "
                    f"JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')}); set {GPU_OPTIONAL}=1 to let them skip",
                    returncode=pytest.ExitCode.USAGE_ERROR)


# CPU seconds of each test file (setup + tests, 2026-12-06, with the settings above, `make
# test` on the 2-core machine; files under 5 s left out). Only the order matters: `make test`
# runs `-n 2 --dist loadscope --no-loadscope-reorder`, so each file (each class of
# test_layer_conformance) runs whole on one worker, in the collection order this hook sets,
# and a long file does not start last (the suite's wall time is the busier worker's). A file
# not listed (a new one) counts DEFAULT_FILE_CPU_S: add it here once measured (process +
# child CPU time of its tests; `--durations` gives wall time, a fair guide on a quiet machine).
FILE_CPU_S = {
    "test_notebooks.py": 126,   # one scope: four notebook kernels in turn
    "test_entmax_kernels.py": 69,   # measured: sum of --durations, -n 2 (75 before jitting its references)
    "test_nsa.py": 81,
    "test_sharding.py": 79,
    "test_flash_kernels.py": 70,
    "test_models.py": 67,
    "test_hysparse_moba.py": 63,
    "test_nsa_decode_kernel.py": 33,   # measured: sum of --durations, -n 2 (70 before jitting its references)
    "test_layer_conformance.py": 57,
    "test_block_sparse_kernels.py": 54,
    "test_experiments.py": 49,
    "test_flash_mosaic_gpu.py": 67,   # measured: sum of --durations, -n 2 (84 before jitting the interpret test)
    "test_kv_policies.py": 43,
    "test_layers.py": 42,
    "test_token_sparse_kernels.py": 40,
    "test_masking.py": 38,
    "test_context_parallel.py": 37,
    "test_compressed_kernels.py": 37,
    "test_decode_kernels.py": 36,
    "test_mla_decode_kernels.py": 44,   # 44 s on its own, most of it the Mosaic GPU interpret cases
    "test_patterns.py": 35,
    "test_kernel_references.py": 33,
    "test_nsa_select_kernels.py": 30,
    "test_checkpoint.py": 29,
    "test_token_sparse_mosaic_gpu.py": 21,   # the Mosaic GPU forward in GPU interpret mode
    "test_indexer_kernels.py": 49,   # measured: sum of --durations, -n 2 (68 before jitting its references)
    "test_csa.py": 26,
    "test_sparse_prefill.py": 23,
    "test_quest.py": 35,
    "test_readme.py": 16,
    "test_dsa.py": 16,
    "test_hf_import.py": 15,
    "test_dispatch.py": 15,
    "test_cache.py": 15,
    "test_selection.py": 12,
    "test_indexer_select.py": 12,
    "test_token_sparse_tpu.py": 8,
    "test_mla.py": 7,
}
DEFAULT_FILE_CPU_S = 60


def pytest_collection_modifyitems(config, items):
    """The test files longest first (by FILE_CPU_S), each file's tests in their order."""
    weight = {}
    for item in items:
        path = item.nodeid.split("::")[0]
        weight.setdefault(path, FILE_CPU_S.get(path.rsplit("/", 1)[-1], DEFAULT_FILE_CPU_S))
    items.sort(key=lambda item: -weight[item.nodeid.split("::")[0]])     # stable: order within a file


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
