"""y + m·y ⊙ l over channels in one op — (IA)³'s output side.

The additive form keeps a small l exact in half precision (1 + l rounded to 11 bits would lose
it), and one addcmul is one kernel: the forward reads y once, backward forms ∇y in one addcmul and
∇l in a multiply and a reduction. Without autograd the result is written over y, the host op's
fresh output.
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
    """y + m·y ⊙ vec (see `ChannelScaleAdd`); in place on y when autograd does not record."""
    if not torch.is_grad_enabled():
        return y.addcmul_(y, vec, value=multiplier)
    return ChannelScaleAdd.apply(y, vec, multiplier)
