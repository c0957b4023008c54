"""Side-by-side benchmark of lycoris_like, lycoris-lora and peft on the standard SD1.5 step.

    python benchmarks/run.py                 # every configuration, full-width SD1.5 UNet, CPU
    python benchmarks/run.py --quick         # half-width UNet, for iteration
    python benchmarks/run.py --only base,ours-lora,peft-lora --rounds 3
    python benchmarks/run.py --device cuda   # the GPU step: bf16 host, autocast, batch 4 at 64×64
    python benchmarks/run.py --device cuda --compile --only base,ours-lora

Each configuration runs in its own process (so peak memory is its own) and prints one JSON line;
the parent collects them into a JSON-lines file and prints a Markdown table with ratios to the
base floor and to the peers of the same run (see ../shared/BENCHMARKS.md for the protocols).

Protocols (`--protocol`, default from `--device`): "cpu" — fp32, latent (1, 4, 32, 32), timestep
10, median of 3 steps after 1 warm-up, max RSS; "gpu" — the model built on the device and cast to
bf16, latent (4, 4, 64, 64), timestep 500, context (4, 77, 768), forward under bf16 autocast, loss
`y.float().square().mean()`, TF32 on, synchronised, median of 10 steps after 3 warm-ups, peak
`max_memory_allocated` above the model. The gpu protocol also runs on the CPU (`--device cpu
--protocol gpu`: autocast on the CPU, RSS), which is how its script is tested without a GPU.
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

from configs import CONFIGS, EQUAL_DTYPE_PEERS, PEERS, build_unet, inputs  # noqa: E402


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


PROTOCOLS = {  # batch, latent size, timestep, dtype name, warm-ups, measured steps
    "cpu": (1, 32, 10, "float32", 1, 3),
    "gpu": (4, 64, 500, "bfloat16", 3, 10),
}


def child(name: str, options: dict) -> dict:
    """Run one configuration in this process and return its measurements."""
    import torch

    device = options["device"]
    batch, latent, timestep, dtype_name, warmups, steps = PROTOCOLS[options["protocol"]]
    batch, latent = options.get("batch") or batch, options.get("latent") or latent
    warmups, steps = options.get("warmup", warmups), options.get("steps") or steps
    dtype = getattr(torch, dtype_name)
    torch.set_num_threads(options.get("threads") or 2)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    with torch.device(device):
        unet = build_unet(options["quick"], options.get("width"))
    unet.to(dtype).requires_grad_(False)
    sample, timesteps, context = inputs(batch, latent, timestep, device, dtype)
    config = CONFIGS[name]
    model_bytes = torch.cuda.memory_allocated() if device == "cuda" else 0
    handle = config.build(unet)
    task = options["task"]
    result = {"config": name, "task": task, "device": device, "protocol": options["protocol"], "compile": options["compile"],
              "trainable": handle.trainable(), "layers": handle.layers, "adapter_dtype": handle.adapter_dtype}
    model = torch.compile(unet, backend=options.get("compile_backend") or "inductor") if options["compile"] else unet
    autocast = options["protocol"] == "gpu"

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def forward():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            return model(sample, timesteps, context).sample

    def timed(run, n: int, warm: int) -> float:
        for _ in range(warm):
            run()
        times = []
        for _ in range(n):
            sync()
            start = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if task == "step":
        if name == "base":
            sample.requires_grad_(True)  # the floor: backward still runs through every layer
        result["step_s"] = timed(lambda: forward().float().square().mean().backward(), steps, warmups)
    elif task == "infer":
        with torch.no_grad():
            result["infer_s"] = timed(forward, steps, warmups)
    elif task in ("merge", "fold"):
        handle.randomize()
        start = time.perf_counter()
        handle.merge() if task == "merge" else handle.merge_for_good()
        sync()
        result[f"{task}_s"] = time.perf_counter() - start
    elif task == "load":
        handle.randomize()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "a.safetensors"
            handle.save(path)
            with torch.device(device):
                fresh = build_unet(options["quick"], options.get("width")).to(dtype)
            start = time.perf_counter()
            config.load(fresh, path)
            result["load_s"] = time.perf_counter() - start
    result["max_rss_gb"] = _rss_gb()
    if device == "cuda":
        result["peak_gpu_gb"] = (torch.cuda.max_memory_allocated() - model_bytes) / 2**30
    return result


def run_child(name: str, options: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--child-options", json.dumps(options)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"config": name, "task": options["task"], "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
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
    if "peak_gpu_gb" in out:
        out["peak_gpu_gb"] = max(r["peak_gpu_gb"] for r in ok)
    out["rounds"] = len(ok)
    return out


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "—"


def table(results: list[dict]) -> str:
    steps = {r["config"]: r for r in results if r.get("task") == "step" and "step_s" in r}
    base = steps.get("base", {})
    gpu = any("peak_gpu_gb" in r for r in steps.values())
    memory = "peak above model (GiB)" if gpu else "max RSS (GB)"
    rows = [
        f"| configuration | layers | trainable | adapter dtype | step (s) | × base | {memory} | vs base | vs peft | vs peft at equal dtype | vs lycoris-lora |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in steps.items():
        peers = {**PEERS.get(name, {}), "equal": EQUAL_DTYPE_PEERS.get(name)}
        vs = [_ratio(steps[peers[p]]["step_s"], r["step_s"]) + "× faster" if peers.get(p) in steps else "—"
              for p in ("peft", "equal", "lycoris")]
        mem = r["peak_gpu_gb"] if gpu else r["max_rss_gb"]
        base_mem = base.get("peak_gpu_gb" if gpu else "max_rss_gb")
        relative = (f"{mem - base_mem:+.2f} GiB" if gpu else f"{(mem / base_mem - 1) * 100:+.0f} %") if base_mem else "—"
        rows.append(
            f"| {name} | {r['layers']} | {r['trainable']:,} | {r.get('adapter_dtype', '-')} | {r['step_s']:.3f} "
            f"| {_ratio(r['step_s'], base.get('step_s'))} | {mem:.2f} | {relative} | {vs[0]} | {vs[1]} | {vs[2]} |"
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
    parser.add_argument("--width", type=int, help="the UNet's base width (320 for SD1.5; --quick: 160)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the model runs (default: cpu)")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), help="cpu or gpu step (default: by --device)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (ours and base alike)")
    parser.add_argument("--compile-backend", help="torch.compile backend (default: inductor; aot_eager traces the "
                        "same graphs without inductor's code generation)")
    parser.add_argument("--batch", type=int, help="override the protocol's batch")
    parser.add_argument("--latent", type=int, help="override the protocol's latent size")
    parser.add_argument("--steps", type=int, help="override the protocol's measured steps")
    parser.add_argument("--warmup", type=int, help="override the protocol's warm-up steps")
    parser.add_argument("--threads", type=int, help="torch threads (default: 2)")
    parser.add_argument("--only", help="comma-separated configuration names (default: all)")
    parser.add_argument("--tasks", default="step", help="comma-separated: step,infer,merge,fold,load (default: step)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the configurations this many times, odd rounds in reverse order, and report "
                             "each one's median (evens out a machine whose speed drifts during the run; default: 1)")
    parser.add_argument("--out", help="JSON-lines output file (default: benchmarks/results/<date>[-quick][-device].jsonl)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-options", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, json.loads(args.child_options))))
        return
    names = args.only.split(",") if args.only else list(CONFIGS)
    unknown = set(names) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configurations {sorted(unknown)}; known: {', '.join(CONFIGS)}")
    protocol = args.protocol or ("gpu" if args.device == "cuda" else "cpu")
    options = {"quick": args.quick, "width": args.width, "device": args.device, "protocol": protocol,
               "compile": args.compile, "compile_backend": args.compile_backend, "batch": args.batch, "latent": args.latent, "steps": args.steps,
               "threads": args.threads}
    if args.warmup is not None:
        options["warmup"] = args.warmup
    stamp = datetime.date.today().isoformat()
    suffix = ("-quick" if args.quick else "") + ("" if args.device == "cpu" else f"-{args.device}") + ("-compile" if args.compile else "")
    out = Path(args.out or HERE / "results" / f"{stamp}{suffix}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {"date": stamp, "machine": platform.platform(), "cpus": os.cpu_count(), **options,
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
                    result = {**run_child(name, {**options, "task": task}), "round": round_}
                    rounds.setdefault(name, []).append(result)
                    f.write(json.dumps(result) + "\n")
                    f.flush()
                    print(json.dumps(result), file=sys.stderr)
            results += [_median(runs) for runs in rounds.values()]
    print(f"{header['date']} · {header['machine']} · {header['cpus']} CPUs · {header['command']}\n")
    print(table(results))


if __name__ == "__main__":
    main()
