"""Algorithm registry: `@register_algorithm("name")` is all a new algorithm needs to plug in."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from ..errors import IncompatibleFileError, UnknownAlgorithmError, format_keys
from .base import AdapterModule

A = TypeVar("A", bound=type[AdapterModule])

# Registration is append-only configuration, done at import time; nothing mutates it afterwards.
_ALGORITHMS: dict[str, type[AdapterModule]] = {}
_ALIASES: dict[str, str] = {}


def register_algorithm(name: str, *, aliases: Iterable[str] = ()) -> Callable[[A], A]:
    """Class decorator that makes an `AdapterModule` subclass available as `algo=name`."""

    def register(cls: A) -> A:
        for key in (name, *aliases):
            owner = _ALGORITHMS.get(_ALIASES.get(key, key))
            if owner is not None and owner.__qualname__ != cls.__qualname__:
                raise ValueError(f"algorithm name {key!r} is already registered by {owner.__qualname__}")
        cls.algo = name
        _ALGORITHMS[name] = cls
        for alias in aliases:
            _ALIASES[alias] = name
        return cls

    return register


def get_algorithm(name: str) -> type[AdapterModule]:
    key = str(name).lower()
    cls = _ALGORITHMS.get(_ALIASES.get(key, key))
    if cls is None:
        raise UnknownAlgorithmError(f"unknown algorithm {name!r}; known: {', '.join(algorithm_names())}")
    return cls


def algorithm_classes() -> list[type[AdapterModule]]:
    """Every registered algorithm class, once (aliases excluded)."""
    return list(_ALGORITHMS.values())


def algorithm_names() -> list[str]:
    return sorted(_ALGORITHMS) + sorted(_ALIASES)


def detect_algorithm(name: str, suffixes: Iterable[str]) -> type[AdapterModule]:
    """The algorithm a file module's key suffixes describe; raises if none or several claim them."""
    suffixes = set(suffixes)
    claims = [cls for cls in _ALGORITHMS.values() if cls.signature_keys & suffixes]
    if len(claims) > 1:
        exact = [cls for cls in claims if suffixes <= cls.file_keys]
        claims = exact if len(exact) == 1 else claims
    if len(claims) != 1:
        what = "no known algorithm" if not claims else "several algorithms (" + ", ".join(c.algo for c in claims) + ")"
        keys = sorted(f"{name}.{s}" for s in suffixes)
        raise IncompatibleFileError(f"{format_keys(keys)}: these key suffixes match {what}", keys=keys)
    cls = claims[0]
    unknown = suffixes - cls.file_keys
    if unknown:
        keys = sorted(f"{name}.{s}" for s in unknown)
        raise IncompatibleFileError(
            f"{format_keys(keys)}: unknown key suffix for {cls.algo} (it reads {', '.join(sorted(cls.file_keys))})",
            keys=keys,
        )
    return cls
