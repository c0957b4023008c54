"""Kronecker-product maths for LoKr: the factorisation rule, ΔW = W1 ⊗ W2, and the bypass
Δy = vec(W1 · unvec(x) · W2ᵀ) that never builds ΔW (LyCORIS paper, App. B.3).

Layout (LyCORIS files): W1 is (a, c), W2 is (b, d[, k…]); ΔW is (a·b, c·d[, k…]) with
ΔW[i·b + p, j·d + q, …] = W1[i, j] · W2[p, q, …] — for convolutions W1 is broadcast over the
kernel as (a, c, 1, …), i.e. unsqueezed at the END.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


FACTORIZATIONS = ("lycoris", "paper")


def factorization(dimension: int, factor: int = -1, rule: str = "lycoris") -> tuple[int, int]:
    """(m, n) with m ≤ n and m·n = `dimension`: how LoKr splits a layer's width.

    "paper" (the LyCORIS paper's eq. 5): the divisor pair closest to √d whose smaller member is at
    most `factor` (`factor < 0`: no bound). "lycoris" (lycoris-lora's code, the default, which its
    files follow): the same, except that a `factor > 0` dividing `dimension` is taken as it is,
    (min(f, d/f), max(f, d/f)) — different exactly when f divides d and f > √d. Examples: 320 →
    (16, 20); factor 8 → (8, 40) by both; factor 64 → (5, 64) lycoris, (16, 20) paper.
    """
    if dimension <= 0:
        raise ValueError(f"cannot factorise {dimension}")
    if factor == 0:
        raise ValueError("factor must be positive, or negative for no bound")
    if rule not in FACTORIZATIONS:
        raise ValueError(f"factorization must be one of {FACTORIZATIONS}, got {rule!r}")
    if rule == "lycoris" and factor > 0 and dimension % factor == 0:
        other = dimension // factor
        return min(factor, other), max(factor, other)
    bound = math.isqrt(dimension) if factor < 0 else min(math.isqrt(dimension), factor)
    m = max(i for i in range(1, bound + 1) if dimension % i == 0)
    return m, dimension // m


def tucker_w2(core: Tensor, w2_a: Tensor, w2_b: Tensor) -> Tensor:
    """W2[p, q, …] = Σᵢⱼ core[i, j, …] · w2_a[i, p] · w2_b[j, q] (LyCORIS Tucker orientation:
    core (r, r, k…), w2_a (r, b) on the output mode, w2_b (r, d) on the input mode)."""
    return torch.einsum("ij...,ip,jq->pq...", core, w2_a, w2_b)


def lowrank_w2(w2_a: Tensor, w2_b: Tensor, kernel: tuple[int, ...]) -> Tensor:
    """W2 = w2_a · w2_b with w2_b (r, d·k…) flattened (or (r, d, k…)); returns (b, d, k…)."""
    b, r = w2_a.shape
    return (w2_a @ w2_b.reshape(r, -1)).reshape(b, -1, *kernel)


def kron_delta(w1: Tensor, w2: Tensor) -> Tensor:
    """ΔW = W1 ⊗ W2 with W1 (a, c) broadcast over W2's kernel dims: (a·b, c·d, k…)."""
    a, c = w1.shape
    b, d, *kernel = w2.shape
    ones = (1,) * len(kernel)
    prod = w1.reshape(a, 1, c, 1, *ones) * w2.reshape(1, b, 1, d, *kernel)
    return prod.reshape(a * b, c * d, *kernel)


def kron_add(acc: Tensor, w1: Tensor, w2: Tensor, scale: float, inplace: bool = False) -> Tensor:
    """acc + scale·W1 ⊗ W2 as one addcmul of broadcast views, scale its value: LoKr's rebuild and
    merge, with no full-size ΔW (`inplace` writes into acc: merges). `acc` must be contiguous.
    Plain autograd: at the sizes where a hand-written backward would save a kernel, its Python
    call costs more."""
    a, c = w1.shape
    b, d, *kernel = w2.shape
    ones = (1,) * len(kernel)
    view = acc.view(a, b, c, d, *kernel)
    left, right = w1.view(a, 1, c, 1, *ones), w2.view(1, b, 1, d, *kernel)
    if inplace:
        return view.addcmul_(left, right, value=float(scale)).view(acc.shape)
    return torch.addcmul(view, left, right, value=float(scale)).view(acc.shape)


def kron_linear_bypass(
    x: Tensor, w1: Tensor, down: Callable[[Tensor], Tensor], up: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """ΔW·x for a Linear host without ΔW: X = unvec(x) (…, c, d); Y = W1 · (X · W2ᵀ) → (…, a·b).

    W2 acts on the last axis: `down` maps (…, c, d) → (…, c, r), then W1 mixes the c groups, then
    `up` (if any) maps (…, a, r) → (…, a, b). With a low-rank W2 = w2_a·w2_b (`down` = · w2_bᵀ,
    `up` = · w2_aᵀ) every intermediate autograd keeps is rank-sized, never output-sized.
    """
    a, c = w1.shape
    grouped = x.reshape(*x.shape[:-1], c, x.shape[-1] // c)
    y = torch.matmul(w1, down(grouped))  # (a, c) @ (…, c, r) → (…, a, r)
    if up is not None:
        y = up(y)
    return y.reshape(*y.shape[:-2], -1)


def kron_conv_bypass(
    x: Tensor, w1: Tensor, inner: Callable[[Tensor], Tensor], spatial_dims: int,
    outer: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """ΔW ⋆ x for a (groups = 1) convolution without ΔW.

    The c input groups of d channels are folded into the batch, `inner` runs W2's convolution on
    them in the host's own conv geometry ((N·c, d, S…) → (N·c, r, S′…)), W1 mixes the groups, and
    `outer` (if any: a low-rank W2's pointwise w2_a) maps the r channels to b on the a groups:
    Y[n, i·b + p] = Σⱼ W1[i, j] · (W2 ⋆ x[n, j·d:(j+1)·d])[p]. Mixing before `outer` keeps every
    intermediate autograd saves rank-sized.
    """
    unbatched = x.dim() == spatial_dims + 1
    if unbatched:
        x = x.unsqueeze(0)
    a, c = w1.shape
    n, channels, *size = x.shape
    h = inner(x.reshape(n * c, channels // c, *size))
    h = h.reshape(n, c, *h.shape[1:])  # (N, c, r, S′…)
    y = torch.einsum("ij,nj...->ni...", w1, h)  # (N, a, r, S′…)
    if outer is not None:
        y = outer(y.reshape(n * a, *y.shape[2:]))
        y = y.reshape(n, a, *y.shape[1:])
    y = y.reshape(n, -1, *y.shape[3:])
    return y.squeeze(0) if unbatched else y
