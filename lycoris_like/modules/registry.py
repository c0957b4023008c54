"""Algorithm registry: `@register_algorithm("name")` is all a new algorithm needs to plug in, and
`@register_variant(...)` all a variant (DoRA) needs to wrap every algorithm it applies to."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import IncompatibleFileError, UnknownAlgorithmError, format_keys
from .base import AdapterModule

A = TypeVar("A", bound=type)

# Registration is append-only configuration, done at import time; nothing mutates it afterwards.
_ALGORITHMS: dict[str, type[AdapterModule]] = {}
_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {}


@dataclass
class Variant:
    """A mixin placed in front of every algorithm derived from `applies_to` when `option` is true
    (or, in a file, when one of `keys` is present). The combined classes are made at registration."""

    option: str
    mixin: type
    applies_to: type
    keys: frozenset[str]
    classes: dict[type, type] = field(default_factory=dict)


_VARIANTS: list[Variant] = []


def _combine(variant: Variant, cls: type[AdapterModule]) -> None:
    """Make `variant.mixin` + `cls` once, importable by name (so adapters pickle)."""
    if not issubclass(cls, variant.applies_to) or cls in variant.classes:
        return
    name = f"{variant.mixin.__name__}{cls.__name__}"
    module = variant.mixin.__module__
    combined = type(name, (variant.mixin, cls), {"__module__": module, "__qualname__": name, "__doc__": cls.__doc__})
    setattr(sys.modules[module], name, combined)
    variant.classes[cls] = combined


def register_algorithm(name: str, *, aliases: Iterable[str] = ()) -> Callable[[A], A]:
    """Class decorator that makes an `AdapterModule` subclass available as `algo=name`."""

    def register(cls: A) -> A:
        for key in (name, *aliases):
            owner = _ALGORITHMS.get(_ALIASES.get(key, (key, {}))[0])
            if owner is not None and owner.__qualname__ != cls.__qualname__:
                raise ValueError(f"algorithm name {key!r} is already registered by {owner.__qualname__}")
        cls.algo = name
        _ALGORITHMS[name] = cls
        for alias in aliases:
            _ALIASES[alias] = (name, {})
        for variant in _VARIANTS:
            _combine(variant, cls)
        return cls

    return register


def register_alias(alias: str, name: str, **options: Any) -> None:
    """`algo=alias` means `algo=name` with `options` (e.g. "dora" = LoRA with weight_decompose)."""
    _ALIASES[alias] = (name, dict(options))


def register_variant(option: str, *, applies_to: type, keys: Iterable[str]) -> Callable[[A], A]:
    """Class decorator for a variant mixin (see `Variant`)."""

    def register(mixin: A) -> A:
        variant = Variant(option, mixin, applies_to, frozenset(keys))
        _VARIANTS.append(variant)
        for cls in list(_ALGORITHMS.values()):
            _combine(variant, cls)
        return mixin

    return register


def resolve(name: str) -> tuple[type[AdapterModule], dict[str, Any]]:
    """(algorithm class, options the name implies)."""
    key = str(name).lower()
    target, implied = _ALIASES.get(key, (key, {}))
    cls = _ALGORITHMS.get(target)
    if cls is None:
        raise UnknownAlgorithmError(f"unknown algorithm {name!r}; known: {', '.join(algorithm_names())}")
    return cls, dict(implied)


def get_algorithm(name: str) -> type[AdapterModule]:
    return resolve(name)[0]


def variants_of(cls: type[AdapterModule]) -> list[Variant]:
    return [v for v in _VARIANTS if issubclass(cls, v.applies_to)]


def class_for(cls: type[AdapterModule], options: Mapping[str, Any]) -> type[AdapterModule]:
    """`cls`, or its combination with the variant whose option is set (`weight_decompose=True`)."""
    for variant in variants_of(cls):
        if options.get(variant.option) and not issubclass(cls, variant.mixin):
            return variant.classes[cls]
    return cls


def file_class(cls: type[AdapterModule], suffixes: Iterable[str]) -> type[AdapterModule]:
    """The class that reads a file module of `cls` with these suffixes (a `dora_scale` → DoRA)."""
    suffixes = set(suffixes)
    for variant in variants_of(cls):
        if variant.keys & suffixes and not issubclass(cls, variant.mixin):
            return variant.classes[cls]
    return cls


def algorithm_classes() -> list[type[AdapterModule]]:
    """Every registered algorithm class, once (aliases excluded)."""
    return list(_ALGORITHMS.values())


def algorithm_names() -> list[str]:
    return sorted(_ALGORITHMS) + sorted(_ALIASES)


def detect_algorithm(name: str, suffixes: Iterable[str]) -> type[AdapterModule]:
    """The class a file module's key suffixes describe (variant included); raises if no algorithm
    or several claim them, or a suffix is unknown to the one that does."""
    suffixes = set(suffixes)
    claims = [cls for cls in _ALGORITHMS.values() if cls.signature_keys & suffixes]
    if len(claims) > 1:
        exact = [cls for cls in claims if suffixes <= known_keys(cls)]
        claims = exact if len(exact) == 1 else claims
    if len(claims) != 1:
        what = "no known algorithm" if not claims else "several algorithms (" + ", ".join(c.algo for c in claims) + ")"
        keys = sorted(f"{name}.{s}" for s in suffixes)
        raise IncompatibleFileError(f"{format_keys(keys)}: these key suffixes match {what}", keys=keys)
    cls = claims[0]
    unknown = suffixes - known_keys(cls)
    if unknown:
        keys = sorted(f"{name}.{s}" for s in unknown)
        raise IncompatibleFileError(
            f"{format_keys(keys)}: unknown key suffix for {cls.algo} (it reads {', '.join(sorted(known_keys(cls)))})",
            keys=keys,
        )
    return file_class(cls, suffixes)


def known_keys(cls: type[AdapterModule]) -> frozenset[str]:
    """The suffixes a file module of `cls` may hold: its own and its variants'."""
    keys = set(cls.file_keys)
    for variant in variants_of(cls):
        keys |= variant.keys
    return frozenset(keys)
