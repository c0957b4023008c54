"""y = op(x, W′, b′) where W′ differs from the host's W in a few entries — without copying W.

A sparse update (SaRA) changes a fraction of W. Rebuilding W′ copies all of W, twice per training
step (forward and backward), into fresh memory. Here the changed entries are written into W's own
storage for the duration of the op and W's values are written back afterwards (bit-exact, also
when the op raises). The writes go through `.data`, so they do not bump W's autograd version
counter, and the only saved tensor is x: backward writes the entries again for the input gradient,
takes the weight gradient at the changed entries only (blockwise, `HostLayer.weight_grad_at`: no
dense ∇W) and backpropagates from there.

While the op runs, W holds W′: another thread using the same weight at that moment would see it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from .rebuild import Op, OpGrads

EntryPatch = tuple[int, Tensor, Callable[[Tensor], Tensor]]
"""(slot — 0 the weight, 1 the bias —, flat indices (increasing), f) where f(current entries) →
new entries, in the tensor's dtype and differentiable in the adapter's parameters."""

WeightGradAt = Callable[[Tensor, Tensor, Tensor], Tensor]
"""(x, grad_y, flat indices) → ∇W of the op at those indices (`HostLayer.weight_grad_at`)."""

Entries = list[tuple[Tensor, Tensor, Tensor, Tensor]]  # (flat storage, int64 index, old, new) per patch


def _entries(tensors: Sequence[Tensor | None], patches: Sequence[EntryPatch], grad: bool) -> Entries:
    """Every patch's current and new entries (nothing written yet)."""
    out: Entries = []
    for slot, index, update in patches:
        flat = tensors[slot].data.view(-1)  # type: ignore[union-attr]  # .data: no version bump
        index = index.to(torch.int64)  # scatter wants int64: a transient copy
        old = flat.index_select(0, index)
        with torch.set_grad_enabled(grad):
            new = update(old)
        out.append((flat, index, old, new))
    return out


@contextmanager
def _written(entries: Entries) -> Iterator[None]:
    """The new entries written in for the block, the old ones put back after it (also on errors)."""
    done = 0
    try:
        for flat, index, _, new in entries:
            flat.scatter_(0, index, new.detach())
            done += 1
        yield
    finally:
        for flat, index, old, _ in reversed(entries[:done]):
            flat.scatter_(0, index, old)


class PatchedOp(torch.autograd.Function):
    """Inputs: x, tensors (weight, bias), patches, op, op_grads, weight_grad_at, *params (the
    trainable leaves the patches depend on)."""

    @staticmethod
    def forward(ctx, x: Tensor, tensors: tuple[Tensor, Tensor | None], patches: Sequence[EntryPatch],  # type: ignore[override]
                op: Op, op_grads: OpGrads, weight_grad_at: WeightGradAt, *params: Tensor) -> Tensor:
        ctx.tensors, ctx.patches, ctx.op_grads, ctx.weight_grad_at, ctx.params = tensors, patches, op_grads, weight_grad_at, params
        ctx.save_for_backward(x)
        with _written(_entries(tensors, patches, grad=False)):
            return op(x, *tensors)

    @staticmethod
    def backward(ctx, grad_y: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        tensors, patches = ctx.tensors, ctx.patches
        entries = _entries(tensors, patches, grad=True)
        need_x = ctx.needs_input_grad[0]
        need_b = any(slot == 1 and new.requires_grad for (slot, _, _), (*_, new) in zip(patches, entries))
        grad_x = grad_b = None
        if need_x:  # only the input gradient reads W′; the weight's and the bias's do not
            with _written(entries):
                grad_x, _, grad_b = ctx.op_grads(x, tensors[0].detach(), grad_y, (True, False, need_b))
        elif need_b:
            _, _, grad_b = ctx.op_grads(x, tensors[0].detach(), grad_y, (False, False, True))
        outputs, grads = [], []
        for (slot, _, _), (_, index, _, new) in zip(patches, entries):
            if new.requires_grad:
                outputs.append(new)
                grads.append(ctx.weight_grad_at(x, grad_y, index) if slot == 0 else grad_b.index_select(0, index))
        trainable = [p for p in ctx.params if p.requires_grad]
        param_grads: Sequence[Tensor | None] = ()
        if outputs and trainable:
            param_grads = torch.autograd.grad(outputs, trainable, grads, allow_unused=True)
        by_id = {id(p): g for p, g in zip(trainable, param_grads)}
        return (grad_x, None, None, None, None, None, *[by_id.get(id(p)) for p in ctx.params])


def patched_op(x: Tensor, tensors: tuple[Tensor, Tensor | None], patches: Sequence[EntryPatch], op: Op,
               op_grads: OpGrads, weight_grad_at: WeightGradAt, params: Sequence[Tensor]) -> Tensor:
    """`op(x, W′, b′)` with W′, b′ = the host's `tensors` changed by `patches`, in place for the call.
    The tensors must be contiguous and not require grad; `params` are the trainable leaves."""
    return PatchedOp.apply(x, tensors, patches, op, op_grads, weight_grad_at, *params)
