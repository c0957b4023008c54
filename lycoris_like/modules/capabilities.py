"""Opt-in capabilities: what an algorithm may add to the contract of `base.AdapterModule`.

Each one is a mixin the planner (`lycoris_like.plan`) or the tools discover with `isinstance`;
an algorithm inherits the ones it has. None is required: without any, the forward rebuilds
W + m·ΔW for one host op, and the tools work from `delta_weight()`.

Forward paths (chosen per layer by the planner: cheapest by `bypass_flops` / `rebuild_flops`,
or as `forward_mode` says):

- `Bypass` — the output plus m·ΔW·x without building ΔW (LoRA: up(down(x))). Example::

      class MyLoRA(Bypass, RankedAdapter):
          def bypass(self, x, train=False):
              return F.linear(F.linear(x, self.a), self.b) * self.scale

- `OutputMap` — the adapted output from the pure host output ((IA)³: base_out ⊙ (1 + m·l)).
- `InputMap` — an input x' with op(x', W, b) = op(x, W + m·ΔW, b) (SVDiff's tall layers).
- `EntryPatches` — W + m·ΔW as a few changed entries, written into the host in place for the
  call (SaRA).
- `NonlinearMultiplier` — ΔW(m) is not m·ΔW (SVDiff); weighted tools ask for ΔW(m).
- `ReadsHostWeight` — ΔW comes from the host weight itself, which must still be the base (SVDiff's
  compact buffers): refused on a host another network merged into.

Tools (`lycoris_like.tools`):

- `WeightFree` — ΔW is a function of the file alone (no base model needed), and the layer's
  shape can be read from the tensors.
- `NativeCombine` — combining several files in the algorithm's own space (LoRA: concatenated
  ranks; SVDiff: summed shifts).
- `Factored` — ΔW as an explicit low-rank product, for exact rank changes (`resize`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import IncompatibleFileError
from ..kernels.patch import EntryPatch


class FastPath:
    """What every forward path besides the rebuild shares: whether it applies, and its cost.

    The default costs need no override: a factor-based adapter costs about one multiply-add per
    parameter and position in its path, and building ΔW about one per weight entry and rank."""

    path_kind: ClassVar[str | None] = None
    """"bypass", "output" or "input": which of the paths below the class has."""

    def fast_path(self, train: bool) -> str | None:
        """The path's kind if it applies to this host now, else None (e.g. LoRA on a grouped conv)."""
        return self.path_kind

    def bypass_flops(self, tokens: int) -> int:
        """Cost of one forward of the path over `tokens` positions."""
        return tokens * adapter_params(self)

    def fixed_flops(self) -> int:
        """Cost the path pays once per forward whatever the tokens (DoRA's norm), without autograd."""
        return 0

    def rebuild_flops(self) -> int:
        """Cost of building ΔW once."""
        host = self.host  # type: ignore[attr-defined]
        width = host.out_features + host.in_features * host.kernel_numel
        return host.weight.numel() * max(1, adapter_params(self) // max(width, 1))


def adapter_params(module: Any) -> int:
    """Entries the adapter's path multiplies by: its parameters and its floating-point buffers
    (frozen factors count as much as trained ones), not the multiplier."""
    buffers = (b for name, b in module.named_buffers() if b.is_floating_point() and not name.endswith("multiplier"))
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in buffers)


class Bypass(FastPath):
    """y = host(x) + m·op(x, ΔW, Δb) with the second term computed without ΔW."""

    path_kind = "bypass"

    bypass_dropout: ClassVar[bool] = False
    """Whether `bypass` applies `self.dropout` itself (LoRA: on the rank-r activations); else the
    planner drops out the bypass output."""

    def bypass(self, x: Tensor, train: bool = False) -> Tensor:
        """op(x, ΔW, Δb) at m = 1, differentiable; `train` applies rank dropout (and `dropout`
        when `bypass_dropout`)."""
        raise NotImplementedError

    def bypass_add(self, out: Tensor, x: Tensor, multiplier: float | Tensor, train: bool = False,
                   row_scale: Tensor | None = None) -> Tensor:
        """out + m·s ⊙ bypass(x), s an optional per-output-channel scale shaped to broadcast on
        `out` (DoRA's). Override to fuse the addition into the path's last op."""
        y = self.bypass(x, train)
        if train and self.dropout and not self.bypass_dropout:  # type: ignore[attr-defined]
            y = F.dropout(y, self.dropout)  # type: ignore[attr-defined]
        y = y.to(out.dtype)
        if row_scale is not None:
            return torch.addcmul(out, row_scale, y, value=multiplier) if not isinstance(multiplier, Tensor) \
                else out + row_scale * y * multiplier.to(out.dtype)
        if isinstance(multiplier, Tensor):
            return out + y * multiplier.to(out.dtype)
        return torch.add(out, y, alpha=multiplier)

    def bypass_plan(self, multiplier: float | Tensor, train: bool) -> Callable[[Tensor, Tensor], Tensor]:
        """`(out, x) → bypass_add(out, x, m, train)` for the planner, made once per plan: an
        algorithm may return a leaner closure with what does not change between calls bound."""
        add = self.bypass_add
        return lambda out, x: add(out, x, multiplier, train)


class OutputMap(FastPath):
    """y = f(host(x)): the adapted output from the pure host output (no other adapter's change in it)."""

    path_kind = "output"

    def output_map(self, base_out: Tensor, x: Tensor, multiplier: float | Tensor, train: bool = False) -> Tensor:
        """op(x, W + ΔW(m), b + Δb(m)) from `base_out` = op(x, W, b); applies its own dropout."""
        raise NotImplementedError

    def output_plan(self, multiplier: float | Tensor, train: bool) -> Callable[[Tensor, Tensor], Tensor]:
        """`(base_out, x) → output_map(base_out, x, m, train)` for the planner, made once per plan
        (an algorithm may return a leaner closure)."""
        out_map = self.output_map
        return lambda base_out, x: out_map(base_out, x, multiplier, train)


class InputMap(FastPath):
    """y = op(g(x), W, b): the adapted output from the host op on a mapped input."""

    path_kind = "input"

    def input_map(self, x: Tensor, multiplier: float | Tensor, train: bool = False) -> Tensor:
        """x' with op(x', W, b) = op(x, W + ΔW(m), b); applies its own dropout."""
        raise NotImplementedError


class EntryPatches:
    """W + m·ΔW (and b + m·Δb) as a few changed entries of the host's own tensors: the forward
    writes them into the host in place for the call (`kernels.patch`) instead of copying W."""

    stacked_merge_dtype: ClassVar[torch.dtype] = torch.float64
    """The precision of W + Σ mᵢ·ΔWᵢ when this adapter shares a rebuild with others, so that
    the sum is rounded once."""

    def entry_patches(self, multiplier: float | Tensor, train: bool = False) -> list[EntryPatch] | None:
        """The patches, or None where they do not apply (then the forward rebuilds)."""
        raise NotImplementedError


class NonlinearMultiplier:
    """ΔW(m) is not m·ΔW (SVDiff: m inside a ReLU): tools that weight an adapter ask for ΔW(m)."""

    def delta_at(self, multiplier: float | Tensor) -> Tensor:
        """ΔW at multiplier m, in merge precision."""
        raise NotImplementedError


class ReadsHostWeight:
    """ΔW is recovered from the host weight itself (SVDiff's compact buffers), so the host must
    hold the base: the forward and merges refuse a host that another network has merged into."""

    def reads_host_weight(self) -> str | None:
        """Why this adapter needs the unchanged base weight (for the error message), or None
        when it does not (its options keep their own factors)."""
        return "it recovers its ΔW from the host weight"


class NotNative(Exception):
    """A combination that the algorithm's own space cannot hold exactly."""


CombinePart = tuple[float, Mapping[str, Tensor]]
"""(weight, the module's tensors in one file)."""


class NativeCombine:
    """Combining several files' modules in the algorithm's own space."""

    @classmethod
    def combine_native(cls, parts: Sequence[CombinePart], build: Callable[[Mapping[str, Tensor]], Any],
                       base: Any, dtype: torch.dtype) -> tuple[dict[str, Tensor], int | None]:
        """(tensors, rank) of Σ wᵢ·moduleᵢ, or raise `NotNative`. `build(tensors)` makes the
        adapter a part describes (validated); `base` is the host layer or None without a base."""
        raise NotImplementedError

    @staticmethod
    def fold_single(parts: Sequence[CombinePart], keys: Sequence[str], dtype: torch.dtype) -> tuple[dict[str, Tensor], None]:
        """One part with its weight folded into the first of `keys` present — for algorithms
        linear in that factor whose sums are not of the same form (LoHa, LoKr)."""
        if len(parts) > 1:
            raise NotNative("a sum of several is not one of the same form and rank")
        (w, tensors), = parts
        if "dora_scale" in tensors:
            raise NotNative("DoRA is not linear in its factors")
        key = next(k for k in keys if k in tensors)
        out = dict(tensors)
        out[key] = (tensors[key].double() * w).to(dtype).contiguous()
        return out, None

    @staticmethod
    def summed(parts: Sequence[CombinePart], keys: Sequence[str], dtype: torch.dtype) -> tuple[dict[str, Tensor], None]:
        """Σ wᵢ·tensorᵢ for each of `keys` (float64, rounded once) — for algorithms linear in their
        tensors; every other key (flags, checksums) is copied from the first part."""
        out: dict[str, Tensor] = {}
        for key in keys:
            present = [(w, tensors[key]) for w, tensors in parts if key in tensors]
            if not present:
                continue
            shapes = {tuple(t.shape) for _, t in present}
            if len(shapes) != 1:
                raise IncompatibleFileError(f"{key}: shapes differ between files: {sorted(shapes)}", keys=[key])
            out[key] = sum(w * t.double() for w, t in present).to(dtype).contiguous()
        for key, value in parts[0][1].items():
            out.setdefault(key, value)
        return out, None


class WeightFree:
    """ΔW is a function of the file's tensors alone: no base model is needed to compute it."""

    @classmethod
    def needs_base(cls, tensors: Mapping[str, Tensor]) -> bool:
        """Whether these tensors' ΔW depends on the base after all (a DoRA magnitude does)."""
        return "dora_scale" in tensors

    @classmethod
    def file_weight_shape(cls, tensors: Mapping[str, Tensor]) -> tuple[tuple[int, ...], bool] | None:
        """The host weight shape the tensors imply, and whether it is certain (False: a flat
        (out, in·k…) guess for factors stored flattened); None if they do not say."""
        raise NotImplementedError


class Factored:
    """ΔW as an explicit product up·down: what exact rank tools (`tools.resize`) work on."""

    def factors(self) -> tuple[Tensor, Tensor]:
        """(up (out, r), down (r, in·k…)) in float64 with ΔW = up @ down, the merge ratio folded in."""
        raise NotImplementedError
