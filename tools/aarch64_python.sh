#!/usr/bin/env bash
# Builds an arm64 Python 3.11 under ROOT that runs on an x86-64 host through qemu-aarch64, with
# numpy, pytest and the test suite's other pure dependencies, and no emulated pip: Debian's arm64
# packages are unpacked (not installed) into ROOT, and the Python packages are installed by the
# host's pip for the aarch64 platform. Writes ROOT/python, a wrapper that runs it (extra module
# paths in FUSEDAE_AARCH64_PATH, colon-separated). Does nothing when ROOT is already complete.
#
# Needs root for `dpkg --add-architecture arm64` and `apt-get update` the first time, qemu-user,
# and network access to Debian's mirror and PyPI. Debian bookworm: glibc 2.36, python3.11.
#
# Usage: tools/aarch64_python.sh ROOT
set -euo pipefail

root=${1:?usage: $0 ROOT}
mkdir -p "$root"
root=$(cd "$root" && pwd)

# What the interpreter and the extension modules the tests import load (checked with qemu:
# `ROOT/python -c 'import ssl, sqlite3, decimal, ctypes, lzma, bz2, readline, uuid'`).
debs=(
    python3.11-minimal libpython3.11-minimal libpython3.11-stdlib
    libc6 libgcc-s1 libstdc++6 zlib1g libexpat1 libffi8 libssl3 libbz2-1.0 liblzma5
    libsqlite3-0 libncursesw6 libtinfo6 libreadline8 libuuid1 libcrypt1
)
pip_packages=(numpy pytest pytest-benchmark tqdm hypothesis safetensors mpmath)
# torch for the kernel tests' PyTorch oracles (test_activations.py, test_native.py's DLPack):
# 2.5.1 is the last aarch64 wheel on PyPI built for the CPU only (later ones load CUDA's
# libraries, gigabytes); importing it takes about 25 s under qemu. pip reads its dependencies'
# markers for the host (x86_64 wants CUDA's packages), so they are named here and torch is
# installed without them.
torch_packages=(filelock typing-extensions sympy==1.13.1 networkx jinja2 fsspec)
torch=torch==2.5.1

# The stamp names what is in ROOT, so changing either list rebuilds it.
stamp="$root/.complete"
want="${debs[*]} | ${pip_packages[*]} ${torch_packages[*]} $torch"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi

if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64
    apt-get update -qq
fi
if ! apt-cache show python3.11-minimal:arm64 > /dev/null 2>&1; then
    apt-get update -qq
fi

mkdir -p "$root/debs"
(cd "$root/debs" && apt-get download -qq -o APT::Sandbox::User=root "${debs[@]/%/:arm64}")
for deb in "$root"/debs/*.deb; do
    dpkg -x "$deb" "$root"
done
rm -rf "$root/debs"

pip_install=(
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore
    --upgrade --target "$root/site" --platform manylinux2014_aarch64 --python-version 3.11
    --implementation cp --only-binary=:all: --no-warn-conflicts
)
"${pip_install[@]}" "${pip_packages[@]}" "${torch_packages[@]}"
"${pip_install[@]}" --no-deps "$torch"

# qemu-user cannot start a foreign binary by itself (no binfmt_misc here), so `-0` makes the
# wrapper the interpreter's argv[0]: `sys.executable` is then this script, and the tests'
# subprocesses (`[sys.executable, "-c", ...]`) go through qemu too. PYTHONHOME points at the
# unpacked stdlib, which Python cannot find from the wrapper's path. qemu's default CPU has SVE,
# whose emulation is slow: OpenBLAS (numpy's matmul, the tests' float64 reference) picks its SVE
# kernels there and ran 17x slower than with its Neoverse N1 (NEON) ones, and its threads spin.
cat > "$root/python" <<EOF
#!/bin/sh
export PYTHONHOME="$root/usr"
export OPENBLAS_CORETYPE="\${OPENBLAS_CORETYPE:-NEOVERSEN1}"
export OPENBLAS_NUM_THREADS="\${OPENBLAS_NUM_THREADS:-1}"
export PYTHONPATH="$root/site\${FUSEDAE_AARCH64_PATH:+:\$FUSEDAE_AARCH64_PATH}"
exec qemu-aarch64 -L "$root" -0 "$root/python" "$root/usr/bin/python3.11" "\$@"
EOF
chmod +x "$root/python"

"$root/python" -c 'import ssl, sqlite3, decimal, ctypes, lzma, bz2, uuid, numpy, pytest, torch'
echo "$want" > "$stamp"
