#!/usr/bin/env bash
# Tests the x86_64 wheel in dist/ as a user gets it: installed from dist/ alone into fresh venvs
# (dependencies from PyPI), with no cargo on PATH, the tests run from a copy outside the tree.
# Then the kernel each CPU model selects, under qemu, and the stubs against the installed module.
# The aarch64 wheel runs its smoke tests under qemu-aarch64 (tools/aarch64_python.sh).
#
# Usage: tools/test_wheel.sh UV PYTHON_VERSION...   (UV: the uv executable; the first version
# runs the whole test suite and the qemu, stubtest and aarch64 checks, the others the smoke
# tests: one abi3 wheel serves them all, and CI's 90 minutes on two cores do not hold a suite per
# version). The first version gets the oldest releases pyproject.toml allows (`--resolution
# lowest-direct`: torch 2.1.0, numpy 1.24.0, pyarrow 15, ...), the others the newest, and `make
# test` runs the suite on the newest: so both ends of the ranges users may have are tested.
set -euo pipefail

uv=$(realpath "$1")
shift
versions=("$@")
repo=$(pwd)
work=$repo/target/test-wheel
x86_64_wheel=$(realpath dist/fusedae-*-cp310-abi3-manylinux*_x86_64.whl)
aarch64_wheel=$(ls dist/fusedae-*-cp310-abi3-manylinux*_aarch64.whl)

step() {
    echo "== $* ($(date -u +%T))"
}

# What the tests need besides fusedae, from pyproject.toml: its dependencies and the groups that
# `make test` installs (the CLI's demo test needs the demo group, test_ops ONNX Runtime); mypy for
# stubtest is installed apart, its newest (older ones do not know the stubs' typing_extensions).
rm -rf "$work"
mkdir -p "$work"
# uv sits beside the project venv's python (3.11 or newer: tomllib).
"$(dirname "$uv")/python" - > "$work/requirements.txt" <<'EOF'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
groups = project["optional-dependencies"]
print("\n".join(project["dependencies"] + groups["test"] + groups["demo"] + groups["bench"]
                + groups["parquet"]))
EOF

# The tests, away from python/: only the installed fusedae can be imported.
cp -r tests pyproject.toml "$work/"
rm -rf "$work/tests/__pycache__"

# PATH without the directories that hold cargo or rustc: nothing can be compiled.
no_rust_path=$(tr ':' '\n' <<< "$PATH" | while read -r dir; do
    [[ -x "$dir/cargo" || -x "$dir/rustc" ]] || printf '%s:' "$dir"
done)

interpreter() {
    # pyenv's build of that version where there is one, else whatever uv finds (or downloads).
    local found
    found=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$1".*/bin/python 2> /dev/null | sort -V | tail -n1)
    echo "${found:-$1}"
}

in_venv() {
    local venv=$1
    shift
    (cd "$work" && env PATH="$venv/bin:$no_rust_path" VIRTUAL_ENV="$venv" "$@")
}

for version in "${versions[@]}"; do
    venv=$work/py$version
    step "Python $version: venv and install"
    "$uv" venv --quiet --python "$(interpreter "$version")" "$venv"
    resolution=highest
    [ "$version" = "${versions[0]}" ] && resolution=lowest-direct
    "$uv" pip install --quiet --python "$venv" --only-binary :all: --resolution "$resolution" \
        -r "$work/requirements.txt"
    "$uv" pip install --quiet --python "$venv" --only-binary :all: mypy
    # --refresh-package: uv caches a find-links wheel by its directory and file name, which stay
    # the same from build to build (CI's clone sits at one path), so it would install an old one.
    "$uv" pip install --quiet --python "$venv" --only-binary :all: --no-index --find-links dist \
        --refresh-package fusedae "fusedae[test,demo,bench]"
    in_venv "$venv" sh -c '! command -v cargo && ! command -v rustc'
    # Installed from this build's wheel: every file of the package byte for byte.
    in_venv "$venv" python -I -c "
import pathlib, site, sys, zipfile, fusedae
assert fusedae.__file__.startswith(tuple(site.getsitepackages())), fusedae.__file__
root = pathlib.Path(fusedae.__file__).parent.parent
wheel = zipfile.ZipFile(sys.argv[1])
stale = [n for n in wheel.namelist()
         if n.startswith('fusedae/') and (root / n).read_bytes() != wheel.read(n)]
assert not stale, f'installed files differ from {sys.argv[1]}: {stale}'
print('fusedae', fusedae.__version__, 'from', fusedae.__file__, fusedae.info()['isa'])" \
        "$x86_64_wheel"
    if [ "$version" = "${versions[0]}" ]; then
        step "Python $version: test suite, with $(in_venv "$venv" python -c \
            'import numpy, torch; print("torch", torch.__version__, "numpy", numpy.__version__)')"
        in_venv "$venv" python -m pytest -q -p no:cacheprovider tests
    else
        step "Python $version: smoke tests"
        in_venv "$venv" python -m pytest -q -p no:cacheprovider tests/test_smoke.py
    fi
done

venv=$work/py${versions[0]}
smoke=(-m pytest -q -p no:cacheprovider tests/test_smoke.py)

# The best ISA this CPU has, read independently of fusedae's own detection.
flags=$(grep -m1 '^flags' /proc/cpuinfo)
native_isa=scalar
if grep -qw avx512f <<< "$flags"; then
    native_isa=avx512
elif grep -qw avx2 <<< "$flags" && grep -qw fma <<< "$flags"; then
    native_isa=avx2
fi
step "native CPU: expect $native_isa"
in_venv "$venv" env FUSEDAE_EXPECT_ISA=$native_isa python "${smoke[@]}"
# qemu's CPU models: Nehalem has no AVX (an AVX instruction anywhere would be SIGILL), Haswell-v4
# has AVX2 and FMA but no AVX-512 (TCG emulates no AVX-512 at all). numpy's OpenBLAS is told the
# model's kernels: its own detection under qemu-user on an AMD Zen 4 host picks one Nehalem lacks
# (SIGILL in `import numpy`, before fusedae loads), which on a real Nehalem it would not.
for model_isa in Nehalem:scalar Haswell-v4:avx2; do
    model=${model_isa%:*}
    step "qemu-x86_64 -cpu $model: expect ${model_isa#*:}"
    in_venv "$venv" env FUSEDAE_EXPECT_ISA="${model_isa#*:}" OPENBLAS_CORETYPE="${model%-*}" \
        qemu-x86_64 -cpu "$model" "$venv/bin/python" "${smoke[@]}"
done

step "stubtest fusedae._native"
in_venv "$venv" python -m mypy.stubtest fusedae._native

step "aarch64 wheel under qemu-aarch64: expect neon"
tools/aarch64_python.sh target/aarch64-python
python3 -m zipfile -e "$aarch64_wheel" "$work/aarch64-site"
(cd "$work" && FUSEDAE_EXPECT_ISA=neon FUSEDAE_AARCH64_PATH="$work/aarch64-site" \
    "$repo/target/aarch64-python/python" -m pytest -q -p no:cacheprovider tests/test_smoke.py)
step "done"
