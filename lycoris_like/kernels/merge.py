"""W + Σ mᵢ·ΔWᵢ, computed in fp32 (fp64 for fp64 hosts) and cast once.

The unmerged rebuild forward and `merge()` both use this function, so a merged model and the
unmerged one it came from compute with the very same weight.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from ..hosts import compute_dtype


def apply_deltas(base: Tensor, deltas: Iterable[tuple[Tensor, Tensor]], dtype: torch.dtype | None = None) -> Tensor:
    """`base + Σ m·Δ` over `(multiplier, delta)` pairs in `dtype` (default: fp32, fp64 for fp64
    bases), cast once to base's dtype."""
    dtype = dtype or compute_dtype(base.dtype)
    out = base.to(dtype)
    for multiplier, delta in deltas:
        out = out + multiplier.to(dtype) * delta.to(dtype)
    return out.to(base.dtype)
