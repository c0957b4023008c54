"""Files: key grammar and shapes (FORMATS.md), metadata, exact round trips, and bad files."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lycoris_like.formats.container as container
from lycoris_like import (
    ConfigError,
    CorruptFileError,
    IncompatibleFileError,
    OverlapError,
    ShapeMismatchError,
    create_network,
    load_network,
)

from conftest import bits, clip_inputs, make_clip, make_host, make_unet, randomize, unet_inputs

DATA = Path(__file__).parent / "data"


def pipeline():
    return {"lora_unet": make_unet(), "lora_te": make_clip()}


def outputs(models) -> list[torch.Tensor]:
    with torch.no_grad():
        return [models["lora_unet"](*unet_inputs()).sample, models["lora_te"](clip_inputs()).last_hidden_state]


def weights_bits(models) -> dict[str, torch.Tensor]:
    return {f"{k}.{n}": bits(v).clone() for k, m in models.items() for n, v in m.state_dict().items()}


def untouched(models, before) -> bool:
    hooked = any("forward" in mod.__dict__ for m in models.values() for mod in m.modules())
    return not hooked and all(torch.equal(bits(v), before[k]) for k, v in weights_bits(models).items())


def test_key_names_match_the_golden_list():
    net = create_network(pipeline(), dim=2, preset="full")
    golden = (DATA / "golden_keys_small_unet_clip.txt").read_text().split()
    assert sorted(net.file_state_dict()) == golden
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in golden
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in golden


def test_key_shapes_follow_formats_md():
    model = nn.Sequential(nn.Linear(48, 80), nn.Conv2d(12, 20, 3), nn.Conv2d(12, 20, 1))
    sd = create_network(model, dim=4, alpha=2, use_tucker=True).file_state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes == {
        "lycoris_0.lora_down.weight": (4, 48), "lycoris_0.lora_up.weight": (80, 4), "lycoris_0.alpha": (),
        "lycoris_1.lora_down.weight": (4, 12, 1, 1), "lycoris_1.lora_mid.weight": (4, 4, 3, 3),
        "lycoris_1.lora_up.weight": (20, 4, 1, 1), "lycoris_1.alpha": (),
        "lycoris_2.lora_down.weight": (4, 12, 1, 1), "lycoris_2.lora_up.weight": (20, 4, 1, 1), "lycoris_2.alpha": (),
    }
    assert all(sd[k].dtype == torch.float32 for k in sd if k.endswith("alpha"))
    plain = create_network(nn.Sequential(nn.Conv2d(12, 20, 3)), dim=4).file_state_dict()
    assert tuple(plain["lycoris_0.lora_down.weight"].shape) == (4, 12, 3, 3)


def test_rs_lora_and_scalar_are_stored_so_any_reader_gets_the_scale():
    model = nn.Sequential(nn.Linear(6, 5))
    net = create_network(model, dim=9, alpha=2, rs_lora=True, use_scalar=True)
    randomize(net, seed=1)
    sd = net.file_state_dict()
    assert sd["lycoris_0.alpha"].item() == pytest.approx(2 * 3)
    adapter = net.adapters["0"]
    expected = sd["lycoris_0.lora_up.weight"] @ sd["lycoris_0.lora_down.weight"] * (sd["lycoris_0.alpha"].item() / 9)
    torch.testing.assert_close(adapter.delta_weight(), expected)
    torch.testing.assert_close(sd["lycoris_0.lora_up.weight"], adapter.lora_up.weight * adapter.scalar)


def test_metadata(tmp_path):
    models = pipeline()
    net = create_network(models, dim=4, alpha=2, preset="attn-mlp", use_tucker=True)
    path = net.save(tmp_path / "style.safetensors", metadata={"modelspec.author": "me"})
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
                "ss_v2", "ss_output_name", "sshs_model_hash", "modelspec.sai_model_spec", "modelspec.architecture",
                "modelspec.implementation", "modelspec.title"):
        assert key in meta, key
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0" and meta["ss_output_name"] == "style"
    assert json.loads(meta["ss_network_args"])["algo"] == "lora"
    assert json.loads(meta["lycoris_like.config"])["preset"] == "attn-mlp"
    assert meta["modelspec.author"] == "me"
    blob = path.read_bytes()
    header = struct.unpack("<Q", blob[:8])[0]
    assert meta["sshs_model_hash"] == hashlib.sha256(blob[8 + header:]).hexdigest()
    sdxl = create_network({"lora_te1": make_clip(), "lora_te2": make_clip(projection=True)}, dim=2)
    with safe_open(str(sdxl.save(tmp_path / "xl.safetensors")), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
        assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha" in f.keys()
    with pytest.raises(ConfigError):
        net.save(tmp_path / "bad.safetensors", metadata={"x": 1})
    with pytest.raises(ConfigError):
        net.save(tmp_path / "bad.safetensors", dtype=torch.int8)


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16])
def test_save_load_round_trip_is_bit_exact(tmp_path, dtype):
    models = pipeline()
    net = create_network(models, dim=4, alpha=2, conv_dim=3, conv_alpha=1, use_tucker=True)
    randomize(net, seed=2)
    if dtype is not None:  # what a reloaded low-precision file holds is the rounded parameters
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(p.to(dtype).float())
    path = net.save(tmp_path / "a.safetensors", dtype=dtype)
    expected = outputs(models)
    written = net.file_state_dict(dtype=dtype)
    net.remove()
    fresh = pipeline()
    loaded = load_network(fresh, path)
    assert loaded.load_report.complete
    for (k, a), (_, b) in zip(sorted(written.items()), sorted(loaded.file_state_dict(dtype=dtype).items())):
        assert torch.equal(bits(a), bits(b)), k
    for a, b in zip(expected, outputs(fresh)):
        assert torch.equal(a, b)


def test_lone_model_prefix_detection_and_renaming(tmp_path):
    model, x = make_host("conv2d-k3")
    net = create_network(model, dim=2)
    randomize(net, seed=3)
    expected = model(x)
    path = net.save(tmp_path / "a.safetensors", prefix="lora_unet")
    assert all(k.startswith("lora_unet_0.") for k in load_file(path))
    net.remove()
    loaded = load_network(model, path)
    assert torch.equal(model(x), expected)
    loaded.remove()
    with pytest.raises(ConfigError):
        create_network(pipeline(), dim=2).save(tmp_path / "b.safetensors", prefix="lora_unet")


def test_text_encoder_files_load_with_either_spelling(tmp_path):
    clip = make_clip()
    net = create_network(clip, dim=2)
    randomize(net, seed=4)
    expected = clip(clip_inputs()).last_hidden_state
    sd = net.file_state_dict()
    net.remove()
    flattened = {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in sd.items()}
    assert all(k.startswith("lora_te_encoder_layers_") for k in flattened)
    save_file(flattened, tmp_path / "flat.safetensors")
    loaded = load_network(clip, tmp_path / "flat.safetensors")
    assert torch.equal(clip(clip_inputs()).last_hidden_state, expected)
    assert all("text_model_" in k for k in loaded.file_state_dict())


def _valid_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    net = create_network(pipeline(), dim=2, alpha=1, preset="attn-only")
    randomize(net, seed=5)
    path = net.save(tmp_path / "good.safetensors")
    net.remove()
    return path, load_file(path)


def _rewrite(tmp_path: Path, sd: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "bad.safetensors"
    save_file(sd, path)
    return path


Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def _bytes_case(mutate):
    def make(tmp_path):
        path, _ = _valid_file(tmp_path)
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(mutate(path.read_bytes()))
        return bad
    return make


def _sd_case(mutate):
    def make(tmp_path):
        _, sd = _valid_file(tmp_path)
        mutate(sd)
        return _rewrite(tmp_path, sd)
    return make


BAD_FILES = {
    "truncated": (_bytes_case(lambda b: b[:-100]), CorruptFileError, None),
    "garbage": (_bytes_case(lambda b: b"\x13" * 64), CorruptFileError, None),
    "huge-header": (_bytes_case(lambda b: struct.pack("<Q", 2**40) + b[8:]), CorruptFileError, None),
    "bad-json": (_bytes_case(lambda b: b[:8] + b"[" + b[9:]), CorruptFileError, None),
    "nan": (_sd_case(lambda sd: sd[f"{Q}.lora_up.weight"].__setitem__((0, 0), math.nan)), CorruptFileError, f"{Q}.lora_up.weight"),
    "int8": (_sd_case(lambda sd: sd.__setitem__(f"{Q}.lora_up.weight", sd[f"{Q}.lora_up.weight"].to(torch.int8))), CorruptFileError, f"{Q}.lora_up.weight"),
    "shape": (_sd_case(lambda sd: sd.__setitem__(f"{Q}.lora_down.weight", torch.zeros(2, 33))), ShapeMismatchError, f"{Q}.lora_down.weight"),
    "rank-mismatch": (_sd_case(lambda sd: sd.__setitem__(f"{Q}.lora_up.weight", torch.zeros(32, 3))), ShapeMismatchError, f"{Q}.lora_up.weight"),
    "unknown-suffix": (_sd_case(lambda sd: sd.__setitem__(f"{Q}.lora_foo.weight", torch.zeros(1))), IncompatibleFileError, f"{Q}.lora_foo.weight"),
    "no-module": (_sd_case(lambda sd: sd.__setitem__("lora_unet_nowhere.lora_up.weight", torch.zeros(1))), IncompatibleFileError, "lora_unet_nowhere.lora_up.weight"),
    "no-dot": (_sd_case(lambda sd: sd.__setitem__("stray", torch.zeros(1))), IncompatibleFileError, "stray"),
    "alpha-zero": (_sd_case(lambda sd: sd.__setitem__(f"{Q}.alpha", torch.tensor(0.0))), IncompatibleFileError, f"{Q}.alpha"),
    "alpha-vector": (_sd_case(lambda sd: sd.__setitem__(f"{Q}.alpha", torch.ones(2))), IncompatibleFileError, f"{Q}.alpha"),
    "missing-up": (_sd_case(lambda sd: sd.pop(f"{Q}.lora_up.weight")), IncompatibleFileError, f"{Q}.lora_up.weight"),
    "norm-layer": (_sd_case(lambda sd: sd.__setitem__("lora_unet_conv_norm_out.lora_up.weight", torch.zeros(1))), IncompatibleFileError, "lora_unet_conv_norm_out"),
    "empty": (lambda tmp_path: _rewrite(tmp_path, {}), IncompatibleFileError, None),
    "lora-on-a-norm": (_sd_case(lambda sd: sd.update({"lora_unet_conv_norm_out.lora_up.weight": torch.zeros(32, 2),
                                                      "lora_unet_conv_norm_out.lora_down.weight": torch.zeros(2, 32)})),
                       IncompatibleFileError, "lora_unet_conv_norm_out"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_raise_typed_errors_and_leave_the_model_untouched(tmp_path, case):
    make, error, key = BAD_FILES[case]
    path = make(tmp_path)
    models = pipeline()
    before = weights_bits(models)
    with pytest.raises(error) as info:
        load_network(models, path)
    if key is not None:
        assert key in str(info.value)
    assert untouched(models, before)


def test_non_strict_load_uses_what_fits_and_reports_the_rest(tmp_path):
    _, sd = _valid_file(tmp_path)
    sd[f"{Q}.lora_down.weight"] = torch.zeros(2, 33)
    sd["lora_unet_nowhere.alpha"] = torch.tensor(1.0)
    path = _rewrite(tmp_path, sd)
    models = pipeline()
    with pytest.warns(UserWarning, match="partial load"):
        net = load_network(models, path, strict=False)
    report = net.load_report
    assert report.unmatched_keys == ["lora_unet_nowhere.alpha"]
    assert list(report.rejected) == [Q] and "expected shape" in report.rejected[Q]
    assert len(net) == 32 + 8 - 1


def test_a_lone_model_with_a_pipeline_file_is_strict_about_the_other_keys(tmp_path):
    path, _ = _valid_file(tmp_path)
    unet = make_unet()
    with pytest.raises(IncompatibleFileError, match="lora_te_text_model"):
        load_network(unet, path)
    with pytest.warns(UserWarning):
        net = load_network(unet, path, strict=False)
    assert len(net) == 32


def test_loading_twice_stacks_unless_refused(tmp_path):
    path, _ = _valid_file(tmp_path)
    models = pipeline()
    base = outputs(models)
    a = load_network(models, path, multiplier=0.5)
    b = load_network(models, path, multiplier=0.5)
    c = load_network(pipeline(), path)
    with pytest.raises(OverlapError):
        load_network(models, path, stack=False)
    for x, y in zip(outputs(models), outputs(c.models)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    a.remove()
    b.remove()
    assert all(torch.equal(x, y) for x, y in zip(outputs(models), base))


def test_interrupted_save_leaves_the_existing_file_intact(tmp_path, monkeypatch):
    model, _ = make_host("linear")
    net = create_network(model, dim=2)
    path = net.save(tmp_path / "keep.safetensors")
    before = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(container, "save_file", broken_save)
    randomize(net, seed=6)
    with pytest.raises(OSError, match="disk full"):
        net.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors"]
    with pytest.raises(FileNotFoundError):
        load_network(model, tmp_path / "missing.safetensors")
