"""Low-rank ΔW (LoRA/LoCon, Tucker core) and the fused bypass out + s·up(down(x)).

`LowRankAdd` is the LoRA forward with the fewest kernels: the rank-r activations h = down(x) in
the host's own geometry (a Linear, or a k×k convolution with the host's stride, padding, dilation
and padding mode), then out + s·up·h in one matmul-add with s as its alpha. Backward forms each
gradient in one gemm with s as its alpha and down's two gradients in one host-op backward;
autograd keeps only h — rank-sized — beside x, which the host op saves anyway.
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


class LowRankAdd(torch.autograd.Function):
    """out + scale·up·op(x, down) on a host layer. Inputs: out, x, down, up (any trailing 1s),
    scale (a float), host (`hosts.HostLayer`); every tensor in out's dtype (the caller casts)."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, x: Tensor, down: Tensor, up: Tensor, scale: float, host: Any) -> Tensor:  # type: ignore[override]
        h = host.op(x, down, None)
        up2 = up.reshape(up.shape[0], -1)
        spatial = len(host.kernel_size)
        ctx.save_for_backward(x, down, up2, h)
        ctx.scale, ctx.host, ctx.up_shape = scale, host, up.shape
        return pointwise_add(out, h, up2, scale, spatial)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        x, down, up2, h = ctx.saved_tensors
        host = ctx.host
        need_out, need_x, need_down, need_up = ctx.needs_input_grad[:4]
        grad_h, grad_up = pointwise_grads(grad, h, up2, ctx.scale, len(host.kernel_size), need_x or need_down, need_up)
        grad_x = grad_down = None
        if grad_h is not None:
            grad_x, grad_down, _ = host.op_grads(x, down, grad_h, (need_x, need_down, False))
        if grad_up is not None:
            grad_up = grad_up.reshape(ctx.up_shape)
        return grad if need_out else None, grad_x, grad_down, grad_up, None, None


def lowrank_add(out: Tensor, x: Tensor, down: Tensor, up: Tensor, scale: float, host: Any) -> Tensor:
    """out + scale·up(down(x)) with the fewest kernels (see `LowRankAdd`)."""
    return LowRankAdd.apply(out, x, down, up, scale, host)
