"""Small building blocks: RMSNorm, the SwiGLU feed-forward network, what a linear layer computes with."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich, arXiv 1910.07467), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` (Shazeer, arXiv 2002.05202): the dense layers and shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def computed_weight(linear: nn.Linear) -> torch.Tensor:
    """The weight ``linear`` actually multiplies by.

    A plain ``nn.Linear`` uses its ``weight``; a subclass that transforms it on the fly (the block-wise
    FP8 linear of :mod:`nanoseek.fp8_training`) exposes ``computed_weight()``. Code that uses a
    layer's weight directly instead of calling the layer (MLA's absorbed decode) asks here, so that it
    computes what the layer computes.
    """
    fn = getattr(linear, "computed_weight", None)
    return fn() if fn is not None else linear.weight


def computed_input(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``linear`` sees it (FP8 layers quantise their input in 1x128 tiles), in ``x``'s dtype."""
    fn = getattr(linear, "computed_input", None)
    return fn(x) if fn is not None else x
