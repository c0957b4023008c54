"""Loss curves as PNG files, drawn with matplotlib — an optional dependency (`pip install
lycoris_like[plot]`, which the `demo` extra pulls in), imported only when a plot is drawn, on the
Agg canvas so that no display and no global pyplot state is involved."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError

INSTALL = "pip install lycoris_like[plot]"
DPI = 100
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
"""matplotlib's tab10 as RGB: curve i is drawn in PALETTE[i % 10]."""


def figure(size: tuple[int, int], layout: str | None = "constrained") -> Any:
    """A matplotlib `Figure` of `size` pixels on the Agg canvas; `ImportError` naming the extra
    to install when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(f"drawing plots needs matplotlib: {INSTALL}") from exc
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        figure((1, 1))
    except ImportError:
        return False
    return True


def plot_losses(curves: Mapping[str, Sequence[tuple[int, float]]], path: str | Path, *,
                title: str = "validation loss (noise prediction mse)", size: tuple[int, int] = (800, 450)) -> Path:
    """Draw loss curves (`{label: [(step, loss), …]}`, non-finite points left out) on linear axes
    and write them as a PNG of `size` pixels."""
    finite = {label: [(s, v) for s, v in curve if math.isfinite(v)] for label, curve in curves.items()}
    if not any(finite.values()):
        raise ConfigError("plot_losses needs at least one finite point")
    fig = figure(size)
    ax = fig.subplots()
    for i, (label, points) in enumerate(finite.items()):
        colour = tuple(c / 255 for c in PALETTE[i % len(PALETTE)])
        ax.plot([s for s, _ in points], [v for _, v in points], color=colour, lw=2, label=label)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(color="0.9")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
