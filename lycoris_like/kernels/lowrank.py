"""Low-rank ΔW rebuilds in the LyCORIS file layout (LoRA/LoCon, Tucker core)."""

from __future__ import annotations

import torch
from torch import Tensor


def lowrank_delta(up: Tensor, down: Tensor, mid: Tensor | None = None) -> Tensor:
    """ΔW = up · down, or with a Tucker core ΔW = mid ×₁ up ×₂ down.

    up (out, r[, 1…]); down (r, in[, k…]) or, with `mid` (r, r, k…), down (r, in[, 1…]).
    Returns (out, in[, k…]) — the host weight's shape. Scale `up` beforehand to include γ.
    """
    up2 = up.reshape(up.shape[0], up.shape[1])
    if mid is None:
        return (up2 @ down.reshape(down.shape[0], -1)).reshape(up.shape[0], *down.shape[1:])
    down2 = down.reshape(down.shape[0], down.shape[1])
    return torch.einsum("ij...,pi,jq->pq...", mid, up2, down2)
