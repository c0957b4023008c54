"""The README's first command: the demo, end to end in a subprocess (short run)."""

from __future__ import annotations

import subprocess
import sys

from safetensors import safe_open


def test_demo_trains_saves_reloads_and_merges(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lycoris_like", "demo", "--steps", "12", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "demo check: OK" in out
    assert "unmerge bit-exact: True" in out and "max |Δ output| = 0\n" in out
    with safe_open(str(tmp_path / "demo_lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_network_module"] == "lycoris.kohya"
        assert any(k.startswith("lora_unet_") for k in f.keys())


def test_cli_usage_errors_exit_non_zero():
    result = subprocess.run([sys.executable, "-m", "lycoris_like", "demo", "--algo", "nope", "--steps", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "unknown algorithm 'nope'" in result.stderr
    result = subprocess.run([sys.executable, "-m", "lycoris_like"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
