#!/usr/bin/env bash
# Runs each Python fuzz harness (fuzz/python/fuzz_*.py, atheris) for SECONDS seconds, one after
# the other, on a copy of its committed seed corpus (fuzz/python/corpus/TARGET, copied to
# target/fuzz-python/TARGET/corpus, so the committed corpus does not grow), and prints how many
# inputs each ran. Exits non-zero if any harness found something: an exception its target may
# not raise, a broken invariant, a crash, a hang (an input running over 30 s) or too much
# memory.
#
#   tools/fuzz_python.sh SECONDS        (from anywhere; the Makefile calls it with 60)
#
# PY: the Python to run the harnesses with (default .venv/bin/python), with fusedae, atheris
# and torch installed; this script installs nothing. Everything a run leaves is under
# target/fuzz-python/TARGET: log (libFuzzer's output), findings/ (one input per distinct
# finding, the smallest seen, named after the exception and where it was raised), crash-*,
# timeout-*, oom-* (libFuzzer's artifacts), corpus/ (the grown copy). Reproduce a finding with
#   $PY fuzz/python/fuzz_TARGET.py target/fuzz-python/TARGET/findings/FILE
set -euo pipefail

if [[ $# -ne 1 || ! $1 =~ ^[0-9]+$ || $1 -lt 1 ]]; then
    echo "usage: $0 SECONDS" >&2
    exit 2
fi
seconds=$1
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if ! "$PY" -c 'import atheris, fusedae' 2>/dev/null; then
    echo "$0: $PY cannot import atheris and fusedae; install them first:" >&2
    echo "    $PY -m pip install atheris   (and maturin develop for fusedae)" >&2
    exit 2
fi

failed=()
for harness in fuzz/python/fuzz_*.py; do
    name=$(basename "$harness" .py)
    target=${name#fuzz_}
    work=$PWD/target/fuzz-python/$target  # absolute: fuzz_cli.py changes directory
    rm -rf "$work"
    mkdir -p "$work/corpus" "$work/findings" "$work/tmp"
    cp fuzz/python/corpus/"$target"/* "$work/corpus/"
    echo "== $target: fuzzing for $seconds s (log: ${work#"$PWD"/}/log)"
    status=0
    # TMPDIR: the harness's scratch files, which libFuzzer's exit leaves behind.
    TMPDIR=$work/tmp FUZZ_FINDINGS=$work/findings timeout -k 10 $((seconds + 300)) \
        "$PY" "$harness" "$work/corpus" -max_total_time="$seconds" -timeout=30 \
        -artifact_prefix="$work/" >"$work/log" 2>&1 || status=$?
    rm -rf "$work/tmp"
    done_line=$(grep -E '^Done [0-9]+ runs in [0-9]+ second' "$work/log" | tail -n 1 || true)
    echo "   ${done_line:-no 'Done N runs' line: the harness stopped early}"
    found=$(find "$work" -maxdepth 2 -type f \( -path "$work/findings/*" -o -name 'crash-*' \
        -o -name 'timeout-*' -o -name 'oom-*' \) | sort)
    if [[ $status -ne 0 || -z $done_line || -n $found ]]; then
        failed+=("$target")
        echo "   FAILED (exit status $status); findings:"
        grep -E '^=== FINDING' "$work/log" | sed 's/^/     /' || true
        for file in $found; do echo "     $file"; done
        tail -n 30 "$work/log" | sed 's/^/   | /'
    fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "fuzz_python: findings in: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz_python: no findings"
