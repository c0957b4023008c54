"""W + Σ mᵢ·ΔWᵢ, computed in fp32 (fp64 for fp64 hosts, or what the adapters ask for) and cast once.

The unmerged rebuild forward and `merge()` both use this function, so a merged model and the
unmerged one it came from compute with the very same weight.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from ..hosts import compute_dtype


def apply_deltas(base: Tensor, deltas: Iterable[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """`base + Σ Δ` over already-scaled deltas (m·ΔW), in `dtype` (default: fp32, fp64 for fp64
    bases), cast once to base's dtype."""
    dtype = dtype or compute_dtype(base.dtype)
    out = base.to(dtype)
    for delta in deltas:
        out = out + delta.to(dtype)
    return out.to(base.dtype)
