# scribble2label-book: the two commands of the README.
#
#   make book   execute every chapter with papermill, then build the HTML book
#   make test   lint and run the test suite
#
# Both create (once) and reuse a virtual environment in $(VENV). On a machine without
# an NVIDIA GPU the CPU build of PyTorch is installed first, so the package's
# `torch>=2.2` needs nothing more.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.s2l-installed
# PyTorch for machines without CUDA. Elsewhere, a smaller CPU-only download:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_CPU ?= torch==2.13.0
TORCH_INDEX ?=
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
# Book profile: smoke (seconds per chapter), cpu (laptop), full (GPU); auto picks
# full with CUDA, cpu otherwise.
PROFILE ?= auto
# More chapter parameters, each given to the chapters that have it, e.g. a shorter
# chapter-4 training: make book BOOK_ARGS="-p n_train 96 -p epochs 42"
BOOK_ARGS ?=
# An offline copy of stage1_train.zip beside the checkout is used when present.
MIRROR := $(wildcard ../shared/data/bbbc038/stage1_train.zip)
ifneq ($(MIRROR),)
export S2L_BBBC038_SOURCE ?= $(abspath $(MIRROR))
endif

.PHONY: venv test lint book clean-book

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifneq ($(HAS_CUDA),yes)
	$(PY) -m pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_CPU)"
endif
	$(PY) -m pip install -e '.[book,test]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest

book: $(STAMP)
	$(PY) tools/run_book.py --profile $(PROFILE) $(BOOK_ARGS)

clean-book:
	rm -rf _build
