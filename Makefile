# Set-up is part of every target: `make demo` and `make test` work on a fresh clone.
#
# torch: the CPU build is installed first, pinned, so that resolving the package's
# `torch>=2.6,<2.15` range installs nothing more (a plain `pip install torch` would pull a
# multi-GB CUDA build). Where the CPU wheel is not on a local find-links path, point pip at
# PyTorch's CPU index:  make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# GPU users skip this and install their CUDA torch, then `pip install -e ".[gpu]"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.egm-installed

.PHONY: install demo demo-rl test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/egm demo

demo-rl: install  # GRPO on top of `make demo`'s SFT export (within 15 minutes, validations included)
	$(BIN)/egm demo-rl

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
