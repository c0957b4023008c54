"""The README's first command: the demo, end to end in a subprocess (short runs), and its parts."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from lycoris_like import UnknownAlgorithmError, algorithm_names, get_algorithm
from lycoris_like import demo, plot
from lycoris_like.cli import main

TABLE_HEADER = "| algorithm | layers | trainable |"


def lycoris_like(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lycoris_like", *args], capture_output=True, text=True, timeout=timeout)


def read_png(path: Path) -> tuple[tuple[int, int], set[tuple[int, int, int]]]:
    """(width, height) and the set of RGB colours of a PNG, decoded by Pillow (matplotlib's own
    dependency, a decoder independent of the code that drew it)."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        rgb = image.convert("RGB")
        return rgb.size, set(rgb.getdata())


def test_demo_trains_saves_reloads_and_merges(tmp_path):
    result = lycoris_like("demo", "--steps", "12", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "demo check: OK" in out
    assert "unmerge bit-exact: True" in out and "reloaded into a fresh UNet: max |Δ output| = 0\n" in out
    assert TABLE_HEADER in out
    rows = [line for line in out.splitlines() if line.startswith("| loha ")]
    assert len(rows) == 1 and rows[0].rstrip().endswith("| OK     |")
    with safe_open(str(tmp_path / "demo_loha.safetensors"), "pt") as f:  # LoHa is the default
        assert f.metadata()["ss_network_module"] == "lycoris.kohya"
        assert any(k.startswith("lora_unet_") and k.endswith(".hada_w1_a") for k in f.keys())
    size, drawn = read_png(tmp_path / "loss_loha.png")
    assert size == (800, 450)
    assert plot.PALETTE[0] in drawn  # the curve is drawn
    assert f"loss curve: {tmp_path / 'loss_loha.png'}" in out
    assert result.stderr == ""  # no progress bar when stderr is not a terminal


def test_demo_all_runs_every_registered_algorithm_once(tmp_path):
    result = lycoris_like("demo", "--algo", "all", "--steps", "3", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "demo check: OK" in out and TABLE_HEADER in out
    expected = demo.demo_algorithms()
    assert set(expected) >= {"lora", "loha", "lokr", "ia3", "full"}
    assert not {"locon", "kron", "diff"} & set(expected)  # aliases are not run twice
    table = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith(TABLE_HEADER)]
    assert [line.split("|")[1].strip() for line in table] == expected
    assert all(line.rstrip().endswith("| OK     |") for line in table)
    for algo in expected:
        assert (tmp_path / f"demo_{algo}.safetensors").is_file()
    _, drawn = read_png(tmp_path / "loss_all.png")
    assert all(plot.PALETTE[i] in drawn for i in range(len(expected)))  # one curve per algorithm


def test_cli_usage_errors_exit_non_zero():
    result = lycoris_like("demo", "--algo", "nope", "--steps", "1", timeout=120)
    assert result.returncode == 2 and "unknown algorithm 'nope'" in result.stderr
    result = lycoris_like("demo", "--steps", "0", timeout=120)
    assert result.returncode == 2 and "steps must be a positive integer" in result.stderr
    result = lycoris_like(timeout=60)
    assert result.returncode != 0


# ----------------------------------------------------------------------------- the parts, in process


def test_parse_algos():
    assert demo.parse_algos("all") == demo.demo_algorithms()
    assert demo.parse_algos("locon, lora,kron") == ["lora", "lokr"]
    canonical = {get_algorithm(n).algo for n in algorithm_names()}
    assert set(demo.demo_algorithms()) == canonical and len(demo.demo_algorithms()) == len(canonical)
    with pytest.raises(UnknownAlgorithmError, match="unknown algorithm 'nope'"):
        demo.parse_algos("lora,nope")


def test_plot_losses_writes_a_valid_png(tmp_path):
    curves = {"lora": [(0, 1.2), (50, 0.4), (100, 0.2)], "loha": [(0, 1.2), (50, 0.3), (100, float("nan"))]}
    path = plot.plot_losses(curves, tmp_path / "sub" / "curve.png", size=(320, 200))
    size, drawn = read_png(path)
    assert size == (320, 200)
    assert {plot.PALETTE[0], plot.PALETTE[1], (255, 255, 255)} <= drawn
    assert plot.PALETTE[2] not in drawn  # two curves, two colours
    with pytest.raises(ValueError):
        plot.plot_losses({"x": [(0, float("nan"))]}, tmp_path / "empty.png")


@pytest.fixture
def no_matplotlib(monkeypatch):
    """matplotlib as if it were not installed (an import of any of its modules fails)."""
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)


def test_without_matplotlib_plotting_names_the_extra_to_install(tmp_path, no_matplotlib):
    with pytest.raises(ImportError, match=re.escape("pip install lycoris_like[plot]")):
        plot.plot_losses({"x": [(0, 1.0)]}, tmp_path / "curve.png")
    assert not plot.available() and not (tmp_path / "curve.png").exists()


def test_without_matplotlib_the_demo_refuses_before_training(tmp_path, no_matplotlib, capsys):
    assert main(["demo", "--steps", "2", "--out", str(tmp_path)]) == 2
    assert "pip install lycoris_like[plot]" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written


def test_progress_bar_draws_only_when_asked():
    stream = io.StringIO()
    bar = demo.Progress(10, "loha", enabled=True, stream=stream)
    for step in range(1, 11):
        bar.update(step, 0.5)
    bar.close()
    assert "[########################]    10/10  loss 0.5000" in stream.getvalue()
    quiet = io.StringIO()
    bar = demo.Progress(10, "loha", stream=quiet)  # StringIO is not a terminal
    bar.update(10, 0.5)
    bar.close()
    assert quiet.getvalue() == ""


def test_summary_table_lists_failures():
    ok = demo.DemoResult("lora", [(0, 1.0), (10, 0.5)], 100, Path("a"), 2048, 1.5, 0.0, 1e-7, True, layers=3, lrs=(3e-3,))
    bad = demo.DemoResult("loha", [(0, 1.0), (10, 1.5)], 100, Path("b"), 2048, 1.5, 1e-3, 1e-7, False, layers=3, lrs=(3e-3,))
    assert ok.ok and not bad.ok
    assert bad.failures == ["reload not bit-exact", "unmerge not bit-exact", "loss did not decrease"]
    table = demo.summary_table([ok, bad]).splitlines()
    assert table[0].startswith(TABLE_HEADER) and len(table) == 4
    assert "| 2.0 KiB |" in table[2] and "| 3e-3 |" in table[2] and "-50.0 %" in table[2]
    assert table[3].rstrip().endswith("reload not bit-exact; unmerge not bit-exact; loss did not decrease |")
