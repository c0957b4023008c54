"""Ops per adapted layer — the kernels an adapter launches, counted on CPU (../shared/BENCHMARKS.md).

    python benchmarks/ops.py                       # the table, ours beside peft and lycoris-lora
    python benchmarks/ops.py --only lora,loha      # some algorithms
    python benchmarks/ops.py --timing              # plus the tiny-layer step time (µs), ours vs peft

One host layer (Linear 64→96; Conv2d 64→96, 3×3, padding 1) in one training step (forward +
`y.float().square().mean().backward()`, counted on the second step) or one no-grad forward, minus
the same count for the bare layer (input with `requires_grad` in the training step). Every
dispatched op counts except those that only make a view or change metadata. Settings: fp32 host;
bf16 host under CPU autocast. Ours runs with float32 adapter parameters (the default) and with
`dtype=torch.bfloat16` (peft's `inject_adapter_in_model` keeps the host dtype). The count does not
drift between machines or runs, so it is committed as JSON lines and checked by a test.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent

FREE = {
    "view", "_unsafe_view", "reshape", "_reshape_alias", "t", "transpose", "permute", "expand", "as_strided",
    "detach", "alias", "squeeze", "unsqueeze", "select", "slice", "split", "split_with_sizes", "unbind",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "unflatten",
    "promote_types", "result_type",
    "flatten", "view_as", "expand_as", "numpy_T", "mT", "_unsafe_split",
}
"""Ops that only make a view or change metadata (or allocate without touching memory)."""


class OpCounter(TorchDispatchMode):
    """Counts every dispatched op except `FREE`."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = func.overloadpacket.__name__
        if name not in FREE:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


# ----------------------------------------------------------------------------- the layers


def host(kind: str, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
    """The host layer (in a container named `layer`, as peft targets modules by name) and its input."""
    torch.manual_seed(0)
    if kind == "linear":
        layer: nn.Module = nn.Linear(64, 96)
        x = torch.randn(4, 16, 64)
    elif kind == "conv":
        layer = nn.Conv2d(64, 96, 3, padding=1)
        x = torch.randn(2, 64, 8, 8)
    elif kind == "tiny":
        layer = nn.Linear(8, 8)
        x = torch.randn(1, 8)
    else:
        raise ValueError(kind)
    model = nn.Sequential()
    model.add_module("layer", layer)
    model.requires_grad_(False)
    return model.to(dtype), x.to(dtype)


ALGOS = ("lora", "loha", "lokr", "ia3", "dora", "svdiff", "sara")
PEER_ALGOS = {"lora", "loha", "lokr", "ia3", "dora"}


def ours(algo: str, model: nn.Module, dtype: torch.dtype | None) -> Any:
    from lycoris_like import create_network

    options: dict[str, Any] = {"dim": 4, "alpha": 2}
    if dtype is not None:
        options["dtype"] = dtype
    if algo == "dora":
        return create_network(model, "lora", weight_decompose=True, **options)
    if algo == "lokr":
        return create_network(model, "lokr", factor=8, **options)
    if algo == "sara":
        return create_network(model, "sara", threshold=2e-2, **options)
    return create_network(model, algo, **options)


def peft(algo: str, model: nn.Module, dtype: torch.dtype | None) -> Any:
    """peft's `inject_adapter_in_model` keeps the host dtype; `dtype=torch.float32` casts the
    adapter to float32 afterwards, as `get_peft_model` does by default (`autocast_adapter_dtype`)."""
    import peft as p

    configs = {
        "lora": lambda: p.LoraConfig(r=4, lora_alpha=2, target_modules=["layer"]),
        "dora": lambda: p.LoraConfig(r=4, lora_alpha=2, target_modules=["layer"], use_dora=True),
        "loha": lambda: p.LoHaConfig(r=4, alpha=2, target_modules=["layer"]),
        "lokr": lambda: p.LoKrConfig(r=4, alpha=2, target_modules=["layer"], decompose_factor=8),
        "ia3": lambda: p.IA3Config(target_modules=["layer"], feedforward_modules=[]),
    }
    injected = p.inject_adapter_in_model(configs[algo](), model)
    if dtype is not None:
        for name, param in injected.named_parameters():
            if param.requires_grad:
                param.data = param.data.to(dtype)
    return injected


def lycoris(algo: str, model: nn.Module, dtype: torch.dtype | None) -> Any:
    import logging

    logging.getLogger("lycoris").setLevel(logging.ERROR)
    from lycoris.modules.ia3 import IA3Module
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    layer = model.layer
    build = {
        "lora": lambda: LoConModule("lycoris_layer", layer, 1.0, 4, 2),
        "dora": lambda: LoConModule("lycoris_layer", layer, 1.0, 4, 2, weight_decompose=True),
        "loha": lambda: LohaModule("lycoris_layer", layer, 1.0, 4, 2),
        "lokr": lambda: LokrModule("lycoris_layer", layer, 1.0, 4, 2, factor=8),
        "ia3": lambda: IA3Module("lycoris_layer", layer, 1.0, 4, 2),
    }
    module = build[algo]()
    module.apply_to()
    module.to(next(layer.parameters()).dtype if dtype is None else dtype)
    model.__dict__["_lycoris"] = module  # keep it alive, not as a child the container would run
    return module


LIBRARIES: dict[str, Callable[[str, nn.Module, torch.dtype | None], Any]] = {
    "ours": ours, "peft": peft, "lycoris": lycoris,
}


def trainable(model: nn.Module, extra: Any) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    if isinstance(extra, nn.Module):
        params += [p for p in extra.parameters() if p.requires_grad and all(p is not q for q in params)]
    return params


def randomize(params: list[torch.Tensor]) -> None:
    """Every trainable parameter random (and SaRA's values moved), so ΔW ≠ 0 on every path."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.01)


@contextlib.contextmanager
def setting(autocast: bool) -> Iterator[None]:
    if autocast:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    else:
        yield


def step(model: nn.Module, x: torch.Tensor, params: list[torch.Tensor], train: bool, autocast: bool) -> None:
    for p in params:
        p.grad = None
    if train:
        with setting(autocast):
            y = model(x)
        y.float().square().mean().backward()
    else:
        with torch.no_grad(), setting(autocast):
            model(x)


def count(library: str | None, algo: str, kind: str, host_dtype: torch.dtype, autocast: bool, train: bool,
          adapter_dtype: torch.dtype | None = None) -> Counter[str]:
    """Ops of the second step of one configuration (`library` None: the bare layer)."""
    model, x = host(kind, host_dtype)
    x = x.requires_grad_(train)
    extra = None if library is None else LIBRARIES[library](algo, model, adapter_dtype)
    params = [x] if train else []
    params += trainable(model, extra)
    if library is not None:
        randomize([p for p in params if p is not x])
    step(model, x, params, train, autocast)
    counter = OpCounter()
    with counter:
        step(model, x, params, train, autocast)
    return counter.ops


COLUMNS = [  # (label, host dtype, autocast, train)
    ("fp32 train", torch.float32, False, True),
    ("bf16-autocast train", torch.bfloat16, True, True),
    ("fp32 infer", torch.float32, False, False),
    ("bf16-autocast infer", torch.bfloat16, True, False),
]


def measure(algos: list[str], libraries: list[str]) -> list[dict[str, Any]]:
    rows = []
    for label, host_dtype, autocast, train in COLUMNS:
        for kind in ("linear", "conv"):
            bare = count(None, "", kind, host_dtype, autocast, train)
            for algo in algos:
                for library in libraries:
                    if library != "ours" and algo not in PEER_ALGOS:
                        continue
                    variants: list[torch.dtype | None] = [None]
                    if host_dtype != torch.float32 and library == "ours":
                        variants.append(torch.bfloat16)  # peft's default on a bf16 host
                    elif host_dtype != torch.float32 and library == "peft":
                        variants.append(torch.float32)  # ours's default on a bf16 host
                    for adapter_dtype in variants:
                        try:
                            ops = count(library, algo, kind, host_dtype, autocast, train, adapter_dtype)
                        except Exception as exc:  # a peer that cannot run this setting
                            rows.append({"library": library, "algo": algo, "layer": kind, "setting": label,
                                         "adapter_dtype": str(adapter_dtype), "error": f"{type(exc).__name__}: {exc}"[:200]})
                            continue
                        extra = ops.copy()
                        extra.subtract(bare)
                        rows.append({
                            "library": library, "algo": algo, "layer": kind, "setting": label,
                            "adapter_dtype": {None: "default", torch.bfloat16: "bf16", torch.float32: "fp32"}[adapter_dtype],
                            "ops": sum(ops.values()) - sum(bare.values()),
                            "detail": {k: v for k, v in sorted(extra.items()) if v},
                        })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """One row per algorithm; a cell is linear / conv. At a bf16 host, "fp32 params" compares ours
    (default) with peft cast to float32, "bf16 params" ours with `dtype=torch.bfloat16` and peft
    as injected (both bf16)."""
    def cell(library: str, algo: str, label: str, dtype: str) -> str:
        found = {r["layer"]: r for r in rows if r["library"] == library and r["algo"] == algo
                 and r["setting"] == label and r["adapter_dtype"] == dtype}
        if not found:
            return ""
        return " / ".join(str(found[k].get("ops", "err")) if k in found else "?" for k in ("linear", "conv"))

    columns: list[tuple[str, str, dict[str, str]]] = []  # (header, setting, library → adapter dtype)
    for label, host_dtype, _, _ in COLUMNS:
        if host_dtype == torch.float32:
            columns.append((label, label, {"ours": "default", "peft": "default", "lycoris": "default"}))
        else:
            columns.append((f"{label}, fp32 params", label, {"ours": "default", "peft": "fp32"}))
            columns.append((f"{label}, bf16 params", label, {"ours": "bf16", "peft": "default", "lycoris": "default"}))
    head = ["algorithm"] + [f"{lib} {header}" for header, _, libs in columns for lib in libs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for algo in dict.fromkeys(r["algo"] for r in rows):
        cells = [algo] + [cell(lib, algo, setting, dtype) for _, setting, libs in columns for lib, dtype in libs.items()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- tiny-layer timing


def timing(algos: list[str], libraries: list[str], rounds: int = 7, steps: int = 300) -> list[dict[str, Any]]:
    """µs per training step on Linear 8→8, batch 1, one thread: interleaved rounds in one process."""
    torch.set_num_threads(1)
    setups = {}
    for algo in algos:
        for library in libraries:
            if library == "lycoris" or (library != "ours" and algo not in PEER_ALGOS):
                continue
            model, x = host("tiny", torch.float32)
            x.requires_grad_(True)
            extra = LIBRARIES[library](algo, model, None)
            params = [x] + trainable(model, extra)
            randomize(params[1:])
            setups[(library, algo)] = (model, x, params)
    samples: dict[tuple[str, str], list[float]] = {k: [] for k in setups}
    for _ in range(rounds):
        for key, (model, x, params) in setups.items():
            for _ in range(20):
                step(model, x, params, True, False)
            start = time.perf_counter()
            for _ in range(steps):
                step(model, x, params, True, False)
            samples[key].append((time.perf_counter() - start) / steps * 1e6)
    return [{"library": lib, "algo": algo, "task": "tiny-step", "us": statistics.median(s)}
            for (lib, algo), s in samples.items()]


def timing_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| algorithm | ours (µs) | peft (µs) | ours / peft |", "|---|---|---|---|"]
    for algo in dict.fromkeys(r["algo"] for r in rows):
        us = {r["library"]: r["us"] for r in rows if r["algo"] == algo}
        ratio = f"{us['ours'] / us['peft']:.2f}" if "ours" in us and "peft" in us else "—"
        peft_us = f"{us['peft']:.0f}" if "peft" in us else "—"
        lines.append(f"| {algo} | {us.get('ours', 0):.0f} | {peft_us} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated algorithms (default: all)")
    parser.add_argument("--libraries", default="ours,peft,lycoris", help="comma-separated (default: ours,peft,lycoris)")
    parser.add_argument("--timing", action="store_true", help="also time a step on a tiny Linear 8→8 (ours vs peft)")
    parser.add_argument("--out", help="JSON-lines output (default: benchmarks/results/<date>-ops.jsonl)")
    args = parser.parse_args()
    algos = args.only.split(",") if args.only else list(ALGOS)
    libraries = args.libraries.split(",")
    torch.set_num_threads(1)
    rows = measure(algos, libraries)
    print(table(rows))
    failed = [r for r in rows if "error" in r]
    for r in failed:
        print(f"failed: {r['library']} {r['algo']} {r['layer']} {r['setting']}: {r['error']}", file=sys.stderr)
    if args.timing:
        timed = timing(algos, libraries)
        rows += timed
        print()
        print(timing_table(timed))
    stamp = datetime.date.today().isoformat()
    out = Path(args.out or HERE / "results" / f"{stamp}-ops.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    import peft as peft_module  # noqa: F401  (versions in the header)
    header = {"date": stamp, "torch": torch.__version__, "peft": peft_module.__version__,
              "command": " ".join([Path(sys.executable).name] + sys.argv)}
    with out.open("w") as f:
        f.write(json.dumps(header) + "\n")
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
