"""Evaluation metrics from the LyCORIS, SaRA and Vendi papers, as pure functions on tensors.

Nothing here loads a model: pass the embeddings (CLIP/DINO…), feature maps (VGG…), scores (FID,
CLIP score) or weights you already have. Every function returns tensors and raises `ConfigError`
(a `ValueError`) for bad shapes, empty or non-finite inputs. See docs/metrics.md for the formulas.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from .errors import ConfigError

__all__ = [
    "amplification_factor",
    "average_cosine_similarity",
    "embedding_variance",
    "gram_matrix",
    "squared_centroid_distance",
    "style_loss",
    "subspace_similarity",
    "vendi_score",
    "vlhi",
]


# ---------------------------------------------------------------------------------------------
# input checks


def _tensor(x: Tensor | Sequence[float], name: str) -> Tensor:
    """`x` as a tensor (sequences of numbers are accepted for score lists)."""
    if isinstance(x, Tensor):
        return x
    try:
        return torch.as_tensor(x, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{name} must be a tensor or a sequence of numbers, got {type(x).__name__}") from exc


def _check_finite(x: Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ConfigError(f"{name} contains NaN or Inf")


def _float64(x: Tensor | Sequence[float], name: str) -> Tensor:
    """Evaluation metrics compute in float64: their inputs are small and the identities are exact."""
    x = _tensor(x, name)
    if x.is_complex():
        raise ConfigError(f"{name} must be real, got {x.dtype}")
    x = x.to(torch.float64)
    _check_finite(x, name)
    return x


def _embeddings(x: Tensor, name: str) -> Tensor:
    """A (n, d) float64 embedding matrix with n, d ≥ 1 and no zero rows, rows L2-normalised."""
    x = _float64(x, name)
    if x.ndim != 2:
        hint = " (use x.unsqueeze(0) for a single embedding)" if x.ndim == 1 else ""
        raise ConfigError(f"{name} must be a 2-D (n, d) tensor of embeddings, got shape {tuple(x.shape)}{hint}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ConfigError(f"{name} is empty: shape {tuple(x.shape)}; need at least one non-empty embedding")
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    zero = (norms.squeeze(1) <= torch.finfo(torch.float64).tiny).nonzero().flatten().tolist()
    if zero:
        raise ConfigError(f"{name} has zero-norm rows {zero[:8]}: their cosine similarity is undefined")
    return x / norms


def _same_dim(a: Tensor, b: Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise ConfigError(f"embedding sizes differ: a has d={a.shape[1]}, b has d={b.shape[1]}")


# ---------------------------------------------------------------------------------------------
# SaRA: Visual-Linguistic Harmony Index


def vlhi(fid: Tensor | Sequence[float], clip: Tensor | Sequence[float]) -> Tensor:
    """VLHI of each model in a group (SaRA, appendix eq. 1): one number trading image quality against
    text alignment. Min-max normalised over the group: (max FID − FID)/(max FID − min FID) +
    (CLIP − min CLIP)/(max CLIP − min CLIP), in [0, 2]; a term whose values are all equal is 0."""
    f = _float64(fid, "fid")
    c = _float64(clip, "clip")
    for name, t in (("fid", f), ("clip", c)):
        if t.ndim != 1:
            raise ConfigError(f"{name} must be 1-D (one score per model), got shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise ConfigError(f"{name} is empty: need at least one model's score")
    if f.shape != c.shape:
        raise ConfigError(f"fid and clip must hold one score per model each, got {f.numel()} and {c.numel()}")
    return _minmax_gain(f.max() - f, f) + _minmax_gain(c - c.min(), c)


def _minmax_gain(gain: Tensor, values: Tensor) -> Tensor:
    """gain / (max − min) of `values`; 0 when all values are equal (every gain is then exactly 0)."""
    span = values.max() - values.min()
    if span == 0:
        return torch.zeros_like(gain)
    return gain / span


# ---------------------------------------------------------------------------------------------
# LyCORIS App. D.4: cosine similarity, centroid distance and variance of normalised embeddings


def average_cosine_similarity(a: Tensor, b: Tensor | None = None, *, include_self: bool = True) -> Tensor:
    """Mean cosine similarity over all n_a·n_b pairs (a_i, b_j) — fidelity of generated vs reference
    images. With b=None, over all n² ordered pairs of a *including* i = j, so it equals
    average_cosine_similarity(a, a) = 1 − embedding_variance(a); include_self=False averages i ≠ j."""
    x = _embeddings(a, "a")
    if b is None:
        n = x.shape[0]
        s = x.sum(dim=0)
        total = s @ s  # Σ_ij ⟨x̂_i, x̂_j⟩ = ‖Σ_i x̂_i‖²
        if include_self:
            return total / (n * n)
        if n < 2:
            raise ConfigError("include_self=False needs at least two embeddings in a")
        return (total - n) / (n * (n - 1))  # each self-pair contributes ⟨x̂_i, x̂_i⟩ = 1
    if not include_self:
        raise ConfigError("include_self=False applies only within one set (b=None)")
    y = _embeddings(b, "b")
    _same_dim(x, y)
    return x.mean(dim=0) @ y.mean(dim=0)  # (1/(n_a n_b)) Σ_ij ⟨x̂_i, ŷ_j⟩ = ⟨z̄ᵃ, z̄ᵇ⟩


def squared_centroid_distance(a: Tensor, b: Tensor) -> Tensor:
    """‖z̄ᵃ − z̄ᵇ‖², z̄ the mean of the L2-normalised embeddings: how far apart two sets sit on average,
    blind to their spread (LyCORIS App. D.4)."""
    x = _embeddings(a, "a")
    y = _embeddings(b, "b")
    _same_dim(x, y)
    d = x.mean(dim=0) - y.mean(dim=0)
    return d @ d


def embedding_variance(a: Tensor) -> Tensor:
    """(1/n) Σ_i ‖â_i − z̄‖² of the L2-normalised embeddings (the 1/n, not 1/(n−1), estimator): the
    spread of one set, equal to 1 − ‖z̄‖², so 0 for identical directions (LyCORIS App. D.4)."""
    x = _embeddings(a, "a")
    d = x - x.mean(dim=0)
    return (d * d).sum(dim=1).mean()


# ---------------------------------------------------------------------------------------------
# Vendi score (Friedman & Dieng 2023)


def vendi_score(x: Tensor) -> Tensor:
    """Diversity of a sample as an effective number of distinct items (Friedman & Dieng 2023):
    exp(−Σ λ_i log λ_i), λ the eigenvalues of K/n, K_ij = cos(x_i, x_j); 0·log 0 = 0. Ranges over
    [1, min(n, d)]: 1 for n identical directions, n for n orthogonal ones."""
    z = _embeddings(x, "x")
    n, d = z.shape
    # K/n = ẐẐᵀ/n and ẐᵀẐ/n share their non-zero eigenvalues: use the smaller matrix.
    m = (z @ z.T) if n <= d else (z.T @ z)
    lam = torch.linalg.eigvalsh(m / n).clamp_min(0.0)  # rounding can leave tiny negatives
    lam = lam / lam.sum()  # trace(K/n) = 1 exactly in theory; remove rounding drift
    pos = lam[lam > 0]
    return torch.exp(-(pos * torch.log(pos)).sum())


# ---------------------------------------------------------------------------------------------
# Style loss (LyCORIS paper, after Gatys et al. / Johnson et al.)


def gram_matrix(features: Tensor) -> Tensor:
    """Per-sample Gram matrix G = ψψᵀ/(c·h·w) of (N, C, H, W) feature maps, ψ the (C, H·W) reshape:
    channel co-activations, which capture style independently of layout. Returns (N, C, C).
    Any number ≥ 1 of spatial dims is accepted (normalised by C times their product)."""
    f = _tensor(features, "features")
    if f.ndim < 3:
        raise ConfigError(f"features must be (N, C, H, W) feature maps, got shape {tuple(f.shape)}")
    if f.numel() == 0:
        raise ConfigError(f"features is empty: shape {tuple(f.shape)}")
    if not f.is_floating_point():
        raise ConfigError(f"features must be a floating-point tensor, got {f.dtype}")
    _check_finite(f, "features")
    if f.dtype in (torch.float16, torch.bfloat16):
        f = f.float()  # sums of H·W products overflow or lose precision in half types
    n, c = f.shape[:2]
    psi = f.reshape(n, c, -1)
    return psi @ psi.transpose(1, 2) / (c * psi.shape[2])


def style_loss(
    features_a: Sequence[Tensor] | Tensor,
    features_b: Sequence[Tensor] | Tensor,
    *,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> Tensor:
    """Σ over layers ℓ of ‖G(aℓ) − G(bℓ)‖_F² — style distance from any feature extractor's layers.
    Sample i of a is paired with sample i of b (a batch of 1 on either side is broadcast); the
    per-sample sums are averaged ("mean"), summed ("sum") or returned as (N,) ("none")."""
    la = [features_a] if isinstance(features_a, Tensor) else list(features_a)
    lb = [features_b] if isinstance(features_b, Tensor) else list(features_b)
    if not la:
        raise ConfigError("style_loss needs at least one layer of features")
    if len(la) != len(lb):
        raise ConfigError(f"features_a has {len(la)} layers but features_b has {len(lb)}")
    if reduction not in ("mean", "sum", "none"):
        raise ConfigError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    total: Tensor | None = None
    for i, (fa, fb) in enumerate(zip(la, lb)):
        try:
            ga, gb = gram_matrix(fa), gram_matrix(fb)
        except ConfigError as exc:
            raise ConfigError(f"layer {i}: {exc}") from None
        if ga.shape[1] != gb.shape[1]:
            raise ConfigError(f"layer {i}: channel counts differ ({ga.shape[1]} vs {gb.shape[1]})")
        if ga.shape[0] != gb.shape[0] and 1 not in (ga.shape[0], gb.shape[0]):
            raise ConfigError(f"layer {i}: batch sizes {ga.shape[0]} and {gb.shape[0]} do not pair up (equal, or one is 1)")
        per_sample = (ga - gb).pow(2).sum(dim=(1, 2))
        if total is not None and per_sample.shape[0] != total.shape[0] and 1 not in (per_sample.shape[0], total.shape[0]):
            raise ConfigError(f"layer {i}: batch size {per_sample.shape[0]} differs from earlier layers ({total.shape[0]})")
        total = per_sample if total is None else total + per_sample
    assert total is not None
    if reduction == "mean":
        return total.mean()
    if reduction == "sum":
        return total.sum()
    return total


# ---------------------------------------------------------------------------------------------
# ΔW versus W (SaRA §10 / Table 8, following LoRA §7)


def _matrix(w: Tensor, name: str) -> tuple[Tensor, float]:
    """A weight as a float64 (out, in·k…) matrix — conv kernels flattened — and its dtype's eps."""
    if not isinstance(w, Tensor):
        raise ConfigError(f"{name} must be a tensor, got {type(w).__name__}")
    if w.ndim < 2:
        raise ConfigError(f"{name} must be a weight with ≥ 2 dims (out, in, …), got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise ConfigError(f"{name} is empty: shape {tuple(w.shape)}")
    eps = torch.finfo(w.dtype if w.is_floating_point() else torch.float64).eps
    return _float64(w, name).reshape(w.shape[0], -1), eps


def _numerical_rank(s: Tensor, shape: torch.Size, eps: float) -> int:
    """Singular values above σ_max·max(m, n)·eps of the *input* dtype (float32 noise is not rank)."""
    if s.numel() == 0 or s[0] == 0:
        return 0
    return int((s > s[0] * max(shape) * eps).sum())


def _check_rank(rank: int | None, limit: int, name: str) -> None:
    if rank is None:
        return
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ConfigError(f"{name} must be an int, got {type(rank).__name__}")
    if not 1 <= rank <= limit:
        raise ConfigError(f"{name} must be in [1, {limit}] for this matrix, got {rank}")


def _pair(delta: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, float]:
    """ΔW and W as float64 matrices of the same shape, and ΔW's dtype eps."""
    d, eps = _matrix(delta, "delta")
    w, _ = _matrix(weight, "weight")
    if delta.shape != weight.shape:
        raise ConfigError(f"delta {tuple(delta.shape)} and weight {tuple(weight.shape)} must have the same shape")
    return d, w, eps


def subspace_similarity(
    delta: Tensor,
    weight: Tensor,
    rank_delta: int | None = None,
    rank_weight: int | None = None,
    *,
    side: Literal["left", "right"] = "left",
) -> Tensor:
    """φ = ‖U_ΔWᵢᵀ U_Wⱼ‖_F² / min(i, j) ∈ [0, 1] (LoRA §7, used by SaRA Table 8): overlap of the top-i
    singular subspace of ΔW with the top-j one of W; 1 = nested, 0 = orthogonal. i defaults to ΔW's
    numerical rank, j to i; side="left" compares column (output) spaces, "right" row (input) ones."""
    if side not in ("left", "right"):
        raise ConfigError(f"side must be 'left' or 'right', got {side!r}")
    d, w, eps = _pair(delta, weight)
    limit = min(d.shape)
    _check_rank(rank_delta, limit, "rank_delta")
    _check_rank(rank_weight, limit, "rank_weight")
    ud, sd, vhd = torch.linalg.svd(d, full_matrices=False)
    if sd[0] == 0:
        raise ConfigError("delta is zero: its singular subspace is undefined")
    i = rank_delta if rank_delta is not None else _numerical_rank(sd, d.shape, eps)
    j = rank_weight if rank_weight is not None else i
    uw, sw, vhw = torch.linalg.svd(w, full_matrices=False)
    if sw[0] == 0:
        raise ConfigError("weight is zero: its singular subspace is undefined")
    if side == "left":
        bd, bw = ud[:, :i], uw[:, :j]
    else:
        bd, bw = vhd[:i].T, vhw[:j].T
    overlap = bd.T @ bw
    return (overlap * overlap).sum() / min(i, j)


def amplification_factor(delta: Tensor, weight: Tensor, rank: int | None = None) -> Tensor:
    """‖ΔW‖_F / ‖Uᵀ W V‖_F, U, V the top-r left/right singular vectors of ΔW (LoRA §7, SaRA Table 8):
    how much ΔW amplifies directions W already has but weakly. r defaults to ΔW's numerical rank;
    +inf when W has no component in that subspace."""
    d, w, eps = _pair(delta, weight)
    _check_rank(rank, min(d.shape), "rank")
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    if s[0] == 0:
        raise ConfigError("delta is zero: the amplification factor is undefined")
    r = rank if rank is not None else _numerical_rank(s, d.shape, eps)
    projected = u[:, :r].T @ w @ vh[:r].T
    denom = torch.linalg.matrix_norm(projected)
    num = torch.linalg.matrix_norm(d)
    if denom == 0:
        return torch.tensor(math.inf, dtype=torch.float64)
    return num / denom
