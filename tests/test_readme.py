"""The README's shell commands work as written from the repository root after its set-up
(`make demo` / `make test`, which create `.venv`): each names the venv's interpreter (or a
`make` target that exists), each script it names exists and answers `--help` with exit 0,
and the cheap ones (train, then evaluate) run with tiny settings appended.

The commands are the lines of the README's ```bash blocks and its inline code spans that
start with a command word. `.venv/bin/python` is run as the repository's `.venv/bin/python`
when there is one (CI's `make test` on a fresh clone makes it), else as the interpreter
running the tests. No PYTHONPATH: a user of the venv has none.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
VENV_PYTHON = ".venv/bin/python"
# first words of a README command; anything else is prose or Python
COMMAND_WORDS = ("make", "bash", ".venv/bin/python", ".venv/bin/pip", "python", "python3", "pytest", "pip")
TINY_TRAIN = ["--steps=2", "--batch=2", "--seq_len=32", "--d_model=16", "--heads=1", "--window=4"]


def readme_commands(text: str) -> list[str]:
    """The shell commands of a README: lines of ```bash / ```sh blocks (comments cut) and
    inline code spans whose first word is in COMMAND_WORDS."""
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`\n]+)`", prose):
        if span.split()[0] in COMMAND_WORDS:
            commands.append(span.strip())
    return commands


def _python():
    venv = os.path.join(ROOT, VENV_PYTHON)
    return venv if os.path.exists(venv) else sys.executable


def _argv(command: str) -> list[str]:
    argv = shlex.split(command)
    return [_python() if argv[0] == VENV_PYTHON else argv[0], *argv[1:]]


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env.pop("PYTHONPATH", None)
    return env


COMMANDS = readme_commands(open(README).read())


def test_readme_commands_found():
    """The extraction sees the README's commands (so the tests below are not vacuous)."""
    assert "make demo" in COMMANDS and "make test" in COMMANDS
    assert any("experiments/train.py" in c for c in COMMANDS)
    assert any("experiments/evaluate.py" in c for c in COMMANDS)
    assert any("-m gpu" in c for c in COMMANDS)


def test_readme_commands_use_the_venv_or_make():
    """A bare `python` / `pytest` / `pip` is whatever is on the user's PATH, without the
    project's dependencies (`python experiments/train.py` failed: no module named absl)."""
    bare = [c for c in COMMANDS if c.split()[0] in ("python", "python3", "pytest", "pip")]
    assert not bare, f"README commands must use {VENV_PYTHON} (or a make target): {bare}"
    targets = set(re.findall(r"^([\w-]+):", open(os.path.join(ROOT, "Makefile")).read(), flags=re.M))
    for command in COMMANDS:
        if command.startswith("make"):
            assert set(command.split()[1:]) <= targets, (command, targets)
        if command.startswith("bash"):
            assert os.path.exists(os.path.join(ROOT, command.split()[1])), command


def test_readme_scripts_exist_and_help_exits_0():
    scripts = sorted({s for c in COMMANDS for s in re.findall(r"experiments/\w+\.py", c)})
    assert scripts
    missing = [s for s in scripts if not os.path.exists(os.path.join(ROOT, s))]
    assert not missing
    procs = {s: subprocess.Popen([_python(), s, "--help"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for s in scripts}
    for script, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and script in out, (script, err[-2000:])


def test_readme_gpu_test_command_selects_gpu_tests():
    (gpu,) = [c for c in COMMANDS if "-m gpu" in c]
    assert gpu.startswith(f"{VENV_PYTHON} -m pytest ") and gpu.split()[-1] == "tests"


def test_readme_train_then_evaluate_run(tmp_path):
    """The README's train and evaluate commands, run as written with their workdir moved
    to a temporary folder and tiny settings appended (absl: the last value of a flag wins)."""
    (train,) = [c for c in COMMANDS if "experiments/train.py" in c]
    (evaluate,) = [c for c in COMMANDS if "experiments/evaluate.py" in c]
    workdir = re.search(r"--workdir=(\S+)", train).group(1)
    assert f"--workdir={workdir}" in evaluate
    runs = [(train, TINY_TRAIN, "done: step 2"), (evaluate, ["--batch=2", "--batches=1"], "exact match")]
    for command, tiny, expected in runs:
        argv = _argv(command.replace(workdir, str(tmp_path / "run"))) + tiny
        done = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and expected in done.stdout, (command, done.stderr[-3000:])


@pytest.mark.parametrize("text, expected", [
    ("```bash\nmake demo    # x\n.venv/bin/python a.py --f=1  # y\n```\nRun `make test`; `x = 1`.",
     ["make demo", ".venv/bin/python a.py --f=1", "make test"]),
    ("```python\nimport jax\n```\n`python b.py`", ["python b.py"]),
])
def test_readme_commands_extraction(text, expected):
    assert readme_commands(text) == expected
