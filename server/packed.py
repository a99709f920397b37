"""Frozen weights kept a second time in oneDNN's blocked layout, for inference matmuls on the CPU.

torch's `F.linear` on the CPU calls MKL's sgemm with the weight as it is stored; for the few rows of a decode step
that path reads the weight at a fraction of the memory bandwidth. oneDNN's matmul over a weight reordered once into
its own blocked layout is the one inductor uses for frozen CPU models: on the embedded base's 30 layers (float32, one
thread, AVX-512 EPYC) it took 50 ms against 88 ms for 8 rows, 46 against 83 for 4, 193 against 287 for 64 tokens
(benchmarks/linear_floor.py). Its results differ from MKL's by summation order only (~1e-6 relative).

The copy costs the weight's size again in memory; training and merges keep using the plain weight (a merge packs it
again). `pack` returns None where oneDNN is unavailable or the dtype is not float32: callers then use F.linear.
"""

from __future__ import annotations

import torch
from torch import nn

PACK_FOR_ROWS = 8  # oneDNN's layout hint; one packing serves every row count (measured 1 to 256)


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` [out, in] in oneDNN's layout, or None where that path is unavailable."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not available():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_FOR_ROWS)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ weight.T + bias with the packed weight (no autograd: inference only)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    """A frozen nn.Linear (the LM head) whose inference forwards multiply with its packed weight; with autograd on,
    the plain layer runs."""

    def __init__(self, layer: nn.Linear, packed: torch.Tensor):
        super().__init__()
        self.layer = layer
        self.packed = packed

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.layer(x)
        return linear(x, self.packed, self.layer.bias)
