"""Truncated SVD for extract, resize and re-compressing combines: rank rules and LoRA factors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError


@dataclass(frozen=True)
class RankRule:
    """How many singular values to keep.

    `rank` alone: that rank. `energy` (0 < e ≤ 1): the smallest rank keeping that fraction of
    ‖ΔW‖²_F. `ratio` (≥ 1): keep σᵢ ≥ σ_max / ratio. With `energy` or `ratio`, `rank` is the cap.
    """

    rank: int | None = None
    energy: float | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        if self.energy is not None and not (0.0 < float(self.energy) <= 1.0):
            raise ConfigError(f"energy must be in (0, 1], got {self.energy!r}")
        if self.ratio is not None and not (math.isfinite(float(self.ratio)) and float(self.ratio) >= 1.0):
            raise ConfigError(f"ratio must be a finite number ≥ 1, got {self.ratio!r}")
        if self.energy is not None and self.ratio is not None:
            raise ConfigError("give energy or ratio, not both")
        if self.rank is None and self.energy is None and self.ratio is None:
            raise ConfigError("give a rank, an energy threshold or a ratio")

    def choose(self, sigma: Tensor) -> int:
        """The rank to keep for singular values `sigma` (descending), at least 1."""
        n = int(sigma.numel())
        if self.energy is not None:
            power = sigma.double() ** 2
            kept = torch.cumsum(power, 0) / power.sum()
            r = int(torch.searchsorted(kept, torch.tensor(float(self.energy), dtype=kept.dtype) - 1e-12)) + 1
        elif self.ratio is not None:
            r = int((sigma >= sigma[0] / float(self.ratio)).sum())
        else:
            r = n
        if self.rank is not None:
            r = min(r, self.rank)
        return max(1, min(r, n))

    def describe(self) -> str:
        if self.energy is not None:
            rule = f"energy {self.energy}"
        elif self.ratio is not None:
            rule = f"ratio {self.ratio}"
        else:
            return f"rank {self.rank}"
        return rule + (f", rank ≤ {self.rank}" if self.rank is not None else "")


@dataclass
class LowRank:
    """ΔW ≈ up · down (2-D, float64): `rank` kept of `full_rank`, `error` = ‖ΔW − up·down‖_F / ‖ΔW‖_F
    as the caller measures it after casting."""

    up: Tensor
    down: Tensor
    rank: int
    full_rank: int
    sigma: Tensor


def svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD in float64, computed on the tall orientation (much faster for wide matrices)."""
    m = matrix.double()
    if m.shape[0] < m.shape[1]:
        u, s, vh = torch.linalg.svd(m.T, full_matrices=False)
        return vh.T, s, u.T
    return torch.linalg.svd(m, full_matrices=False)


def factored_svd(up: Tensor, down: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of up·down (out×r · r×n) from the factors alone: two QRs and an r×r SVD."""
    q1, r1 = torch.linalg.qr(up.double())
    q2, r2 = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(r1 @ r2.T)
    return q1 @ u, s, (q2 @ vh.T).T


def truncate(u: Tensor, s: Tensor, vh: Tensor, rule: RankRule) -> LowRank:
    """Keep the rank the rule picks; σ is split evenly (√σ on each side) so neither factor dominates."""
    r = rule.choose(s)
    root = s[:r].sqrt()
    return LowRank(up=u[:, :r] * root, down=root[:, None] * vh[:r], rank=r, full_rank=int((s > 0).sum()), sigma=s)


def lowrank(matrix: Tensor, rule: RankRule) -> LowRank:
    """Truncated SVD of a 2-D matrix (float64)."""
    return truncate(*svd(matrix), rule)


def relative_error(target: Tensor, up: Tensor, down: Tensor) -> float:
    """‖target − up·down‖_F / ‖target‖_F in float64 (0 for a zero target)."""
    target = target.double().reshape(target.shape[0], -1)
    norm = torch.linalg.norm(target)
    if norm == 0:
        return 0.0
    approx = up.double().reshape(up.shape[0], -1) @ down.double().reshape(down.shape[0], -1)
    return float(torch.linalg.norm(target - approx) / norm)
