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
	  print('\n'.join(d['dependencies'] + [r for g in ('test', 'bench', 'demo', 'parquet', 'ray', 'dev') for r in d['optional-dependencies'][g]]))" \
	  > $(VENV)/requirements.txt
	$(PIP) -r $(VENV)/requirements.txt
	touch $@

build: $(VENV)/.deps
	$(BIN)/maturin develop --release --quiet

demo: build
	$(BIN)/fusedae demo

test: test-rust build test-python test-isas

# The Rust tests check results, not speed: built without fat LTO, on every core (a cold build
# here took 4m51s, against about 6m30s for the shipped profile).
test-rust:
	$(FAST_RELEASE) cargo test --release

test-python: build
	$(PY) -m pytest -q

# Run the Python kernel tests again with each lower ISA this CPU supports forced.
test-isas: build
	@for isa in $$($(PY) -c "import fusedae; print(' '.join(fusedae.info()['available_isas'][1:]))"); do \
	  echo "== FUSEDAE_ISA=$$isa"; \
	  FUSEDAE_ISA=$$isa $(PY) -m pytest -q tests/test_mlp.py tests/test_torch.py tests/test_backward.py tests/test_native.py tests/test_activations.py tests/test_soak.py tests/test_precision.py || exit 1; \
	done

lint: $(VENV)/.deps
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings
	cargo fmt --check --manifest-path fuzz/Cargo.toml
	CARGO_TARGET_DIR=target/fuzz-check cargo clippy --manifest-path fuzz/Cargo.toml --all-targets -- -D warnings
	$(BIN)/ruff check python tests benches fuzz
	$(BIN)/ruff format --check python tests benches fuzz
	$(BIN)/mypy
	$(BIN)/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	$(BIN)/check-jsonschema --builtin-schema vendor.dependabot .github/dependabot.yml
	$(BIN)/zizmor --offline .github/workflows

fmt: $(VENV)/.deps
	cargo fmt
	$(BIN)/ruff format python tests benches fuzz
	$(BIN)/ruff check --fix python tests benches fuzz

# One compile thread: no idle worker processes beside the timed code.
bench: build
	FUSEDAE_BENCH_PASSES=4 TORCHINDUCTOR_COMPILE_THREADS=1 $(PY) -m pytest benches --benchmark-enable --benchmark-only --bench-seconds=0.5 --benchmark-json=benches/results.json -q
	$(PY) benches/report.py benches/results.json

clean:
	rm -rf $(VENV) target fuzz/target

# ---- Reliability: fuzzing and sanitizers (docs/reliability.md) --------------------------------
# `make fuzz FUZZ_SECONDS=N`: each Rust fuzz target (cargo fuzz, nightly: every ISA against the
# scalar kernel and the float64 oracle) and each Python one (atheris) for N seconds, from the
# committed seed corpus; new inputs go to target/, not into the corpus.
# `make sanitize`: the Rust tests under AddressSanitizer, the pool's under ThreadSanitizer.
FUZZ_SECONDS ?= 60
# CI builds the fuzz targets at opt-level 1 (FUZZ_OPT_LEVEL=1), as the sanitizers are built: about
# a third of the build time of level 3 (28 min on a loaded 2-core Zen 3), for fewer executions
# in its 20-second runs. Long local runs keep level 3.
FUZZ_OPT_LEVEL ?= 3
RUST_FUZZ_TARGETS := forward backward

.PHONY: fuzz fuzz-rust fuzz-python sanitize sanitize-python cargo-fuzz

cargo-fuzz:
	@command -v cargo-fuzz > /dev/null || cargo install --locked cargo-fuzz@0.13.2

fuzz: fuzz-rust fuzz-python

# -timeout: an input running 30 s is a hang; -rss_limit_mb: one using 4 GB is a leak. The whole
# log goes to target/fuzz-logs/; its statistics (executions, corpus) are printed.
fuzz-rust: cargo-fuzz
	CARGO_PROFILE_RELEASE_OPT_LEVEL=$(FUZZ_OPT_LEVEL) cargo +nightly fuzz build -O
	@mkdir -p target/fuzz-logs
	@for target in $(RUST_FUZZ_TARGETS); do \
	  echo "== cargo fuzz run $$target ($(FUZZ_SECONDS) s)"; \
	  mkdir -p target/fuzz-corpus/$$target; \
	  log=target/fuzz-logs/$$target.log; \
	  if ! CARGO_PROFILE_RELEASE_OPT_LEVEL=$(FUZZ_OPT_LEVEL) cargo +nightly fuzz run -O $$target target/fuzz-corpus/$$target fuzz/corpus/$$target -- \
	      -max_total_time=$(FUZZ_SECONDS) -timeout=30 -rss_limit_mb=4096 -print_final_stats=1 \
	      > $$log 2>&1; then tail -n 80 $$log; exit 1; fi; \
	  grep -E "^(Done|stat::number_of_executed_units|stat::peak_rss_mb)|INITED|DONE" $$log; \
	done

$(VENV)/.fuzz-deps: pyproject.toml | $(PY)
	$(PIP) $$($(PY) -c "import tomllib; \
	  print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['fuzz']))")
	touch $@

fuzz-python: build $(VENV)/.fuzz-deps
	PY=$(PY) tools/fuzz_python.sh $(FUZZ_SECONDS)

sanitize:
	tools/sanitize.sh

# Not in CI (the suite runs several times slower under ASan): the Python tests against an ASan
# build of the extension.
sanitize-python: $(VENV)/.deps
	PY=$(abspath $(PY)) tools/sanitize.sh python

# ---- Release: wheels, sdist and their checks --------------------------------------------------
# `make wheel`: manylinux2014 abi3 wheels for x86_64 and aarch64 and the sdist in dist/, checked.
# `make test-wheel`: the x86_64 wheel installed from dist/ into fresh venvs and tested there (the
# whole suite on the first Python with the oldest dependencies pyproject.toml allows, the smoke
# tests on the others with the newest), the kernel each CPU model
# selects under qemu, the stubs against the installed module.
# `make check-targets`: the crate type-checks for Windows and macOS.

WHEEL_ARCHES := x86_64 aarch64
TEST_WHEEL_PYTHONS := 3.10 3.13
CHECK_TARGETS := x86_64-pc-windows-msvc aarch64-apple-darwin
# zig (from the ziglang package, found on PATH) links against glibc 2.17's symbols: manylinux2014
# wheels without Docker.
RELEASE_PATH := PATH="$(abspath $(BIN)):$$PATH"
# The sdist check checks buildability, not speed: no fat LTO.
FAST_RELEASE := CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16

.PHONY: wheel wheel-builds $(WHEEL_ARCHES:%=wheel-%) sdist check-dist check-sdist test-wheel \
	check-targets check-targets-toolchains release-system-deps

$(VENV)/.release-deps: pyproject.toml | $(PY)
	$(PIP) --upgrade pip
	$(PY) -c "import tomllib; \
	  print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['release']))" \
	  > $(VENV)/release-requirements.txt
	$(PIP) -r $(VENV)/release-requirements.txt
	touch $@

# qemu-user for test-wheel; the aarch64 cross linker and libc for cargo's build scripts and
# for linking aarch64 code outside zig (the neon branch's tests).
release-system-deps:
	@missing=""; \
	for pkg in qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross; do \
	  dpkg -s $$pkg > /dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then apt-get update -qq && apt-get install -y -qq $$missing; fi
	rustup target add $(WHEEL_ARCHES:%=%-unknown-linux-gnu)

check-targets-toolchains:
	rustup target add $(CHECK_TARGETS)

wheel:
	rm -rf dist
	$(MAKE) -j2 wheel-builds
	$(MAKE) check-dist check-sdist

# Each build mostly runs on one core (codegen-units = 1), so they run side by side (cold, on 2
# cores: 2m15s against 2m06s + 0m30s one after the other; the aarch64 build, scalar kernels only,
# is short); separate target dirs, as cargo locks a target dir for the whole build.
wheel-builds: $(WHEEL_ARCHES:%=wheel-%) sdist

$(WHEEL_ARCHES:%=wheel-%): wheel-%: $(VENV)/.release-deps release-system-deps
	$(RELEASE_PATH) CARGO_TARGET_DIR=target/wheel-$* $(BIN)/maturin build --quiet --release \
	  --locked --zig --compatibility manylinux2014 --target $*-unknown-linux-gnu --out dist

sdist: $(VENV)/.release-deps
	$(BIN)/maturin sdist --out dist

check-dist: $(VENV)/.release-deps
	$(BIN)/twine check --strict dist/*
	$(BIN)/abi3audit --strict --summary dist/*.whl
	$(PY) tools/check_dist.py dist $(WHEEL_ARCHES)

# A wheel built from the sdist with cargo offline (crates from Cargo.lock, fetched beforehand),
# installed in a throwaway venv, imported and smoke-tested from outside the tree.
check-sdist: $(VENV)/.release-deps
	cargo fetch --locked
	rm -rf target/sdist-check && mkdir -p target/sdist-check
	$(FAST_RELEASE) CARGO_NET_OFFLINE=true MATURIN_PEP517_ARGS=--locked \
	  CARGO_TARGET_DIR=$(abspath target/sdist-cargo) \
	  $(BIN)/uv build --quiet --wheel --out-dir target/sdist-check dist/*.tar.gz
	$(BIN)/uv venv --quiet --python $(PY) target/sdist-check/venv
	$(BIN)/uv pip install --quiet --python target/sdist-check/venv -r pyproject.toml pytest
	# --refresh-package: the wheel's path and name repeat between builds; uv's cache would not see
	# the new one (tools/test_wheel.sh).
	$(BIN)/uv pip install --quiet --python target/sdist-check/venv --no-index \
	  --find-links target/sdist-check --refresh-package fusedae fusedae
	cp tests/test_smoke.py target/sdist-check/
	# An empty pytest.ini: the tree's pyproject.toml, above, would add pytest-benchmark's options.
	touch target/sdist-check/pytest.ini
	cd target/sdist-check && venv/bin/python -m pytest -q -p no:cacheprovider test_smoke.py

test-wheel: $(VENV)/.release-deps release-system-deps
	tools/test_wheel.sh $(BIN)/uv $(TEST_WHEEL_PYTHONS)

# Without and with the Python bindings; PyO3 needs no interpreter for an abi3 cross check.
check-targets: check-targets-toolchains
	for target in $(CHECK_TARGETS); do \
	  cargo check --locked --all-targets --target $$target && \
	  PYO3_CROSS_PYTHON_VERSION=3.10 cargo check --locked --all-targets --features python \
	    --target $$target || exit 1; \
	done

# --- AArch64 (NEON) under qemu-aarch64 -------------------------------------------------------
# `make test-aarch64` on an x86-64 Debian host with gcc-aarch64-linux-gnu, libc6-dev-arm64-cross,
# qemu-user and the Rust target aarch64-unknown-linux-gnu: the Rust tests (NEON and scalar against
# the float64 reference), then the Python kernel tests against the built wheel on an arm64 Python
# (tools/aarch64_python.sh, cached under target/) with the detected ISA, asserted to be NEON.
# The scalar kernel's Python tests do not run again here: it is the same portable Rust that
# `make test` runs on x86-64 with FUSEDAE_ISA=scalar, and the Rust tests above check it on
# aarch64. Timings under emulation mean nothing; this checks results only. The Rust tests build
# without LTO (a third of the time), in their own target dir so that they can build beside the
# host's.
AARCH64 := aarch64-unknown-linux-gnu
AARCH64_ROOT := target/aarch64-python
AARCH64_TEST := target/aarch64-test
AARCH64_ENV := CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
	CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu" \
	CARGO_TARGET_DIR=target/aarch64-rust $(FAST_RELEASE)
# test_threads.py: fusedae.torch on torch 2.5.1, whose libgomp auditwheel renamed into torch.libs.
AARCH64_PYTESTS := tests/test_mlp.py tests/test_native.py tests/test_activations.py tests/test_threads.py
# qemu-user aborts when a multithreaded process forks (an assertion in its TCG).
AARCH64_DESELECT := --deselect tests/test_mlp.py::test_a_forked_child_gets_its_own_threads \
	--deselect tests/test_threads.py::test_a_forked_child_runs_on_a_pool_of_its_own \
	--deselect tests/test_threads.py::test_a_child_forked_after_the_team_ran_runs_its_calls_on_the_pool

.PHONY: test-aarch64 test-aarch64-rust test-aarch64-python

test-aarch64: test-aarch64-rust test-aarch64-python

test-aarch64-rust: release-system-deps
	$(AARCH64_ENV) cargo test --release --target $(AARCH64)

# The Python tests run on the wheel `make wheel` ships (rebuilt here only if its sources changed),
# not on a second build of their own.
test-aarch64-python: $(VENV)/.release-deps release-system-deps
	tools/aarch64_python.sh $(AARCH64_ROOT)
	$(MAKE) wheel-aarch64
	rm -rf $(AARCH64_TEST) && mkdir -p $(AARCH64_TEST)/site
	@# A wheel is a zip: unpacked as pip would.
	$(PYTHON) -m zipfile -e dist/fusedae-*-manylinux2014_aarch64*.whl $(AARCH64_TEST)/site
	@# The tests run from a copy, so only the wheel's fusedae can be imported.
	cp -r tests pyproject.toml $(AARCH64_TEST)/
	cd $(AARCH64_TEST) && export FUSEDAE_AARCH64_PATH=$(abspath $(AARCH64_TEST)/site) && \
	  $(abspath $(AARCH64_ROOT))/python -c "import fusedae; isa = fusedae.info()['isa']; \
	    assert isa == 'neon', isa; print('fusedae', fusedae.__file__, isa)" && \
	  $(abspath $(AARCH64_ROOT))/python -m pytest -q -p no:cacheprovider $(AARCH64_PYTESTS) $(AARCH64_DESELECT)
