"""fusedae's multithreaded calls on PyTorch's own threads, where PyTorch runs its ops on an
OpenMP runtime: ``share_torch_threads``, which importing ``fusedae.torch`` calls."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from fusedae import _native

# An OpenMP runtime's file name: GNU libgomp (PyTorch's Linux wheels; `libgomp-<hash>.so.1.0.0`
# where auditwheel renamed it), LLVM's libomp (macOS), Intel's libiomp5.
_RUNTIME_NAME = re.compile(r"lib(gomp|omp|iomp5)([-.].*)?\.(so|dylib)(\..*)?")
# Where no loaded library can be listed, the names PyTorch's builds load one under.
_RUNTIME_NAMES = ("libgomp.so.1", "libomp.so", "libiomp5.so", "libomp.dylib", "libiomp5.dylib")


def _loaded_runtimes() -> list[str]:
    """Where an OpenMP runtime PyTorch may run on can be loaded from, PyTorch's own first: its
    library folders (``torch/lib``, auditwheel's ``torch.libs``), then every runtime this process
    has mapped (Linux: ``/proc/self/maps``; another library may have brought its own), then the
    usual names."""
    torch_dir = Path(torch.__file__).parent
    paths = [
        str(path)
        for folder in (torch_dir / "lib", torch_dir.parent / "torch.libs")
        for path in folder.glob("lib*")
    ]
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            # address, permissions, offset, device, inode, then the path (none: anonymous)
            fields = (line.split(maxsplit=5) for line in maps)
            paths += [entry[5].strip() for entry in fields if len(entry) == 6]
    except OSError:
        pass
    found = dict.fromkeys(path for path in paths if _RUNTIME_NAME.fullmatch(os.path.basename(path)))
    return [*found, *_RUNTIME_NAMES]


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
    call (``OMP_THREAD_LIMIT`` and ``OMP_DYNAMIC`` cap it there, as they cap PyTorch's ops).

    Only the calling thread's calls go to PyTorch's threads (the runtime keeps a team of threads
    for each thread that starts one), and only while PyTorch runs its ops on more than one
    thread there (at one, as in a ``DataLoader`` worker, its threads are not in the way, and in
    a child forked after the parent's team started, a team never returns); other threads, and
    a process forked after this, use fusedae's pool."""
    if not share:
        _native.use_own_threads()
        return None
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    for library in _loaded_runtimes():
        if _native.share_openmp_threads(library):
            return library
    return None
