"""The exception hierarchy: every error the library raises on bad input is one of these."""

from __future__ import annotations

from collections.abc import Iterable


class AdapterError(Exception):
    """Base class of every lycoris_like error."""


class ConfigError(AdapterError, ValueError):
    """A bad argument, preset, override or option, refused before anything is changed."""


class UnknownAlgorithmError(ConfigError):
    """An algorithm name that is not registered."""


class UnsupportedLayerError(ConfigError):
    """A layer type the chosen algorithm cannot adapt."""


class OverlapError(ConfigError):
    """A layer already carries an adapter from another network and stacking was not asked for."""


class IncompatibleFileError(AdapterError, ValueError):
    """An adapter file (or state dict) that does not fit the model; `keys` names the offenders."""

    def __init__(self, message: str, keys: Iterable[str] = ()) -> None:
        self.keys = sorted(set(keys))
        super().__init__(message)


class CorruptFileError(IncompatibleFileError):
    """A file that is not a readable safetensors file, or holds unusable values (NaN/Inf, bad dtypes)."""


class ShapeMismatchError(IncompatibleFileError):
    """A tensor whose shape does not fit the layer it targets."""


class MergeError(AdapterError, RuntimeError):
    """A merge that would produce NaN/Inf, or an unmerge that cannot restore the weights exactly."""


def format_keys(keys: Iterable[str], limit: int = 12) -> str:
    """A short, readable listing of offending keys for error messages."""
    keys = sorted(set(keys))
    shown = ", ".join(keys[:limit])
    more = len(keys) - limit
    return shown + (f" … and {more} more" if more > 0 else "")
