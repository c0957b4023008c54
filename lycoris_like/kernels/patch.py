"""y = op(x, W′, b′) where W′ differs from the host's W in a few entries — without copying W.

A sparse update (SaRA) changes a fraction of W. Rebuilding W′ copies all of W, twice per training
step (forward and backward), into fresh memory. Here the changed entries are written into W's own
storage for the duration of the op and W's values are written back afterwards (bit-exact, also
when the op raises). The writes go through `.data`, so they do not bump W's autograd version
counter, and the only saved tensor is x: backward writes the entries again for the input gradient,
takes the weight gradient at the changed entries only (blockwise, `HostLayer.weight_grad_at`: no
dense ∇W) and backpropagates from there.

A patch may name the entries the host holds when unchanged (SaRA's P₀[M]). When the forward found
exactly those, backward takes them from there instead of reading W again — unless W's version
counter moved in between (then it reads). Like every tensor autograd saves, W must not change
between forward and backward through `.data`, which the counter does not see.

While the op runs, W holds W′: another thread using the same weight at that moment would see it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from .rebuild import Op, OpGrads

EntryPatch = tuple[int, Tensor, Callable[[Tensor], Tensor], Tensor | None]
"""(slot — 0 the weight, 1 the bias —, flat indices (increasing), f, expected) where f(current
entries) → new entries, in the tensor's dtype and differentiable in the adapter's parameters, and
`expected` is what the entries hold on an unchanged host (passed to f as that very tensor when they
do), or None."""

WeightGradAt = Callable[[Tensor, Tensor, Tensor], Tensor]
"""(x, grad_y, flat indices) → ∇W of the op at those indices (`HostLayer.weight_grad_at`)."""

Entries = list[tuple[Tensor, Tensor, Tensor, Tensor]]  # (flat storage, int64 index, old, new) per patch


def _entries(tensors: Sequence[Tensor | None], patches: Sequence[EntryPatch], grad: bool,
             known: Sequence[bool] = ()) -> tuple[Entries, list[bool]]:
    """Every patch's current and new entries (nothing written yet), and per patch whether the
    current entries are its `expected` ones. `known[i]`: they are, without reading them."""
    out: Entries = []
    pristine: list[bool] = []
    for i, (slot, index, update, expected) in enumerate(patches):
        flat = tensors[slot].data.view(-1)  # type: ignore[union-attr]  # .data: no version bump
        index = index.to(torch.int64)  # scatter wants int64: a transient copy
        if i < len(known) and known[i]:
            old = expected
        else:
            old = flat.index_select(0, index)
            if expected is not None and _same_bits(old, expected):
                old = expected  # f recognises its own base by identity: no second comparison
        with torch.set_grad_enabled(grad):
            new = update(old)
        out.append((flat, index, old, new))
        pristine.append(old is expected)
    return out, pristine


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality (−0.0 ≠ 0.0, a NaN equals its own bits): `expected` may stand in for the
    entries only where restoring it restores them bit-exactly."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[a.element_size()]
        a, b = a.view(as_int), b.view(as_int)
    return torch.equal(a, b)


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
        entries, ctx.pristine = _entries(tensors, patches, grad=False)
        ctx.versions = _versions(tensors)
        with _written(entries):
            return op(x, *tensors)

    @staticmethod
    def backward(ctx, grad_y: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        tensors, patches = ctx.tensors, ctx.patches
        known = ctx.pristine if _versions(tensors) == ctx.versions else ()
        entries, _ = _entries(tensors, patches, grad=True, known=known)
        need_x = ctx.needs_input_grad[0]
        need_b = any(slot == 1 and new.requires_grad for (slot, *_), (*_, new) in zip(patches, entries))
        grad_x = grad_b = None
        if need_x:  # only the input gradient reads W′; the weight's and the bias's do not
            with _written(entries):
                grad_x, _, grad_b = ctx.op_grads(x, tensors[0].detach(), grad_y, (True, False, need_b))
        elif need_b:
            _, _, grad_b = ctx.op_grads(x, tensors[0].detach(), grad_y, (False, False, True))
        outputs, grads = [], []
        for (slot, *_), (_, index, _, new) in zip(patches, entries):
            if new.requires_grad:
                outputs.append(new)
                grads.append(ctx.weight_grad_at(x, grad_y, index) if slot == 0 else grad_b.index_select(0, index))
        trainable = [p for p in ctx.params if p.requires_grad]
        param_grads: Sequence[Tensor | None] = ()
        if outputs and trainable:
            param_grads = torch.autograd.grad(outputs, trainable, grads, allow_unused=True)
        by_id = {id(p): g for p, g in zip(trainable, param_grads)}
        return (grad_x, None, None, None, None, None, *[by_id.get(id(p)) for p in ctx.params])


def _versions(tensors: Sequence[Tensor | None]) -> list[int]:
    return [-1 if t is None else t._version for t in tensors]


def patched_op(x: Tensor, tensors: tuple[Tensor, Tensor | None], patches: Sequence[EntryPatch], op: Op,
               op_grads: OpGrads, weight_grad_at: WeightGradAt, params: Sequence[Tensor]) -> Tensor:
    """`op(x, W′, b′)` with W′, b′ = the host's `tensors` changed by `patches`, in place for the call.
    The tensors must be contiguous and not require grad; `params` are the trainable leaves."""
    return PatchedOp.apply(x, tensors, patches, op, op_grads, weight_grad_at, *params)
