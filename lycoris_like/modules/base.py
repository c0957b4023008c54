"""The one contract every algorithm fulfils: what is ΔW for this host layer?

An `AdapterModule` owns its parameters and answers `delta_weight()` (host-weight shape, merge
ratio included, runtime multiplier excluded). Everything around it — the multiplier, the forward
dispatch, merging, dropout plumbing, file validation — lives here or in the network, once.
"""

from __future__ import annotations

import inspect
import math
import struct
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import ConfigError, IncompatibleFileError, ShapeMismatchError, UnsupportedLayerError
from ..hosts import HostLayer, compute_dtype

ALL_HOST_KINDS = frozenset({"linear", "conv1d", "conv2d", "conv3d"})
FORWARD_MODES = ("auto", "rebuild", "bypass")


class AdapterModule(nn.Module):
    """Base class of every algorithm. Identity at init: `delta_weight()` is exactly zero."""

    algo: ClassVar[str] = ""
    host_kinds: ClassVar[frozenset[str]] = ALL_HOST_KINDS
    file_keys: ClassVar[frozenset[str]] = frozenset()
    """Every key suffix the algorithm reads and writes (`lora_down.weight`, `alpha`, …)."""
    signature_keys: ClassVar[frozenset[str]] = frozenset()
    """Suffixes whose presence identifies the algorithm in a file."""

    def __init__(
        self,
        host: HostLayer,
        *,
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        rank_dropout_scale: bool = False,
    ) -> None:
        super().__init__()
        if host.kind not in self.host_kinds:
            raise UnsupportedLayerError(
                f"{self.algo} cannot adapt a {host.kind} layer ({type(host.module).__name__}); "
                f"it supports {sorted(self.host_kinds)}"
            )
        for name, p in (("dropout", dropout), ("rank_dropout", rank_dropout), ("module_dropout", module_dropout)):
            if not 0.0 <= float(p) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {p!r}")
        self.host = host
        self.dropout = float(dropout)
        self.rank_dropout = float(rank_dropout)
        self.module_dropout = float(module_dropout)
        self.rank_dropout_scale = bool(rank_dropout_scale)
        self.enabled = True
        self.merged = False
        self.forward_mode = "auto"
        self.register_buffer("multiplier", torch.ones((), **self.factory()), persistent=False)

    # ----------------------------------------------------------------- the contract

    def delta_weight(self) -> Tensor:
        """ΔW in the host weight's shape, merge ratio included, multiplier excluded."""
        raise NotImplementedError

    def delta_bias(self) -> Tensor | None:
        """Δb for algorithms that change the bias; None otherwise."""
        return None

    def train_delta_weight(self) -> Tensor:
        """ΔW as the training forward sees it (rank dropout applied); merges never use this."""
        return self.delta_weight()

    @property
    def can_bypass(self) -> bool:
        """Whether `bypass` is available for this host."""
        return False

    def bypass(self, x: Tensor) -> Tensor:
        """The adapter's contribution `op(x, ΔW)` without building ΔW (multiplier excluded)."""
        raise NotImplementedError

    def rebuild_flops(self) -> int:
        """Cost of building ΔW once (cost-model input)."""
        return self.host.weight.numel()

    def bypass_flops(self, tokens: int) -> int:
        """Cost of one bypass forward over `tokens` positions (cost-model input)."""
        return tokens * self.host.weight.numel()

    def file_tensors(self) -> dict[str, Tensor]:
        """The tensors written to a file, keyed by suffix (LyCORIS names)."""
        raise NotImplementedError

    @classmethod
    def from_file_tensors(cls, host: HostLayer, tensors: Mapping[str, Tensor], name: str) -> AdapterModule:
        """Build the adapter a file describes; raise a typed error naming `name.<key>` if it does not fit."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Algorithm, rank and options, for metadata and inspection."""
        return {"algo": self.algo}

    # ----------------------------------------------------------------- shared helpers

    @classmethod
    def option_names(cls) -> frozenset[str]:
        """Keyword options `create_network` may pass to this algorithm."""
        names = set(inspect.signature(AdapterModule.__init__).parameters) - {"self", "host"}
        for param in inspect.signature(cls.__init__).parameters.values():
            if param.kind is inspect.Parameter.KEYWORD_ONLY:
                names.add(param.name)
        return frozenset(names)

    @property
    def param_dtype(self) -> torch.dtype:
        return compute_dtype(self.host.weight.dtype)

    def factory(self) -> dict[str, Any]:
        """`device`/`dtype` keyword arguments for new parameters."""
        return {"device": self.host.weight.device, "dtype": self.param_dtype}

    @property
    def training_now(self) -> bool:
        """Training-time randomness applies only when both the network and the host train."""
        return self.training and self.host.module.training

    def is_active(self) -> bool:
        """Whether this forward applies the adapter (module dropout draws here, in training only)."""
        if not self.enabled or self.merged:
            return False
        if self.module_dropout and self.training_now and torch.rand(()) < self.module_dropout:
            return False
        return True

    def use_bypass(self, x: Tensor) -> bool:
        """Bypass or rebuild for this call: forced by `forward_mode`, else the cheaper one."""
        if not self.can_bypass or self.forward_mode == "rebuild":
            return False
        if self.forward_mode == "bypass" or (self.dropout and self.training_now):
            return True
        tokens = self.host.tokens(x)
        if torch.is_grad_enabled() and self._trainable():
            # Rebuilding makes autograd form the full weight gradient (tokens·|W|) on top.
            return 3 * self.bypass_flops(tokens) < self.rebuild_flops() + tokens * self.host.weight.numel()
        return self.bypass_flops(tokens) < self.rebuild_flops()

    def _trainable(self) -> bool:
        for p in self.parameters():
            if p.requires_grad:
                return True
        return False

    def rank_mask(self, rank: int, like: Tensor) -> Tensor | None:
        """A training-only keep-mask over `rank` components, or None."""
        if not (self.rank_dropout and self.training_now):
            return None
        keep = (torch.rand(rank, device=like.device) >= self.rank_dropout).to(like.dtype)
        if self.rank_dropout_scale:
            keep = keep / (1.0 - self.rank_dropout)
        return keep

    def extra_repr(self) -> str:
        return f"{self.algo} on {self.host.kind} {tuple(self.host.weight.shape)}"


# --------------------------------------------------------------------- file validation helpers


def require_keys(tensors: Mapping[str, Tensor], name: str, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in tensors]
    if missing:
        keys = [f"{name}.{k}" for k in missing]
        raise IncompatibleFileError(f"missing {', '.join(keys)}", keys=keys)


def expect_shape(name: str, key: str, tensor: Tensor, shape: tuple[int, ...]) -> Tensor:
    """`tensor` reshaped to `shape`; trailing singleton dims may be present or absent."""
    squeezed = tuple(tensor.shape)
    while len(squeezed) > 2 and squeezed[-1] == 1:
        squeezed = squeezed[:-1]
    target = tuple(shape)
    while len(target) > 2 and target[-1] == 1:
        target = target[:-1]
    if squeezed != target:
        raise ShapeMismatchError(
            f"{name}.{key}: expected shape {tuple(shape)} for this layer, found {tuple(tensor.shape)}",
            keys=[f"{name}.{key}"],
        )
    return tensor.reshape(shape)


def read_alpha(tensors: Mapping[str, Tensor], name: str, rank: int) -> float:
    """The stored `alpha` as a float32-exact Python float; the rank when absent (scale 1)."""
    if "alpha" not in tensors:
        return float(rank)
    alpha = tensors["alpha"]
    value = float(alpha.float().reshape(-1)[0]) if alpha.numel() == 1 else math.nan
    if alpha.numel() != 1 or not math.isfinite(value) or value <= 0:
        raise IncompatibleFileError(
            f"{name}.alpha: expected one finite positive number, found shape {tuple(alpha.shape)}"
            + (f" value {value}" if alpha.numel() == 1 else ""),
            keys=[f"{name}.alpha"],
        )
    return value


def float32_exact(value: float) -> float:
    """`value` rounded to float32, so scales computed from it match after a save/load round trip."""
    return struct.unpack("f", struct.pack("f", value))[0]


def check_dim(dim: Any, what: str = "dim") -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise ConfigError(f"{what} must be a positive integer, got {dim!r}")
    return dim
