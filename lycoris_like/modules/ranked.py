"""What the rank-r algorithms (LoRA, LoHa, LoKr) share: rank, α and γ, the Tucker flag, a trained scalar."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..hosts import HostLayer
from .base import AdapterModule
from .files import check_dim, merge_ratio


class RankedAdapter(AdapterModule):
    """A rank-r adapter: `rank`, the stored `alpha` and the merge ratio `scale` = α/r (rs-LoRA:
    α/√r, stored as α·√r so every reader's α/r gives it), `tucker` (a core on k>1 convs only), and
    with `use_scalar` a trained `scalar` (init 0) that files fold into one factor. Variants such as
    DoRA (`weight_decompose=True`) apply to every subclass."""

    def __init__(
        self,
        host: HostLayer,
        dim: int = 4,
        alpha: float | None = 1.0,
        *,
        use_tucker: bool = False,
        rs_lora: bool = False,
        use_scalar: bool = False,
        **common: Any,
    ) -> None:
        super().__init__(host, **common)
        self.rank = check_dim(dim)
        self.tucker = bool(use_tucker) and host.kernel_numel > 1
        self.rs_lora = bool(rs_lora)
        self.alpha, self.scale = merge_ratio(alpha, self.rank, self.rs_lora)
        # Shape (1,), not 0-d: FSDP's fully_shard cannot shard a 0-d parameter.
        self.scalar = nn.Parameter(torch.zeros(1, **self.factory())) if use_scalar else None

    def with_scalar(self, factor: Tensor) -> Tensor:
        """`factor` times the trained scalar (as files store it), or `factor` itself."""
        return factor if self.scalar is None else factor * self.scalar

    def alpha_tensor(self) -> Tensor:
        """The per-module float32 `alpha` files carry."""
        return torch.tensor(self.alpha, dtype=torch.float32, device="cpu")

    def config(self) -> dict[str, Any]:
        return {"algo": self.algo, "dim": self.rank, "alpha": self.alpha, "use_tucker": self.tucker,
                "rs_lora": self.rs_lora}
