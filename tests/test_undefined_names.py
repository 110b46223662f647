"""Static check: no undefined names anywhere in the project (pyflakes).

GPU-only code paths (`@pytest.mark.gpu` tests, Hopper-only branches) never run in the CPU
suite, so a NameError there would only show on a GPU machine; this check catches it on CPU.
(It did: a renamed variable broke 36 Mosaic GPU gradient tests, found on an H200 only.)"""

import pathlib

from pyflakes import api, messages, reporter

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("sparse_jax", "pallas_kernels", "experiments", "tests", "colab")
FATAL = (messages.UndefinedName, messages.UndefinedLocal, messages.UndefinedExport)


class _Collect(reporter.Reporter):
    def __init__(self):
        super().__init__(None, None)
        self.found = []

    def flake(self, message):
        if isinstance(message, FATAL):
            self.found.append(str(message))

    def syntaxError(self, filename, msg, lineno, offset, text):  # noqa: N802 (pyflakes' API)
        self.found.append(f"{filename}:{lineno}: syntax error: {msg}")

    def unexpectedError(self, filename, msg):  # noqa: N802
        self.found.append(f"{filename}: {msg}")


def _files():
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_no_undefined_names():
    files = _files()
    assert len(files) > 50, files   # the walk found the project
    collect = _Collect()
    for path in files:
        api.checkPath(str(path), collect)
    assert not collect.found, "\n".join(collect.found)


def test_the_check_catches_an_undefined_name(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    return config\n")
    collect = _Collect()
    api.checkPath(str(bad), collect)
    assert len(collect.found) == 1 and "config" in collect.found[0]

