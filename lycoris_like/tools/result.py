"""What a tool returns: the tensors of the new file, one report row per module, and its metadata."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._version import __version__
from ..errors import ConfigError
from ..formats.container import data_hash, write_safetensors
from ..formats.metadata import build_metadata

# Metadata that describes the base model, carried over when every input agrees on it.
BASE_KEYS = ("ss_base_model_version", "ss_v2", "modelspec.architecture", "modelspec.resolution", "modelspec.implementation")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp64": torch.float64, "float64": torch.float64}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    try:
        return DTYPES[str(value).lower()]
    except KeyError:
        raise ConfigError(f"dtype must be one of {sorted(set(DTYPES))}, got {value!r}") from None


@dataclass
class Row:
    """One module of the output. `error` is the relative Frobenius error ‖ΔW − ΔW'‖/‖ΔW‖ of an
    approximation, None where the result is exact."""

    name: str
    algo: str
    rank: int | None = None
    error: float | None = None
    note: str = ""


@dataclass
class Result:
    tensors: dict[str, Tensor]
    rows: list[Row]
    config: dict[str, Any]
    inherited: dict[str, str] = field(default_factory=dict)

    def metadata(self, output_name: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        meta = build_metadata(models={}, config=self.config, output_name=output_name,
                              model_hash=data_hash(self.tensors), version=__version__, extra=None)
        if self.inherited:
            meta.pop("modelspec.architecture", None)
            meta.update(self.inherited)
        meta.update(extra or {})
        return meta

    def save(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
        """Write atomically (never a partial file)."""
        path = Path(path)
        if not self.tensors:
            raise ConfigError("nothing to write: every module was skipped")
        write_safetensors(path, self.tensors, self.metadata(path.stem, metadata))
        return path

    @property
    def max_error(self) -> float | None:
        errors = [r.error for r in self.rows if r.error is not None]
        return max(errors) if errors else None

    def table(self) -> str:
        return format_rows(self.rows)


def format_rows(rows: Iterable[Row]) -> str:
    rows = list(rows)
    if not rows:
        return "(no modules)"
    width = max(len(r.name) for r in rows)
    lines = [f"{'module':<{width}}  {'algo':<6} {'rank':>5} {'rel. error':>11}  note"]
    for r in rows:
        rank = "" if r.rank is None else str(r.rank)
        err = "" if r.algo == "-" else "exact" if r.error is None else f"{r.error:.3e}"
        lines.append(f"{r.name:<{width}}  {r.algo:<6} {rank:>5} {err:>11}  {r.note}".rstrip())
    return "\n".join(lines)


def inherit_base_metadata(metadatas: Iterable[Mapping[str, str]]) -> dict[str, str]:
    """The base-model keys every input that has them agrees on."""
    metadatas = [m for m in metadatas if any(k in m for k in BASE_KEYS)]
    out = {}
    for key in BASE_KEYS:
        values = {m.get(key) for m in metadatas}
        if len(values) == 1 and None not in values:
            out[key] = values.pop()
    return out
