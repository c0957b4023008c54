"""lycoris_like — parameter-efficient adapters for diffusion models and any torch model.

Every algorithm answers one question, *what is ΔW?*; the network attaches adapters to a model's
layers by preset, merges them exactly, and reads and writes LyCORIS/kohya `.safetensors` files.

The names below that need torch are imported on first use, so that `import lycoris_like` — and the
`lycoris-like` command's `--help` — do not pay torch's start-up time.
"""

import importlib

from ._version import __version__
from .errors import (
    AdapterError,
    ConfigError,
    CorruptFileError,
    IncompatibleFileError,
    MergeError,
    OverlapError,
    ShapeMismatchError,
    UnknownAlgorithmError,
    UnsupportedLayerError,
)

_LAZY = {
    "LoadReport": ".loading",
    "load_network": ".loading",
    "network_from_tensors": ".loading",
    "AdapterModule": ".modules",
    "algorithm_names": ".modules",
    "get_algorithm": ".modules",
    "register_algorithm": ".modules",
    "AdapterNetwork": ".network",
    "create_network": ".network",
    "BUILTIN_PRESETS": ".presets",
    "register": ".registration",
    "unregister": ".registration",
}
"""Public name → the submodule that defines it."""


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AdapterError",
    "AdapterModule",
    "AdapterNetwork",
    "BUILTIN_PRESETS",
    "ConfigError",
    "CorruptFileError",
    "IncompatibleFileError",
    "LoadReport",
    "MergeError",
    "OverlapError",
    "ShapeMismatchError",
    "UnknownAlgorithmError",
    "UnsupportedLayerError",
    "__version__",
    "algorithm_names",
    "create_network",
    "get_algorithm",
    "load_network",
    "network_from_tensors",
    "register",
    "register_algorithm",
    "unregister",
]
