"""Adapter algorithms, one file each, registered by name."""

from .base import AdapterModule
from .registry import algorithm_names, detect_algorithm, get_algorithm, register_algorithm
from . import full, ia3, lokr, lora, loha, sara, svdiff  # noqa: F401  (registration)

__all__ = ["AdapterModule", "algorithm_names", "detect_algorithm", "get_algorithm", "register_algorithm"]
