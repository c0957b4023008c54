"""Adapter algorithms, one file each, registered by name."""

from .base import AdapterModule
from .registry import algorithm_names, detect_algorithm, get_algorithm, register_algorithm
from . import lora  # noqa: F401  (registers "lora"/"locon")

__all__ = ["AdapterModule", "algorithm_names", "detect_algorithm", "get_algorithm", "register_algorithm"]
