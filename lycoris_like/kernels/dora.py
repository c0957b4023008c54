"""DoRA (Liu et al. 2024): W' = m ⊙ (W + ΔW) / ‖W + ΔW‖, the norm over one axis."""

from __future__ import annotations

import torch
from torch import Tensor


def weight_norm(weight: Tensor, on_out: bool) -> Tensor:
    """Column-vector norms kept broadcastable: (out, 1, …) on the output axis, (1, in, …) on the input axis."""
    dims = [d for d in range(weight.dim()) if d != (0 if on_out else 1)]
    return torch.linalg.vector_norm(weight, dim=dims, keepdim=True)


def magnitude_scale(merged: Tensor, magnitude: Tensor, on_out: bool) -> Tensor:
    """m / ‖W + ΔW‖ per channel (broadcastable on W). The norm is detached (the paper's §4.3 memory
    trick) and rounded to m's dtype first, so the scale is exactly 1 where m is ‖W‖ and ΔW = 0 —
    identity at init, bit for bit, in every parameter dtype; it is clamped at the smallest normal
    number, so an all-zero channel of zero magnitude gives 0, not NaN."""
    with torch.no_grad():
        norm = weight_norm(merged.detach(), on_out).to(magnitude.dtype)
        norm.clamp_min_(torch.finfo(norm.dtype).tiny)
    return magnitude / norm


def dora_delta(weight: Tensor, merged: Tensor, magnitude: Tensor, on_out: bool) -> Tensor:
    """W' − W = s ⊙ (W + ΔW) − W for `merged` = W + ΔW: exactly zero when ΔW = 0 and m = ‖W‖."""
    scale = magnitude_scale(merged, magnitude, on_out).to(merged.dtype)
    return merged * scale - weight
