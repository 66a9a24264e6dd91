# Every target CI runs lives here. `make demo` and `make test` work on a fresh machine: they
# create .venv, install what pyproject.toml lists, and build the extension in release mode.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
export VIRTUAL_ENV := $(abspath $(VENV))
# Prebuilt wheels only come from PyPI here; keep pip quiet but not silent about failures.
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test test-rust test-python test-isas build lint fmt bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Tools and test/bench dependencies, reinstalled when pyproject.toml changes.
$(VENV)/.deps: pyproject.toml | $(PY)
	$(PIP) --upgrade pip
	$(PIP) "maturin>=1.9.3,<2"
	$(PY) -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	  print('\n'.join(d['dependencies'] + [r for g in ('test', 'bench', 'demo', 'dev') for r in d['optional-dependencies'][g]]))" \
	  > $(VENV)/requirements.txt
	$(PIP) -r $(VENV)/requirements.txt
	touch $@

build: $(VENV)/.deps
	$(BIN)/maturin develop --release --quiet

demo: build
	$(BIN)/fusedae demo

test: test-rust build test-python test-isas

test-rust:
	cargo test --release

test-python: build
	$(PY) -m pytest -q

# Run the Python kernel tests again with each lower ISA this CPU supports forced.
test-isas: build
	@for isa in $$($(PY) -c "import fusedae; print(' '.join(fusedae.info()['available_isas'][1:]))"); do \
	  echo "== FUSEDAE_ISA=$$isa"; \
	  FUSEDAE_ISA=$$isa $(PY) -m pytest -q tests/test_mlp.py tests/test_torch.py tests/test_native.py tests/test_activations.py || exit 1; \
	done

lint: $(VENV)/.deps
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings
	$(BIN)/ruff check python tests benches
	$(BIN)/ruff format --check python tests benches
	$(BIN)/mypy

fmt: $(VENV)/.deps
	cargo fmt
	$(BIN)/ruff format python tests benches
	$(BIN)/ruff check --fix python tests benches

# One compile thread: no idle worker processes beside the timed code.
bench: build
	FUSEDAE_BENCH_PASSES=4 TORCHINDUCTOR_COMPILE_THREADS=1 $(PY) -m pytest benches --benchmark-enable --benchmark-only --bench-seconds=0.5 --benchmark-json=benches/results.json -q
	$(PY) benches/report.py benches/results.json

clean:
	rm -rf $(VENV) target
