"""Execute every `colab/*.ipynb` top to bottom on CPU (issue 7: every notebook runs in CI).

Each notebook is its own test. The kernel is this interpreter (`sys.executable`, so the
CI `.venv` or whatever venv runs pytest), registered in a temporary kernelspec directory
put first on `JUPYTER_PATH`: a `python3` kernelspec installed elsewhere on the machine
cannot point the notebooks at another Python. The kernel starts in the repository root
with the root on `PYTHONPATH` (so `import sparse_jax` and `import experiments...` work
without an editable install) and without this conftest's 8 fake devices (a notebook
user has one CPU device). The committed notebooks must have no outputs and hold the
cells `colab/build_notebooks.py` writes (the builder is their source).

Needs nbclient, nbformat and ipykernel (the `test` extra); skipped without them.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
TIMEOUT_S = 240          # per cell; the whole notebook should take well under a minute
KERNEL = "sparse_jax_test_python"
# Notebooks whose time goes into running a training loop, not compiling: they run with XLA's
# CPU optimisations (which tests/conftest.py turns off for the compile-bound suite). 02 took
# 69 CPU-s without them against 49 with them.
TRAINING_BOUND = ("02_train_compare_hybrid", "04_compress_kv_cache")


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """Environment for the notebook kernels: a kernelspec for `sys.executable` first on
    JUPYTER_PATH, the repository root on PYTHONPATH, one CPU device."""
    spec_root = tmp_path_factory.mktemp("jupyter")
    spec_dir = spec_root / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "sparse_jax test kernel", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    env = dict(os.environ)
    env["JUPYTER_PATH"] = os.pathsep.join([str(spec_root)] + [p for p in [env.get("JUPYTER_PATH")] if p])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)
    env.pop("MPLBACKEND", None)                 # the kernel's inline backend renders the figures
    return env


def test_there_are_four_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_train_compare_hybrid.ipynb",
                                          "03_kernels_and_benchmark.ipynb", "04_compress_kv_cache.ipynb"]


def test_notebooks_are_built_and_clean():
    """Committed notebooks hold the builder's cells (compared by content, so another
    nbformat version's JSON layout does not matter) and no outputs."""
    sys.path.insert(0, str(ROOT / "colab"))
    try:
        import build_notebooks
    finally:
        sys.path.pop(0)
    built = build_notebooks.build_all()
    assert sorted(built) == [p.name for p in NOTEBOOKS]
    for name, nb in built.items():
        committed = nbformat.read(ROOT / "colab" / name, as_version=4)
        assert ([(c.cell_type, c.source) for c in committed.cells]
                == [(c.cell_type, c.source) for c in nb.cells]), f"{name} differs from build_notebooks.py: rerun it"
        for cell in committed.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{name} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, kernel_env, monkeypatch):
    for key in ("JUPYTER_PATH", "PYTHONPATH"):   # the kernelspec lookup runs in this process
        monkeypatch.setenv(key, kernel_env[key])
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name=KERNEL,
                                     resources={"metadata": {"path": str(ROOT)}})
    env = dict(kernel_env)
    if path.stem in TRAINING_BOUND:
        env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "0"
    client.execute(env=env)
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
