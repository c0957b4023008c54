"""DoRA (Liu et al. 2024): W' = m ⊙ (W + ΔW) / ‖W + ΔW‖, the norm over one axis."""

from __future__ import annotations

import torch
from torch import Tensor


def weight_norm(weight: Tensor, on_out: bool) -> Tensor:
    """Column-vector norms kept broadcastable: (out, 1, …) on the output axis, (1, in, …) on the input axis."""
    dims = [d for d in range(weight.dim()) if d != (0 if on_out else 1)]
    return torch.linalg.vector_norm(weight, dim=dims, keepdim=True)


def dora_delta(weight: Tensor, delta: Tensor, magnitude: Tensor, on_out: bool) -> Tensor:
    """W' − W for DoRA. The norm is detached (the paper's §4.3 memory trick), and exactly
    W' = W when ΔW = 0 and `magnitude` is ‖W‖ — no epsilon, so identity at init holds bit-exactly."""
    merged = weight + delta
    norm = weight_norm(merged, on_out).detach()
    scale = torch.where(norm > 0, magnitude / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.ones_like(norm))
    return merged * scale - weight
