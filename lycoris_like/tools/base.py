"""Base models the tools read: an in-memory model, a safetensors file, shards, or a diffusers folder.

File module names are matched **forward**: every module path of the base (from `named_modules()`,
or from a checkpoint's `<path>.weight` keys) is spelled with `formats.naming.accepted_names` and
looked up, never parsed back. Checkpoint tensors are read one at a time (`safe_open`), so a layer
is materialised only while it is used.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from safetensors import safe_open
from torch import Tensor, nn

from ..errors import ConfigError, CorruptFileError, IncompatibleFileError, format_keys
from ..formats.naming import KNOWN_PREFIXES, accepted_names, default_prefix, split_prefix
from ..hosts import HostLayer, host_kind

# diffusers pipeline folders: component → file prefix (text_encoder is lora_te1 when a second exists).
FOLDER_COMPONENTS = {
    "unet": "lora_unet",
    "transformer": "lora_unet",
    "text_encoder": "lora_te",
    "text_encoder_2": "lora_te2",
    "text_encoder_3": "lora_te3",
}
# Single-file checkpoints in the original (SGM/LDM) layout: key prefix → file prefix.
SINGLE_FILE_PREFIXES = {
    "model.diffusion_model.": "lora_unet",
    "cond_stage_model.transformer.": "lora_te",
    "conditioner.embedders.0.transformer.": "lora_te1",
}
_STUB = nn.Module()  # names of checkpoint paths are spelled as for a plain module


class Location(NamedTuple):
    """Where a file module name points: a component of the base and a module path in it."""

    component: Component
    path: str


class Component:
    """One model of a base (a UNet, a text encoder): its module paths and how files name them."""

    label: str = ""
    prefix: str | None = None
    """The fixed file prefix, or None when it is detected from the adapter files."""
    fallback_prefix: str | None = None

    def paths(self) -> list[str]:
        raise NotImplementedError

    def names(self, prefix: str, path: str) -> list[str]:
        raise NotImplementedError

    def host(self, path: str) -> HostLayer:
        raise NotImplementedError

    def weight_shape(self, path: str) -> tuple[int, ...]:
        raise NotImplementedError

    def index(self, prefix: str) -> tuple[dict[str, str], set[str]]:
        """File name → path for `prefix`, and the names two paths share."""
        cache = self.__dict__.setdefault("_index_cache", {})
        if prefix not in cache:
            index: dict[str, str] = {}
            ambiguous: set[str] = set()
            for path in self.paths():
                for name in self.names(prefix, path):
                    if name in index and index[name] != path:
                        ambiguous.add(name)
                    index.setdefault(name, path)
            cache[prefix] = (index, ambiguous)
        return cache[prefix]

    def name(self, prefix: str, path: str) -> str:
        """The name we write for `path` (`text_model_` spelled for CLIP)."""
        return self.names(prefix, path)[0]


class ModelComponent(Component):
    """An in-memory torch model."""

    def __init__(self, model: nn.Module, prefix: str | None, label: str = "") -> None:
        self.model = model
        self.prefix = prefix
        self.fallback_prefix = default_prefix(model)
        self.label = label or type(model).__name__
        self._modules = {p: m for p, m in model.named_modules() if host_kind(m) is not None}

    def paths(self) -> list[str]:
        return list(self._modules)

    def names(self, prefix: str, path: str) -> list[str]:
        return accepted_names(prefix, self.model, path)

    def host(self, path: str) -> HostLayer:
        return HostLayer.of(self._modules[path], path)

    def weight_shape(self, path: str) -> tuple[int, ...]:
        return tuple(self._modules[path].weight.shape)


def make_host(weight: Tensor, bias: Tensor | None, path: str = "") -> HostLayer:
    """A layer of the right kind for a checkpoint weight (Linear, Conv1d/2d/3d, a norm for 1-D)
    holding the given tensors; convolution geometry does not change ΔW, so defaults are used."""
    dims = weight.dim()
    has_bias = bias is not None
    if dims == 1:
        module: nn.Module = nn.LayerNorm(weight.shape[0], bias=has_bias, device="meta")
    elif dims == 2:
        module = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    elif dims in (3, 4, 5):
        conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[dims]
        module = conv(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), bias=has_bias, device="meta")
    else:
        raise IncompatibleFileError(f"{path}: a {dims}-D weight is no layer an adapter targets")
    module.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        module.bias = nn.Parameter(bias, requires_grad=False)
    return HostLayer.of(module, path)


class TensorStore:
    """Keys of one or several safetensors files, read one tensor at a time."""

    def __init__(self, files: Iterable[Path]) -> None:
        self.files = list(files)
        self.key_file: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self.metadata: dict[Path, dict[str, str]] = {}
        for file in self.files:
            try:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    self.metadata[file] = dict(f.metadata() or {})
                    for key in f.keys():
                        part = f.get_slice(key)
                        self.key_file[key] = file
                        self.shapes[key] = tuple(part.get_shape())
                        self.dtypes[key] = part.get_dtype()
            except Exception as exc:  # safetensors raises several types for broken files
                raise CorruptFileError(f"{file}: not a readable safetensors file ({exc})") from exc

    def keys_of(self, file: Path) -> list[str]:
        return [k for k, f in self.key_file.items() if f == file]

    def read(self, key: str) -> Tensor:
        with safe_open(str(self.key_file[key]), framework="pt", device="cpu") as f:
            return f.get_tensor(key)


def _looks_like_clip(paths: Iterable[str]) -> bool:
    paths = list(paths)
    return any(p.startswith("encoder.layers.") for p in paths) and any(p.startswith("embeddings.") for p in paths)


class PathComponent(Component):
    """A model known only by its module paths (a checkpoint's keys, a PEFT file's paths)."""

    def __init__(self, paths: Iterable[str], prefix: str | None, label: str) -> None:
        self.prefix = prefix
        self.label = label
        self._paths: dict[str, Any] = dict.fromkeys(paths)
        # CLIP saved by transformers 5 has no `text_model.` level; files spell it (FORMATS.md §1).
        clip = _looks_like_clip(self._paths) and (prefix is None or prefix.startswith("lora_te"))
        self.naming_prefix = "text_model." if clip else ""
        self.fallback_prefix = guess_prefix(self._paths)

    def paths(self) -> list[str]:
        return list(self._paths)

    def names(self, prefix: str, path: str) -> list[str]:
        return accepted_names(prefix, _STUB, self.naming_prefix + path)


class CheckpointComponent(PathComponent):
    """The `<path>.weight` keys of a checkpoint under `key_prefix`, as module paths."""

    def __init__(self, store: TensorStore, key_prefix: str, prefix: str | None, label: str, role: str | None = None) -> None:
        self.store = store
        self.role = key_prefix if role is None else role
        """What the component is, to pair it with its counterpart in another checkpoint."""
        self.key_prefix = key_prefix
        layers: dict[str, tuple[str, str | None]] = {}
        for key in store.key_file:
            if key.startswith(key_prefix) and key.endswith(".weight"):
                path = key[len(key_prefix):-len(".weight")]
                bias = f"{key_prefix}{path}.bias"
                layers[path] = (key, bias if bias in store.key_file else None)
        super().__init__(layers, prefix, label)
        self._paths = layers

    def keys(self, path: str) -> tuple[str, str | None]:
        return self._paths[path]

    def weight_shape(self, path: str) -> tuple[int, ...]:
        return self.store.shapes[self._paths[path][0]]

    def is_embedding(self, path: str) -> bool:
        """2-D weights without bias named like embeddings (token/position tables, not Linear)."""
        weight, bias = self._paths[path]
        return bias is None and "embed" in path.rsplit(".", 1)[-1] and len(self.store.shapes[weight]) == 2

    def read_layer(self, path: str) -> tuple[Tensor, Tensor | None]:
        weight, bias = self._paths[path]
        return self.store.read(weight), None if bias is None else self.store.read(bias)

    def host(self, path: str) -> HostLayer:
        weight, bias = self.read_layer(path)
        if not weight.is_floating_point():
            raise IncompatibleFileError(f"{self.label}: {path}.weight is {weight.dtype}, not a float weight")
        return make_host(weight, bias, path)


def guess_prefix(paths: Iterable[str]) -> str:
    """The prefix kohya tools give a model with these module paths."""
    paths = list(paths)
    unet_marks = ("down_blocks.", "input_blocks.", "mid_block.", "middle_block.", "transformer_blocks.", "single_transformer_blocks.")
    if any(p.startswith(unet_marks) for p in paths):
        return "lora_unet"
    if _looks_like_clip(paths) or any(p.startswith("text_model.") for p in paths):
        return "lora_te"
    return "lycoris"


@dataclass
class Base:
    """A base model as the tools see it: one or more components with their file prefixes."""

    components: list[Component]
    source: str = "base"
    folder: Path | None = None
    stores: list[TensorStore] = field(default_factory=list)

    def resolve(self, names: Iterable[str], prefix: str | None = None) -> tuple[dict[str, Location], list[str]]:
        """File module name → location, for the names that match; the names that match nothing.
        A component without a fixed prefix takes whichever prefix in `names` matches it best."""
        names = list(dict.fromkeys(names))
        found: dict[str, Location] = {}
        for comp in self.components:
            if comp.prefix is not None:
                candidates = [comp.prefix]
            elif prefix is not None:
                candidates = [prefix]
            else:
                known = KNOWN_PREFIXES + ((comp.fallback_prefix,) if comp.fallback_prefix else ())
                candidates = sorted({p for n in names if (p := split_prefix(n, known)) is not None})
            best: dict[str, str] = {}
            best_ambiguous: set[str] = set()
            for cand in candidates:
                index, ambiguous = comp.index(cand)
                matched = {n: index[n] for n in names if n in index and n not in found}
                if len(matched) > len(best):
                    best, best_ambiguous = matched, ambiguous
            clash = sorted(set(best) & best_ambiguous)
            if clash:
                raise IncompatibleFileError(f"{format_keys(clash)}: several layers of {comp.label} share this file name", keys=clash)
            found.update({n: Location(comp, p) for n, p in best.items()})
        return found, [n for n in names if n not in found]

    def prefix_of(self, comp: Component, names: Iterable[str] = ()) -> str:
        """The prefix to write for `comp`: fixed, else detected from `names`, else guessed."""
        if comp.prefix is not None:
            return comp.prefix
        found, _ = self.resolve(names)
        for name, loc in found.items():
            if loc.component is comp:
                return split_prefix(name, KNOWN_PREFIXES + ((comp.fallback_prefix,) if comp.fallback_prefix else ())) or comp.fallback_prefix or "lycoris"
        return comp.fallback_prefix or "lycoris"


def open_base(source: Any, *, prefix: str | None = None) -> Base:
    """A `Base` from a model, `{prefix: model}`, an AdapterNetwork (its models), a safetensors file,
    a folder of shards or a diffusers pipeline folder."""
    from ..network import AdapterNetwork

    if isinstance(source, Base):
        return source
    if isinstance(source, AdapterNetwork):
        models = source.models
        if list(models) == [""]:
            return Base([ModelComponent(models[""], prefix)], source="network")
        return Base([ModelComponent(m, k, k) for k, m in models.items()], source="network")
    if isinstance(source, nn.Module):
        return Base([ModelComponent(source, prefix)], source=type(source).__name__)
    if isinstance(source, Mapping) and source and all(isinstance(v, nn.Module) for v in source.values()):
        return Base([ModelComponent(m, k, k) for k, m in source.items()], source="models")
    if isinstance(source, (str, os.PathLike)):
        return _open_path(Path(source), prefix)
    raise ConfigError(f"a base is a model, a dict of models, a safetensors file or a folder; got {type(source).__name__}")


def _shards(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("."))


def _open_path(path: Path, prefix: str | None) -> Base:
    if not path.exists():
        raise FileNotFoundError(f"no such base checkpoint: {path}")
    if path.is_file():
        store = TensorStore([path])
        return Base(_split_single_file(store, prefix, path.name), source=str(path), stores=[store])
    subfolders = {name: path / name for name in FOLDER_COMPONENTS if _shards(path / name)}
    if subfolders:
        components: list[Component] = []
        stores = []
        for name, folder in subfolders.items():
            store = TensorStore(_shards(folder))
            stores.append(store)
            fixed = FOLDER_COMPONENTS[name]
            if name == "text_encoder" and "text_encoder_2" in subfolders:
                fixed = "lora_te1"
            components.append(CheckpointComponent(store, "", fixed, name, role=name))
        return Base(components, source=str(path), folder=path, stores=stores)
    shards = _shards(path)
    if not shards:
        raise IncompatibleFileError(
            f"{path}: no safetensors files (expected a file, a folder of shards, or a diffusers folder "
            f"with {'/'.join(FOLDER_COMPONENTS)} subfolders)"
        )
    store = TensorStore(shards)
    return Base(_split_single_file(store, prefix, path.name), source=str(path), folder=path, stores=[store])


def _split_single_file(store: TensorStore, prefix: str | None, label: str) -> list[Component]:
    """A plain state dict is one component; an original-layout checkpoint is split by key prefix."""
    components: list[Component] = []
    keys = list(store.key_file)
    claimed = set()
    for key_prefix, fixed in SINGLE_FILE_PREFIXES.items():
        if any(k.startswith(key_prefix) for k in keys):
            components.append(CheckpointComponent(store, key_prefix, fixed, f"{label}:{key_prefix[:-1]}"))
            claimed.add(key_prefix)
    if not components:
        components.append(CheckpointComponent(store, "", prefix, label))
    return components
