"""Adapter arithmetic on files: combine, bake, extract, resize, convert, inspect.

Each job is one small module built on the ΔW contract (`AdapterModule.delta_weight()`), the
file grammar (`formats/`) and `tools.base` (base models read forward, one layer at a time).
Functions return a `Result` (tensors + per-module report) or write atomically.
"""

from .bake import BakeReport, bake
from .base import Base, open_base
from .combine import combine
from .convert import from_peft, from_sara_official, from_svdiff_pytorch, rename_prefix, to_diff, to_peft, to_sgm, to_svdiff_pytorch
from .extract import extract
from .inspect import Inspection, inspect_file
from .resize import resize
from .result import Result, Row
from .svd import RankRule

__all__ = [
    "Base",
    "BakeReport",
    "Inspection",
    "RankRule",
    "Result",
    "Row",
    "bake",
    "combine",
    "extract",
    "from_peft",
    "from_sara_official",
    "from_svdiff_pytorch",
    "inspect_file",
    "open_base",
    "rename_prefix",
    "resize",
    "to_diff",
    "to_peft",
    "to_sgm",
    "to_svdiff_pytorch",
]
