"""examples/train_text_to_image.py, run as a user runs it (a subprocess each): training moves the
validation loss, and an interrupted run resumed from its accelerate checkpoint ends with the very
same adapter, bit for bit, as the run that was never interrupted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import bits

pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_text_to_image.py"
STEPS, INTERRUPT = 6, 3


def run(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--steps", str(STEPS), "--mixed-precision", "bf16", *args],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = Path(args[args.index("--output-dir") + 1])
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("example")
    whole, parts = d / "whole", d / "interrupted"
    run("--output-dir", str(whole))
    run("--output-dir", str(parts), "--checkpoint-every", str(INTERRUPT), "--stop-after", str(INTERRUPT))
    run("--output-dir", str(parts), "--resume", str(parts / f"checkpoint-{INTERRUPT}"))
    return {"whole": whole, "interrupted": parts}


def test_training_lowers_the_validation_loss(runs):
    metrics = json.loads((runs["whole"] / "metrics.json").read_text())
    assert len(metrics["losses"]) == STEPS and len(set(metrics["losses"])) == STEPS
    assert metrics["validation_loss_after"] < metrics["validation_loss_before"]


def test_the_checkpoint_holds_the_adapters_in_the_unet_state(runs):
    checkpoint = runs["interrupted"] / f"checkpoint-{INTERRUPT}"
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        adapter_keys = [k for k in f.keys() if k.startswith("lycoris_like.")]
    assert adapter_keys and all(k.startswith("lycoris_like.lora_unet_") for k in adapter_keys)


def test_resume_reproduces_the_uninterrupted_run_bit_exactly(runs):
    whole, resumed = (load_file(runs[k] / "adapter.safetensors") for k in ("whole", "interrupted"))
    halfway = load_file(runs["interrupted"] / f"checkpoint-{INTERRUPT}" / "adapter.safetensors")
    assert whole.keys() == resumed.keys() == halfway.keys()
    assert all(torch.equal(bits(whole[k]), bits(resumed[k])) for k in whole)
    assert any(not torch.equal(whole[k], halfway[k]) for k in whole)  # the resumed steps did train
    assert json.loads((runs["interrupted"] / "metrics.json").read_text())["last_step"] == STEPS
