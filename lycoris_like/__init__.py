"""lycoris_like — parameter-efficient adapters for diffusion models and any torch model.

Every algorithm answers one question, *what is ΔW?*; the network attaches adapters to a model's
layers by preset, merges them exactly, and reads and writes LyCORIS/kohya `.safetensors` files.
"""

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
from .loading import LoadReport, load_network, network_from_tensors
from .modules import AdapterModule, algorithm_names, get_algorithm, register_algorithm
from .network import AdapterNetwork, create_network
from .presets import BUILTIN_PRESETS
from .registration import register, unregister

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
