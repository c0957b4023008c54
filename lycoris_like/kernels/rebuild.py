"""y = op(x, W′, b′) with W′, b′ rebuilt from small factors — without keeping W′ alive until backward.

A plain autograd graph of `op(x, W + ΔW)` saves the full-size W′ for the input gradient: one extra
weight copy per adapted layer until backward. This Function saves only x and the factors, and in
backward rebuilds W′ (cheap: a low-rank product, a sparse update), then asks the host for its two
gradients (input and weight) in one call and pushes the weight gradient into the factors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Build = Callable[[], tuple[Tensor, Tensor | None]]
Op = Callable[[Tensor, Tensor, Tensor | None], Tensor]
OpGrads = Callable[[Tensor, Tensor, Tensor, tuple[bool, bool, bool]], tuple[Tensor | None, Tensor | None, Tensor | None]]


class RebuiltOp(torch.autograd.Function):
    """Inputs: x, build (→ W′, b′), op (x, W′, b′ → y), op_grads (x, W′, grad_y, needs → gx, gW, gb), *params."""

    @staticmethod
    def forward(ctx, x: Tensor, build: Build, op: Op, op_grads: OpGrads, *params: Tensor) -> Tensor:  # type: ignore[override]
        ctx.build, ctx.op_grads = build, op_grads
        ctx.rng = torch.random.get_rng_state()  # rank dropout must draw the same mask again
        with torch.no_grad():
            weight, bias = build()
            y = op(x, weight, bias)
        ctx.params = params  # leaves (parameters): kept by reference, never copied
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        params = ctx.params
        trainable = [p for p in params if p.requires_grad]
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.random.set_rng_state(ctx.rng)
            weight, bias = ctx.build()
        need_x = ctx.needs_input_grad[0]
        need_w = weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        grad_x, grad_w, grad_b = ctx.op_grads(x, weight.detach(), grad_y, (need_x, need_w, need_b))
        outputs, grads = [], []
        if need_w:
            outputs.append(weight)
            grads.append(grad_w)
        if need_b:
            outputs.append(bias)
            grads.append(grad_b)
        param_grads: Sequence[Tensor | None] = ()
        if outputs and trainable:
            param_grads = torch.autograd.grad(outputs, trainable, grads, allow_unused=True)
        by_id = {id(p): g for p, g in zip(trainable, param_grads)}
        return (grad_x, None, None, None, *[by_id.get(id(p)) for p in params])


def rebuilt_op(x: Tensor, build: Build, op: Op, op_grads: OpGrads, params: Sequence[Tensor]) -> Tensor:
    """`op(x, *build())` whose backward rebuilds the weight from `params` instead of saving it."""
    return RebuiltOp.apply(x, build, op, op_grads, *params)
