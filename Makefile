# The two commands of the README. Each creates the venv itself (Python 3.12 through pyenv).
PY ?= PYENV_VERSION=3.12.1 python3.12
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test venv clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

# The main job: train tiny full / sliding-window / hybrid LMs on needle retrieval, print one table.
demo: venv
	$(BIN)/python experiments/retrieval_demo.py

# The whole CPU test suite (Pallas kernels in interpret mode). Each test file runs whole on
# one worker (loadscope; each class of a file with classes), longest first (the order of
# tests/conftest.py FILE_CPU_S, kept by --no-loadscope-reorder).
test: venv
	$(BIN)/python -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder tests

clean:
	rm -rf $(VENV)
