"""The singular-value spectrum of a trained ΔW, per algorithm, for the algorithm pages.

Trains every algorithm with the demo's model, data and settings (`lycoris_like.demo.train`: the
small UNet, the generated shapes, noise prediction, the per-algorithm learning rate) and reads
ΔW = W_merged − W of two layers of the mid block — the self-attention query projection (Linear
64 → 64) and the first resnet convolution (3×3, 64 → 64, read as a 64 × 576 matrix) — from
`network.bake()`, the same merged weights a merge writes. It plots σᵢ/σ₁ on a log scale, writes
`docs/images/spectrum_<variant>.png` (the variant in colour, the others in grey) and
`docs/images/spectrum_all.png`, and prints a Markdown table of numerical ranks.

Variants: every registered algorithm (aliases left out) plus DoRA on LoRA.

Run:  pip install -e ".[plot]" && python docs/scripts/spectrum.py
      (about 1 minute per variant on 2 CPU cores; downloads nothing; --steps, --out, --only)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

LAYERS = {
    "attention query, Linear 64→64": "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
    "resnet conv 3×3, 64→64": "mid_block.resnets.0.conv1",
}
FLOOR = 1e-8
"""σᵢ/σ₁ below this (float32 round-off of an exactly low-rank ΔW) are drawn at the floor."""


def variants() -> dict[str, tuple[str, dict]]:
    """{variant name: (algorithm, options)}: the registered algorithms, then DoRA on LoRA."""
    from lycoris_like.demo import demo_algorithms

    out = {name: (name, {}) for name in demo_algorithms()}
    out["dora"] = ("lora", {"weight_decompose": True})
    return out


def spectra(algo: str, options: dict, steps: int) -> tuple[dict[str, torch.Tensor], dict[str, str], float]:
    """Train one variant; return σ(ΔW) per layer (float64, descending), a table cell per layer
    (numerical rank, share of ‖ΔW‖² in the top 4 singular values, ‖ΔW‖/‖W‖) and the final
    validation loss."""
    from lycoris_like.demo import train

    trained = train(algo, steps, log=lambda line: print("   ", line), log_every=0, **options)
    baked = trained.network.bake()
    sigmas, cells = {}, {}
    for label, path in LAYERS.items():
        weight = trained.base_state[f"{path}.weight"].double()
        delta = baked[f"{path}.weight"].double() - weight
        matrix = delta.reshape(delta.shape[0], -1)
        s = torch.linalg.svdvals(matrix)
        sigmas[label] = s
        energy = float((s[:4] ** 2).sum() / (s**2).sum()) if s[0] > 0 else 0.0
        cells[label] = f"{numerical_rank(s, tuple(matrix.shape))} / {len(s)}, {energy:.0%}, {float(delta.norm() / weight.norm()):.3f}"
    trained.network.remove()
    return sigmas, cells, trained.losses[-1][1]


def numerical_rank(sigma: torch.Tensor, shape: tuple[int, int]) -> int:
    """Singular values above σ₁ · max(m, n) · eps(float32): the rank float32 weights can show."""
    if sigma[0] == 0:
        return 0
    return int((sigma > sigma[0] * max(shape) * torch.finfo(torch.float32).eps).sum())


def plot(results: dict[str, dict[str, torch.Tensor]], highlight: str | None, path: Path) -> None:
    from lycoris_like.plot import figure

    fig = figure((1000, 360), layout=None)
    axes = fig.subplots(1, len(LAYERS), sharey=True)
    for ax, label in zip(axes, LAYERS):
        for i, (name, sig) in enumerate(results.items()):
            values = (sig[label] / sig[label][0]).clamp_min(FLOOR).numpy() if sig[label][0] > 0 else None
            if values is None:
                continue
            index = range(1, len(values) + 1)
            if highlight is None:
                ax.plot(index, values, color=f"C{i % 10}", lw=1.6, label=name)
            elif name != highlight:
                ax.plot(index, values, color="0.8", lw=1.0, label="other algorithms" if ax is axes[0] and i == 0 else None)
        if highlight is not None:
            sig = results[highlight][label]
            values = (sig / sig[0]).clamp_min(FLOOR).numpy()
            ax.plot(range(1, len(values) + 1), values, color="tab:blue", lw=2.2, label=highlight)
        ax.set_yscale("log")
        ax.set_ylim(FLOOR / 2, 2)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("index i")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("σᵢ / σ₁ of trained ΔW")
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center right", fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.84 if highlight is None else 0.82, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    from lycoris_like.demo import DEFAULT_STEPS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "images"))
    parser.add_argument("--only", default=None, help="comma-separated variants (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from lycoris_like.plot import INSTALL, available

    if not available():
        print(f"docs/scripts/spectrum.py draws with matplotlib: {INSTALL}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    chosen = variants()
    if args.only:
        wanted = [v.strip() for v in args.only.split(",") if v.strip()]
        unknown = [v for v in wanted if v not in chosen]
        if unknown:
            print(f"unknown variants {unknown}; known: {sorted(chosen)}", file=sys.stderr)
            return 2
        chosen = {k: chosen[k] for k in wanted}

    results, cells, losses = {}, {}, {}
    for name, (algo, options) in chosen.items():
        print(f"{name}: training {args.steps} steps", flush=True)
        results[name], cells[name], losses[name] = spectra(algo, options, args.steps)

    out = Path(args.out)
    for name in results:
        plot(results, name, out / f"spectrum_{name}.png")
    if args.only is None:
        plot(results, None, out / "spectrum_all.png")

    print()
    print("| variant | " + " | ".join(f"{label}: rank, top-4 energy, ‖ΔW‖/‖W‖" for label in LAYERS) + " | final loss |")
    print("|---|" + "---|" * len(LAYERS) + "---|")
    for name in results:
        print(f"| {name} | " + " | ".join(cells[name][label] for label in LAYERS) + f" | {losses[name]:.4f} |")
    print(f"\nwrote {len(results)} spectra to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
