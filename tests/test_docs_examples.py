"""docs/examples/oft.py, the worked example of docs/extending.md: a new algorithm in one file, run
through create_network, training, merge, save and load — and through the demo."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lycoris_like import ConfigError, ShapeMismatchError, create_network, get_algorithm, load_network
from lycoris_like.modules import registry

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "oft.py"


@pytest.fixture(scope="module")
def oft():
    """Import the example as a user would (registering "oft-example"); unregister it afterwards so
    the rest of the suite sees only the library's algorithms."""
    spec = importlib.util.spec_from_file_location("docs_examples_oft", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    registry._ALGORITHMS.pop("oft-example", None)


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Unflatten(1, (20, 1, 1)), nn.Upsample(size=5),
                         nn.Conv2d(20, 6, 3, padding=1)).eval()


X = torch.randn(4, 12, generator=torch.Generator().manual_seed(1))


def train(net: nn.Module, host: nn.Module, steps: int = 5) -> None:
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    target = torch.randn_like(host(X))
    for _ in range(steps):
        loss = (host(X) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_registered_and_identity_at_init(oft):
    assert get_algorithm("oft-example") is oft.OFT
    m = model()
    base = m(X)
    net = create_network(m, algo="oft-example", dim=4)
    assert [a.block for a in net] == [4, 3]  # 20 channels → blocks of 4; 6 → the largest divisor ≤ 4
    assert all(float(a.delta_weight().detach().abs().max()) == 0.0 for a in net)
    assert torch.equal(m(X), base)
    with pytest.raises(ConfigError, match="unknown options for oft-example"):
        create_network(model(), algo="oft-example", block=4)


def test_trained_update_is_a_rotation_and_merges_exactly(oft):
    m = model()
    m.requires_grad_(False)
    weights = {k: v.clone() for k, v in m.state_dict().items()}
    net = create_network(m, algo="oft-example", dim=4)
    train(net, m)
    for adapter in net:
        delta = adapter.delta_weight().detach()
        assert float(delta.abs().max()) > 1e-3
        # R orthogonal: each block of output rows keeps its Gram matrix, W′ᵀW′ = WᵀW.
        w = adapter.host.weight.detach().reshape(-1, adapter.block, adapter.host.weight[0].numel())
        w2 = (adapter.host.weight.detach() + delta).reshape(w.shape)
        torch.testing.assert_close(w2.transpose(1, 2) @ w2, w.transpose(1, 2) @ w, atol=1e-5, rtol=1e-5)
    unmerged = m(X)
    net.merge()
    torch.testing.assert_close(m(X), unmerged, atol=1e-6, rtol=1e-6)
    net.unmerge()
    assert all(torch.equal(weights[k], v) for k, v in m.state_dict().items())
    net.remove()
    assert all(torch.equal(weights[k], v) for k, v in m.state_dict().items())


def test_save_and_load_round_trip(oft, tmp_path):
    m = model()
    m.requires_grad_(False)
    net = create_network(m, algo="oft-example", dim=4)
    train(net, m)
    expected = m(X)
    path = net.save(tmp_path / "oft.safetensors")
    tensors = load_file(str(path))
    assert sorted(tensors) == ["lycoris_0.oft_example_blocks", "lycoris_4.oft_example_blocks"]
    assert tuple(tensors["lycoris_0.oft_example_blocks"].shape) == (5, 4, 4)

    fresh = model()
    loaded = load_network(fresh, path)  # the algorithm is recognised by its key
    assert loaded.load_report.complete and {a.algo for a in loaded} == {"oft-example"}
    assert torch.equal(fresh(X), expected)
    loaded.remove()

    tensors["lycoris_4.oft_example_blocks"] = torch.zeros(3, 2, 2)  # fits: 3 blocks of 2 = 6 channels
    tensors["lycoris_0.oft_example_blocks"] = torch.zeros(3, 4, 4)  # 3 blocks of 4 = 12, not 20
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ShapeMismatchError, match=r"lycoris_0\.oft_example_blocks: expected \(n, b, b\)") as err:
        load_network(model(), tmp_path / "bad.safetensors")
    assert err.value.keys == ["lycoris_0.oft_example_blocks"]


def test_runs_in_the_demo(oft, tmp_path):
    result = oft.main(steps=4, out_dir=str(tmp_path))
    assert result.ok, result.failures
    assert result.reload_max_diff == 0.0 and result.unmerge_exact
    assert result.file == tmp_path / "demo_oft-example.safetensors"


# ----------------------------------------------------------------------------- docs/quickstart.md

QUICKSTART = EXAMPLE.parent.parent / "quickstart.md"
SKIP_MARK = "<!-- not run"


def python_blocks(markdown: str) -> list[str]:
    """The ```python blocks of a page, in order, except those right after a `<!-- not run …>` line."""
    blocks, lines, i = [], markdown.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            j = next(k for k in range(i + 1, len(lines)) if lines[k].strip() == "```")
            previous = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            if not previous.strip().startswith(SKIP_MARK):
                blocks.append("\n".join(lines[i + 1:j]))
            i = j
        i += 1
    return blocks


def test_quickstart_runs_as_pasted(tmp_path, monkeypatch):
    blocks = python_blocks(QUICKSTART.read_text(encoding="utf-8"))
    assert len(blocks) == 2  # train; load, scale, merge
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__quickstart__"}
    for block in blocks:
        exec(compile(block, str(QUICKSTART), "exec"), namespace)
    assert (tmp_path / "style.safetensors").is_file()
    assert namespace["loaded"].load_report.complete
