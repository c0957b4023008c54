"""The benchmark scripts run and measure what they say: benchmarks/ops.py's kernel counts (ours at
most peft's, at equal adapter dtype) and benchmarks/run.py's GPU protocol, exercised on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import ops  # noqa: E402

# (algorithm, setting label, ours' adapter dtype, peft's): the defaults side by side on an fp32
# host; on a bf16 host ours (fp32 parameters) beside peft cast to fp32, and ours in bf16 beside
# peft as injected (bf16).
PAIRS = [(label, host, autocast, train, mine, theirs)
         for label, host, autocast, train in ops.COLUMNS
         for mine, theirs in ([(None, None)] if host == torch.float32 else [(None, torch.float32), (torch.bfloat16, None)])]


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr", "ia3", "dora"])
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_ours_launches_no_more_kernels_than_peft(algo, layer):
    """The GPU cost of an adapter at SD sizes is its kernels: count them (a TorchDispatchMode) in a
    training step and a no-grad forward, minus the bare layer's, and compare with peft 0.21.2."""
    for label, host, autocast, train, mine, theirs in PAIRS:
        bare = sum(ops.count(None, "", layer, host, autocast, train).values())
        ours = sum(ops.count("ours", algo, layer, host, autocast, train, mine).values()) - bare
        peft = sum(ops.count("peft", algo, layer, host, autocast, train, theirs).values()) - bare
        assert ours <= peft, f"{label}, ours {mine}, peft {theirs}: {ours} kernels, peft {peft}"


def test_the_count_sees_every_kernel_and_no_view():
    counter = ops.OpCounter()
    x = torch.randn(3, 4)
    with counter:
        y = x.view(12).reshape(3, 4).t() * 2 + 1  # views are free; mul and add are kernels
    assert dict(counter.ops) == {"mul": 1, "add": 1} and torch.equal(y, (x * 2 + 1).t())
    copying = ops.OpCounter()
    with copying:
        x.t().reshape(12)  # a reshape that must copy is a kernel
    assert copying.total == 1


def _run(tmp_path: Path, *args: str) -> list[dict]:
    out = tmp_path / "r.jsonl"
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert "| configuration |" in proc.stdout
    return rows[1:]


def test_gpu_protocol_runs_on_the_cpu(tmp_path):
    """bf16 host under autocast, the equal-dtype configurations, one process each."""
    rows = _run(tmp_path, "--device", "cpu", "--protocol", "gpu", "--width", "32", "--batch", "1", "--latent", "8",
                "--steps", "1", "--warmup", "0", "--only", "base,ours-lora,ours-lora-bf16,peft-lora-fp32")
    by_name = {r["config"]: r for r in rows}
    assert set(by_name) == {"base", "ours-lora", "ours-lora-bf16", "peft-lora-fp32"}, rows
    assert all(r["step_s"] > 0 and r["protocol"] == "gpu" for r in rows)
    assert by_name["ours-lora"]["adapter_dtype"] == "float32" and by_name["ours-lora-bf16"]["adapter_dtype"] == "bfloat16"
    assert by_name["peft-lora-fp32"]["adapter_dtype"] == "float32"
    assert by_name["ours-lora"]["layers"] == by_name["peft-lora-fp32"]["layers"] == 278


def test_compiled_step_runs(tmp_path):
    rows = _run(tmp_path, "--device", "cpu", "--protocol", "gpu", "--width", "32", "--batch", "1", "--latent", "8",
                "--steps", "1", "--warmup", "1", "--compile", "--compile-backend", "aot_eager", "--only", "base,ours-lora")
    assert {r["config"] for r in rows} == {"base", "ours-lora"} and all(r["compile"] and r["step_s"] > 0 for r in rows)
