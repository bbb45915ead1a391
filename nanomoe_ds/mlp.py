"""The GPT-2 MLP and its GELU: the dense blocks' MLP (model.py) and the MoE's shared experts (moe.py).

Its own file because both use it and model.py imports moe.py: in model.py, the
MoE's shared experts would make the two files import each other.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def gelu_approximate(gelu_variant: str) -> str:
    """F.gelu's `approximate` for a GELU variant (config.ACTIVATIONS): "tanh" for gelu_tanh (GPT-2's), else "none"."""
    return "tanh" if gelu_variant == "gelu_tanh" else "none"


def gelu(h: torch.Tensor, gelu_variant: str) -> torch.Tensor:
    """The MLP nonlinearity: exact GELU, or the tanh approximation GPT-2 was trained with ("gelu_tanh")."""
    return F.gelu(h, approximate=gelu_approximate(gelu_variant))


class MLP(nn.Module):
    """The GPT-2 MLP: the dense block, and the shared experts of DeepSeekMoE."""

    def __init__(self, d: int, hidden: int, bias: bool, dropout: float = 0.0, gelu_variant: str = "gelu"):
        super().__init__()
        self.c_fc = nn.Linear(d, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, d, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.gelu_variant = gelu_variant  # the config's `activation`: gelu or gelu_tanh

    def forward(self, x):
        return self.dropout(self.c_proj(gelu(self.c_fc(x), self.gelu_variant)))
