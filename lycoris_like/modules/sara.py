"""SaRA: fine-tune only the entries of the base weights with |P₀| < θ (the SaRA paper).

Each host weight (and, with `train_bias`, its bias) gets ONE 1-D parameter: the current values v of
the selected entries in C order; the mask is int32 flat indices. The adapted weight is
P = P₀ + m·ΔP with ΔP = v − P₀ on M, computed in float64 and rounded once; m = 1 gives the trained
values themselves (bit-exact) and several SaRA networks on one base add as Σ mᵢ·ΔPᵢ. Autograd through that update is the paper's unstructured backpropagation:
∇v = m·∇W[M]; no dense gradient or optimizer state exists for the host weight.

After progressive adjustment (`training.progressive_adjust`) entries whose value left (−θ, θ) are
frozen at their learned values (buffers) and `v` shrinks in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import IncompatibleFileError
from ..hosts import LINEAR_AND_CONV, NORMS, HostLayer
from ..kernels import sparse
from ..kernels.patch import EntryPatch
from ..kernels.sparse import check_threshold
from .base import AdapterModule
from .capabilities import CombinePart, EntryPatches, NativeCombine, NotNative
from .files import float32_exact, require_keys
from .registry import register_algorithm

WEIGHT_KEYS = ("sara_values", "sara_indices", "sara_nnz", "sara_checksum")
BIAS_KEYS = ("sara_b_values", "sara_b_indices", "sara_b_nnz", "sara_b_checksum")


def sara_lr(threshold: float) -> float:
    """The paper's default learning rate: 1e-3·exp(−350·θ)."""
    return 1e-3 * math.exp(-350.0 * threshold)


class SparseEntries(nn.Module):
    """The selected entries of one host tensor: trained values `values` (the parameter) at `index`,
    the base values there (`base`), and entries frozen by progressive adjustment."""

    def __init__(self, tensor: Tensor, threshold: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.shape = tuple(tensor.shape)
        self.numel = tensor.numel()
        index = sparse.select_indices(tensor, threshold)
        base = sparse.gather(tensor, index, dtype)
        if index.numel():
            self.values = nn.Parameter(base.clone())
        else:  # nothing to train: no empty parameter for optimizers, DDP or FSDP to trip over
            self.register_buffer("values", base.clone(), persistent=False)
        # index / frozen_index / frozen_values are in state_dict(): they record a progressive
        # adjustment, so a training checkpoint restores it (`_load_from_state_dict`). The base
        # values P₀[M] are not: they are re-read from the host's mask.
        self.register_buffer("index", index)
        self.register_buffer("base", base, persistent=False)
        self.register_buffer("frozen_index", index[:0].clone())
        self.register_buffer("frozen_values", base[:0].clone())
        self.register_buffer("frozen_base", base[:0].clone(), persistent=False)

    @property
    def nnz(self) -> int:
        """Selected entries in total (trained and frozen): |{|P₀| < θ}|."""
        return self.index.numel() + self.frozen_index.numel()

    def apply(self, acc: Tensor, multiplier: float | Tensor, keep: Tensor | None = None) -> Tensor:
        """acc with the selected entries updated; `keep` (training-time dropout over the trained
        entries) scales each entry's multiplier."""
        trained = multiplier if keep is None else multiplier * keep
        out = sparse.sparse_update(acc, self.index, self.values, self.base, trained)
        if self.frozen_index.numel():
            out = sparse.sparse_update(out, self.frozen_index, self.frozen_values, self.frozen_base, multiplier)
        return out

    def patches(self, slot: int, multiplier: float | Tensor) -> list[EntryPatch]:
        """This part's update as entry patches of the host tensor in `slot` (`kernels.patch`):
        the entries of `apply`, computed by the same formula."""
        out: list[EntryPatch] = [
            (slot, self.index, lambda old: sparse.updated_entries(old, self.values, self.base, multiplier), self.base)
        ]
        if self.frozen_index.numel():
            out.append((slot, self.frozen_index,
                        lambda old: sparse.updated_entries(old, self.frozen_values, self.frozen_base, multiplier),
                        self.frozen_base))
        return out

    def delta(self, dtype: torch.dtype) -> Tensor:
        """Dense ΔP (the tensor's shape) in `dtype`: v − P₀ on the mask, zero elsewhere."""
        wide = torch.float64
        delta = sparse.scatter(self.numel, self.index, self.values.to(wide) - self.base.to(wide))
        if self.frozen_index.numel():
            delta = delta.index_put((self.frozen_index,), self.frozen_values.to(wide) - self.frozen_base.to(wide))
        return delta.to(dtype).reshape(self.shape)

    def entries(self) -> tuple[Tensor, Tensor, Tensor]:
        """(indices, values, base) over the whole mask (trained and frozen), increasing indices."""
        if not self.frozen_index.numel():
            return self.index, self.values.detach(), self.base
        return sparse.merge_sorted(
            self.index, self.frozen_index, (self.values.detach(), self.frozen_values), (self.base, self.frozen_base)
        )

    @torch.no_grad()
    def shrink(self, keep: Tensor) -> Tensor:
        """Keep training `values[keep]`; freeze the rest at their current values. Returns `keep`."""
        frozen = ~keep
        self.frozen_index, self.frozen_values, self.frozen_base = sparse.merge_sorted(
            self.frozen_index, self.index[frozen],
            (self.frozen_values, self.values.detach()[frozen]), (self.frozen_base, self.base[frozen]),
        )
        self.index = self.index[keep]
        self.base = self.base[keep]
        grad = self.values.grad
        self.values.data = self.values.data[keep]
        if grad is not None:
            self.values.grad = grad[keep]
        return keep

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Restore a checkpoint taken after a progressive adjustment: its trained/frozen split of the
        same mask has other lengths than this one's, so resize to the saved split first. A split that
        is not a partition of this host's mask (another θ, another base model) is refused."""
        saved = {n: state_dict.get(prefix + n) for n in ("values", "index", "frozen_index", "frozen_values")}
        if all(isinstance(t, Tensor) for t in saved.values()) and (
            saved["index"].shape != self.index.shape or saved["frozen_index"].shape != self.frozen_index.shape
        ):
            mask, _, mask_base = self.entries()
            index = torch.cat([saved["index"], saved["frozen_index"]]).to(torch.int64)
            if index.numel() != mask.numel() or not torch.equal(index.sort().values, mask.to(torch.int64)):
                error_msgs.append(
                    f"{prefix}index/frozen_index: the checkpoint's {index.numel()} selected entries are not "
                    f"this layer's {mask.numel()} (another threshold or base model?)"
                )
                return
            position = torch.searchsorted(mask.to(torch.int64), index)
            n = saved["index"].numel()
            with torch.no_grad():
                self.values.data = self.values.data.new_empty(saved["values"].shape)
                self.index = saved["index"].to(self.index.device, self.index.dtype).clone()
                self.base = mask_base[position[:n]].clone()
                self.frozen_index = saved["frozen_index"].to(self.index.device, self.index.dtype).clone()
                self.frozen_values = self.frozen_values.new_empty(saved["frozen_values"].shape)
                self.frozen_base = mask_base[position[n:]].clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @torch.no_grad()
    def load(self, values: Tensor) -> None:
        """Set the trained values from a file (a freshly built, unadjusted mask)."""
        self.values.data = values.detach().to(self.values.device, self.values.dtype).clone()


@register_algorithm("sara")
class SaRA(EntryPatches, NativeCombine, AdapterModule):
    """Sparse fine-tuning of the entries with |P₀| < θ (strict, float32 values, one θ per network).

    Options: `threshold` θ (default 2e-3); `train_bias` also trains the bias entries below θ;
    `train_norm` adds LayerNorm/GroupNorm weights as hosts. `dim`/`alpha` are accepted and ignored.
    The multiplier m gives P₀ + m·ΔP (m = 0: the base exactly; m = 1: the trained values exactly).
    """

    host_kinds = LINEAR_AND_CONV | NORMS
    file_keys = frozenset({*WEIGHT_KEYS, *BIAS_KEYS, "sara_threshold"})
    signature_keys = frozenset({"sara_values", "sara_indices", "sara_threshold"})

    def __init__(
        self,
        host: HostLayer,
        dim: int = 1,
        alpha: float | None = None,
        *,
        threshold: float = 2e-3,
        train_bias: bool = False,
        train_norm: bool = False,
        **common: Any,
    ) -> None:
        super().__init__(host, **common)
        self.threshold = check_threshold(threshold)
        self.train_norm = bool(train_norm)
        dtype = self.param_dtype
        self.sparse_weight = SparseEntries(host.weight, self.threshold, dtype)
        self.sparse_bias = (
            SparseEntries(host.bias, self.threshold, dtype) if train_bias and host.bias is not None else None
        )

    @classmethod
    def kinds_for(cls, options: Mapping[str, Any]) -> frozenset[str]:
        return cls.host_kinds if options.get("train_norm") else LINEAR_AND_CONV

    @property
    def parts(self) -> list[SparseEntries]:
        return [p for p in (self.sparse_weight, self.sparse_bias) if p is not None]

    @property
    def nnz(self) -> int:
        """Selected entries (weight and bias), trained or frozen."""
        return sum(p.nnz for p in self.parts)

    @property
    def merge_dtype(self) -> torch.dtype:
        """Alone in a rebuild on a float32/float64 host: the host's dtype — the selected entries are
        still computed in float64 and rounded once (the same bits), but the dense rest of the
        weight is never converted (half the rebuild cost). float16/bfloat16 hosts: float64."""
        dtype = self.host.weight.dtype
        return dtype if dtype in (torch.float32, torch.float64) else torch.float64

    def default_lr(self, name: str) -> float | None:
        return sara_lr(self.threshold)

    def config(self) -> dict[str, Any]:
        return {"algo": self.algo, "threshold": self.threshold, "train_bias": self.sparse_bias is not None,
                "train_norm": self.train_norm, "nnz": self.nnz}

    # ------------------------------------------------------------------ ΔW: only our own entries

    def delta_weight(self, train: bool = False) -> Tensor:
        return self.sparse_weight.delta(self.param_dtype)

    def delta_bias(self) -> Tensor | None:
        return None if self.sparse_bias is None else self.sparse_bias.delta(self.param_dtype)

    def add_delta(self, acc: Tensor, multiplier: float | Tensor, train: bool = False, inplace: bool = False) -> Tensor:
        # rank_dropout: SaRA has no rank, so it drops individual trained entries' updates. The
        # scatter is out of place whatever `inplace` says: a merge copies its result over.
        values = self.sparse_weight.values
        keep = self.rank_mask(values.numel(), values) if train else None
        return self.sparse_weight.apply(acc, single(multiplier, self.multiplier.dtype), keep)

    def entry_patches(self, multiplier: float | Tensor, train: bool = False) -> list[EntryPatch] | None:
        # Rank dropout draws a keep-mask per call, which backward would have to draw again: that
        # case rebuilds instead (kernels.rebuild replays the random state).
        if train and self.rank_dropout and self.training_now:
            return None
        m = single(multiplier, self.multiplier.dtype)
        return [patch for slot, part in enumerate((self.sparse_weight, self.sparse_bias)) if part is not None
                for patch in part.patches(slot, m)]

    @property
    def changes_bias(self) -> bool:
        return self.sparse_bias is not None

    def add_delta_bias(self, acc: Tensor, multiplier: float | Tensor, inplace: bool = False) -> Tensor:
        return acc if self.sparse_bias is None else self.sparse_bias.apply(acc, single(multiplier, self.multiplier.dtype))

    def rebuild_flops(self) -> int:
        return self.nnz + self.host.weight.numel()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, θ={self.threshold:g}, nnz={self.nnz}"

    # ------------------------------------------------------------------ files

    def file_tensors(self) -> dict[str, Tensor]:
        out = {"sara_threshold": torch.tensor(self.threshold, dtype=torch.float32)}
        for keys, part in ((WEIGHT_KEYS, self.sparse_weight), (BIAS_KEYS, self.sparse_bias)):
            if part is None:
                continue
            index, values, base = part.entries()
            out[keys[0]] = values.detach()
            out[keys[1]] = index.to(sparse.INDEX_DTYPE)
            out[keys[2]] = torch.tensor(index.numel(), dtype=torch.int64)
            out[keys[3]] = torch.tensor(sparse.checksum(base), dtype=torch.int64)
        return out

    @classmethod
    def from_file_tensors(cls, host: HostLayer, tensors: Mapping[str, Tensor], name: str, **options: Any) -> SaRA:
        require_keys(tensors, name, ("sara_threshold", *WEIGHT_KEYS))
        threshold = read_threshold(tensors, name)
        has_bias = any(k in tensors for k in BIAS_KEYS)
        if has_bias:
            require_keys(tensors, name, BIAS_KEYS)
            if host.bias is None:
                raise IncompatibleFileError(
                    f"{name}.sara_b_values: the file changes a bias, but the layer "
                    f"{type(host.module).__name__}{tuple(host.weight.shape)} has none",
                    keys=[f"{name}.sara_b_values"],
                )
        groups = [(WEIGHT_KEYS, host.weight, "weight")] + ([(BIAS_KEYS, host.bias, "bias")] if has_bias else [])
        for keys, tensor, what in groups:  # cheap checks before any mask is computed
            check_entries(tensors, name, keys, tensor, what)
        module = cls(host, threshold=threshold, train_bias=has_bias, train_norm=host.kind in NORMS, **options)
        for (keys, tensor, what), part in zip(groups, module.parts):
            verify_base(tensors, name, keys, part, threshold, what)
            part.load(tensors[keys[0]])
        return module


    @classmethod
    def combine_native(cls, parts: Sequence[CombinePart], build: Callable[[Mapping[str, Tensor]], Any],
                       base: Any, dtype: torch.dtype) -> tuple[dict[str, Tensor], int | None]:
        """P₀ + Σ wᵢ·ΔPᵢ on the shared mask, ΔPᵢ = vᵢ − P₀ (float64, rounded once). Files of
        different θ (nested masks) go dense instead."""
        if base is None:
            raise NotNative("SaRA stores trained values, so combining needs the base weights (--base)")
        groups = [t for _, t in parts]
        out = dict(groups[0])
        for values_key, index_key, p0_tensor in (("sara_values", "sara_indices", base.weight),
                                                 ("sara_b_values", "sara_b_indices", base.bias)):
            present = [g for g in groups if values_key in g]
            if not present:
                continue
            if len(present) != len(groups) or any(not torch.equal(g[index_key], groups[0][index_key]) for g in groups):
                raise NotNative("the files select different entries (another θ)")
            index = groups[0][index_key].long()
            p0 = p0_tensor.detach().reshape(-1)[index].double()
            total = p0 + sum(w * (g[values_key].double() - p0) for (w, _), g in zip(parts, groups))
            out[values_key] = total.to(groups[0][values_key].dtype)
        return out, None


def single(multiplier: float | Tensor, dtype: torch.dtype) -> float | Tensor:
    """The multiplier in the host's compute dtype (the multiplier buffer's): on float32 hosts a
    float32 value, so m·(v − P₀) is exact in float64 (24 + 29 bits) and P₀ + m·ΔP is rounded once."""
    if isinstance(multiplier, Tensor) or dtype == torch.float64:
        return multiplier
    return float32_exact(multiplier)


# --------------------------------------------------------------------------- file validation


def read_threshold(tensors: Mapping[str, Tensor], name: str) -> float:
    key = f"{name}.sara_threshold"
    t = tensors["sara_threshold"]
    value = float(t.double().reshape(-1)[0]) if t.numel() == 1 and t.is_floating_point() else math.nan
    if not math.isfinite(value) or value <= 0:
        raise IncompatibleFileError(f"{key}: expected one finite positive number, found {t!r}", keys=[key])
    if t.dtype in (torch.float16, torch.bfloat16):
        raise IncompatibleFileError(
            f"{key}: θ was rounded to {t.dtype} (saved with dtype=…), so the mask cannot be rebuilt exactly; "
            "save SaRA networks without a half-precision dtype",
            keys=[key],
        )
    return check_threshold(value)


def check_entries(tensors: Mapping[str, Tensor], name: str, keys: tuple[str, ...], tensor: Tensor, what: str) -> None:
    """Shapes, dtypes, nnz and index range of one (values, indices, nnz, checksum) group."""
    values, indices, nnz, digest = (tensors[k] for k in keys)
    k_values, k_indices, k_nnz, k_digest = (f"{name}.{k}" for k in keys)
    if indices.dim() != 1 or indices.dtype not in (torch.int32, torch.int64):
        raise IncompatibleFileError(
            f"{k_indices}: expected a 1-D int32 tensor, found {indices.dtype} {tuple(indices.shape)}", keys=[k_indices]
        )
    if values.dim() != 1 or not values.is_floating_point():
        raise IncompatibleFileError(
            f"{k_values}: expected a 1-D float tensor, found {values.dtype} {tuple(values.shape)}", keys=[k_values]
        )
    for key, t in ((k_nnz, nnz), (k_digest, digest)):
        if t.numel() != 1 or t.is_floating_point():
            raise IncompatibleFileError(f"{key}: expected one integer, found {t.dtype} {tuple(t.shape)}", keys=[key])
    count = int(nnz.reshape(-1)[0])
    if count != values.numel() or count != indices.numel():
        raise IncompatibleFileError(
            f"{k_nnz}: the file says {count} entries, but holds {values.numel()} values and {indices.numel()} indices",
            keys=[k_nnz],
        )
    if count:
        idx = indices.to(torch.int64)
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= tensor.numel():
            raise IncompatibleFileError(
                f"{k_indices}: indices out of range [0, {tensor.numel()}) for the layer's {what} "
                f"{tuple(tensor.shape)} (found {low} … {high})",
                keys=[k_indices],
            )
        if count > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise IncompatibleFileError(f"{k_indices}: indices must be strictly increasing", keys=[k_indices])


def verify_base(
    tensors: Mapping[str, Tensor], name: str, keys: tuple[str, ...], part: SparseEntries, threshold: float, what: str
) -> None:
    """The layer's entries below θ are exactly the file's, and their base values have its checksum."""
    values, indices, nnz, digest = (tensors[k] for k in keys)
    k_indices, k_nnz, k_digest = (f"{name}.{k}" for k in keys[1:])
    hint = "a different base model, or a float16/bfloat16 copy of it (half precision flips mask entries)"
    if part.nnz != values.numel():
        raise IncompatibleFileError(
            f"{k_nnz}: the file trains {values.numel()} entries of this layer's {what}, but "
            f"{part.nnz} of the model's entries are below θ = {threshold:g}: {hint}",
            keys=[k_nnz],
        )
    if not torch.equal(indices.to(part.index.device, sparse.INDEX_DTYPE), part.index):
        raise IncompatibleFileError(
            f"{k_indices}: the file's entries are not the model's entries below θ = {threshold:g}: {hint}",
            keys=[k_indices],
        )
    if sparse.checksum(part.base) != int(digest.reshape(-1)[0]):
        raise IncompatibleFileError(
            f"{k_digest}: the base values under the mask differ from the ones the file was trained on: {hint}",
            keys=[k_digest],
        )
