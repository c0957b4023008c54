"""Adapter arithmetic (issue 6): combine, bake, extract, resize, convert, inspect — each checked
against something independent: the stacked networks' own forward and `delta_weight()`, `merge()`,
an explicit low-rank difference, peft's loader, diffusers' own LDM→diffusers converter."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lycoris_like import IncompatibleFileError, create_network, load_network
from lycoris_like.errors import ConfigError, CorruptFileError, MergeError
from lycoris_like.formats import sgm
from lycoris_like.tools import (
    RankRule,
    bake,
    combine,
    extract,
    from_peft,
    inspect_file,
    rename_prefix,
    resize,
    to_diff,
    to_peft,
    to_sgm,
)

from conftest import SMALL_UNET, bits, clip_inputs, make_clip, make_unet, randomize, unet_inputs


def model() -> nn.Sequential:
    """Non-square Linear, a 3×3 conv, a 1×1 conv and a LayerNorm (paths 0…3, names lycoris_0…)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 80), nn.Conv2d(12, 20, 3, padding=1), nn.Conv2d(12, 20, 1), nn.LayerNorm(20))


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(3, 48, generator=g), torch.randn(2, 12, 7, 6, generator=g)


def outputs(m: nn.Module) -> list[torch.Tensor]:
    x, img = inputs()
    with torch.no_grad():
        return [m[0](x), m[1](img), m[2](img)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


def save_net(m: nn.Module, path, algo: str = "lora", seed: int = 1, **options) -> object:
    net = create_network(m, algo=algo, targets=["0", "1", "2"], **options)
    randomize(net, std=0.1, seed=seed)
    net.save(path)
    net.remove()
    return path


def deltas(m: nn.Module, files_weights) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Σ wᵢ·ΔWᵢ (float64) per layer path, from networks loaded the ordinary way."""
    out: dict[str, list] = {}
    for path, w in files_weights:
        net = load_network(m, path)
        for p, adapter in net.adapters.items():
            dw = adapter.delta_weight().detach().double() * w
            db = adapter.delta_bias()
            db = None if db is None else db.detach().double() * w
            if p in out:
                out[p][0] = out[p][0] + dw
                out[p][1] = db if out[p][1] is None else (out[p][1] if db is None else out[p][1] + db)
            else:
                out[p] = [dw, db]
        net.remove()
    return {p: (a, b) for p, (a, b) in out.items()}


# ----------------------------------------------------------------------------- combine


def test_combining_two_lora_files_concatenates_ranks_and_equals_the_sum_of_their_forwards(tmp_path):
    m = model()
    a = save_net(m, tmp_path / "a.safetensors", dim=4, alpha=2, seed=1)
    b = save_net(m, tmp_path / "b.safetensors", dim=3, alpha=5, use_tucker=True, seed=2)  # Tucker core on the 3×3 conv
    result = combine([(a, 0.7), (b, -0.4)])
    assert all(r.algo == "lora" and r.rank == 7 and r.error is None for r in result.rows)
    result.save(tmp_path / "ab.safetensors")
    sd = load_file(tmp_path / "ab.safetensors")
    assert sd["lycoris_0.lora_down.weight"].shape == (7, 48) and float(sd["lycoris_0.alpha"]) == 7.0

    stacked = copy.deepcopy(m)
    load_network(stacked, a, multiplier=0.7)
    load_network(stacked, b, multiplier=-0.4)
    combined = copy.deepcopy(m)
    load_network(combined, tmp_path / "ab.safetensors")
    for got, want in zip(outputs(combined), outputs(stacked)):
        assert rel(got, want) <= 1e-6

    # Exact: the only error is the fp32 rounding of each folded factor entry; in float64 it vanishes.
    wide = combine([(a, 0.7), (b, -0.4)], dtype=torch.float64)
    expected = deltas(copy.deepcopy(m).double(), [(a, 0.7), (b, -0.4)])  # float64 reference
    net = load_network(copy.deepcopy(m).double(), _write(tmp_path / "ab64.safetensors", wide))
    for p, adapter in net.adapters.items():
        assert torch.allclose(adapter.delta_weight(), expected[p][0], rtol=0, atol=1e-13 * float(expected[p][0].abs().max()))


def _write(path, result):
    result.save(path)
    return path


def test_all_tucker_lora_files_keep_a_block_diagonal_core(tmp_path):
    m = model()
    a = save_net(m, tmp_path / "a.safetensors", dim=2, alpha=1, use_tucker=True, seed=1)
    b = save_net(m, tmp_path / "b.safetensors", dim=3, alpha=1, use_tucker=True, seed=2)
    result = combine([(a, 1.0), (b, 0.5)])
    core = result.tensors["lycoris_1.lora_mid.weight"]
    assert core.shape == (5, 5, 3, 3) and not bool(core[:2, 2:].any()) and not bool(core[2:, :2].any())
    net = load_network(copy.deepcopy(m), _write(tmp_path / "c.safetensors", result))
    want = deltas(m, [(a, 1.0), (b, 0.5)])["1"][0]
    assert rel(net.adapters["1"].delta_weight().double(), want) <= 1e-6


def test_mixed_algorithms_combine_to_an_exact_dense_diff(tmp_path):
    m = model()
    files = [(save_net(m, tmp_path / "lora.safetensors", dim=4, seed=1), 0.8),
             (save_net(m, tmp_path / "loha.safetensors", algo="loha", dim=3, seed=2), -0.5),
             (save_net(m, tmp_path / "lokr.safetensors", algo="lokr", dim=2, factor=4, seed=3), 1.5),
             (save_net(m, tmp_path / "ia3.safetensors", algo="ia3", seed=4), 0.3),
             (save_net(m, tmp_path / "dora.safetensors", dim=2, weight_decompose=True, seed=5), 0.6)]
    with pytest.raises(IncompatibleFileError, match="depends on the base weights"):
        combine(files, to="diff")  # (IA)³ and DoRA need the base
    result = combine(files, to="auto", base=m)
    assert {r.algo for r in result.rows} == {"full"} and all("mixed algorithms" in r.note for r in result.rows)
    expected = deltas(m, files)
    for p, (dw, db) in expected.items():
        assert torch.equal(bits(result.tensors[f"lycoris_{p}.diff"]), bits(dw.float()))  # Σ in fp64, rounded once
        assert torch.equal(bits(result.tensors[f"lycoris_{p}.diff_b"]), bits(db.float()))  # (IA)³ scales the bias
    stacked = copy.deepcopy(m)
    for path, w in files:
        load_network(stacked, path, multiplier=w)
    dense = copy.deepcopy(m)
    load_network(dense, _write(tmp_path / "diff.safetensors", result))
    for got, want in zip(outputs(dense), outputs(stacked)):
        assert rel(got, want) <= 1e-5


def test_svd_recompression_reports_its_error_and_it_decreases_with_rank(tmp_path):
    m = model()
    files = [(save_net(m, tmp_path / "lora.safetensors", dim=4, seed=1), 1.0),
             (save_net(m, tmp_path / "loha.safetensors", algo="loha", dim=3, seed=2), 1.0)]
    dense = deltas(m, files)
    errors = {}
    for rank in (1, 2, 4, 8, 13):
        result = combine(files, to="lora", rule=RankRule(rank=rank), base=m)
        net = load_network(copy.deepcopy(m), _write(tmp_path / f"r{rank}.safetensors", result))
        for row in result.rows:
            path = row.name.removeprefix("lycoris_")
            want = dense[path][0]
            measured = float((net.adapters[path].delta_weight().detach().double() - want).norm() / want.norm())
            assert row.error == pytest.approx(measured, rel=1e-3, abs=1e-7)  # the reported error is the real one
            errors.setdefault(path, []).append(row.error)
        net.remove()
    for path, errs in errors.items():
        assert all(e1 > e2 for e1, e2 in zip(errs, errs[1:])), (path, errs)
        assert errs[-1] <= 1e-6  # rank 13 ≥ the true rank (4 + 3² for LoHa): lossless up to fp32
    energy = combine(files, to="lora", rule=RankRule(energy=0.9), base=m)
    assert all(0.0 < r.error <= (0.1 ** 0.5) + 1e-6 for r in energy.rows)  # keeps ≥ 90 % of ‖ΔW‖²


def test_native_combination_of_each_algorithm(tmp_path):
    m = model()
    full = [(save_net(m, tmp_path / f"full{i}.safetensors", algo="full", seed=i), w) for i, w in ((1, 0.5), (2, -2.0))]
    ia3 = [(save_net(m, tmp_path / f"ia3{i}.safetensors", algo="ia3", seed=i), w) for i, w in ((1, 0.5), (2, 1.5))]
    for files in (full, ia3):
        result = combine(files, to="native", base=m)
        net = load_network(copy.deepcopy(m), _write(tmp_path / "n.safetensors", result))
        for p, (dw, db) in deltas(m, files).items():
            assert rel(net.adapters[p].delta_weight().double(), dw) <= 1e-6
            assert rel(net.adapters[p].delta_bias().double(), db) <= 1e-6
        net.remove()
    # LoHa / LoKr: one file scales natively; several do not (use diff or lora)
    loha = save_net(m, tmp_path / "loha.safetensors", algo="loha", dim=3, seed=3)
    scaled = combine([(loha, -0.25)], to="native")
    assert set(scaled.tensors) == set(load_file(loha))
    net = load_network(copy.deepcopy(m), _write(tmp_path / "s.safetensors", scaled))
    for p, (dw, _) in deltas(m, [(loha, -0.25)]).items():
        assert rel(net.adapters[p].delta_weight().double(), dw) <= 1e-6
    with pytest.raises(IncompatibleFileError, match="cannot combine natively"):
        combine([(loha, 1.0), (loha, 1.0)], to="native")
    # (IA)³ on both sides does not add; auto falls back to diff
    other_side = save_net(m, tmp_path / "ia3in.safetensors", algo="ia3", train_on_input=True, seed=4)
    with pytest.raises(IncompatibleFileError, match="input and on the output side"):
        combine([(ia3[0][0], 1.0), (other_side, 1.0)], to="native", base=m)
    assert all(r.algo == "full" for r in combine([(ia3[0][0], 1.0), (other_side, 1.0)], base=m).rows)
    # one file at weight 1 is copied bit-exactly, whatever the algorithm
    same = combine([ia3[0][0]])
    assert all(torch.equal(bits(v), bits(load_file(ia3[0][0])[k])) for k, v in same.tensors.items())


def _shifted(m: nn.Module, algo: str, path, seed: int, **options):
    net = create_network(m, algo=algo, targets=["0", "1"], **options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    net.save(path)
    net.remove()
    return path


def test_svdiff_combines_in_delta_space(tmp_path):
    pytest.importorskip("lycoris_like.modules.svdiff")  # registers "svdiff" while it is being added
    m = model()
    a, b = _shifted(m, "svdiff", tmp_path / "a.safetensors", 1), _shifted(m, "svdiff", tmp_path / "b.safetensors", 2)
    result = combine([(a, 0.5), (b, 2.0)])  # no base needed: δ space
    sa, sb = load_file(a), load_file(b)
    for key, value in result.tensors.items():
        want = (0.5 * sa[key].double() + 2.0 * sb[key].double()).float() if key.endswith(".delta") else sa[key]
        assert torch.equal(value, want)
    load_network(copy.deepcopy(m), _write(tmp_path / "c.safetensors", result))  # the base checksum still fits


def test_sara_combines_as_the_sum_of_weighted_differences(tmp_path):
    pytest.importorskip("lycoris_like.modules.sara")
    m = model()
    files = [(_shifted(m, "sara", tmp_path / f"s{i}.safetensors", i, threshold=0.05), w) for i, w in ((1, 0.5), (2, -1.5))]
    with pytest.raises(IncompatibleFileError, match="base"):
        combine(files, to="native")
    result = combine(files, to="native", base=tmp_path / _base_file(m, tmp_path))
    assert all(r.algo == "sara" for r in result.rows)
    net = load_network(copy.deepcopy(m), _write(tmp_path / "c.safetensors", result))
    for p, (dw, _) in deltas(m, files).items():
        assert rel(net.adapters[p].delta_weight().double(), dw) <= 1e-6


def test_svdiff_pytorch_and_sara_official_conversions_delegate_to_their_formats(tmp_path):
    for name in ("modules.svdiff", "modules.sara", "formats.svdiff_pytorch", "formats.sara_official"):
        pytest.importorskip(f"lycoris_like.{name}")
    from lycoris_like.tools import from_sara_official, from_svdiff_pytorch, to_svdiff_pytorch

    m = model()
    ours = _shifted(m, "svdiff", tmp_path / "ours.safetensors", 1)
    theirs = to_svdiff_pytorch(ours, copy.deepcopy(m), tmp_path / "spectral_shifts.safetensors")
    assert all(k.endswith(".delta") and not k.startswith("lycoris") for k in load_file(theirs))
    back = from_svdiff_pytorch(theirs, copy.deepcopy(m))
    original = load_file(ours)
    assert all(torch.equal(back.tensors[k], original[k]) for k in original)

    sara = _shifted(m, "sara", tmp_path / "sara.safetensors", 2, threshold=0.05)
    net = load_network(copy.deepcopy(m), sara)
    positions = {n: i for i, (n, _) in enumerate(m.named_parameters())}
    official = {"threshold": 0.05}
    for path, adapter in net.adapters.items():
        official[positions[f"{path}.weight"]] = adapter.sparse_weight.entries()[1].clone()
    torch.save(official, tmp_path / "unet.pt")
    result = from_sara_official(tmp_path / "unet.pt", copy.deepcopy(m))
    assert {k: v for k, v in result.tensors.items() if "values" in k}.keys() <= set(load_file(sara))
    assert all(torch.equal(v, load_file(sara)[k]) for k, v in result.tensors.items() if k.endswith("sara_values"))


def _base_file(m: nn.Module, folder) -> str:
    save_file(m.state_dict(), folder / "base.safetensors")
    return "base.safetensors"


# ----------------------------------------------------------------------------- extract and resize


def test_extract_recovers_an_exact_rank_r_difference(tmp_path):
    base = model()
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for i, r in ((0, 3), (1, 3)):
            w = tuned[i].weight
            low = torch.randn(w.shape[0], r, generator=g) @ torch.randn(r, w[0].numel(), generator=g)
            w.add_(0.05 * low.reshape(w.shape))
        tuned[3].weight.add_(0.1)  # a norm: no LoRA form, reported
    save_file(base.state_dict(), tmp_path / "base.safetensors")
    save_file(tuned.state_dict(), tmp_path / "tuned.safetensors")
    for rule in (RankRule(rank=3), RankRule(energy=0.9999), RankRule(ratio=1e4)):
        result = extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", rule=rule)
        rows = {r.name: r for r in result.rows}
        assert rows["lycoris_0"].rank == 3 and rows["lycoris_1"].rank == 3
        assert rows["lycoris_0"].error <= 1e-5 and rows["lycoris_1"].error <= 1e-5
        assert "lycoris_2" not in rows and result.config["unchanged_layers"] == 1  # exactly zero: skipped
        assert "no LoRA form" in rows["lycoris_3"].note
    result.save(tmp_path / "x.safetensors")
    merged = copy.deepcopy(base)
    load_network(merged, tmp_path / "x.safetensors").merge()
    for i in (0, 1):
        diff = (tuned[i].weight - base[i].weight).detach().double()
        assert float((merged[i].weight - tuned[i].weight).detach().double().norm() / diff.norm()) <= 1e-5


def test_resize_to_the_same_rank_is_lossless_and_lower_ranks_report_their_error(tmp_path):
    m = model()
    path = save_net(m, tmp_path / "a.safetensors", dim=6, alpha=3, seed=1)
    same = resize(path, rule=RankRule(rank=6))
    original = load_file(path)
    assert set(same.tensors) == set(original)
    assert all(torch.equal(bits(same.tensors[k]), bits(original[k])) for k in original)
    assert all(r.error is None and r.note == "kept" for r in same.rows)

    # a rank-8 file whose ΔW has rank 4 resizes to 4 without loss (the SVD is taken from the factors)
    net = create_network(m, dim=8, alpha=4, targets=["0", "1", "2"])
    randomize(net, seed=2)
    with torch.no_grad():
        for adapter in net:
            adapter.lora_up.weight[:, 4:] = adapter.lora_up.weight[:, :4]
    net.save(tmp_path / "r8.safetensors")
    want = {p: a.delta_weight().detach().double() for p, a in net.adapters.items()}
    net.remove()
    previous = None
    for rank in (4, 2, 1):
        result = resize(tmp_path / "r8.safetensors", rule=RankRule(rank=rank))
        loaded = load_network(copy.deepcopy(m), _write(tmp_path / f"r{rank}.safetensors", result))
        for p, adapter in loaded.adapters.items():
            assert adapter.rank == rank and adapter.scale == pytest.approx(0.5)  # α/r kept
        errors = [r.error for r in result.rows]
        if rank == 4:
            assert max(errors) <= 1e-6
            assert all(rel(loaded.adapters[p].delta_weight().double(), want[p]) <= 1e-6 for p in want)
        else:
            assert min(errors) > max(previous)
        previous = errors


def test_resize_refuses_other_algorithms(tmp_path):
    path = save_net(model(), tmp_path / "h.safetensors", algo="loha", dim=2)
    with pytest.raises(IncompatibleFileError, match="combine --to lora"):
        resize(path, rule=RankRule(rank=1))


# ----------------------------------------------------------------------------- bake


def test_bake_equals_merge_bit_for_bit_and_loads_into_a_diffusers_unet(tmp_path):
    from diffusers import UNet2DConditionModel

    for dtype in (torch.float32, torch.float16):
        unet = make_unet().to(dtype)
        save_file(unet.state_dict(), tmp_path / "unet.safetensors")
        net = create_network(unet, dim=4, alpha=2, conv_dim=3, conv_alpha=1, use_tucker=True)
        randomize(net, seed=1)
        net.save(tmp_path / "lora.safetensors")
        report = bake(tmp_path / "unet.safetensors", [(tmp_path / "lora.safetensors", 0.8)], tmp_path / "baked.safetensors", overwrite=True)
        assert len(report.merged) == len(net) and not report.unmatched
        net.set_multiplier(0.8)
        net.merge()
        baked = load_file(tmp_path / "baked.safetensors")
        merged = unet.state_dict()
        assert set(baked) == set(merged)
        assert all(baked[k].dtype == dtype and torch.equal(bits(baked[k]), bits(merged[k])) for k in merged)
        fresh = UNet2DConditionModel(**SMALL_UNET).to(dtype).eval()
        fresh.load_state_dict(baked)
        if dtype == torch.float32:
            with torch.no_grad():
                assert torch.equal(fresh(*unet_inputs()).sample, unet(*unet_inputs()).sample)


def test_bake_a_diffusers_folder_with_unet_and_text_encoder(tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet, te = make_unet(), make_clip()
    (tmp_path / "sd").mkdir()
    unet.save_pretrained(tmp_path / "sd" / "unet")
    te.save_pretrained(tmp_path / "sd" / "text_encoder")
    (tmp_path / "sd" / "model_index.json").write_text("{}")
    net = create_network({"lora_unet": unet, "lora_te": te}, dim=2, alpha=1)
    randomize(net, seed=2)
    net.save(tmp_path / "pipe.safetensors")  # CLIP names spelled lora_te_text_model_… (transformers 5 has no text_model level)
    report = bake(tmp_path / "sd", [tmp_path / "pipe.safetensors"], tmp_path / "out")
    assert len(report.merged) == len(net)
    with torch.no_grad():
        net.merge()
        want = unet(*unet_inputs()).sample, te(clip_inputs()).last_hidden_state
        new_unet = UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet").eval()
        new_te = CLIPTextModel.from_pretrained(tmp_path / "out" / "text_encoder").eval()
        assert torch.equal(new_unet(*unet_inputs()).sample, want[0])
        assert torch.equal(new_te(clip_inputs()).last_hidden_state, want[1])
    assert (tmp_path / "out" / "model_index.json").is_file()
    assert json.loads(load_meta(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")["lycoris_like.baked"])["adapters"]


def load_meta(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_bake_refuses_a_file_that_does_not_fit_and_writes_nothing(tmp_path):
    m = model()
    save_file(m.state_dict(), tmp_path / "base.safetensors")
    other = nn.Sequential(nn.Linear(48, 81))
    save_net_any = create_network(other, dim=2)
    randomize(save_net_any, seed=1)
    save_net_any.save(tmp_path / "other.safetensors")
    with pytest.raises(IncompatibleFileError, match="expected shape"):
        bake(tmp_path / "base.safetensors", [tmp_path / "other.safetensors"], tmp_path / "out.safetensors")
    from collections import OrderedDict

    stray = create_network(nn.Sequential(OrderedDict(proj=nn.Linear(48, 80))), dim=2)
    stray.save(tmp_path / "stray.safetensors")  # lycoris_proj: no such layer
    with pytest.raises(IncompatibleFileError, match="match no layer"):
        bake(tmp_path / "base.safetensors", [tmp_path / "stray.safetensors"], tmp_path / "out.safetensors")
    half = model().half()
    save_file(half.state_dict(), tmp_path / "half.safetensors")
    huge = create_network(half, dim=2, targets=["0"])
    with torch.no_grad():
        huge.adapters["0"].lora_up.weight.fill_(300.0)
        huge.adapters["0"].lora_down.weight.fill_(300.0)  # ΔW = 0.5·2·300² = 9e4 > float16's 65504
    huge.save(tmp_path / "huge.safetensors")
    with pytest.raises(MergeError, match="NaN/Inf"):
        bake(tmp_path / "half.safetensors", [tmp_path / "huge.safetensors"], tmp_path / "out.safetensors")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))] == []


def test_bake_into_an_sgm_single_file_with_sgm_names(tmp_path):
    """kohya's SDXL spelling against an original-layout checkpoint (`model.diffusion_model.` keys)."""
    unet = make_unet()
    config = sgm.unet_config(unet)
    ldm = {"model.diffusion_model." + k: v for k, v in sgm.state_dict_to_sgm(unet.state_dict(), config).items()}
    save_file(ldm, tmp_path / "sd.safetensors")
    net = create_network(unet, dim=2, alpha=1)
    randomize(net, seed=3)
    net.save(tmp_path / "diffusers_names.safetensors")
    sgm_file = _write(tmp_path / "sgm_names.safetensors", to_sgm(tmp_path / "diffusers_names.safetensors", unet=unet))
    assert any(k.startswith("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.") for k in load_file(sgm_file))
    bake(tmp_path / "sd.safetensors", [sgm_file], tmp_path / "baked.safetensors")
    net.merge()
    want = sgm.state_dict_to_sgm(unet.state_dict(), config)
    got = load_file(tmp_path / "baked.safetensors")
    assert all(torch.equal(bits(got["model.diffusion_model." + k]), bits(v)) for k, v in want.items())


# ----------------------------------------------------------------------------- convert


def test_sgm_paths_agree_with_diffusers_own_converter():
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    sdxl_like = dict(block_out_channels=(32, 64, 64), layers_per_block=2,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     transformer_layers_per_block=(1, 2, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=56, use_linear_projection=True)
    for changes in ({}, sdxl_like):
        unet = make_unet(**changes)
        state = unet.state_dict()
        ldm = {"model.diffusion_model." + k: v for k, v in sgm.state_dict_to_sgm(state, sgm.unet_config(unet)).items()}
        back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
        assert set(back) == set(state) and all(back[k] is state[k] or torch.equal(back[k], state[k]) for k in state)


def test_sdxl_names_round_trip_and_the_default_config_is_sdxl(tmp_path):
    names = sgm.name_map(sgm.build_unet())
    assert names["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"] == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert names["lora_unet_up_blocks_0_upsamplers_0_conv"] == "lora_unet_output_blocks_2_2_conv"
    assert names["lora_unet_mid_block_attentions_0_transformer_blocks_9_ff_net_2"] == "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2"
    unet = make_unet()
    net = create_network({"lora_unet": unet, "lora_te": make_clip()}, dim=2)
    randomize(net, seed=1)
    net.save(tmp_path / "d.safetensors")
    there = _write(tmp_path / "s.safetensors", to_sgm(tmp_path / "d.safetensors", unet=unet))
    back = to_sgm(there, unet=unet, reverse=True)
    original = load_file(tmp_path / "d.safetensors")
    assert set(back.tensors) == set(original) and all(torch.equal(back.tensors[k], original[k]) for k in original)
    with pytest.raises(IncompatibleFileError, match="not diffusers names"):
        to_sgm(there, unet=unet)


def test_prefix_rename_is_bit_exact_and_loads(tmp_path):
    unet = make_unet()
    net = create_network(unet, dim=2)
    randomize(net, seed=1)
    net.save(tmp_path / "u.safetensors", prefix="lycoris")
    renamed = _write(tmp_path / "r.safetensors", rename_prefix(tmp_path / "u.safetensors", {"lycoris": "lora_unet"}))
    back = rename_prefix(renamed, {"lora_unet": "lycoris"})
    original = load_file(tmp_path / "u.safetensors")
    assert all(torch.equal(back.tensors[k], original[k]) for k in original) and set(back.tensors) == set(original)
    assert all(k.startswith("lora_unet_") for k in load_file(renamed))
    load_network(copy.deepcopy(unet), renamed)
    with pytest.raises(IncompatibleFileError, match="no module name starts with"):
        rename_prefix(renamed, {"lora_te": "lora_te1"})


def test_kohya_to_peft_to_kohya_is_bit_exact_and_peft_loads_it(tmp_path):
    from peft import PeftModel

    unet = make_unet()
    save_file(unet.state_dict(), tmp_path / "unet.safetensors")
    reference = copy.deepcopy(unet)
    net = create_network(unet, dim=4, alpha=2, conv_dim=2, conv_alpha=1, overrides={"*attn1.to_q": {"dim": 3, "alpha": 0.75}})
    randomize(net, seed=1)
    with torch.no_grad():
        want = unet(*unet_inputs()).sample
    net.save(tmp_path / "k.safetensors", metadata={"modelspec.author": "test"})
    net.remove()
    folders, notes = to_peft(tmp_path / "k.safetensors", tmp_path / "peft", base=tmp_path / "unet.safetensors")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["rank_pattern"] and config["alpha_pattern"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(reference, tmp_path / "peft").eval()
    with torch.no_grad():
        assert rel(peft_model(*unet_inputs()).sample, want) <= 1e-5
    back = from_peft(tmp_path / "peft")
    back.save(tmp_path / "back.safetensors")
    original, again = load_file(tmp_path / "k.safetensors"), load_file(tmp_path / "back.safetensors")
    assert set(original) == set(again)
    assert all(original[k].shape == again[k].shape and torch.equal(bits(original[k]), bits(again[k])) for k in original)
    assert load_meta(tmp_path / "back.safetensors")["modelspec.author"] == "test"


@pytest.mark.parametrize("algo, options", [("lora", {"weight_decompose": True}), ("loha", {}), ("loha", {"use_tucker": True}), ("ia3", {})])
def test_peft_conversion_of_other_algorithms(tmp_path, algo, options):
    from peft import PeftModel

    m = model()
    net = create_network(m, algo=algo, dim=3, alpha=2, targets=["0", "1", "2"], **options)
    randomize(net, seed=2)
    want = outputs(m)
    net.save(tmp_path / "k.safetensors")
    net.remove()
    to_peft(tmp_path / "k.safetensors", tmp_path / "peft", base=m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(model(), tmp_path / "peft").eval()
    for got, w in zip(outputs(peft_model.base_model.model), want):
        assert rel(got, w) <= 1e-5
    back = from_peft(tmp_path / "peft").tensors
    original = load_file(tmp_path / "k.safetensors")
    assert set(back) == set(original)
    if algo != "ia3":  # (IA)³: PEFT holds 1 + l, one rounding
        assert all(torch.equal(bits(back[k]), bits(original[k])) for k in original)


def test_a_peft_file_written_by_peft_loads_in_ours_with_the_same_output(tmp_path):
    from peft import LoraConfig, get_peft_model

    m = model()
    peft_model = get_peft_model(copy.deepcopy(m), LoraConfig(r=4, lora_alpha=8, target_modules=["0", "1"], rank_pattern={"1": 2}, init_lora_weights=False))
    with torch.no_grad():
        want = outputs(peft_model.base_model.model)
    peft_model.save_pretrained(tmp_path / "peft")
    result = from_peft(tmp_path / "peft")
    assert sorted(r.name for r in result.rows) == ["lycoris_0", "lycoris_1"]
    ours = copy.deepcopy(m)
    load_network(ours, _write(tmp_path / "k.safetensors", result))
    for got, w in zip(outputs(ours), want):
        assert rel(got, w) <= 1e-5


def test_peft_refusals(tmp_path):
    m = model()
    path = save_net(m, tmp_path / "lokr.safetensors", algo="lokr", dim=2)
    with pytest.raises(IncompatibleFileError, match="LoKr is not converted"):
        to_peft(path, tmp_path / "p", base=m)
    with pytest.raises(ConfigError, match="give the base model"):
        to_peft(save_net(m, tmp_path / "l.safetensors"), tmp_path / "p", base=None)
    assert not (tmp_path / "p").exists()


def test_to_diff_of_a_weight_free_file_needs_no_base_and_loha_convs_do(tmp_path):
    m = model()
    lora = save_net(m, tmp_path / "l.safetensors", dim=2)
    result = to_diff(lora)
    for p, (dw, _) in deltas(m, [(lora, 1.0)]).items():
        assert torch.equal(result.tensors[f"lycoris_{p}.diff"], dw.float())
    loha = save_net(m, tmp_path / "h.safetensors", algo="loha", dim=2)
    with pytest.raises(IncompatibleFileError, match="shape is not certain"):
        to_diff(loha)
    assert to_diff(loha, base=m).tensors["lycoris_1.diff"].shape == (20, 12, 3, 3)


# ----------------------------------------------------------------------------- inspect


def test_inspect_reports_each_module_and_the_metadata(tmp_path):
    m = model()
    net = create_network(m, dim=4, alpha=2, targets=["0", "1"], overrides={"1": {"algo": "ia3"}})
    randomize(net, seed=1)
    net.save(tmp_path / "f.safetensors", metadata={"modelspec.author": "me"})
    want = {p: float(a.delta_weight().detach().double().norm()) for p, a in net.adapters.items()}
    info = inspect_file(tmp_path / "f.safetensors")
    rows = {i.name: i for i in info.modules}
    assert info.metadata["modelspec.author"] == "me" and info.params == sum(load_file(tmp_path / "f.safetensors")[k].numel() for k in ("lycoris_0.lora_down.weight", "lycoris_0.lora_up.weight", "lycoris_1.weight"))
    lora = rows["lycoris_0"]
    assert (lora.algo, lora.shape, lora.rank, lora.alpha, lora.scale, lora.dtype) == ("lora", [80, 48], 4, 2.0, 0.5, "float32")
    assert lora.delta_norm == pytest.approx(want["0"], rel=1e-6)
    assert rows["lycoris_1"].delta_norm is None and "--base" in rows["lycoris_1"].note  # (IA)³ needs W
    with_base = {i.name: i for i in inspect_file(tmp_path / "f.safetensors", base=m).modules}
    assert with_base["lycoris_1"].delta_norm == pytest.approx(want["1"], rel=1e-6)
    assert "lycoris_0" in info.table() and "modelspec.author" in json.dumps(info.as_dict())


def test_bad_files_are_refused_with_typed_errors(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CorruptFileError):
        inspect_file(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        combine([tmp_path / "missing.safetensors"])
    with pytest.raises(ConfigError):
        RankRule(energy=1.5)
    with pytest.raises(ConfigError):
        RankRule()
