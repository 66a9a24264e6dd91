#!/usr/bin/env bash
# The crate's Rust tests under AddressSanitizer (all of them) and ThreadSanitizer (the thread pool
# and every test that calls it), on the nightly toolchain. Exits non-zero on a test failure or any
# sanitizer report. On two cores a cold run takes ~6 min to build and ~2 to test under ASan, ~8.5
# and under 1 under TSan (std is rebuilt instrumented); later runs reuse target/sanitize/.
#
#   tools/sanitize.sh          asan and tsan (what CI runs)
#   tools/sanitize.sh asan     one of them
#   tools/sanitize.sh tsan
#   tools/sanitize.sh setup    only install what the others need (nightly, rust-src)
#   tools/sanitize.sh python   the Python test suite against an ASan build of the extension
#                              (~7 min to build, then the suite, several times slower than
#                              plain; not in CI for its length)
set -euo pipefail
cd "$(dirname "$0")/.."

# Host-only target triple: with --target, RUSTFLAGS reach only what is built for the target (the
# crate, its dependencies, a rebuilt std), never the build scripts or proc-macros (bytemuck's
# derive), which would otherwise load instrumented into an uninstrumented rustc or cargo.
TARGET=x86_64-unknown-linux-gnu
ROOT=target/sanitize
LOGS=$ROOT/logs
mkdir -p "$LOGS"

# The release profile, minus what only slows a sanitizer build (fat LTO, one codegen unit, and
# opt-level 3: level 1 builds in a third of the time, ~30 min less for both, which is what lets
# CI run them, and its tests run as fast here), plus what makes it catch more and report better:
# debug assertions, overflow checks, line tables for symbolized stacks. The unoptimized profile
# is too slow for these numeric tests under ASan.
export CARGO_PROFILE_RELEASE_OPT_LEVEL=1
export CARGO_PROFILE_RELEASE_LTO=false
export CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
export CARGO_PROFILE_RELEASE_DEBUG=line-tables-only
export CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS=true
export CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=true

# Lines any sanitizer prints when it finds something. ASan, LSan and TSan also set a non-zero
# exit status; the log is searched as well, so a report cannot pass unnoticed whatever the test
# harness does with the exit status.
REPORT='ERROR: AddressSanitizer|ERROR: LeakSanitizer|WARNING: ThreadSanitizer'

step() { echo; echo "== $*"; }

# Runs a cargo test command (the arguments) with its output shown and kept in log file $1; fails
# on a non-zero status or a sanitizer report in the log.
run_logged() {
    local log=$1 status=0
    shift
    "$@" 2>&1 | tee "$log" || status=$?
    if grep -Eq "$REPORT" "$log"; then
        echo "sanitize.sh: sanitizer report(s) above (kept in $log)" >&2
        return 1
    fi
    if [ "$status" -ne 0 ]; then
        echo "sanitize.sh: failed with status $status (log: $log)" >&2
        return "$status"
    fi
}

setup() {
    step "setup: nightly toolchain with rust-src"
    # Install nightly only if missing: `rustup toolchain install` on an installed one updates it.
    if ! rustup toolchain list | grep -q '^nightly-'; then
        rustup toolchain install nightly --profile minimal
    fi
    # -Zbuild-std (TSan) builds std from the sources in rust-src. Idempotent.
    rustup component add rust-src --toolchain nightly
    rustc +nightly --version
}

asan() {
    step "asan: every lib test under AddressSanitizer (and LeakSanitizer)"
    local start=$SECONDS
    # run_caught (rust/threads.rs) leaks a caught panic's payload on purpose (its drop could panic
    # again); the tests that panic inside the pool leak those few bytes. Every panic payload is
    # allocated under std's panic_with_hook, so this skips exactly those and no other leak.
    printf 'leak:panic_with_hook\n' >"$ROOT/lsan.supp"
    # No -Zbuild-std here: ASan needs only the crate's own code instrumented (std's allocations go
    # through the intercepted malloc, and std's generic code is compiled into the crate). The
    # pre-built std keeps this build shorter.
    # --lib builds only the unit-test harness, an executable, so the cdylib crate type, which
    # would need the ASan runtime from its host process, is never linked.
    CARGO_TARGET_DIR=$ROOT/asan \
        RUSTFLAGS="-Zsanitizer=address -Cforce-frame-pointers=yes" \
        ASAN_OPTIONS="detect_leaks=1:detect_stack_use_after_return=1" \
        LSAN_OPTIONS="suppressions=$PWD/$ROOT/lsan.supp:print_suppressions=1" \
        run_logged "$LOGS/asan.log" \
        cargo +nightly test --release --target "$TARGET" --lib
    echo "== asan: passed in $((SECONDS - start)) s"
}

tsan() {
    step "tsan: the thread pool and its callers under ThreadSanitizer"
    local start=$SECONDS
    # TSan must see std's own synchronization (Mutex, Condvar, thread join, Arc), else it
    # reports races that std orders: std is rebuilt instrumented (-Zbuild-std). Nightly refuses
    # to mix an instrumented crate with the pre-built std anyway ("mixing -Zsanitizer will cause
    # an ABI mismatch").
    # Every lib test but one runs: threads::tests (callers racing for the pool, sleep and wake,
    # panics in the pool), mlp's threads test and the forward and backward tests, whose large
    # batches run on the pool, two tests at a time, so callers also meet on the global pool.
    # Skipped: the activation accuracy test, one-column layers over ~22k values per op, which
    # adds no sharing the others lack and takes ~8 min alone under TSan (it runs under ASan).
    CARGO_TARGET_DIR=$ROOT/tsan \
        RUSTFLAGS="-Zsanitizer=thread -Cforce-frame-pointers=yes" \
        TSAN_OPTIONS="second_deadlock_stack=1" \
        run_logged "$LOGS/tsan.log" \
        cargo +nightly test -Zbuild-std --release --target "$TARGET" --lib -- \
        --skip every_activation_matches_its_f64_reference_on_every_isa
    echo "== tsan: passed in $((SECONDS - start)) s"
}

python_suite() {
    step "python: the Python test suite against an ASan build of the extension"
    local start=$SECONDS work=$ROOT/python py=${PY:-$PWD/.venv/bin/python}
    # The extension instrumented. rustc links no sanitizer runtime into a cdylib: its __asan_*
    # symbols resolve against the runtime preloaded into Python below.
    CARGO_TARGET_DIR=$ROOT/asan-python \
        RUSTFLAGS="-Zsanitizer=address -Cforce-frame-pointers=yes" \
        PYO3_PYTHON=$py \
        cargo +nightly rustc --release --target "$TARGET" --features python --lib \
        --crate-type cdylib
    rm -rf "$work"
    mkdir -p "$work/objects" "$work/site"
    # Python is not instrumented, so the runtime must come first (LD_PRELOAD) and be a shared
    # object: nightly ships it static. Made from its objects without asan_preinit (a shared
    # object may not have a .preinit_array), with libstdc++ loaded with it (--no-as-needed) so
    # that ASan's __cxa_throw interceptor finds the real one: torch throws C++ exceptions. Not
    # named libasan.so: ASan takes a
    # library of that name for gcc's runtime and refuses to start beside it.
    local runtime
    runtime=$(rustc +nightly --print sysroot)/lib/rustlib/$TARGET/lib/librustc-nightly_rt.asan.a
    (cd "$work/objects" && ar x "$runtime" && rm -f asan_preinit.cpp.o)
    cc -shared -o "$work/asan-runtime.so" "$work"/objects/*.o \
        -Wl,--no-as-needed -lstdc++ -lpthread -ldl -lm -lrt
    # The package from python/, with the instrumented extension in place of any built one.
    cp -r python/fusedae "$work/site/"
    rm -f "$work"/site/fusedae/_native*.so
    cp "$ROOT/asan-python/$TARGET/release/libfusedae.so" "$work/site/fusedae/_native.abi3.so"
    # Leak detection off: what Python and torch keep until exit would be reported. A malloc too
    # large returns NULL, as without ASan (numpy then raises the MemoryError tests expect; ASan
    # would end the process). Deselected,
    # for the build's own reasons: it reports build_profile "debug" (debug assertions), and
    # ASan's shadow memory lifts the .npy encode's peak RSS over the test's 100 MiB bound.
    PYTHONPATH=$PWD/$work/site \
        LD_PRELOAD=$PWD/$work/asan-runtime.so \
        ASAN_OPTIONS="detect_leaks=0:detect_stack_use_after_return=1:allocator_may_return_null=1" \
        run_logged "$LOGS/python.log" \
        "$py" -m pytest -q -p no:cacheprovider tests \
        --deselect tests/test_mlp.py::test_import_needs_no_torch_and_info_reports_the_isa \
        --deselect tests/test_smoke.py::test_the_expected_isa_is_selected \
        --deselect tests/test_cli.py::test_memory_stays_bounded_on_a_large_input
    echo "== python: passed in $((SECONDS - start)) s"
}

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(asan tsan)
for name in "${steps[@]}"; do
    case $name in
        asan | tsan | python) ;;
        setup) [ ${#steps[@]} -eq 1 ] || { echo "$0: setup goes alone" >&2; exit 2; } ;;
        *) echo "usage: $0 [asan] [tsan] [python] | setup" >&2; exit 2 ;;
    esac
done
setup
[ "${steps[*]}" != setup ] || exit 0
for name in "${steps[@]}"; do
    if [ "$name" = python ]; then python_suite; else "$name"; fi
done
step "sanitize: ${steps[*]} passed, no sanitizer report"
