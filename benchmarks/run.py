"""Side-by-side benchmark of lycoris_like, lycoris-lora and peft on the standard SD1.5 step.

    python benchmarks/run.py                 # every configuration, full-width SD1.5 UNet
    python benchmarks/run.py --quick         # half-width UNet, for iteration
    python benchmarks/run.py --only base,ours-lora,peft-lora --rounds 3

Each configuration runs in its own process (so peak RSS is its own) and prints one JSON line;
the parent collects them into a JSON-lines file and prints a Markdown table with ratios to the
base floor and to the peers of the same run (see ../shared/BENCHMARKS.md for the protocol).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from configs import CONFIGS, PEERS, build_unet, inputs  # noqa: E402


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def child(name: str, quick: bool, task: str) -> dict:
    """Run one configuration in this process and return its measurements."""
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    unet = build_unet(quick)
    unet.requires_grad_(False)
    sample, timestep, context = inputs()
    config = CONFIGS[name]
    handle = config.build(unet)
    result = {"config": name, "task": task, "trainable": handle.trainable(), "layers": handle.layers}
    if task == "step":
        if name == "base":
            sample.requires_grad_(True)  # the floor: backward still runs through every layer
        times = []
        for _ in range(4):
            start = time.perf_counter()
            unet(sample, timestep, context).sample.square().mean().backward()
            times.append(time.perf_counter() - start)
        result["step_s"] = statistics.median(times[1:])
    elif task == "infer":
        with torch.no_grad():
            unet(sample, timestep, context)
            times = []
            for _ in range(4):
                start = time.perf_counter()
                unet(sample, timestep, context)
                times.append(time.perf_counter() - start)
        result["infer_s"] = statistics.median(times[1:])
    elif task in ("merge", "fold"):
        handle.randomize()
        start = time.perf_counter()
        handle.merge() if task == "merge" else handle.merge_for_good()
        result[f"{task}_s"] = time.perf_counter() - start
    elif task == "load":
        handle.randomize()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "a.safetensors"
            handle.save(path)
            fresh = build_unet(quick)
            start = time.perf_counter()
            config.load(fresh, path)
            result["load_s"] = time.perf_counter() - start
    result["max_rss_gb"] = _rss_gb()
    return result


def run_child(name: str, quick: bool, task: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--task", task] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"config": name, "task": task, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(lines[-1])


def _median(runs: list[dict]) -> dict:
    """One configuration's rounds → the median of each measured time, the largest RSS."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    out = dict(ok[-1])
    for key in ("step_s", "infer_s", "merge_s", "fold_s", "load_s"):
        if key in out:
            out[key] = statistics.median(r[key] for r in ok)
    out["max_rss_gb"] = max(r["max_rss_gb"] for r in ok)
    out["rounds"] = len(ok)
    return out


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "—"


def table(results: list[dict]) -> str:
    steps = {r["config"]: r for r in results if r.get("task") == "step" and "step_s" in r}
    base = steps.get("base", {})
    rows = [
        "| configuration | layers | trainable | step (s) | × base | max RSS (GB) | RSS vs base | vs peft | vs lycoris-lora |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in steps.items():
        peers = PEERS.get(name, {})
        vs = [_ratio(steps.get(peers.get(p), {}).get("step_s"), r["step_s"]) + "× faster" if peers.get(p) in steps else "—"
              for p in ("peft", "lycoris")]
        rss = f"{(r['max_rss_gb'] / base['max_rss_gb'] - 1) * 100:+.0f} %" if base else "—"
        rows.append(
            f"| {name} | {r['layers']} | {r['trainable']:,} | {r['step_s']:.2f} | {_ratio(r['step_s'], base.get('step_s'))} "
            f"| {r['max_rss_gb']:.2f} | {rss} | {vs[0]} | {vs[1]} |"
        )
    for task, key in (("merge", "merge_s"), ("fold", "fold_s"), ("load", "load_s"), ("infer", "infer_s")):
        done = [r for r in results if r.get("task") == task and key in r]
        if done:
            rows += ["", f"| {task} | seconds |", "|---|---|"]
            rows += [f"| {r['config']} | {r[key]:.3f} |" for r in done]
    failed = [r for r in results if "error" in r]
    if failed:
        rows += ["", "Failed: " + "; ".join(f"{r['config']} ({r['task']}): {r['error']}" for r in failed)]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="half-width UNet")
    parser.add_argument("--only", help="comma-separated configuration names (default: all)")
    parser.add_argument("--tasks", default="step", help="comma-separated: step,infer,merge,fold,load (default: step)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the configurations this many times, odd rounds in reverse order, and report "
                             "each one's median (evens out a machine whose speed drifts during the run; default: 1)")
    parser.add_argument("--out", help="JSON-lines output file (default: benchmarks/results/<date>[-quick].jsonl)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--task", default="step", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.quick, args.task)))
        return
    names = args.only.split(",") if args.only else list(CONFIGS)
    unknown = set(names) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configurations {sorted(unknown)}; known: {', '.join(CONFIGS)}")
    stamp = datetime.date.today().isoformat()
    out = Path(args.out or HERE / "results" / f"{stamp}{'-quick' if args.quick else ''}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {"date": stamp, "machine": platform.platform(), "cpus": os.cpu_count(), "quick": args.quick,
              "command": " ".join([Path(sys.executable).name] + sys.argv)}
    results = []
    with out.open("w") as f:
        f.write(json.dumps(header) + "\n")
        for task in args.tasks.split(","):
            rounds: dict[str, list[dict]] = {}
            for round_ in range(args.rounds):
                # odd rounds in reverse order: over a pair of rounds a steady drift of the machine's
                # speed hits every configuration alike (the floor runs first and last)
                for name in names if round_ % 2 == 0 else names[::-1]:
                    if task != "step" and name == "base" and task != "infer":
                        continue
                    result = {**run_child(name, args.quick, task), "round": round_}
                    rounds.setdefault(name, []).append(result)
                    f.write(json.dumps(result) + "\n")
                    f.flush()
                    print(json.dumps(result), file=sys.stderr)
            results += [_median(runs) for runs in rounds.values()]
    print(f"{header['date']} · {header['machine']} · {header['cpus']} CPUs · {header['command']}\n")
    print(table(results))


if __name__ == "__main__":
    main()
