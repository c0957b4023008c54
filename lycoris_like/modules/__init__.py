"""Adapter algorithms, one file each, registered by name — and what an extender needs to add one.

    from lycoris_like.modules import AdapterModule, Bypass, register_algorithm, require_keys

See docs/extending.md.
"""

from .base import AdapterModule
from .capabilities import (
    Bypass,
    EntryPatches,
    FastPath,
    InputMap,
    Factored,
    NativeCombine,
    NonlinearMultiplier,
    NotNative,
    OutputMap,
    ReadsHostWeight,
    WeightFree,
)
from .files import check_dim, expect_shape, float32_exact, merge_ratio, read_alpha, require_keys
from .ranked import RankedAdapter
from .registry import (
    algorithm_classes,
    algorithm_names,
    detect_algorithm,
    get_algorithm,
    register_algorithm,
    register_alias,
    register_variant,
)
from . import full, ia3, lokr, lora, loha, sara, svdiff  # noqa: F401,E402  (registration)
from . import dora  # noqa: F401,E402  (the DoRA variant, after the algorithms it wraps)

__all__ = [
    "AdapterModule",
    "Bypass",
    "EntryPatches",
    "Factored",
    "FastPath",
    "InputMap",
    "NativeCombine",
    "NonlinearMultiplier",
    "NotNative",
    "OutputMap",
    "RankedAdapter",
    "ReadsHostWeight",
    "WeightFree",
    "algorithm_classes",
    "algorithm_names",
    "check_dim",
    "detect_algorithm",
    "expect_shape",
    "float32_exact",
    "get_algorithm",
    "merge_ratio",
    "read_alpha",
    "register_algorithm",
    "register_alias",
    "register_variant",
    "require_keys",
]
