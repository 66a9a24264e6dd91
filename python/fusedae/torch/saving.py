"""``save``: a torch model's chain, lowered to a ``ChainSpec``, in one ``.safetensors`` file."""

from __future__ import annotations

import os
from typing import cast

import torch
from torch import nn

from fusedae import serialization
from fusedae.chain import ChainSpec, Layer, default_encoder_layers
from fusedae.torch.lower import lower
from fusedae.torch.modules import SEQUENTIALS


def save(
    module: nn.Module, path: str | os.PathLike[str], *, encoder_layers: int | None = None
) -> None:
    """Writes ``module``'s weights and layer structure to one ``.safetensors`` file, which
    ``fusedae.MLP.load(path)`` reads with numpy alone (no PyTorch).

    ``module`` is either a chain (``nn.Sequential`` or ``FusedMLP`` of ``nn.Linear`` with
    ``nn.ReLU`` / ``nn.Identity`` between, such as an AE's ``encoder`` alone), or a module whose
    only children are two such chains ``encoder`` and ``decoder`` and whose forward is
    ``decoder(encoder(x))`` (the seed's ``AE``, ``fusedae.torch.AE``): then the file holds one
    chain and records the encoder's length as ``encoder_layers``. Otherwise ``encoder_layers``
    defaults to the narrowest inner layer if the chain's output is as wide as its input (an
    autoencoder), else to all layers. Parameters are saved as float64 if the first weight is
    float64, else as float32.
    """
    if isinstance(module, nn.Sequential):
        chains: list[tuple[str, nn.Module | None]] = [("module", module)]
    elif list(module._modules) == ["encoder", "decoder"] and not module._parameters:
        chains = list(module._modules.items())
    else:
        raise TypeError(
            "save takes an nn.Sequential of Linear/ReLU/Identity layers, or a module whose only "
            f"children are such chains 'encoder' and 'decoder'; got {type(module).__name__} "
            f"with children {list(module._modules)}"
        )
    layers: list[Layer] = []
    dtype: torch.dtype | None = None
    for name, chain in chains:
        lowered = lower(cast(nn.Sequential, chain)) if type(chain) in SEQUENTIALS else None
        if lowered is None:
            raise TypeError(f"{name} is not an nn.Sequential of Linear/ReLU/Identity: {chain}")
        if encoder_layers is None and name == "decoder":
            encoder_layers = len(layers)
        if dtype is None:
            first = lowered.layers[0][0].weight.dtype
            dtype = torch.float64 if first == torch.float64 else torch.float32
        tensors = [None if t is None else t.detach().to("cpu", dtype) for t in lowered.tensors()]
        layers.extend(lowered.spec(tensors).layers)
    if encoder_layers is None:
        widths = [layers[0].in_features, *(layer.out_features for layer in layers)]
        encoder_layers = default_encoder_layers(widths)
    serialization.write_spec(path, ChainSpec(tuple(layers), encoder_layers))
