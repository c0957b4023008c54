"""out = y ⊙ s over channels, written over y — the host's fresh output — for (IA)³.

The plain product allocates a second output-sized tensor and autograd keeps y alive for ∇s. Here
the product overwrites y (nothing else holds it) and the saved tensor is the result itself, which
the next op usually saves anyway (attention's q/k/v, GEGLU's halves): ∇s = (Σ g ⊙ out) / s, the
division on the channel-sized sum, which differs from Σ g ⊙ y by the rounding of out only.
That needs every sᵢ ≠ 0: the caller checks it (`rescale_in_place_ok`).
"""

from __future__ import annotations

import torch
from torch import Tensor


class ChannelRescale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, scale: Tensor) -> Tensor:  # type: ignore[override]
        y.mul_(scale)
        ctx.mark_dirty(y)
        ctx.save_for_backward(y, scale)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        out, scale = ctx.saved_tensors
        grad_y = grad * scale if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            grad_scale = (grad * out).sum_to_size(scale.shape) / scale
        return grad_y, grad_scale


def rescale_in_place_ok(y: Tensor, scale: Tensor) -> bool:
    """Whether `rescale_` applies: y is a fresh CPU output in y's dtype, scale has no zero (∇s
    divides by it) and broadcasts to y without growing it. On accelerators the check would stall
    the device once per layer, so they keep the plain product."""
    fits = scale.dim() <= y.dim() and all(n in (1, m) for n, m in zip(reversed(scale.shape), reversed(y.shape)))
    return (fits and y.device.type == "cpu" and scale.device == y.device and scale.dtype == y.dtype
            and not torch.compiler.is_compiling() and bool(scale.ne(0).all()))


def rescale_(y: Tensor, scale: Tensor) -> Tensor:
    """y ⊙ scale written over y (differentiable in both; see the module docstring)."""
    return ChannelRescale.apply(y, scale)
