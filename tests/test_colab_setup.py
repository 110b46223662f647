"""The notebooks' set-up cell (`colab/build_notebooks.SETUP`), run here as Colab would (a fake
`google.colab` module, `subprocess.run` recorded instead of run): it installs the checkout it
runs in, clones only a URL the user set, and otherwise stops with a message saying what to
set; no notebook holds a placeholder URL. And notebook 01's tables stay aligned whatever
the attention names (the notebook invites adding your own)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytest.importorskip("nbformat")        # build_notebooks imports it (the `test` extra)
sys.path.insert(0, str(ROOT / "colab"))
import build_notebooks  # noqa: E402


def run_setup(monkeypatch, cwd, git_url=None):
    """Executes SETUP in `cwd` as in Colab; the commands it would have run (and a
    `("chdir", folder)` for a folder that the faked clone did not make)."""
    calls = []
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(subprocess, "run", lambda argv, **kw: calls.append(list(argv)))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(cwd)
    if git_url is None:
        monkeypatch.delenv("SPARSE_JAX_GIT_URL", raising=False)
    else:
        monkeypatch.setenv("SPARSE_JAX_GIT_URL", git_url)
    if git_url is not None:
        monkeypatch.setattr(os, "chdir", lambda folder: calls.append(("chdir", str(folder))))
    exec(compile(build_notebooks.SETUP, "setup-cell", "exec"), {})
    return calls


def test_setup_installs_the_checkout_it_runs_in(monkeypatch):
    calls = run_setup(monkeypatch, ROOT / "colab")          # a notebook opened from colab/
    assert not [c for c in calls if "git" in c]
    (install,) = [c for c in calls if c[:4] == [sys.executable, "-m", "pip", "install"] and "-e" in c]
    assert install[-1] in (str(ROOT), str(ROOT) + "[gpu]")
    assert pathlib.Path.cwd() == ROOT and sys.path[0] == str(ROOT)


def test_setup_without_a_checkout_says_what_to_set(monkeypatch, tmp_path):
    with pytest.raises(RuntimeError, match="Set SPARSE_JAX_GIT_URL"):
        run_setup(monkeypatch, tmp_path)


def test_setup_clones_only_the_url_the_user_set(monkeypatch, tmp_path):
    monkeypatch.setattr(pathlib.Path, "is_file", lambda self: False)     # no /content/sparse_jax yet
    calls = run_setup(monkeypatch, tmp_path, git_url="https://example.org/me/sparse_jax.git")
    assert calls[0] == ["git", "clone", "--depth=1", "https://example.org/me/sparse_jax.git", "/content/sparse_jax"]
    assert calls[1][-1].startswith("/content/sparse_jax") and calls[-1] == ("chdir", "/content/sparse_jax")


def test_no_notebook_clones_a_placeholder_url():
    for path in sorted((ROOT / "colab").glob("*.ipynb")):
        text = path.read_text()
        assert "placeholder" not in text.lower() and "github.com/sparse-jax" not in text, path.name


def _quickstart_cell(marker: str) -> str:
    (cell,) = [c.source for c in build_notebooks.QUICKSTART if marker in c.source]
    return cell


def _print_formats(source: str) -> list[str]:
    """The f-string literals of the `print(f"...")` calls of a cell."""
    return re.findall(r'print\((f"[^\n]*")\)', source)


def test_quickstart_tables_align_for_any_attention_name():
    """Each column starts (names) or ends (numbers) at the same place in the header and in
    every row, also for a name longer than the built-in ones."""
    names = ["full", "a user's own attention with a long name", "x"]
    logits_cell = _quickstart_cell("logits[name] = forward(")
    decode_cell = _quickstart_cell("max |decode - forward|")
    scope = {"models": dict.fromkeys(names)}
    exec(re.search(r"^NAME = .*$", logits_cell, flags=re.M).group(0), scope)
    (logits_row,) = _print_formats(logits_cell)
    header, row = _print_formats(decode_cell)
    starts = set()
    for i, name in enumerate(names):
        scope.update(name=name, err=10.0 ** -i, nbytes=10 ** (3 * i + 3), logits={name: types.SimpleNamespace(shape=(2, 40, 50))}, bool=bool,
                     jnp=types.SimpleNamespace(isfinite=lambda x: types.SimpleNamespace(all=lambda: True)))
        starts.add(eval(logits_row, scope).index("logits"))
        lines = [eval(header, scope), eval(row, scope)]
        assert len(lines[0]) == len(lines[1]), lines                 # numbers end under their headers
        assert lines[0].index("max") > len(name) and lines[1][len(name)] == " ", lines
    assert len(starts) == 1
