"""``save``: a torch model's chain, lowered to a ``ChainSpec``, in one ``.safetensors`` file."""

from __future__ import annotations

import copy
import os
import warnings
from typing import cast

import numpy as np
import torch
from torch import nn

from fusedae import serialization
from fusedae._reference import forward
from fusedae.chain import ChainSpec, Layer, default_encoder_layers
from fusedae.torch.lower import lower, split, why_not_fused
from fusedae.torch.modules import AE, SEQUENTIALS, set_precision_below


def save(
    module: nn.Module, path: str | os.PathLike[str], *, encoder_layers: int | None = None
) -> None:
    """Writes ``module``'s weights and layer structure (every activation with its parameters,
    every BatchNorm) to one ``.safetensors`` file, which ``fusedae.MLP.load(path)`` reads with
    numpy alone (no PyTorch): ``chain_spec`` written by ``serialization.write_spec``."""
    serialization.write_spec(path, chain_spec(module, encoder_layers=encoder_layers))


def chain_spec(module: nn.Module, *, encoder_layers: int | None = None) -> ChainSpec:
    """The chain ``module`` computes, its tensors copied to CPU numpy arrays.

    ``module`` is either a chain (``nn.Sequential`` or ``FusedMLP`` of ``nn.Linear`` layers,
    each with the activations and BatchNorms ``lower`` fuses, such as an AE's ``encoder``
    alone), or a module whose only children are two such chains ``encoder`` and ``decoder``
    and whose forward is ``decoder(encoder(x))`` (the seed's ``AE``, ``fusedae.torch.AE``; for
    any class but the latter, checked: ``check_forward_is_the_chain``), or
    a Sequential of two such chains (``nn.Sequential(encoder, decoder)``): then the spec is one
    chain whose ``encoder_layers`` is the first chain's length. Otherwise
    ``encoder_layers`` defaults to the narrowest inner layer if the chain's output is as wide
    as its input (an autoencoder), else to all layers. Arrays are float64 if the first weight
    is float64, else float32. The chain is what the modules compute in eval mode (BatchNorm
    with its running statistics, Dropout as nothing), whatever mode they are in, and on rows:
    a leading ``nn.Flatten`` or trailing ``nn.Unflatten`` is left to the caller. Any other
    module is a TypeError naming the modules in the way.
    """
    halves = list(module._modules.items())
    probe = False
    if (
        type(module) in SEQUENTIALS
        and len(halves) == 2
        and all(type(half) in SEQUENTIALS for _, half in halves)
    ):
        chains: list[tuple[str, nn.Module | None]] = halves  # nn.Sequential(encoder, decoder)
    elif isinstance(module, nn.Sequential):
        chains = [("", module)]
    elif list(module._modules) == ["encoder", "decoder"] and not module._parameters:
        chains = list(module._modules.items())
        if type(module) is not AE:  # (fusedae's own: its forward is the two halves)
            probe = True
    else:
        raise TypeError(
            "fusedae takes an nn.Sequential of Linear layers with their activations and "
            "BatchNorms, or a module whose only children are such chains 'encoder' and "
            f"'decoder'; got {type(module).__name__} with children {list(module._modules)}"
        )
    layers: list[Layer] = []
    dtype: torch.dtype | None = None
    for name, chain in chains:
        lowered = lower(cast(nn.Sequential, chain)) if type(chain) in SEQUENTIALS else None
        if lowered is None:
            raise TypeError(why_not_a_chain(chain, name))
        if encoder_layers is None and len(chains) == 2 and name == chains[1][0]:
            encoder_layers = len(layers)  # the decoder starts here
        if dtype is None:
            first = lowered.layers[0][0].weight.dtype
            dtype = torch.float64 if first == torch.float64 else torch.float32
        tensors = [None if t is None else t.detach().to("cpu", dtype) for t in lowered.tensors()]
        layers.extend(lowered.spec(tensors).layers)
    if encoder_layers is None:
        widths = [layers[0].in_features, *(layer.out_features for layer in layers)]
        encoder_layers = default_encoder_layers(widths)
    spec = ChainSpec(tuple(layers), encoder_layers)
    if probe:
        check_forward_is_the_chain(module, spec)
    return spec


# The scales of the probe's rows, four rows each.
PROBE_SCALES = (1.0, 30.0, 1000.0)


def check_forward_is_the_chain(module: nn.Module, spec: ChainSpec) -> None:
    """A TypeError where ``module``'s own ``forward`` (a class with children ``encoder`` and
    ``decoder``) computes other than ``decoder(encoder(x))``, as ``spec`` holds it: a scale, an
    activation or a buffer there is not in the chain (a tester's class scaling its output saved
    and encoded 2.18 off, status 0). Run on rows of a fixed draw at the scales of
    ``PROBE_SCALES`` (a clamp or clean-up of the input or output that rows of unit scale do not
    reach) through a float64 copy on the CPU in eval mode, fused modules at full precision,
    without autocast (so a bf16 model, TF32 or an accelerated one at bf16 is compared at
    float64's precision); a forward returning a tuple is compared by its first item. Where the
    copy cannot run (a forward of other arguments or input shapes, a module that does not
    copy), a warning says it was not checked."""
    rows = 4 * len(PROBE_SCALES)
    draw = torch.randn(rows, spec.in_features, generator=torch.Generator().manual_seed(0))
    x = draw * torch.tensor(PROBE_SCALES, dtype=draw.dtype).repeat_interleave(4)[:, None]
    try:
        probe = copy.deepcopy(module).to("cpu", torch.float64).eval()
        set_precision_below(probe, "fp32")
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            result = probe(x.double())
        if isinstance(result, tuple | list) and result:
            result = result[0]
        got = cast(torch.Tensor, result).reshape(rows, -1).numpy()
    except Exception as error:  # whatever stops the probe, the chain itself stands
        warnings.warn(
            f"fusedae saves {type(module).__name__} as decoder(encoder(x)), without checking "
            f"its forward ({type(error).__name__}: {error})",
            stacklevel=3,
        )
        return
    folded = spec.folded().layers
    want, _ = forward([(layer.weight, layer.bias) for layer in folded], spec.post_ops, x.numpy())
    # (The spec holds the weights rounded to float32, the probe float64: 1e-7 of them.) Each
    # row against its own scale: the large rows' would pass anything on the small ones.
    scale = np.abs(want).max(axis=1, keepdims=True, initial=0.0)
    scale[scale == 0] = 1.0
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-5 * scale):
        off = (
            f"{float(np.abs(got - want).max()):.3g} off"
            if got.shape == want.shape
            else f"shape {got.shape} against {want.shape}"
        )
        raise TypeError(
            f"{type(module).__name__}'s forward computes other than decoder(encoder(x)) "
            f"({off} on a probe): fusedae saves the two chains alone, not what forward "
            "adds (a scale, an activation, a buffer); save an nn.Sequential of what it computes"
        )


def why_not_a_chain(chain: nn.Module | None, name: str) -> str:
    """Which modules stop ``chain`` (the child ``name`` of the model, ``""`` for the model
    itself) from lowering to one chain."""
    label = name or "the model"
    if type(chain) not in SEQUENTIALS:
        return f"{label} is a {type(chain).__name__}, not an nn.Sequential"
    children = list(cast(nn.Sequential, chain).named_children())
    if not children:
        return f"{label} is empty"
    pieces = split([child for _, child in children])

    def where(index: int) -> str:
        key, child = children[index]
        return (
            f"{name}.{key} ({type(child).__name__})" if name else f"{key} ({type(child).__name__})"
        )

    stuck = [
        f"{where(start)} into it: {why_not_fused(children[start][1])}"
        for start, _, lowered in pieces
        if lowered is None
    ]
    if stuck:
        return f"{label} is not one chain: fusedae cannot fuse {'; '.join(stuck)}"
    starts = ", ".join(where(start) for start, _, _ in pieces[1:])
    return f"{label} is {len(pieces)} chains, not one: they split before {starts}"
