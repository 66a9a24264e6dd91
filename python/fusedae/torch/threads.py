"""fusedae's multithreaded calls on PyTorch's own threads, where PyTorch runs its ops on an
OpenMP runtime: ``share_torch_threads``, which importing ``fusedae.torch`` calls."""

from __future__ import annotations

from pathlib import Path

import torch

from fusedae import _native

# OpenMP runtimes by the names PyTorch's builds load them under: its wheels' own copy in
# torch/lib (GNU libgomp on Linux, LLVM's libomp on macOS), else a system or conda one.
_RUNTIME_PATTERNS = ("libgomp*", "libomp*", "libiomp*")
_RUNTIME_NAMES = ("libgomp.so.1", "libomp.so", "libiomp5.so", "libomp.dylib", "libiomp5.dylib")


def share_torch_threads(share: bool = True) -> str | None:
    """Runs fusedae's multithreaded calls on the threads of the OpenMP runtime PyTorch's ops run
    on (``share``), or on fusedae's own pool (``share=False``); returns the runtime's library,
    or None where fusedae keeps its own pool (PyTorch's parallel backend is not OpenMP, or its
    runtime could not be found). ``fusedae.info()["threads_runtime"]`` says which runs them.

    Why: after each of its ops, PyTorch's OpenMP threads keep spinning, ready for the next; a
    training step alternates its ops (the loss, the optimizer) with fused calls, whose own
    threads then found the cores taken: the seed AE's step on 2 threads at 4096 rows took 20.4
    ms through fusedae's pool against 17.5 ms plain PyTorch (Zen 4). On PyTorch's threads the
    fused call finds them awake instead. ``fusedae.set_num_threads`` still says how many run a
    call. A process forked after this uses fusedae's pool (an OpenMP team's threads stay in the
    parent)."""
    if not share:
        _native.use_own_threads()
        return None
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    library_dir = Path(torch.__file__).parent / "lib"
    bundled = sorted(
        str(path) for pattern in _RUNTIME_PATTERNS for path in library_dir.glob(pattern)
    )
    for library in (*bundled, *_RUNTIME_NAMES):
        if _native.share_openmp_threads(library):
            return library
    return None
