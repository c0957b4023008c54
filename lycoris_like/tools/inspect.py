"""inspect: what an adapter file holds — per module its algorithm, layer shape, rank, α, scale,
‖ΔW‖ and dtype — and the file's metadata. ΔW comes from each algorithm's own `delta_weight()`;
weight-dependent algorithms ((IA)³, DoRA, SVDiff, SaRA) need the base for it."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterError, IncompatibleFileError, format_keys
from .adapters import AdapterFile, Hosts, build
from .base import open_base
from .progress import track


@dataclass
class ModuleInfo:
    name: str
    algo: str
    shape: list[int] | None
    rank: int | None
    alpha: float | None
    scale: float | None
    delta_norm: float | None
    bias_norm: float | None
    dtype: str
    params: int
    note: str = ""


@dataclass
class Inspection:
    source: str
    metadata: dict[str, str]
    modules: list[ModuleInfo] = field(default_factory=list)
    file_bytes: int | None = None

    @property
    def params(self) -> int:
        return sum(m.params for m in self.modules)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "file_bytes": self.file_bytes, "params": self.params,
                "metadata": self.metadata, "modules": [asdict(m) for m in self.modules]}

    def summary(self) -> str:
        algos = Counter(m.algo for m in self.modules)
        size = f", {self.file_bytes / 2**20:.2f} MiB" if self.file_bytes is not None else ""
        return (f"{self.source}: {len(self.modules)} modules ({', '.join(f'{n}×{a}' for a, n in algos.items())}), "
                f"{self.params:,} parameters{size}")

    def table(self) -> str:
        head = ("module", "algo", "layer", "rank", "alpha", "scale", "‖ΔW‖", "dtype", "note")
        rows = [head]
        for m in self.modules:
            rows.append((m.name, m.algo, "×".join(map(str, m.shape)) if m.shape else "?",
                         "" if m.rank is None else str(m.rank), _num(m.alpha), _num(m.scale),
                         _num(m.delta_norm) if m.delta_norm is not None else "n/a", m.dtype, m.note))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        return "\n".join("  ".join(c.ljust(w) if i in (0, 1, 2, 7, 8) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                         for r in rows)


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def inspect_file(source: Any, *, base: Any = None, norms: bool = True, progress: bool | None = None) -> Inspection:
    """Describe an adapter file (or network). `base` gives the real layers, needed for ‖ΔW‖ of
    weight-dependent algorithms and for exact conv shapes of LoHa / low-rank LoKr."""
    f = AdapterFile.read(source)
    located = {}
    if base is not None:
        base_obj = open_base(base)
        located, unmatched = base_obj.resolve(f.modules)
        if unmatched:
            raise IncompatibleFileError(f"{len(unmatched)} modules match no layer of {base_obj.source}: {format_keys(unmatched)}", keys=unmatched)
    hosts = Hosts(located)
    size = Path(source).stat().st_size if isinstance(source, (str, os.PathLike)) else None
    out = Inspection(f.label, dict(f.metadata), file_bytes=size)
    for name, group in track(list(f.modules.items()), desc="inspect", enabled=progress):
        cls = f.algo(name)
        dtypes = sorted({str(t.dtype).replace("torch.", "") for k, t in group.items() if t.is_floating_point() and k != "alpha"})
        params = sum(t.numel() for k, t in group.items() if t.is_floating_point() and k != "alpha")
        alpha = float(group["alpha"].float().reshape(-1)[0]) if "alpha" in group and group["alpha"].numel() == 1 else None
        info = ModuleInfo(name, cls.algo, None, None, alpha, None, None, None, ",".join(dtypes) or "-", params)
        shape = hosts.shape(name, [f])
        if shape is not None:
            info.shape = list(shape[0])
            if not shape[1]:
                info.note = "shape as stored (convs flattened; --base gives the layer's)"
        try:
            module = build(cls, hosts.host(name, f, [f]), group, name)
        except AdapterError as exc:
            reason = str(exc).split("\n")[0]
            info.note = "; ".join(filter(None, [info.note, reason.split(": ", 1)[-1] if reason.startswith(name) else reason]))
            out.modules.append(info)
            continue
        info.shape = list(module.host.weight.shape)
        info.rank = getattr(module, "rank", None)
        if isinstance(info.rank, torch.Tensor) or not isinstance(info.rank, (int, type(None))):
            info.rank = None
        info.alpha = getattr(module, "alpha", info.alpha) if isinstance(getattr(module, "alpha", None), float) else info.alpha
        scale = getattr(module, "scale", None)
        info.scale = float(scale) if isinstance(scale, (int, float)) else None
        if norms:
            with torch.no_grad():
                info.delta_norm = float(module.delta_weight().double().norm())
                bias = module.delta_bias()
                info.bias_norm = None if bias is None else float(bias.double().norm())
        flags = [k for k, v in module.config().items() if v is True]
        if flags:
            info.note = "; ".join(filter(None, [info.note, ", ".join(flags)]))
        hosts.release(name)
        out.modules.append(info)
    return out
