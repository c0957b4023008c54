"""The `lycoris-like` subcommands end to end, each in its own subprocess on small files (run a few
at a time), with a bad-input case each: exit code 2, a clear message, and no output file."""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lycoris_like import create_network, load_network
from lycoris_like.cli import build_parser, main, weighted
from lycoris_like.tools import RankRule, combine, extract, resize

from conftest import bits, randomize

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("inspect", "combine", "bake", "extract", "resize", "convert")


def small_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.Conv2d(6, 10, 3, padding=1), nn.Linear(24, 8))


def adapter(m: nn.Module, path: Path, seed: int, **options) -> Path:
    net = create_network(m, **options)
    randomize(net, std=0.1, seed=seed)
    net.save(path)
    net.remove()
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    m = small_model()
    save_file(m.state_dict(), d / "base.safetensors")
    tuned = copy.deepcopy(m)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        tuned[0].weight.add_(torch.randn(24, 2, generator=g) @ torch.randn(2, 16, generator=g) * 0.1)
    save_file(tuned.state_dict(), d / "tuned.safetensors")
    other = nn.Sequential(nn.Linear(17, 24))
    (d / "junk.safetensors").write_bytes(b"\x00" * 12)
    return {
        "dir": d,
        "base": d / "base.safetensors",
        "tuned": d / "tuned.safetensors",
        "a": adapter(m, d / "a.safetensors", 1, dim=4, alpha=2),
        "b": adapter(m, d / "b.safetensors", 2, dim=2, alpha=1),
        "loha": adapter(m, d / "loha.safetensors", 3, algo="loha", dim=2),
        "other": adapter(other, d / "other.safetensors", 4, dim=2),
        "junk": d / "junk.safetensors",
    }


def cases(f: dict[str, Path]) -> dict[str, list[str]]:
    d = f["dir"]
    return {
        "inspect": ["inspect", str(f["a"])],
        "inspect-bad": ["inspect", str(f["junk"])],
        "combine": ["combine", f"{f['a']}:0.7", f"{f['b']}:-0.3", "-o", str(d / "ab.safetensors")],
        "combine-bad": ["combine", str(f["a"]), str(f["other"]), "-o", str(d / "bad-combine.safetensors")],
        "combine-malformed": ["combine", f"{f['a']}:abc", "-o", str(d / "malformed.safetensors")],
        "bake": ["bake", str(f["base"]), f"{f['a']}:0.5", "-o", str(d / "baked.safetensors")],
        "bake-bad": ["bake", str(f["base"]), str(f["other"]), "-o", str(d / "bad-baked.safetensors")],
        "extract": ["extract", str(f["base"]), str(f["tuned"]), "--rank", "2", "-o", str(d / "extracted.safetensors")],
        "extract-bad": ["extract", str(f["base"]), str(f["tuned"]), "--energy", "1.5", "-o", str(d / "bad-extract.safetensors")],
        "resize": ["resize", str(f["a"]), "--rank", "2", "-o", str(d / "resized.safetensors")],
        "resize-bad": ["resize", str(f["loha"]), "--rank", "1", "-o", str(d / "bad-resize.safetensors")],
        "convert": ["convert", str(f["a"]), "--to", "peft", "--base", str(f["base"]), "-o", str(d / "peft")],
        "convert-bad": ["convert", str(f["a"]), "--to", "peft", "-o", str(d / "bad-peft")],
    }


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_cli(args: list[str], *python_options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *python_options, "-m", "lycoris_like", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=cli_env())


@pytest.fixture(scope="module")
def runs(files):
    """Every case started at once on a small pool; each test waits for its own."""
    pool = ThreadPoolExecutor(max_workers=4)
    futures = {name: pool.submit(run_cli, args) for name, args in cases(files).items()}
    yield futures
    pool.shutdown(wait=True)


def ok(runs, name: str) -> str:
    result = runs[name].result()
    assert result.returncode == 0, result.stderr
    return result.stdout


def refused(runs, name: str, files, output: str, *fragments: str) -> None:
    result = runs[name].result()
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "error:" in result.stderr and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr
    d = files["dir"]
    assert not (d / output).exists()
    assert not [p for p in d.iterdir() if p.name.startswith(f".{output}")]  # no temporary left behind


def test_inspect(runs, files):
    out = ok(runs, "inspect")
    assert "3 modules (3×lora)" in out and "ss_network_module: lycoris.kohya" in out
    assert "lycoris_1  lora  10×6×3×3" in out
    refused(runs, "inspect-bad", files, "none", "not a readable safetensors file")


def test_combine_with_a_malformed_multiplier_says_so(runs, files):
    refused(runs, "combine-malformed", files, "malformed.safetensors", "malformed multiplier 'abc'", "FILE:NUMBER")
    with_colon = files["dir"] / "style:v2.safetensors"  # an existing file whose name has a colon is a file
    with_colon.write_bytes(b"")
    assert weighted(str(with_colon)) == (str(with_colon), 1.0)
    with pytest.raises(argparse.ArgumentTypeError, match="malformed multiplier '0.5x'"):
        weighted("style.safetensors:0.5x")


def test_combine(runs, files):
    out = ok(runs, "combine")
    assert "native" in out and "exact" in out
    want = combine([(files["a"], 0.7), (files["b"], -0.3)]).tensors
    got = load_file(files["dir"] / "ab.safetensors")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    refused(runs, "combine-bad", files, "bad-combine.safetensors", "lycoris_0.lora_down.weight", "expected shape")


def test_bake(runs, files):
    out = ok(runs, "bake")
    assert "merged 3 adapter modules into 3 layers" in out
    m = small_model()
    net = load_network(m, files["a"], multiplier=0.5)
    net.merge()
    baked = load_file(files["dir"] / "baked.safetensors")
    assert all(torch.equal(bits(baked[k]), bits(v)) for k, v in m.state_dict().items())
    refused(runs, "bake-bad", files, "bad-baked.safetensors", "lycoris_0.lora_down.weight", "expected shape")


def test_extract(runs, files):
    out = ok(runs, "extract")
    assert "2 unchanged layers skipped" in out
    want = extract(files["base"], files["tuned"], rule=RankRule(rank=2))
    assert want.rows[0].error <= 1e-5 and f"{want.rows[0].error:.3e}" in out
    got = load_file(files["dir"] / "extracted.safetensors")
    assert set(got) == set(want.tensors)
    refused(runs, "extract-bad", files, "bad-extract.safetensors", "energy must be in (0, 1]")


def test_resize(runs, files):
    out = ok(runs, "resize")
    assert "4 → 2" in out
    want = resize(files["a"], rule=RankRule(rank=2)).tensors
    got = load_file(files["dir"] / "resized.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)
    refused(runs, "resize-bad", files, "bad-resize.safetensors", "resize changes the rank of factored adapters", "loha")


def test_convert(runs, files):
    out = ok(runs, "convert")
    assert "wrote" in out
    config = json.loads((files["dir"] / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    refused(runs, "convert-bad", files, "bad-peft", "give the base model (--base)")


def test_every_subcommand_has_help(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([name, "--help"])
        assert exit_.value.code == 0
        assert f"usage: lycoris-like {name}" in capsys.readouterr().out


def test_existing_outputs_and_weights(files, capsys):
    existing = files["dir"] / "exists.safetensors"
    existing.write_bytes(b"keep me")
    assert main(["resize", str(files["a"]), "--rank", "1", "-o", str(existing)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and existing.read_bytes() == b"keep me"
    assert main(["resize", str(files["a"]), "--rank", "1", "-o", str(files["a"])]) == 2  # input = output
    assert main(["combine", str(files["a"]), "-o", str(files["dir"] / "nofolder" / "x.safetensors")]) == 2
    assert weighted("C:/x/a.safetensors:0.5") == ("C:/x/a.safetensors", 0.5)
    assert weighted("a.safetensors") == ("a.safetensors", 1.0)
    assert weighted("dir:name/a.safetensors") == ("dir:name/a.safetensors", 1.0)


# ----------------------------------------------------------------------------- start-up and manners


def imported(args: list[str]) -> set[str]:
    """The modules a run of `lycoris-like ARGS` imports (python -X importtime)."""
    result = run_cli(args, "-X", "importtime")
    return {line.rpartition("|")[2].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}


def test_version_is_the_package_version():
    result = run_cli(["--version"])
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert result.returncode == 0 and result.stdout.strip() == f"lycoris-like {version}"


@pytest.mark.parametrize("args", [["--help"], ["inspect", "--help"], ["combine", "--help"], ["--version"]])
def test_help_imports_neither_torch_nor_diffusers(args):
    modules = imported(args)
    assert "lycoris_like.cli" in modules  # the measurement works
    assert not {"torch", "diffusers", "transformers"} & modules


def test_inspect_imports_no_diffusers_or_transformers(files):
    modules = imported(["inspect", str(files["a"])])
    assert "torch" in modules and not {"diffusers", "transformers"} & modules


def test_a_piped_multi_algorithm_demo_prints_each_stage_as_it_ends(tmp_path):
    env = cli_env()
    env.pop("PYTHONUNBUFFERED", None)  # stdout into a pipe, block-buffered as in CI logs
    process = subprocess.Popen([sys.executable, "-m", "lycoris_like", "demo", "--algo", "lora,loha", "--steps", "2",
                                "--out", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    arrivals = [(time.monotonic(), line) for line in process.stdout]
    process.wait(timeout=300)
    end = time.monotonic()
    assert process.returncode == 0, process.stderr.read()
    stages = [(at, line) for at, line in arrivals if line.startswith("[")]
    assert [line[:5] for _, line in stages] == ["[1/2]", "[1/2]", "[2/2]", "[2/2]"]
    assert stages[0][1].startswith("[1/2] lora:") and stages[2][1].startswith("[2/2] loha:")
    assert stages[2][0] - stages[0][0] > 0.3  # lora's lines came while loha had yet to train
    assert end - stages[0][0] > 0.5
