"""fusedae: fused SIMD CPU kernels for small MLPs and autoencoders.

``import fusedae`` never imports torch; the PyTorch front end lives in ``fusedae.torch``.
"""

from fusedae import _native
from fusedae._native import get_num_threads, set_num_threads
from fusedae.mlp import MLP

__version__: str = _native.__version__

__all__ = ["MLP", "__version__", "get_num_threads", "info", "set_num_threads"]


def info() -> dict[str, object]:
    """Version, the kernel ISA in use, the ISAs this CPU supports, threads and build profile.
    ``half_registers``: the kernels count a multiply-add on half a register as half the cost of a
    whole one (AVX-512 on AMD Zen 4, decided from the CPU's identity), so layers such as 784 -> 42
    run as 40 + 2 outputs rather than padded to 48.

    ``threads``: what a large batch is split across, resolved at first use from
    ``set_num_threads()``, else ``FUSEDAE_NUM_THREADS``, else ``OMP_NUM_THREADS`` (as Ray, Dask
    and Spark set it for a worker), else the CPUs this process may use (affinity and cgroup
    quota), the last three at most ``OMP_THREAD_LIMIT``; ``threads_from`` says which.
    ``threads_runtime``: the threads the calling thread's are handed to, ``"fusedae"`` (its own
    pool) or ``"openmp:"`` and the library of PyTorch's OpenMP runtime, whose threads
    ``fusedae.torch`` shares (``fusedae.torch.share_torch_threads``; they run the calls while
    PyTorch runs more than one thread).

    ``cpu_vendor``: CPUID's vendor string (``"AuthenticAMD"``, ``"GenuineIntel"``; ``""`` off
    x86-64), which some choices no instruction set tells apart are made from (bf16's form, the
    training gate of ``fusedae.torch``).

    ``precisions``: how each ``precision=`` runs on the selected ISA: ``"native"`` in its own
    instructions (bf16 with AVX512_BF16 on AMD, int8 with AVX512_VNNI), ``"widened"`` with the
    weights stored narrow and widened to float32 in registers (bf16 with ``FUSEDAE_BF16=widen``),
    ``"emulated"`` on the float32 kernel with the weights rounded to it (the rest: never slower
    than fp32), ``"mixed"`` native for calls of one or two rows and emulated above (bf16 with
    Intel's AVX512_BF16, which runs at half the FMA's rate); same error bound.

    Raises ``ValueError`` / ``RuntimeError`` if ``FUSEDAE_ISA`` names an unknown ISA or one this
    CPU lacks.
    """
    return {
        "version": __version__,
        "isa": _native.selected_isa(),
        "available_isas": _native.available_isas(),
        "half_registers": _native.half_registers_cheaper(),
        "cpu_vendor": _native.cpu_vendor(),
        "precisions": dict(_native.precision_support()),
        "threads": _native.get_num_threads(),
        "threads_from": _native.threads_source(),
        "threads_runtime": _native.threads_runtime(),
        "build_profile": _native.build_profile,
        "target_arch": _native.target_arch,
    }
