"""PyTorch front end: the fused kernels behind ``nn.Module``s that are drop-in for the seed's.

* ``FusedMLPFunction``: a ``torch.autograd.Function`` running a chain of Linear layers through
  the fused CPU kernel, with the fused backward in Rust (``function.py``).
* ``FusedMLP``: an ``nn.Sequential`` with the same children, ``state_dict`` keys and printout,
  whose runs of ``nn.Linear`` with the op table's activations (and eval-mode ``nn.BatchNorm1d``
  folded in, ``nn.Dropout``, a leading ``nn.Flatten``, a trailing ``nn.Unflatten``) run fused
  on CPU for float32/float64, and everything else as plain PyTorch (other children, CUDA, other
  dtypes, autocast, training-mode BatchNorm).
* ``torch.compile`` and ``torch.export`` trace the fused call as the custom ops
  ``fusedae::chain`` and ``fusedae::chain_saving``, whose backward is ``fusedae::chain_backward``
  (``custom_ops.py``).
* ``AE``: the seed's autoencoder, encoder and decoder run as one fused call on CPU
  (``modules.py``; the packed weights are cached in ``cache.py``).
* ``accelerate`` turns a model's ``nn.Sequential``s holding such runs into ``FusedMLP``s;
  ``save`` writes one to a ``.safetensors`` file. Modules become a ``ChainSpec`` through
  ``lower.py``.
* Importing it runs fusedae's multithreaded calls on PyTorch's OpenMP threads, not fusedae's own
  pool, which PyTorch's spinning threads kept off the cores (``share_torch_threads``,
  ``threads.py``).
"""

from fusedae.torch.accelerate import AccelerateReport, accelerate
from fusedae.torch.function import (
    FusedMLPFunction,
    InputDtypeError,
    InputShapeError,
    pack_chain,
)
from fusedae.torch.modules import AE, FusedMLP, invalidate
from fusedae.torch.saving import save
from fusedae.torch.threads import share_torch_threads

__all__ = [
    "AE",
    "AccelerateReport",
    "FusedMLP",
    "FusedMLPFunction",
    "InputDtypeError",
    "InputShapeError",
    "accelerate",
    "invalidate",
    "pack_chain",
    "save",
    "share_torch_threads",
]

share_torch_threads()
