# Two commands do all the set-up on a fresh machine with Python 3.11 and a C++
# compiler:   make train   (the main job)   and   make test   (the test suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: train test bench install clean

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*.cpp)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/ddvae-fast train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-only $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info ddvae_fast/*.so
