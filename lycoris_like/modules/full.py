"""full / diff: native fine-tuning of the chosen layers, kept (and saved) as a difference.

ΔW = `diff` (the host weight's shape), Δb = `diff_b` ((out,), only when the host has a bias); both
zero at init. With multiplier 1 the forward is op(x, W + diff, b + diff_b), so the gradient of
`diff` is exactly the gradient plain fine-tuning would give W: a step on `diff` is a step on W.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import IncompatibleFileError
from ..hosts import HostLayer
from .base import AdapterModule
from .capabilities import CombinePart, NativeCombine, WeightFree
from .files import expect_shape, require_keys
from .registry import register_algorithm


@register_algorithm("full", aliases=("diff",))
class Full(WeightFree, NativeCombine, AdapterModule):
    """ΔW = diff, Δb = diff_b. `dim`/`alpha` are accepted and ignored (no rank, no merge ratio).

    `rank_dropout` drops whole output rows of ΔW during training (LyCORIS' rule); Δb is never
    dropped (rank dropout acts on ΔW only, for every algorithm). There is no bypass: building
    W + m·diff costs one addition per weight entry, less than any separate path.
    """

    file_keys = frozenset({"diff", "diff_b"})
    signature_keys = frozenset({"diff", "diff_b"})

    def __init__(self, host: HostLayer, dim: int = 1, alpha: float | None = None, **common: Any) -> None:
        super().__init__(host, **common)
        fac = self.factory()
        self.diff = nn.Parameter(torch.zeros(host.weight.shape, **fac))
        self.diff_b = nn.Parameter(torch.zeros(host.out_features, **fac)) if host.bias is not None else None

    def delta_weight(self, train: bool = False) -> Tensor:
        mask = self.rank_mask(self.host.out_features, self.diff) if train else None
        if mask is None:
            return self.diff
        return self.diff * mask.reshape(-1, *([1] * (self.diff.dim() - 1)))

    def delta_bias(self) -> Tensor | None:
        return self.diff_b

    # ------------------------------------------------------------------ files

    def file_tensors(self) -> dict[str, Tensor]:
        out = {"diff": self.diff.detach()}
        if self.diff_b is not None:
            out["diff_b"] = self.diff_b.detach()
        return out

    @classmethod
    def from_file_tensors(cls, host: HostLayer, tensors: Mapping[str, Tensor], name: str, **options: Any) -> Full:
        require_keys(tensors, name, ("diff",))
        diff = expect_shape(name, "diff", tensors["diff"], tuple(host.weight.shape))
        diff_b = tensors.get("diff_b")
        if diff_b is not None:
            if host.bias is None:
                raise IncompatibleFileError(
                    f"{name}.diff_b: the file changes a bias, but the layer "
                    f"{type(host.module).__name__}{tuple(host.weight.shape)} has none",
                    keys=[f"{name}.diff_b"],
                )
            diff_b = expect_shape(name, "diff_b", diff_b, (host.out_features,))
        module = cls(host, **options)
        with torch.no_grad():
            module.diff.copy_(diff)
            if diff_b is not None:
                module.diff_b.copy_(diff_b)
        return module

    # ------------------------------------------------------------------ tools

    @classmethod
    def file_weight_shape(cls, tensors: Mapping[str, Tensor]) -> tuple[tuple[int, ...], bool] | None:
        diff = tensors.get("diff")
        return None if diff is None else (tuple(diff.shape), True)

    @classmethod
    def combine_native(cls, parts: Sequence[CombinePart], build: Callable[[Mapping[str, Tensor]], Any],
                       base: Any, dtype: torch.dtype) -> tuple[dict[str, Tensor], int | None]:
        """Differences add."""
        return cls.summed(parts, ("diff", "diff_b"), dtype)
