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
from ..modules import AdapterModule, detect_algorithm
from .base import Location, make_host

WEIGHT_FREE = frozenset({"lora", "loha", "lokr", "full"})
"""Algorithms whose ΔW is a function of the file alone (without `dora_scale`): no base needed."""


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
        return self._algos[name].algo in WEIGHT_FREE and "dora_scale" not in self.modules[name]


def file_weight_shape(algo: str, group: Mapping[str, Tensor]) -> tuple[tuple[int, ...], bool] | None:
    """The host weight shape a module's tensors imply, and whether it is certain (False: a flat
    (out, in·k…) guess — LoHa and low-rank LoKr store conv factors flattened)."""
    g = {k: tuple(v.shape) for k, v in group.items()}
    try:
        if algo == "lora":
            down, up = g["lora_down.weight"], g["lora_up.weight"]
            if "lora_mid.weight" in g:
                return (up[0], down[1], *g["lora_mid.weight"][2:]), True
            return (up[0], *down[1:]), True
        if algo == "full":
            return g["diff"], True
        if algo == "loha":
            if "hada_t1" in g:
                return (g["hada_w1_a"][1], g["hada_w1_b"][1], *g["hada_t1"][2:]), True
            b = g["hada_w1_b"]
            return ((g["hada_w1_a"][0], *b[1:]), len(b) > 2)
        if algo == "lokr":
            a, c = (g["lokr_w1"] if "lokr_w1" in g else (g["lokr_w1_a"][0], g["lokr_w1_b"][1]))[:2]
            if "lokr_w2" in g:
                w2 = g["lokr_w2"]
                return (a * w2[0], c * w2[1], *w2[2:]), True
            if "lokr_t2" in g:
                return (a * g["lokr_w2_a"][1], c * g["lokr_w2_b"][1], *g["lokr_t2"][2:]), True
            return (a * g["lokr_w2_a"][0], c * g["lokr_w2_b"][1]), False
    except (KeyError, IndexError):
        return None
    return None


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
                found = file_weight_shape(f.algo(name).algo, f.modules[name])
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
            algo = file.algo(name).algo
            why = "DoRA" if "dora_scale" in file.modules[name] else algo
            raise IncompatibleFileError(
                f"{name}: ΔW of {why} depends on the base weights; give the base model (--base)", keys=[name]
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
