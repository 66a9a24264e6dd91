"""Comparing tensors in the torch tests."""

from __future__ import annotations

import torch


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest difference relative to ``want``'s largest magnitude, in float64."""
    if want.numel() == 0:
        return 0.0
    got64, want64 = got.detach().double(), want.detach().double()
    return float((got64 - want64).abs().max() / want64.abs().max().clamp_min(1e-30))
