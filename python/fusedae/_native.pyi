"""Type stubs for the Rust extension module (``rust/python.rs``)."""

from typing import Literal

import numpy as np
import numpy.typing as npt
from typing_extensions import Self, disjoint_base

__all__ = [
    "MAX_THREADS",
    "POST_OPS",
    "Chain",
    "__version__",
    "available_isas",
    "build_profile",
    "cpu_vendor",
    "fma_peak_gflops",
    "get_num_threads",
    "half_registers_cheaper",
    "precision_support",
    "selected_isa",
    "set_num_threads",
    "share_openmp_threads",
    "target_arch",
    "threads_runtime",
    "threads_source",
    "use_own_threads",
]

__version__: str
build_profile: Literal["debug", "release"]
target_arch: str
POST_OPS: tuple[str, ...]
"""The post-ops the kernels apply to a layer's outputs, by name, in the Rust enum's order."""
MAX_THREADS: int
"""The most threads ``set_num_threads`` accepts."""

# A native class: Python cannot combine it with another native base (PEP 800).
@disjoint_base
class Chain:
    """A chain of Linear layers packed once for the fused kernels.

    ``weights[i]`` has shape ``(out_i, in_i)`` (PyTorch layout), ``biases[i]`` shape ``(out_i,)``
    or ``None``; all float32 or all float64, C-contiguous. ``post_ops[i]``, applied to layer
    ``i``'s outputs, is a name in ``POST_OPS`` or a ``(name, *parameters)`` tuple; an unknown
    name is a ValueError. ``isa`` forces a kernel (for tests). ``precision``: None computes in
    the weights' dtype; ``"bf16"`` stores float32 weights as bfloat16, ``"int8"`` as int8 with a
    scale per output, each layer's input rows quantized to uint8 (inference only: the training
    entry points raise ValueError).
    """

    def __new__(
        cls,
        weights: list[npt.NDArray[np.floating]],
        biases: list[npt.NDArray[np.floating] | None],
        post_ops: list[str | tuple[str | float, ...]],
        isa: str | None = None,
        precision: Literal["bf16", "int8"] | None = None,
    ) -> Self: ...
    def forward(
        self, x: npt.NDArray[np.floating], out: npt.NDArray[np.floating] | None = None
    ) -> npt.NDArray[np.floating]:
        """Runs the chain on ``x`` (``(rows, in_features)``, C-contiguous, the chain's dtype) into
        a new ``(rows, out_features)`` array (from 1 MiB up, a view of a block that starts on a
        cache line, where the stores run fastest), or into ``out`` (same shape and dtype,
        C-contiguous, not overlapping ``x``), which it returns. Raises on any other input."""
    def __call__(
        self, x: npt.NDArray[np.floating], out: npt.NDArray[np.floating] | None = None
    ) -> npt.NDArray[np.floating]:
        """``forward``, or, for input ``forward`` refuses, the subclass's ``_call_general(x, out)``
        where it has one."""
    def _forward_dlpack(self, capsule: object) -> npt.NDArray[np.floating]:
        """The chain on the tensor in a DLPack ``capsule`` (``torch.utils.dlpack.to_dlpack(x)``
        of a C-contiguous CPU tensor of the chain's dtype, shape ``(*, in_features)``), into a
        new ``(rows, out_features)`` array, read where the tensor lies; the GIL stays held, so no
        other thread resizes it meanwhile. Private to ``fusedae.torch``."""
    def _forward_saving_dlpack(
        self, capsule: object
    ) -> tuple[npt.NDArray[np.floating], npt.NDArray[np.floating]]:
        """``_forward_dlpack`` that also returns what the backward reads: ``(output, saved)``,
        ``saved`` of shape ``(rows, saved_width)``, laid out as ``saved_columns`` says. Private
        to ``fusedae.torch``."""
    def _backward_dlpack(
        self,
        x: object,
        saved: object,
        y: object,
        grad_output: object,
        needs_params: list[bool],
        needs_input: bool,
    ) -> tuple[npt.NDArray[np.floating] | None, npt.NDArray[np.floating]]:
        """The chain's backward from the forward's input ``x``, ``saved`` and output ``y`` (as
        ``_forward_saving_dlpack`` returned them) and ``grad_output``, all DLPack capsules of
        C-contiguous CPU tensors of the chain's dtype: ``(grad_x or None, grads)``, ``grads``
        1-d, each layer's weight gradient (``out x in``) then bias gradient (``out``), zeros
        where ``needs_params`` is false; ``grad_x`` ``(rows, in_features)`` where
        ``needs_input``. Weight gradients are summed per thread over fixed shares of the rows,
        then in order: the same bits on every call with the same thread count. Private to
        ``fusedae.torch``."""
    @property
    def saved_columns(self) -> list[tuple[int | None, int | None]]:
        """Per layer ``(outputs, pre)``: the columns of a row of ``saved`` where its outputs
        (every layer but the last) and its pre-activations (where its op's gradient reads them)
        start, or None."""
    @property
    def saved_width(self) -> int: ...
    @property
    def dtype(self) -> np.dtype:
        """float32 or float64: the chain's values, and what it takes and gives."""
    @property
    def precision(self) -> Literal["fp32", "fp64", "bf16", "int8"]:
        """How the weights are stored: the dtype's own (``"fp32"``, ``"fp64"``), ``"bf16"`` or
        ``"int8"``."""
    @property
    def isa(self) -> Literal["avx512", "avx2", "neon", "scalar"]: ...
    @property
    def in_features(self) -> int: ...
    @property
    def out_features(self) -> int: ...
    @property
    def flops_per_row(self) -> int: ...

def selected_isa() -> Literal["avx512", "avx2", "neon", "scalar"]: ...
def available_isas() -> list[str]: ...
def half_registers_cheaper() -> bool: ...
def cpu_vendor() -> str:
    """CPUID's vendor string (``"AuthenticAMD"``, ``"GenuineIntel"``), ``""`` off x86-64."""

def set_num_threads(threads: int) -> None: ...
def get_num_threads() -> int: ...
def threads_source() -> str: ...
def share_openmp_threads(library: str) -> bool:
    """Runs the calling thread's multithreaded calls on the threads of the OpenMP runtime
    ``library`` (a path or a loaded library's name) already loaded in this process, while it
    runs that thread's parallel regions on more than one thread; False, and nothing changes,
    where none of that name is loaded or it has no ``GOMP_parallel``."""

def use_own_threads() -> None:
    """Runs the multithreaded calls on fusedae's own pool again."""

def threads_runtime() -> str:
    """The threads the calling thread's multithreaded calls are handed to: ``"fusedae"`` (its
    own pool) or ``"openmp:"`` and the shared runtime's library (whose threads run them while it
    runs that thread on more than one)."""

def fma_peak_gflops(
    seconds: float = 0.2,
    dtype: str = "float32",
    isa: str | None = None,
    precision: Literal["bf16", "int8"] | None = None,
) -> float:
    """GFLOP/s of one thread running register-only FMAs: the ceiling for kernel speed. With
    ``precision="bf16"`` or ``"int8"``, the ceiling of that precision's kernel's own instruction
    (``vdpbf16ps``, ``vpdpbusd`` where it has one, counted as the FMAs it replaces; else the
    float32 FMA)."""

def precision_support(
    isa: str | None = None,
) -> list[tuple[str, Literal["native", "mixed", "widened", "emulated"]]]:
    """How each precision runs on ``isa`` (default: the selected one): ``"native"`` in its own
    instructions, ``"widened"`` with its weights stored narrow and widened to float32,
    ``"emulated"`` on the float32 kernel with the weights rounded to it (int8: the inputs left in
    float32), ``"mixed"`` native for calls of one or two rows and emulated above (bf16 on
    Intel's AVX512_BF16)."""
