"""The import rules of DESIGN.md ("imports point down only"), checked on the source (ast).

* `pallas_kernels` imports nothing from `sparse_jax` (arrays in, arrays out), lazy imports
  inside functions included;
* no file imports an underscore name from another file, in `pallas_kernels` or
  `sparse_jax` (shared helpers get public names: kernel tile helpers live in
  `pallas_kernels/tiles_*.py`);
* a Mosaic TPU kernel file imports no GPU (Triton / Mosaic GPU) file, nor the reverse;
* no op's files import another op's backend files (what several ops share is a tiles
  module).

Each rule is a pure function of the parsed files, tested on small made-up sources too, so
that a rule that silently matches nothing cannot pass.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
GPU, TPU = "gpu", "tpu"


def module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources(package: str, root: pathlib.Path = ROOT) -> dict[str, tuple[str, str]]:
    """{module name: (path relative to the repository, source)} of every .py under `package`."""
    return {module_name(p, root): (str(p.relative_to(root)), p.read_text())
            for p in sorted((root / package).rglob("*.py"))}


def imports(module: str, source: str, is_package: bool = False):
    """Every import of a module's source, nested ones included: `(line, target module,
    imported names)`; `from pkg import name` also yields `pkg.name` as a target (it may be a
    submodule). Relative imports are resolved against `module`."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[:len(module.split(".")) + int(is_package) - node.level]
                base = ".".join(parent + ([base] if base else []))
            names = tuple(a.name for a in node.names)
            yield node.lineno, base, names
            for name in names:
                yield node.lineno, f"{base}.{name}", ()


def upward_imports(files: dict[str, tuple[str, str]], forbidden: str) -> list[str]:
    """`path:line target` for every import of `forbidden` (or a module below it)."""
    return [f"{path}:{line} {target}"
            for module, (path, src) in files.items()
            for line, target, _ in imports(module, src, path.endswith("__init__.py"))
            if target == forbidden or target.startswith(forbidden + ".")]


def underscore_imports(files: dict[str, tuple[str, str]]) -> list[str]:
    """`path:line module._name` for every `from module import _name` (dunders aside)."""
    return [f"{path}:{line} {target}.{name}"
            for module, (path, src) in files.items()
            for line, target, names in imports(module, src, path.endswith("__init__.py"))
            for name in names
            if name.startswith("_") and not name.startswith("__")]


def backend(module: str) -> str | None:
    """GPU for Triton / Mosaic GPU files, TPU for Mosaic TPU files, None otherwise."""
    leaf = module.rsplit(".", 1)[-1]
    if leaf.startswith(("triton", "mosaic_gpu")) or leaf in ("tiles_triton", "tiles_mosaic_gpu"):
        return GPU
    if leaf.startswith("tpu") or leaf == "tiles_tpu":
        return TPU
    return None


def op_of(path: str) -> str | None:
    """`pallas_kernels/<op>/<file>.py` -> op; top-level files (tiles, common) -> None."""
    parts = pathlib.PurePath(path).parts
    return parts[1] if len(parts) > 2 else None


def cross_backend_imports(files: dict[str, tuple[str, str]]) -> list[str]:
    """`path:line target` where a TPU file imports a GPU file or the reverse."""
    bad = []
    for module, (path, src) in files.items():
        mine = backend(module)
        for line, target, _ in imports(module, src, path.endswith("__init__.py")):
            theirs = backend(target) if target in files else None
            if mine and theirs and mine != theirs:
                bad.append(f"{path}:{line} {target}")
    return bad


def foreign_backend_imports(files: dict[str, tuple[str, str]]) -> list[str]:
    """`path:line target` where a file of one op imports another op's backend file."""
    return [f"{path}:{line} {target}"
            for module, (path, src) in files.items() if op_of(path)
            for line, target, _ in imports(module, src, path.endswith("__init__.py"))
            if target in files and backend(target) and op_of(files[target][0]) not in (None, op_of(path))]


# ----------------------------------------------------------------------------- the rules


@pytest.fixture(scope="module")
def kernel_files():
    return sources("pallas_kernels")


def test_pallas_kernels_imports_nothing_from_sparse_jax(kernel_files):
    assert upward_imports(kernel_files, "sparse_jax") == []


@pytest.mark.parametrize("package", ["pallas_kernels", "sparse_jax"])
def test_no_underscore_name_is_imported_across_files(package):
    assert underscore_imports(sources(package)) == []


def test_tpu_and_gpu_kernel_files_do_not_import_each_other(kernel_files):
    assert cross_backend_imports(kernel_files) == []


def test_ops_do_not_import_each_others_backend_files(kernel_files):
    assert foreign_backend_imports(kernel_files) == []


# ----------------------------------------------------------------------------- the checks


def fake_tree(tmp_path, files: dict[str, str]):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return sources("pallas_kernels", tmp_path)


def test_checks_find_what_they_look_for(tmp_path):
    files = fake_tree(tmp_path, {
        "pallas_kernels/__init__.py": "",
        "pallas_kernels/tiles_tpu.py": "X = 1\n",
        "pallas_kernels/flash/__init__.py": "",
        "pallas_kernels/flash/triton.py": "def _dot(): pass\nNT = 1\n",
        "pallas_kernels/flash/tpu.py": (
            "from pallas_kernels.flash.triton import NT\n"          # TPU -> GPU
            "from .triton import _dot\n"                            # underscore, relative
            "def f():\n    from sparse_jax.ops import nsa\n"        # lazy upward import
            "from pallas_kernels.tiles_tpu import X\n"),            # fine
        "pallas_kernels/decode/__init__.py": "",
        "pallas_kernels/decode/triton.py": (
            "import sparse_jax\n"                                   # upward
            "from pallas_kernels.flash import triton\n"),           # another op's backend
    })
    assert upward_imports(files, "sparse_jax") == [
        "pallas_kernels/decode/triton.py:1 sparse_jax", "pallas_kernels/flash/tpu.py:4 sparse_jax.ops",
        "pallas_kernels/flash/tpu.py:4 sparse_jax.ops.nsa"]
    assert underscore_imports(files) == ["pallas_kernels/flash/tpu.py:2 pallas_kernels.flash.triton._dot"]
    assert cross_backend_imports(files) == ["pallas_kernels/flash/tpu.py:1 pallas_kernels.flash.triton",
                                            "pallas_kernels/flash/tpu.py:2 pallas_kernels.flash.triton"]
    assert foreign_backend_imports(files) == ["pallas_kernels/decode/triton.py:2 pallas_kernels.flash.triton"]
