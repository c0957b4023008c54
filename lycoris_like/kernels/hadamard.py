"""Hadamard-product ΔW (LoHa / FedPara): γ·(A₁B₁) ⊙ (A₂B₂), plain and Tucker, and the rank-r²
Khatri-Rao factors that let a forward apply it without building ΔW.

Both autograd Functions save only the factors, never the two rank-r products (each as large as
the host weight); backward recomputes the one product it needs for each half.
"""

from __future__ import annotations

import torch
from torch import Tensor


def tucker_factor(core: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """F[o, i, k…] = Σ_{p,q} core[p, q, k…]·a[p, o]·b[q, i]; core (r, r, k…), a (r, out), b (r, in)."""
    inner = torch.einsum("pq...,qi->pi...", core, b)  # (r, in, k…): r²·in·k… multiply-adds
    return torch.einsum("po,pi...->oi...", a, inner)  # (out, in, k…)


class HadamardProduct(torch.autograd.Function):
    """scale·(a1 @ b1) ⊙ (a2 @ b2) for a (out, r) and b (r, n); saves only a1, b1, a2, b2."""

    @staticmethod
    def forward(ctx, a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = float(scale)
        ctx.save_for_backward(a1, b1, a2, b2)
        out = a1 @ b1  # in place from here: the bits of (a1 @ b1) * (a2 @ b2) * scale, two allocations less
        return out.mul_(a2 @ b2).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        a1, b1, a2, b2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad = grad * ctx.scale
        ga1 = gb1 = ga2 = gb2 = None
        # d/dP₁ of Σ G ⊙ P₁ ⊙ P₂ is G ⊙ P₂; then the chain rule of P₁ = a1 @ b1.
        if need[0] or need[1]:
            g1 = grad * (a2 @ b2)
            ga1 = g1 @ b1.mT if need[0] else None
            gb1 = a1.mT @ g1 if need[1] else None
            del g1
        if need[2] or need[3]:
            g2 = grad * (a1 @ b1)
            ga2 = g2 @ b2.mT if need[2] else None
            gb2 = a2.mT @ g2 if need[3] else None
        return ga1, gb1, ga2, gb2, None


class HadamardAdd(torch.autograd.Function):
    """acc + scale·(a1 @ b1) ⊙ (a2 @ b2) (reshaped to acc) in one addcmul, scale its value: the
    rebuild and merge of LoHa. Saves only the factors; backward recomputes each product once and
    forms every factor gradient in one gemm with scale as its alpha."""

    @staticmethod
    def forward(ctx, acc: Tensor, a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = float(scale)
        ctx.save_for_backward(a1, b1, a2, b2)
        return torch.addcmul(acc, (a1 @ b1).view(acc.shape), (a2 @ b2).view(acc.shape), value=ctx.scale)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        a1, b1, a2, b2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        s = ctx.scale
        g = grad.reshape(a1.shape[0], -1)
        ga1 = gb1 = ga2 = gb2 = None
        if need[1] or need[2]:  # ∂/∂P₁ of Σ G ⊙ s·P₁ ⊙ P₂ is s·G ⊙ P₂, then the chain rule of P₁ = a1 @ b1
            q = (g * (a2 @ b2)).to(a1.dtype)
            ga1 = torch.addmm(a1, q, b1.mT, beta=0, alpha=s) if need[1] else None
            gb1 = torch.addmm(b1, a1.mT, q, beta=0, alpha=s) if need[2] else None
            del q
        if need[3] or need[4]:
            q = (g * (a1 @ b1)).to(a2.dtype)
            ga2 = torch.addmm(a2, q, b2.mT, beta=0, alpha=s) if need[3] else None
            gb2 = torch.addmm(b2, a2.mT, q, beta=0, alpha=s) if need[4] else None
        return grad if need[0] else None, ga1, gb1, ga2, gb2, None


def hadamard_add(acc: Tensor, a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor, scale: float,
                 inplace: bool = False) -> Tensor:
    """acc + scale·(a1 @ b1) ⊙ (a2 @ b2), reshaped to acc (see `HadamardAdd`); `inplace` writes
    into acc with the same kernel (merges, without autograd)."""
    if inplace or not (torch.is_grad_enabled() and any(t.requires_grad for t in (acc, a1, b1, a2, b2))):
        p1, p2 = (a1 @ b1).view(acc.shape), (a2 @ b2).view(acc.shape)  # the same kernels, no Function
        return acc.addcmul_(p1, p2, value=float(scale)) if inplace else torch.addcmul(acc, p1, p2, value=float(scale))
    return HadamardAdd.apply(acc, a1, b1, a2, b2, scale)


def _tucker_grads(g: Tensor, core: Tensor, a: Tensor, b: Tensor, need: tuple[bool, bool, bool]):
    """Gradients of Σ g ⊙ tucker_factor(core, a, b) with respect to core, a, b."""
    g_core = g_a = g_b = None
    if need[0] or need[2]:
        ga = torch.einsum("oi...,po->pi...", g, a)  # (r, in, k…)
        if need[0]:
            g_core = torch.einsum("pi...,qi->pq...", ga, b)
        if need[2]:
            g_b = torch.einsum("pi...,pq...->qi", ga, core)
        del ga
    if need[1]:
        inner = torch.einsum("pq...,qi->pi...", core, b)  # (r, in, k…)
        g_a = torch.einsum("oi...,pi...->po", g, inner)
    return g_core, g_a, g_b


class HadamardTuckerProduct(torch.autograd.Function):
    """scale·F(t1, a1, b1) ⊙ F(t2, a2, b2) with F = `tucker_factor`; saves only the six factors."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, t1: Tensor, a1: Tensor, b1: Tensor, t2: Tensor, a2: Tensor, b2: Tensor, scale: float
    ) -> Tensor:
        ctx.scale = float(scale)
        ctx.save_for_backward(t1, a1, b1, t2, a2, b2)
        return tucker_factor(t1, a1, b1) * tucker_factor(t2, a2, b2) * ctx.scale

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        t1, a1, b1, t2, a2, b2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad = grad * ctx.scale
        first = second = (None, None, None)
        if any(need[0:3]):
            first = _tucker_grads(grad * tucker_factor(t2, a2, b2), t1, a1, b1, need[0:3])
        if any(need[3:6]):
            second = _tucker_grads(grad * tucker_factor(t1, a1, b1), t2, a2, b2, need[3:6])
        return (*first, *second, None)


def hadamard_delta(a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor, scale: float = 1.0) -> Tensor:
    """ΔW = scale·(a1 @ b1) ⊙ (a2 @ b2): a (out, r), b (r, n) → (out, n)."""
    return HadamardProduct.apply(a1, b1, a2, b2, scale)


def hadamard_tucker_delta(
    t1: Tensor, a1: Tensor, b1: Tensor, t2: Tensor, a2: Tensor, b2: Tensor, scale: float = 1.0
) -> Tensor:
    """ΔW = scale·F₁ ⊙ F₂ with Fᵢ[o, i, k…] = Σ tᵢ[p, q, k…]·aᵢ[p, o]·bᵢ[q, i] → (out, in, k…)."""
    return HadamardTuckerProduct.apply(t1, a1, b1, t2, a2, b2, scale)


def khatri_rao_factors(a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor) -> tuple[Tensor, Tensor]:
    """(up, down) with up @ down = (a1 @ b1) ⊙ (a2 @ b2), a rank-r₁r₂ product:
    up[:, p·r₂+q] = a1[:, p]·a2[:, q] (out, r₁r₂) and down[p·r₂+q, :] = b1[p]·b2[q] (r₁r₂, n)."""
    up = (a1.unsqueeze(2) * a2.unsqueeze(1)).reshape(a1.shape[0], -1)
    down = (b1.unsqueeze(1) * b2.unsqueeze(0)).reshape(-1, b1.shape[1])
    return up, down
