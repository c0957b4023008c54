"""(IA)³'s output side: y ⊙ (1 + m·l) over channels with the fewest kernels, exact for a small l.

Full precision: the product with 1 + m·l (built on the channel-sized vector) under plain autograd.
Half precision: 1 + l rounded to 8–11 bits would lose a small l, so the additive form y + m·y ⊙ l,
one addcmul, in a Function whose backward forms ∇y in one multiply-add and ∇l in a multiply and a
reduction (plain autograd would add the two paths to y). Without autograd the result is written
over y, the host op's fresh output.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class ChannelScaleAdd(torch.autograd.Function):
    """y + m·y ⊙ v for v broadcast over y's channel axis; saves y and v."""

    @staticmethod
    def forward(ctx: Any, y: Tensor, vec: Tensor, multiplier: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(y, vec)
        ctx.multiplier = multiplier
        return torch.addcmul(y, y, vec, value=multiplier)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        y, vec = ctx.saved_tensors
        m = ctx.multiplier
        grad_y = torch.addcmul(grad, grad, vec, value=m) if ctx.needs_input_grad[0] else None
        grad_vec = None
        if ctx.needs_input_grad[1]:
            grad_vec = (grad * y).sum_to_size(vec.shape)
            if m != 1:
                grad_vec = grad_vec * m
        return grad_y, grad_vec, None


def channel_scale_add(y: Tensor, vec: Tensor, multiplier: float) -> Tensor:
    """y ⊙ (1 + m·vec), vec (in y's dtype) broadcast over y's channel axis (see the module docstring)."""
    if y.dtype in (torch.float32, torch.float64):
        scale = vec + 1 if multiplier == 1 else vec * multiplier + 1
        return y.mul_(scale) if not torch.is_grad_enabled() else y * scale
    if not torch.is_grad_enabled():
        return y.addcmul_(y, vec, value=multiplier)
    return ChannelScaleAdd.apply(y, vec, multiplier)
