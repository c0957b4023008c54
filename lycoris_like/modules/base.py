"""The one contract every algorithm fulfils: what is ΔW for this host layer?

An algorithm is an `AdapterModule` subclass that declares its parameters (in `__init__`), ΔW
(`delta_weight`, and `delta_bias` if it changes the bias) and its file layout (`file_tensors`,
`from_file_tensors`, `file_keys`, `signature_keys`). That is all it must do. Speed-ups are opt-in
capabilities (`modules.capabilities`), variants such as DoRA wrap an algorithm
(`modules.variants`), and the forward, merges and files are built on this contract elsewhere,
once.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import ConfigError, UnsupportedLayerError
from ..hosts import LINEAR_AND_CONV, HostLayer, compute_dtype



class AdapterModule(nn.Module):
    """Base class of every algorithm. Identity at init: `delta_weight()` is exactly zero.

    Required: `delta_weight`, `file_tensors`, `from_file_tensors` and the class attributes
    `file_keys` / `signature_keys`. Optional: `delta_bias`, `add_delta` (a faster or exacter
    W + m·ΔW), `config`, `default_lr`, `host_kinds`, `restorable_options`.
    """

    algo: ClassVar[str] = ""
    host_kinds: ClassVar[frozenset[str]] = LINEAR_AND_CONV
    file_keys: ClassVar[frozenset[str]] = frozenset()
    """Every key suffix the algorithm reads and writes (`lora_down.weight`, `alpha`, …)."""
    signature_keys: ClassVar[frozenset[str]] = frozenset()
    """Suffixes whose presence identifies the algorithm in a file."""
    restorable_options: ClassVar[frozenset[str]] = frozenset()
    """Options that change how ΔW is computed but not the file's keys (SVDiff's `svd_buffers`):
    kept in our metadata and passed back on load."""

    def __init__(
        self,
        host: HostLayer,
        *,
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        rank_dropout_scale: bool = False,
        dtype: torch.dtype | None = None,
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
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ConfigError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.host = host
        self.dropout = float(dropout)
        self.rank_dropout = float(rank_dropout)
        self.module_dropout = float(module_dropout)
        self.rank_dropout_scale = bool(rank_dropout_scale)
        self._param_dtype = dtype or compute_dtype(host.weight.dtype)
        self.enabled = True
        self.merged = False
        self.forward_mode = "auto"
        self.multiplier_value = 1.0
        # The multiplier as a tensor too: what a torch.compile'd forward reads, so that changing it
        # never recompiles. Eager forwards fold the float into their kernels' scalars instead.
        self.register_buffer("multiplier", torch.ones((), device=host.weight.device, dtype=compute_dtype(host.weight.dtype)),
                             persistent=False)

    # ----------------------------------------------------------------- what an algorithm implements

    def delta_weight(self, train: bool = False) -> Tensor:
        """ΔW in the host weight's shape, merge ratio included, runtime multiplier excluded;
        `train=True` applies training-time randomness (rank dropout) when the adapter trains."""
        raise NotImplementedError

    def delta_bias(self) -> Tensor | None:
        """Δb for algorithms that change the bias; None otherwise."""
        return None

    def file_tensors(self) -> dict[str, Tensor]:
        """The tensors written to a file, keyed by suffix (LyCORIS names where LyCORIS has the algorithm)."""
        raise NotImplementedError

    @classmethod
    def from_file_tensors(cls, host: HostLayer, tensors: Mapping[str, Tensor], name: str, **options: Any) -> AdapterModule:
        """Build the adapter a file module describes (passing `options` to `__init__`); raise a
        typed error naming `name.<key>` if it does not fit the host."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Algorithm, rank and options, for metadata and inspection."""
        return {"algo": self.algo}

    def default_lr(self, name: str) -> float | None:
        """The learning rate the algorithm recommends for parameter `name`, or None for the
        optimizer's own (see `training.param_groups`)."""
        return None

    # ----------------------------------------------------------------- W + m·ΔW (merges and rebuilds)

    def add_delta(self, acc: Tensor, multiplier: float | Tensor, train: bool = False, inplace: bool = False) -> Tensor:
        """`acc + ΔW(m)`, `acc` being the host weight (plus earlier adapters) in merge precision;
        written into `acc` with `inplace` (merges, after a backup). ΔW(m) = m·ΔW unless the algorithm
        says otherwise (SVDiff: m inside a ReLU; DoRA). Merges and the rebuild forward both call
        this, so a merged model computes with the very bits the unmerged one does."""
        return add_scaled(acc, self.delta_weight(train), multiplier, inplace)

    def add_delta_bias(self, acc: Tensor, multiplier: float | Tensor, inplace: bool = False) -> Tensor:
        """`acc + m·Δb` (`acc` unchanged for algorithms without a bias delta)."""
        delta = self.delta_bias()
        return acc if delta is None else add_scaled(acc, delta, multiplier, inplace)

    @property
    def changes_bias(self) -> bool:
        """Whether the adapter changes the host's bias (merges write and back up only what changes)."""
        return self.delta_bias() is not None

    @property
    def merge_dtype(self) -> torch.dtype:
        """The precision W + m·ΔW is computed in before the one cast: fp32, or fp64 for fp64 hosts."""
        return compute_dtype(self.host.weight.dtype)

    # ----------------------------------------------------------------- shared helpers

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """Keyword options `create_network` may pass, with their defaults: the keyword-only
        `__init__` arguments of every class from the algorithm up to this base, and those of the
        variants that apply to it (`weight_decompose`, `wd_on_out`)."""
        from .registry import variants_of  # the registry imports this module

        classes = list(cls.__mro__[: cls.__mro__.index(AdapterModule) + 1])
        classes += [v.mixin for v in variants_of(cls)]
        defaults: dict[str, Any] = {}
        for klass in reversed(classes):
            if "__init__" in vars(klass):
                for param in inspect.signature(klass.__init__).parameters.values():
                    if param.kind is inspect.Parameter.KEYWORD_ONLY:
                        defaults[param.name] = param.default
        for variant in variants_of(cls):
            defaults.setdefault(variant.option, False)
        return defaults

    @classmethod
    def option_names(cls) -> frozenset[str]:
        """The names of `option_defaults()`."""
        return frozenset(cls.option_defaults())

    @classmethod
    def kinds_for(cls, options: Mapping[str, Any]) -> frozenset[str]:
        """The host kinds a network with these options adapts (SVDiff's norms depend on `one_d`)."""
        return cls.host_kinds

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype of new parameters: `dtype=` if given, else fp32 (fp64 on an fp64 host)."""
        return self._param_dtype

    def factory(self) -> dict[str, Any]:
        """`device`/`dtype` keyword arguments for new parameters."""
        return {"device": self.host.weight.device, "dtype": self.param_dtype}

    def train(self, mode: bool = True) -> AdapterModule:
        super().train(mode)
        self.settings_changed()
        return self

    def settings_changed(self) -> None:
        """Drop the layer's planned forwards: a setting changed (the network calls this after
        changing a multiplier, enable, merge, forward mode or dropout)."""
        replan = self.__dict__.get("_replan")
        if replan is not None:
            replan()

    def _apply(self, fn: Any, recurse: bool = True) -> AdapterModule:
        out = super()._apply(fn, recurse)  # .to(), .cuda(), .half(): parameter dtypes or devices change
        self.settings_changed()
        return out

    @property
    def training_now(self) -> bool:
        """Training-time randomness applies only when both the network and the host train."""
        return self.training and self.host.module.training

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


def add_scaled(acc: Tensor, delta: Tensor, multiplier: float | Tensor, inplace: bool = False) -> Tensor:
    """acc + m·delta in acc's dtype, one op for a float m (its alpha); written into acc with `inplace`."""
    delta = delta.to(acc.dtype)
    if isinstance(multiplier, Tensor):
        delta = delta * multiplier.to(acc.dtype)
        return acc.add_(delta) if inplace else acc + delta
    return acc.add_(delta, alpha=multiplier) if inplace else torch.add(acc, delta, alpha=multiplier)
