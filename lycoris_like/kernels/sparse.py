"""Sparse-entry maths for SaRA: pure functions on tensors, no modules and no state.

A SaRA mask is stored as int32 flat indices (C order) — 4 bytes per selected entry, never a 1-byte
bool per weight entry. Updates are out-of-place `index_put`s computed in the accumulator's
precision (float64 for SaRA), so autograd gives ∇values = ∇W[M] and nothing dense survives the
backward pass.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError

INDEX_DTYPE = torch.int32
_CHUNK = 1 << 24  # entries per selection chunk: bounds the transient |W| / bool tensors


def check_threshold(threshold: Any) -> float:
    """θ as a float32-exact positive finite float (masks compare float32 values against it)."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ConfigError(f"threshold must be a positive number, got {threshold!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"threshold must be finite and > 0, got {threshold!r}")
    return float(torch.tensor(value, dtype=torch.float32))


def compare_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision |W| < θ is evaluated in: float32 (fp16/bf16/fp32 weights), float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def threshold_tensor(threshold: float, dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
    """θ as a 0-dim tensor of the comparison dtype (θ itself is float32-exact)."""
    return torch.tensor(threshold, dtype=compare_dtype(dtype), device=device)


def select_indices(tensor: Tensor, threshold: float) -> Tensor:
    """Flat C-order indices (int32, increasing) of the entries with |t| < θ, strict; the comparison
    runs on the float32 value of every entry (float64 for float64 tensors), in chunks so the
    transient boolean mask stays small."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() >= 2**31:
        raise ValueError(f"a tensor of {flat.numel()} entries is too large for int32 indices")
    theta = threshold_tensor(threshold, flat.dtype, flat.device)
    parts = []
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start:start + _CHUNK].to(theta.dtype)
        hits = torch.nonzero(chunk.abs() < theta).reshape(-1)
        parts.append((hits + start).to(INDEX_DTYPE))
    if not parts:
        return torch.zeros(0, dtype=INDEX_DTYPE, device=flat.device)
    return torch.cat(parts)


def count_below(tensor: Tensor, threshold: float) -> int:
    """How many entries have |t| < θ (the rule of `select_indices`)."""
    flat = tensor.detach().reshape(-1)
    theta = threshold_tensor(threshold, flat.dtype, flat.device)
    return sum(int((flat[s:s + _CHUNK].to(theta.dtype).abs() < theta).sum()) for s in range(0, flat.numel(), _CHUNK))


def gather(tensor: Tensor, index: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """`tensor.flatten()[index]` (optionally cast)."""
    out = tensor.detach().reshape(-1).index_select(0, index)
    return out if dtype is None else out.to(dtype)


def sparse_update(acc: Tensor, index: Tensor, values: Tensor, base: Tensor, multiplier: float | Tensor) -> Tensor:
    """`acc` with acc[M] ← P₀[M] + m·(v − P₀[M]) + (acc[M] − P₀[M]), out of place.

    `base` = P₀[M]. The selected entries are computed in float64 and rounded once to acc's dtype;
    the others are acc's own, untouched. The own term is `torch.lerp(P₀, v, m)`: one fused kernel
    that returns v itself at m = 1 and P₀ itself at m = 0; when `acc` is the base weight the
    correction term is exactly zero — so merged weights equal the trained values bit-exactly.
    Adapters applied earlier to `acc` are carried over (Σ mᵢ·ΔPᵢ). Differentiable in `values`
    (∇v = m·∇acc'[M]) and in `acc`.
    """
    flat = acc.reshape(-1)
    index = index.to(torch.int64)  # scatter wants int64: a transient copy, 3× faster than index_put
    new = updated_entries(flat.index_select(0, index), values, base, multiplier)
    return flat.scatter(0, index, new).reshape(acc.shape)


def updated_entries(current: Tensor, values: Tensor, base: Tensor, multiplier: float | Tensor) -> Tensor:
    """The selected entries of `sparse_update`: P₀[M] + m·(v − P₀[M]) + (current − P₀[M]) in
    float64, rounded once to current's dtype (differentiable in `values` and `current`).

    At m = 1 on an unchanged base (current = P₀[M], the usual training step) that is v itself —
    lerp(P₀, v, 1) returns its end point and the correction is zero — so v is returned without the
    float64 round trip (the same bits for finite values; for non-finite ones both are non-finite).
    `current` being `base` itself says they are equal without comparing them.
    """
    if _is_one(multiplier) and not current.requires_grad:  # v alone would cut ∂/∂current
        same = torch.promote_types(current.dtype, base.dtype)
        if current is base or torch.equal(current.to(same), base.to(same)):
            return values.to(current.dtype)
    wide = torch.float64
    base = base.to(wide)
    own = torch.lerp(base, values.to(wide), multiplier.to(wide) if isinstance(multiplier, Tensor) else float(multiplier))
    return (own + (current.to(wide) - base)).to(current.dtype)


def _is_one(multiplier: float | Tensor) -> bool:
    """Whether m is one constant exactly 1 (a tensor never while torch.compile traces: no
    data-dependent branch; a per-entry multiplier — rank dropout's keep-mask — takes the formula)."""
    if not isinstance(multiplier, Tensor):
        return multiplier == 1
    return (not torch.compiler.is_compiling() and multiplier.dim() == 0 and not multiplier.requires_grad
            and bool(multiplier == 1))


def scatter(numel: int, index: Tensor, values: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A dense zero vector of `numel` entries with `values` at `index` (differentiable in values)."""
    dtype = values.dtype if dtype is None else dtype
    out = torch.zeros(numel, dtype=dtype, device=values.device)
    return out.scatter(0, index.to(torch.int64), values.to(dtype))


def merge_sorted(index_a: Tensor, index_b: Tensor, *tensors: tuple[Tensor, Tensor]) -> tuple[Tensor, ...]:
    """The union of two disjoint index sets in increasing order, with paired value tensors
    reordered the same way: `merge_sorted(ia, ib, (va, vb), (ba, bb)) → (index, values, base)`."""
    index = torch.cat([index_a, index_b])
    order = torch.argsort(index.to(torch.int64))
    out = [index[order]]
    for a, b in tensors:
        out.append(torch.cat([a, b])[order])
    return tuple(out)


def checksum(values: Tensor) -> int:
    """A 63-bit digest (sha256) of the exact bits of `values` in their float32 (float64 for float64)
    form: the base values under a mask, stored in files to detect a different base model."""
    flat = values.detach().reshape(-1)
    flat = flat.to(compare_dtype(flat.dtype)).cpu().contiguous()
    digest = hashlib.sha256(flat.numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def rounded_difference(base: Tensor, target: Tensor) -> Tensor:
    """target − base computed in float64 and rounded once to the base's compute dtype (float32;
    float64 for float64). A consumer computing base + 1·d in float32 then gets `target` exactly
    whenever any float32 d can give it — the correctly rounded difference is the nearest to the
    exact one — and within one ulp otherwise (a target much smaller than the base, or of opposite
    sign, can lie off the grid of base + d)."""
    dtype = compare_dtype(base.dtype)
    return (target.detach().to(torch.float64) - base.detach().to(torch.float64)).to(dtype)


class NuclearNorm(torch.autograd.Function):
    """‖A‖_* = Σσᵢ(A) with gradient U·Vᵀ (the reduced SVD; a subgradient when A is rank-deficient)."""

    @staticmethod
    def forward(ctx, matrix: Tensor) -> Tensor:  # type: ignore[override]
        u, s, vh = torch.linalg.svd(matrix.detach(), full_matrices=False)
        ctx.save_for_backward(u, vh)
        return s.sum()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        u, vh = ctx.saved_tensors
        return grad * (u @ vh)


def nuclear_norm(matrix: Tensor) -> Tensor:
    """‖matrix‖_* for a 2-D tensor, differentiable (gradient U·Vᵀ)."""
    if matrix.dim() != 2:
        raise ValueError(f"the nuclear norm needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    return NuclearNorm.apply(matrix)
