"""Adapter files as the tools see them: modules grouped by name, their algorithm, and the adapter
module each one builds on a host (a base layer, or a shape-only stand-in when ΔW does not depend
on the base weights)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, IncompatibleFileError
from ..formats.container import check_tensors, read_safetensors
from ..hosts import HostLayer
from ..modules import AdapterModule, WeightFree, detect_algorithm
from .base import Location, make_host


@dataclass
class AdapterFile:
    """One adapter file (or network): `modules` maps a file module name to its {suffix: tensor}."""

    label: str
    tensors: dict[str, Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    network: Any = None

    def __post_init__(self) -> None:
        check_tensors(self.tensors, self.label)
        self.modules: dict[str, dict[str, Tensor]] = {}
        stray = []
        for key, tensor in self.tensors.items():
            name, dot, suffix = key.partition(".")
            if not dot or not name or not suffix:
                stray.append(key)
            else:
                self.modules.setdefault(name, {})[suffix] = tensor
        if stray:
            raise IncompatibleFileError(f"{self.label}: keys without a module name and suffix: {', '.join(sorted(stray))}", keys=stray)
        if not self.modules:
            raise IncompatibleFileError(f"{self.label} holds no adapter tensors")
        self._algos = {name: detect_algorithm(name, group) for name, group in self.modules.items()}

    @classmethod
    def read(cls, source: Any) -> AdapterFile:
        """From a path, an AdapterNetwork (its file tensors) or an AdapterFile."""
        from ..network import AdapterNetwork

        if isinstance(source, AdapterFile):
            return source
        if isinstance(source, AdapterNetwork):
            return cls(f"network {source.extra_repr()}", source.file_state_dict(), {}, network=source)
        if isinstance(source, (str, os.PathLike)):
            tensors, metadata = read_safetensors(source)
            return cls(str(source), tensors, metadata)
        raise ConfigError(f"an adapter is a file path or an AdapterNetwork, got {type(source).__name__}")

    def algo(self, name: str) -> type[AdapterModule]:
        return self._algos[name]

    def weight_free(self, name: str) -> bool:
        """Whether the module's ΔW is a function of the file alone (no base model needed)."""
        cls = self._algos[name]
        return issubclass(cls, WeightFree) and not cls.needs_base(self.modules[name])


def file_weight_shape(cls: type[AdapterModule], group: Mapping[str, Tensor]) -> tuple[tuple[int, ...], bool] | None:
    """The host weight shape a module's tensors imply, and whether it is certain (False: a flat
    (out, in·k…) guess), from the algorithm's `WeightFree.file_weight_shape`; None if it cannot say."""
    return cls.file_weight_shape(group) if issubclass(cls, WeightFree) else None


def describe(cls: type[AdapterModule]) -> str:
    """The algorithm's name, with the variant it carries (`lora with weight_decompose`)."""
    from ..modules.registry import variants_of

    extra = [v.option for v in variants_of(cls) if issubclass(cls, v.mixin)]
    return cls.algo + "".join(f" with {option}" for option in extra)


def stand_in(shape: tuple[int, ...], path: str = "") -> HostLayer:
    """A host of `shape` whose weight takes no memory (zeros, expanded): for weight-free ΔW only."""
    dims = len(shape)
    if dims < 2 or dims > 5:
        raise IncompatibleFileError(f"{path}: cannot build a layer for weight shape {shape}")
    return make_host(torch.zeros((), dtype=torch.float32).expand(shape), None, path)


def build(cls: type[AdapterModule], host: HostLayer, group: Mapping[str, Tensor], name: str) -> AdapterModule:
    """The adapter a file module describes on `host` (validated), ready for `delta_weight()`."""
    try:
        module = cls.from_file_tensors(host, group, name)
    except ConfigError as exc:
        raise IncompatibleFileError(f"{name}: {exc}", keys=[f"{name}.{s}" for s in group]) from exc
    module.requires_grad_(False)
    return module


class Hosts:
    """Host layers for file module names: from a base where one is given (materialised once per
    name), else shape-only stand-ins for weight-free modules."""

    def __init__(self, located: Mapping[str, Location] | None = None) -> None:
        self.located = dict(located or {})
        self._cache: dict[str, HostLayer] = {}

    def has_base(self, name: str) -> bool:
        return name in self.located

    def shape(self, name: str, files: list[AdapterFile]) -> tuple[tuple[int, ...], bool] | None:
        """The weight shape of `name`: the base's, else the most certain one its files imply."""
        if name in self.located:
            loc = self.located[name]
            return loc.component.weight_shape(loc.path), True
        guess = None
        for f in files:
            if name in f.modules:
                found = file_weight_shape(f.algo(name), f.modules[name])
                if found is not None and (guess is None or (found[1] and not guess[1])):
                    guess = found
        return guess

    def host(self, name: str, file: AdapterFile, files: list[AdapterFile]) -> HostLayer:
        if name in self.located:
            if name not in self._cache:
                loc = self.located[name]
                self._cache[name] = loc.component.host(loc.path)
            return self._cache[name]
        if not file.weight_free(name):
            raise IncompatibleFileError(
                f"{name}: ΔW of {describe(file.algo(name))} depends on the base weights; give the base model (--base)",
                keys=[name],
            )
        shape = self.shape(name, files)
        if shape is None:
            raise IncompatibleFileError(f"{name}: cannot tell the layer's shape from the file; give the base model (--base)", keys=[name])
        return stand_in(shape[0], name)

    def release(self, name: str) -> None:
        self._cache.pop(name, None)


def label_of(source: Any) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else getattr(source, "label", type(source).__name__)


def stem(path: str | os.PathLike) -> str:
    return Path(path).stem
