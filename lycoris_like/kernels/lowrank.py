"""Low-rank ΔW (LoRA/LoCon, Tucker core) and the fused add out + s·up·h of a bypass.

The LoRA forward with the fewest kernels: the rank-r activations h = down(x) in the host's own
geometry (a Linear, or a k×k convolution with the host's stride, padding, dilation and padding
mode), then `lowrank_add`: out + s·up·h in one matmul-add with s as its alpha. Backward forms each
of its gradients in one gemm with s as their alpha; autograd keeps only h — rank-sized — beside
x, which the host op saves anyway. LoHa (Khatri-Rao factors) and LoKr (Kronecker factors) use it
for their bypasses too.
"""

from __future__ import annotations

from typing import Any

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


def batched_channels(t: Tensor, spatial: int) -> Tensor:
    """A conv activation (N, C, S…) or unbatched (C, S…) as (N, C, S), spatial dims flattened (a view)."""
    return t.flatten(-spatial).unsqueeze(0) if t.dim() == spatial + 1 else t.flatten(2)


def pointwise_add(out: Tensor, h: Tensor, up: Tensor, scale: float, spatial: int) -> Tensor:
    """out + scale·up·h over the channel axis (last for Linear, before the `spatial` dims for
    convs) as one addmm / baddbmm; `up` is (out, r)."""
    if not spatial:
        return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), up.T, alpha=scale).reshape(out.shape)
    out3, h3 = batched_channels(out, spatial), batched_channels(h, spatial)
    return torch.baddbmm(out3, up.expand(out3.shape[0], *up.shape), h3, alpha=scale).reshape(out.shape)


def pointwise_grads(grad: Tensor, h: Tensor, up: Tensor, scale: float, spatial: int,
                    need_h: bool, need_up: bool) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of Σ grad ⊙ (scale·up·h) with respect to h and up (one gemm each, scale as alpha)."""
    grad_h = grad_up = None
    if not spatial:
        g2, h2 = grad.reshape(-1, grad.shape[-1]), h.reshape(-1, h.shape[-1])
        if need_h:
            grad_h = torch.addmm(h2, g2, up, beta=0, alpha=scale).reshape(h.shape)
        if need_up:
            grad_up = torch.addmm(up, g2.T, h2, beta=0, alpha=scale)
        return grad_h, grad_up
    g3, h3 = batched_channels(grad, spatial), batched_channels(h, spatial)
    if need_h:
        grad_h = torch.baddbmm(h3, up.T.expand(g3.shape[0], *up.T.shape), g3, beta=0, alpha=scale).reshape(h.shape)
    if need_up:
        per_batch = torch.baddbmm(up.expand(g3.shape[0], *up.shape), g3, h3.transpose(1, 2), beta=0, alpha=scale)
        grad_up = per_batch[0] if g3.shape[0] == 1 else per_batch.sum(0)
    return grad_h, grad_up


class PointwiseAdd(torch.autograd.Function):
    """out + scale·up·h over the channel axis, one gemm forward and one per gradient backward
    (scale their alpha); saves h (rank-sized) and up. Inputs: out, h, up (out, r), scale, spatial."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, h: Tensor, up: Tensor, scale: float, spatial: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(h, up)
        ctx.scale, ctx.spatial = scale, spatial
        return pointwise_add(out, h, up, scale, spatial)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        h, up = ctx.saved_tensors
        need_out, need_h, need_up = ctx.needs_input_grad[:3]
        grad_h, grad_up = pointwise_grads(grad, h, up, ctx.scale, ctx.spatial, need_h, need_up)
        return grad if need_out else None, grad_h, grad_up, None, None


def lowrank_add(out: Tensor, h: Tensor, up: Tensor, scale: float, spatial: int, fused: bool = False) -> Tensor:
    """out + scale·up·h over the channel axis (last for Linear, before the `spatial` dims for
    convs); `up` any (out, r, 1…) layout. Together with the host op that made h = down(x) —
    whose autograd forms both of down's gradients in one op for convs — this is the LoRA forward.

    Linear: one addmm with scale as its alpha under plain autograd (its backward, two more
    multiplies, costs less than a Python backward at small sizes), unless `fused` asks for
    `PointwiseAdd` (a path that runs many ops anyway: DoRA). Convs: `PointwiseAdd`, which saves
    the per-batch reduction and the alpha multiplies of baddbmm's backward."""
    if up.dim() != 2:
        up = up.reshape(up.shape[0], -1)
    if spatial or fused:
        return PointwiseAdd.apply(out, h, up, scale, spatial)
    if out.dim() == 2:
        return torch.addmm(out, h, up.T, alpha=scale)
    flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), up.T, alpha=scale)
    return flat.view(out.shape)
