"""Which layers a network adapts: presets, target/exclude patterns and per-layer overrides.

Every supported layer gets a role from the classes around it — `attn` (projections of an
attention module), `mlp` (feed-forward layers and a transformer block's in/out projections) or
`other` — and the built-in presets are sets of roles. This one rule covers diffusers UNets, DiT
blocks (SD3, Flux, PixArt), transformers CLIP encoders and, by class names, any other model.
"""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .errors import ConfigError
from .hosts import LINEAR_AND_CONV, HostLayer, host_kind

BUILTIN_PRESETS: dict[str, frozenset[str]] = {
    "attn-only": frozenset({"attn"}),
    "attn-mlp": frozenset({"attn", "mlp"}),
    "full": frozenset({"attn", "mlp", "other"}),
}
# Layers consumers never expect in adapter files, by root model class.
_NOT_IN_PRESETS = {"CLIPTextModelWithProjection": frozenset({"text_projection"})}
_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)
_MLP_CLASS = re.compile(r"mlp|feedforward|ffn", re.IGNORECASE)
_BLOCK_PROJECTIONS = {"Transformer2DModel": {"proj_in", "proj_out"}}
_SINGLE_BLOCK_PROJECTIONS = {"proj_mlp", "proj_out"}
_PRESET_KEYS = {"base", "module_classes", "include", "exclude", "overrides", "class_overrides"}


@dataclass(frozen=True)
class Candidate:
    """A layer that can be adapted: which model, where, its role and enclosing classes."""

    key: str
    path: str
    host: HostLayer
    role: str
    classes: tuple[str, ...]
    in_presets: bool = True

    @property
    def full_path(self) -> str:
        return f"{self.key}.{self.path}" if self.key else self.path


def _role(parts: list[str], modules: Mapping[str, nn.Module]) -> tuple[str, tuple[str, ...]]:
    chain = [modules[".".join(parts[:i])] for i in range(len(parts))]  # root … parent
    classes = tuple(type(m).__name__ for m in chain)
    i = len(chain) - 1
    while i > 0 and isinstance(chain[i], _CONTAINERS):
        i -= 1
    parent, rel = type(chain[i]).__name__, ".".join(parts[i:])
    if "attention" in parent.lower():
        return "attn", classes
    if any(_MLP_CLASS.search(c) for c in classes):
        return "mlp", classes
    if rel in _BLOCK_PROJECTIONS.get(parent, ()) or (parent.endswith("TransformerBlock") and rel in _SINGLE_BLOCK_PROJECTIONS):
        return "mlp", classes
    return "other", classes


def candidates(models: Mapping[str, nn.Module], kinds: Iterable[str] | None = None) -> list[Candidate]:
    """Every layer of every model an algorithm supporting `kinds` (default: Linear and convs)
    can adapt, in `named_modules()` order."""
    kinds = LINEAR_AND_CONV if kinds is None else frozenset(kinds)
    found = []
    for key, model in models.items():
        modules = dict(model.named_modules())
        hidden = _NOT_IN_PRESETS.get(type(model).__name__, frozenset())
        for path, module in modules.items():
            if host_kind(module) not in kinds:
                continue
            parts = path.split(".") if path else []
            role, classes = _role(parts, modules)
            found.append(Candidate(key, path, HostLayer.of(module, path), role, classes, path not in hidden))
    return found


class Pattern:
    """A glob (`*` crosses dots) matched against a layer path or any ancestor path, or `re:<regex>` searched in the path."""

    def __init__(self, text: Any, what: str) -> None:
        if not isinstance(text, str) or not text:
            raise ConfigError(f"{what}: patterns must be non-empty strings, got {text!r}")
        self.text = text
        if text.startswith("re:"):
            try:
                self.regex: re.Pattern[str] | None = re.compile(text[3:])
            except re.error as exc:
                raise ConfigError(f"{what}: invalid regular expression {text!r}: {exc}") from exc
            self.literal = len(re.sub(r"\\.|[.^$*+?{}\[\]|()]", "", text[3:]))
        else:
            self.regex = None
            self.literal = len(re.sub(r"[*?\[\]]", "", text))

    def matches(self, path: str) -> bool:
        if self.regex is not None:
            return self.regex.search(path) is not None
        parts = path.split(".")
        return any(fnmatch.fnmatchcase(".".join(parts[:i]), self.text) for i in range(len(parts), 0, -1))

    def __repr__(self) -> str:
        return repr(self.text)


@dataclass(frozen=True)
class Preset:
    """A resolved preset: roles of a built-in base, classes to target, patterns and overrides."""

    name: str
    roles: frozenset[str] = frozenset()
    module_classes: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    class_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    all_layers: bool = False

    def base_selects(self, cand: Candidate) -> bool:
        if self.all_layers:
            return True
        if cand.in_presets and cand.role in self.roles:
            return True
        return any(c in self.module_classes for c in cand.classes)


def _str_list(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Iterable) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{what} must be a list of strings, got {value!r}")
    return tuple(value)


def _table(value: Any, what: str) -> dict[str, dict[str, Any]]:
    if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
        raise ConfigError(f"{what} must map patterns to tables of settings, got {value!r}")
    return {str(k): dict(v) for k, v in value.items()}


def load_preset(preset: str | os.PathLike | Mapping[str, Any] | None) -> Preset:
    """A built-in name, a dict, or a TOML file with keys base / module_classes / include / exclude / overrides / class_overrides."""
    if preset is None:
        return Preset("none", all_layers=True)
    if isinstance(preset, str) and preset in BUILTIN_PRESETS:
        return Preset(preset, BUILTIN_PRESETS[preset])
    name = "custom"
    if isinstance(preset, (str, os.PathLike)):
        path = Path(preset)
        if path.suffix != ".toml":
            raise ConfigError(f"unknown preset {str(preset)!r}; built-in: {', '.join(BUILTIN_PRESETS)}, or a .toml file or a dict")
        try:
            preset = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read preset file {path}: {exc}") from exc
        name = path.stem
    if not isinstance(preset, Mapping):
        raise ConfigError(f"a preset is a name, a .toml path or a dict, got {type(preset).__name__}")
    unknown = set(preset) - _PRESET_KEYS
    if unknown:
        raise ConfigError(f"unknown preset keys {sorted(unknown)}; known: {sorted(_PRESET_KEYS)}")
    base = preset.get("base")
    if base is not None and base not in BUILTIN_PRESETS:
        raise ConfigError(f"preset base must be one of {list(BUILTIN_PRESETS)}, got {base!r}")
    return Preset(
        name=name,
        roles=BUILTIN_PRESETS[base] if base else frozenset(),
        module_classes=_str_list(preset.get("module_classes", ()), "module_classes"),
        include=_str_list(preset.get("include", ()), "include"),
        exclude=_str_list(preset.get("exclude", ()), "exclude"),
        overrides=_table(preset.get("overrides", {}), "overrides"),
        class_overrides=_table(preset.get("class_overrides", {}), "class_overrides"),
    )


def _patterns(texts: Iterable[str] | str | None, what: str) -> list[Pattern]:
    if texts is None:
        return []
    return [Pattern(t, what) for t in _str_list(texts, what)]


def select(
    cands: list[Candidate],
    preset: Preset,
    targets: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
) -> list[Candidate]:
    """The preset's layers (plus its `include`), narrowed to `targets`, minus `exclude`.

    Every pattern must match some layer, so a typo is an error rather than a silent no-op.
    """
    include = _patterns(preset.include, "include")
    chosen = [c for c in cands if preset.base_selects(c) or any(p.matches(c.full_path) for p in include)]
    for p in include:
        if not any(p.matches(c.full_path) for c in cands):
            raise ConfigError(f"include pattern {p} matches no supported layer")
    target_patterns = _patterns(targets, "targets")
    for p in target_patterns:
        if not any(p.matches(c.full_path) for c in chosen):
            outside = sum(p.matches(c.full_path) for c in cands)
            hint = f" (it matches {outside} layers outside the preset: use preset=None or 'full')" if outside else ""
            raise ConfigError(f"target pattern {p} matches no layer selected by preset {preset.name!r}{hint}")
    if target_patterns:
        chosen = [c for c in chosen if any(p.matches(c.full_path) for p in target_patterns)]
    for p in _patterns(preset.exclude, "exclude") + _patterns(exclude, "exclude"):
        if not any(p.matches(c.full_path) for c in cands):
            raise ConfigError(f"exclude pattern {p} matches no supported layer")
        chosen = [c for c in chosen if not p.matches(c.full_path)]
    if not chosen:
        raise ConfigError(f"preset {preset.name!r} with these targets/exclude selects no layer of the model")
    return chosen


def resolve_overrides(
    chosen: list[Candidate],
    overrides: Mapping[str, Mapping[str, Any]] | None,
    class_overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per-layer settings: class overrides, then the most specific path pattern (exact path, then
    most literal characters, then the later entry)."""
    result: dict[str, dict[str, Any]] = {}
    overrides = _table(overrides or {}, "overrides")
    class_overrides = _table(class_overrides or {}, "class_overrides")
    for cls_name in class_overrides:
        if not any(cls_name in c.classes for c in chosen):
            raise ConfigError(f"class override {cls_name!r} matches no selected layer")
    patterns = [(Pattern(text, "overrides"), i) for i, text in enumerate(overrides)]
    for p, _ in patterns:
        if not any(p.matches(c.full_path) for c in chosen):
            raise ConfigError(f"override pattern {p} matches no selected layer")
    for c in chosen:
        settings: dict[str, Any] = {}
        for cls_name, values in class_overrides.items():
            if cls_name in c.classes:
                settings.update(values)
        hits = [(p.text == c.full_path, p.literal, i, p) for p, i in patterns if p.matches(c.full_path)]
        if hits:
            settings.update(overrides[max(hits, key=lambda h: h[:3])[3].text])
        if settings:
            result[c.full_path] = settings
    return result
