"""`--network_module lycoris_like.kohya`: the calls sd-scripts' train_network.py makes, in its order,
on a small diffusers UNet and CLIP text encoder(s) from configs (SD1.x: one encoder, SDXL: two).

Each case trains a few steps the way train_network.py does, saves with sd-scripts' metadata, and
then checks the file against independent readers — our `load_network`, lycoris-lora 4.1.3's kohya
module and diffusers' kohya LoRA loader — and the network's own sd-scripts paths
(`create_network_from_weights` + `load_weights`, `merge_to`, gen_img's pre-calculation), each
against the trained network's unmerged forward.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from lycoris_like import ConfigError, IncompatibleFileError, load_network

from conftest import SMALL_CLIP, bits, make_clip, make_unet

pytestmark = pytest.mark.usefixtures("one_thread")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)

SDXL_UNET = dict(cross_attention_dim=2 * SMALL_CLIP["hidden_size"], addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + SMALL_CLIP["projection_dim"], use_linear_projection=True)
# The kohya metadata train_network.py passes to save_weights (a few of its keys).
KOHYA_METADATA = {"ss_network_module": "lycoris_like.kohya", "ss_network_dim": "4", "ss_network_alpha": "2.0",
                  "ss_output_name": "style", "ss_training_comment": "test"}
# name → (SDXL?, network_args as typed on the command line, how many steps)
CASES = {
    "lora-conv": (False, ["algo=lora", "conv_dim=4", "conv_alpha=2"]),
    "locon-tucker-dropouts": (False, ["algo=locon", "conv_dim=4", "use_tucker=True", "dropout=0.1", "rank_dropout=0.1", "module_dropout=0.1"]),
    "loha": (False, ["algo=loha", "conv_dim=4", "conv_alpha=1"]),
    "kron-factor": (False, ["algo=kron", "factor=4", "conv_dim=4"]),
    "dora": (False, ["algo=lora", "dora_wd=true", "wd_on_output=false"]),
    "ia3": (False, ["algo=ia3"]),
    "full": (False, ["algo=diff"]),
    "svdiff": (False, ["algo=svdiff"]),
    "sara": (False, ["algo=sara", "threshold=0.02"]),
    "sdxl-lora": (True, ["algo=lora", "conv_dim=2"]),
    "sdxl-loha": (True, ["algo=loha"]),
}
LYCORIS_READS = {"lora-conv", "locon-tucker-dropouts", "loha", "kron-factor", "sdxl-lora", "sdxl-loha"}
DIFFUSERS_READS = {"lora-conv", "sdxl-lora"}
STEPS, LR = 3, 1e-2


@dataclass
class Pipe:
    """Text encoder(s) and UNet of one pipeline, called as sd-scripts' SD1 / SDXL trainers do."""

    text_encoders: list[nn.Module]
    unet: nn.Module

    @property
    def text_encoder(self):  # what sd-scripts passes around: one model, or a list for SDXL
        return self.text_encoders if len(self.text_encoders) > 1 else self.text_encoders[0]

    def encode(self, tokens: torch.Tensor):
        outputs = [te(tokens) for te in self.text_encoders]
        context = torch.cat([o.last_hidden_state for o in outputs], dim=-1)
        return context, getattr(outputs[-1], "text_embeds", None)

    def denoise(self, latents, timesteps, context, pooled=None) -> torch.Tensor:
        if pooled is None:
            return self.unet(latents, timesteps, context).sample
        time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]).expand(len(latents), 6)
        return self.unet(latents, timesteps, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample

    def __call__(self, batch) -> torch.Tensor:
        latents, timesteps, tokens = batch
        return self.denoise(latents, timesteps, *self.encode(tokens))

    def copy(self) -> Pipe:
        return copy.deepcopy(self)


def make_pipe(sdxl: bool) -> Pipe:
    if sdxl:
        return Pipe([make_clip(0), make_clip(1, projection=True)], make_unet(**SDXL_UNET))
    return Pipe([make_clip(0)], make_unet())


def batch(seed: int, size: int = 2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(size, 4, 8, 8, generator=g), torch.randint(0, 1000, (size,), generator=g),
            torch.randint(3, SMALL_CLIP["vocab_size"], (size, 9), generator=g))


def network_kwargs(args: list[str]) -> dict:
    """train_network.py: `key, value = net_arg.split("=", 1)`, then the LyCORIS dropout workaround."""
    kwargs = dict(arg.split("=", 1) for arg in args)
    kwargs.setdefault("dropout", None)  # net_kwargs["dropout"] = args.network_dropout (None by default)
    return kwargs


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@dataclass
class Trained:
    name: str
    sdxl: bool
    kwargs: dict
    base: Pipe                # untouched copies of the models before training
    pipe: Pipe                # the models the network trained on (network attached, eval mode)
    network: object
    file: Path                # saved with dtype float32
    half_file: Path           # saved with dtype float16
    expected: torch.Tensor    # the trained pipeline's unmerged output on `probe`
    untrained: torch.Tensor
    losses: list[float]


PROBE = batch(99)


def train(name: str, out: Path) -> Trained:
    """train_network.py's calls on the network, in its order."""
    sdxl, args = CASES[name]
    kohya = importlib.import_module("lycoris_like.kohya")  # importlib.import_module(args.network_module)
    pipe = make_pipe(sdxl)
    base = pipe.copy()
    kwargs = network_kwargs(args)
    network = kohya.create_network(1.0, 4, 2.0, nn.Identity(), pipe.text_encoder, pipe.unet, neuron_dropout=None, **kwargs)
    network.apply_to(pipe.text_encoder, pipe.unet, True, True)
    checkpointing = name == "lora-conv"
    if checkpointing:  # --gradient_checkpointing
        pipe.unet.enable_gradient_checkpointing()
        for te in pipe.text_encoders:
            te.gradient_checkpointing_enable()
        network.enable_gradient_checkpointing()
    if hasattr(network, "prepare_optimizer_params_with_multiple_te_lrs"):  # sd-scripts 0.10+
        params, descriptions = network.prepare_optimizer_params_with_multiple_te_lrs([LR], LR, LR)
        assert len(descriptions) == len(params)
    else:
        params = network.prepare_optimizer_params(LR, LR, LR)
    optimizer = torch.optim.AdamW(params, lr=LR)
    pipe.unet.requires_grad_(False)
    for te in pipe.text_encoders:
        te.requires_grad_(False)
    for model in [pipe.unet, *pipe.text_encoders]:
        model.train(checkpointing)  # sd-scripts: train() with gradient checkpointing, else eval()
    network.prepare_grad_etc(pipe.text_encoder, pipe.unet)
    network.on_epoch_start(pipe.text_encoder, pipe.unet)
    losses = []
    for step in range(STEPS):
        network.on_step_start(pipe.text_encoder, pipe.unet)
        latents, timesteps, tokens = batch(step, size=4)
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(100 + step))
        loss = F.mse_loss(pipe((latents + noise, timesteps, tokens)), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.get_trainable_params(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    network.eval()  # as for sd-scripts' validation: no dropout from here on
    for model in [pipe.unet, *pipe.text_encoders]:
        model.eval()
    with torch.no_grad():
        expected, untrained = pipe(PROBE), base(PROBE)
    file, half_file = out / f"{name}.safetensors", out / f"{name}-fp16.safetensors"
    network.save_weights(str(file), torch.float32, dict(KOHYA_METADATA))
    network.save_weights(str(half_file), torch.float16, dict(KOHYA_METADATA))
    return Trained(name, sdxl, kwargs, base, pipe, network, file, half_file, expected, untrained, losses)


@pytest.fixture(scope="module", params=sorted(CASES))
def trained(request, tmp_path_factory) -> Trained:
    return train(request.param, tmp_path_factory.mktemp(request.param))


def models_of(pipe: Pipe) -> dict[str, nn.Module]:
    names = ["lora_te"] if len(pipe.text_encoders) == 1 else ["lora_te1", "lora_te2"]
    return {**dict(zip(names, pipe.text_encoders)), "lora_unet": pipe.unet}


# ----------------------------------------------------------------------------- the trained file


def test_a_few_steps_change_the_output_of_text_encoders_and_unet(trained):
    assert rel_err(trained.expected, trained.untrained) > 1e-4
    base, pipe = trained.base, trained.pipe
    with torch.no_grad():
        for te, te_base in zip(pipe.text_encoders, base.text_encoders):
            assert rel_err(te(PROBE[2]).last_hidden_state, te_base(PROBE[2]).last_hidden_state) > 1e-5
        context, pooled = base.encode(PROBE[2])
        assert rel_err(pipe.denoise(*PROBE[:2], context, pooled), base.denoise(*PROBE[:2], context, pooled)) > 1e-5


def test_file_has_kohya_names_metadata_and_dtype(trained):
    with safe_open(str(trained.half_file), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    prefixes = {k.split(".")[0].split("_text_model_")[0] for k in keys if k.startswith("lora_te")}
    assert prefixes == ({"lora_te1", "lora_te2"} if trained.sdxl else {"lora_te"})
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.") for k in keys)
    assert all("_text_model_encoder_layers_" in k for k in keys if k.startswith("lora_te"))
    for key, value in KOHYA_METADATA.items():
        assert meta[key] == value  # sd-scripts' metadata is written as given
    assert meta["ss_base_model_version"] == ("sdxl_base_v1-0" if trained.sdxl else "sd_v1")
    assert {t.dtype for t in tensors.values() if t.is_floating_point() and t.dim() > 0} == {torch.float16}
    assert {t.dtype for k, t in tensors.items() if k.endswith(".alpha")} <= {torch.float32}  # scalars stay float32


def test_file_loads_in_lycoris_like_with_the_trained_output(trained):
    fresh = trained.base.copy()
    load_network(models_of(fresh), trained.file)
    with torch.no_grad():
        torch.testing.assert_close(fresh(PROBE), trained.expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("trained", sorted(LYCORIS_READS), indirect=True)
def test_file_loads_in_lycoris_lora_kohya_module(trained, lycoris_preset):
    """lycoris-lora 4.1.3's `lycoris.kohya` (what sd-scripts users pass today) on the UNet part: under
    transformers 5 its loader cannot find `lora_te_text_model_…` names in a CLIPTextModel."""
    from lycoris.kohya import create_network_from_weights

    fresh = trained.base.copy()
    theirs, weights = create_network_from_weights(1.0, str(trained.file), None, None, fresh.unet)
    theirs.apply_to(None, fresh.unet, False, True)
    result = theirs.load_state_dict(weights, False)
    assert not result.missing_keys
    assert len(theirs.unet_loras) == len(trained.network.unet_loras)
    context, pooled = trained.pipe.encode(PROBE[2])  # the trained text encoders' output
    with torch.no_grad():
        expected = trained.pipe.denoise(*PROBE[:2], context, pooled)
        assert rel_err(fresh.denoise(*PROBE[:2], context, pooled), expected) <= 1e-5


@pytest.mark.parametrize("trained", sorted(DIFFUSERS_READS), indirect=True)
def test_lora_file_loads_in_diffusers_with_the_trained_output(trained):
    """diffusers reads plain LoRA/LoCon (no lora_mid, no DoRA) through its kohya converter."""
    pytest.importorskip("peft")
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    loader = StableDiffusionXLLoraLoaderMixin if trained.sdxl else StableDiffusionLoraLoaderMixin
    fresh = trained.base.copy()
    state, alphas = loader.lora_state_dict(str(trained.file))
    loader.load_lora_into_unet(state, alphas, fresh.unet, adapter_name="kohya")
    for te, prefix in zip(fresh.text_encoders, ["text_encoder", "text_encoder_2"]):
        loader.load_lora_into_text_encoder(state, alphas, te, prefix=prefix, adapter_name="kohya")
    with torch.no_grad():
        assert rel_err(fresh(PROBE), trained.expected) <= 1e-5


# ----------------------------------------------------------------------------- sd-scripts' other paths


def test_dim_from_weights_then_load_weights_reproduces_the_trained_output(trained):
    """`--dim_from_weights --network_weights`: create_network_from_weights, apply_to, load_weights."""
    kohya = importlib.import_module("lycoris_like.kohya")
    fresh = trained.base.copy()
    network, weights = kohya.create_network_from_weights(1, str(trained.file), nn.Identity(), fresh.text_encoder, fresh.unet, **trained.kwargs)
    assert set(weights) == set(trained.network.network.file_state_dict())
    network.apply_to(fresh.text_encoder, fresh.unet, True, True)
    info = network.load_weights(str(trained.file))
    assert info["missing"] == [] and info["loaded"] == len(trained.network.network)
    assert network.get_trainable_params()  # it keeps training
    network.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(PROBE), trained.expected, rtol=1e-5, atol=1e-6)


def test_network_weights_load_into_a_freshly_created_network(trained):
    """`--network_weights` without `--dim_from_weights`: the same network_args, then load_weights."""
    kohya = importlib.import_module("lycoris_like.kohya")
    fresh = trained.base.copy()
    network = kohya.create_network(1.0, 4, 2.0, nn.Identity(), fresh.text_encoder, fresh.unet, **trained.kwargs)
    network.apply_to(fresh.text_encoder, fresh.unet, True, True)
    network.eval()
    with torch.no_grad():
        assert rel_err(fresh(PROBE), trained.untrained) <= 1e-5  # identity before loading
    network.load_weights(str(trained.file))
    with torch.no_grad():
        torch.testing.assert_close(fresh(PROBE), trained.expected, rtol=1e-5, atol=1e-6)


def test_merge_to_reproduces_the_unmerged_output(trained):
    """`--base_weights` / gen_img's merge: create_network_from_weights(for_inference=True) + merge_to."""
    kohya = importlib.import_module("lycoris_like.kohya")
    fresh = trained.base.copy()
    network, weights = kohya.create_network_from_weights(1.0, str(trained.file), None, fresh.text_encoder, fresh.unet, for_inference=True)
    assert network.is_mergeable()
    network.merge_to(fresh.text_encoder, fresh.unet, weights, torch.float32, "cpu")
    assert all("forward" not in m.__dict__ for model in [fresh.unet, *fresh.text_encoders] for m in model.modules())
    with torch.no_grad():
        assert rel_err(fresh(PROBE), trained.expected) <= 1e-5


def test_gen_img_apply_load_state_dict_and_pre_calculation(trained):
    """gen_img.py: apply_to(text_encoders, unet) + load_state_dict(weights_sd, False), then
    backup_weights / pre_calculation / restore_weights around each batch."""
    kohya = importlib.import_module("lycoris_like.kohya")
    fresh = trained.base.copy()
    weights_before = {k: v.clone() for k, v in fresh.unet.state_dict().items()}
    network, weights = kohya.create_network_from_weights(0.5, str(trained.file), None, fresh.text_encoder, fresh.unet, for_inference=True)
    network.apply_to(fresh.text_encoder, fresh.unet)
    network.load_state_dict(weights, False)
    network.to(torch.float32)
    network.backup_weights()
    network.set_multiplier(1.0)
    with torch.no_grad():
        torch.testing.assert_close(fresh(PROBE), trained.expected, rtol=1e-5, atol=1e-6)
        network.pre_calculation()
        assert any(not torch.equal(v, weights_before[k]) for k, v in fresh.unet.state_dict().items())
        assert rel_err(fresh(PROBE), trained.expected) <= 1e-5
        network.restore_weights()
    assert all(torch.equal(bits(v), bits(weights_before[k])) for k, v in fresh.unet.state_dict().items())


def test_accelerate_save_and_load_state_resume_the_training_state_exactly(trained, tmp_path):
    """--save_state / --resume: accelerate saves `network.state_dict()` and loads it into the network
    a new run builds with the same arguments."""
    kohya = importlib.import_module("lycoris_like.kohya")
    torch.save(trained.network.state_dict(), tmp_path / "state.pt")
    fresh = trained.base.copy()
    network = kohya.create_network(1.0, 4, 2.0, None, fresh.text_encoder, fresh.unet, **trained.kwargs)
    network.apply_to(fresh.text_encoder, fresh.unet, True, True)
    network.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    network.eval()
    for (name, p), q in zip(network.named_parameters(), trained.network.parameters()):
        assert torch.equal(bits(p), bits(q)), name
    with torch.no_grad():
        assert torch.equal(fresh(PROBE), trained.pipe(PROBE))


def test_unet_only_training_writes_no_text_encoder_keys(tmp_path):
    """--network_train_unet_only: apply_to(…, apply_text_encoder=False, apply_unet=True)."""
    kohya = importlib.import_module("lycoris_like.kohya")
    pipe = make_pipe(sdxl=True)
    network = kohya.create_network(1.0, 4, 1.0, None, pipe.text_encoder, pipe.unet, algo="loha")
    network.apply_to(pipe.text_encoder, pipe.unet, False, True)
    assert network.text_encoder_loras == [] and network.unet_loras
    params, descriptions = network.prepare_optimizer_params_with_multiple_te_lrs(None, None, 1e-4)
    assert descriptions == ["unet"]
    network.save_weights(str(tmp_path / "u.safetensors"), None, {})
    with safe_open(str(tmp_path / "u.safetensors"), "pt") as f:
        assert {k.split("_")[1] for k in f.keys()} == {"unet"}


# ----------------------------------------------------------------------------- layers and optimizer groups


@pytest.mark.parametrize("conv", [False, True])
def test_default_layers_are_those_of_sd_scripts_networks_lora(conv, lycoris_preset_for):
    """The reference: lycoris-lora's kohya module with sd-scripts' `networks/lora.py` target classes
    (Transformer2DModel; + ResnetBlock2D, Downsample2D, Upsample2D with conv_dim; CLIPAttention, CLIPMLP)."""
    from lycoris.kohya import create_network as lycoris_create

    kohya = importlib.import_module("lycoris_like.kohya")
    pipe = make_pipe(sdxl=True)
    theirs = lycoris_create(1.0, 4, 1, None, pipe.text_encoder, pipe.unet, algo="lora", preset=lycoris_preset_for(conv))
    expected = {lora.lora_name.replace("_text_model_", "_") for lora in theirs.unet_loras + theirs.text_encoder_loras}
    network = kohya.create_network(1.0, 4, 1.0, None, pipe.text_encoder, pipe.unet, **({"conv_dim": "4"} if conv else {}))
    network.apply_to(pipe.text_encoder, pipe.unet, True, True)
    ours = {k.split(".")[0].replace("_text_model_", "_") for k in network.network.file_state_dict()}  # lycoris drops text_model_ where transformers 5 has no such level
    assert ours == expected
    has_conv = any(a.host.kind == "conv2d" and a.host.weight.shape[-1] == 3 for a in network.unet_loras)
    assert has_conv == conv


def test_optimizer_groups_follow_sd_scripts_learning_rates_and_loraplus():
    kohya = importlib.import_module("lycoris_like.kohya")
    pipe = make_pipe(sdxl=True)
    network = kohya.create_network(1.0, 4, 1.0, None, pipe.text_encoder, pipe.unet, loraplus_unet_lr_ratio="16")
    network.apply_to(pipe.text_encoder, pipe.unet, True, True)
    # the reference: which model each parameter's host layer belongs to, from the models themselves
    owner = {}
    for index, model in enumerate([*pipe.text_encoders, pipe.unet]):
        hosts = {id(m) for m in model.modules()}
        for adapter in network.network:
            if id(adapter.host.module) in hosts:
                for name, p in adapter.named_parameters():
                    owner[id(p)] = (index, "lora_up" in name)
    groups = network.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert isinstance(groups, list)  # sd-scripts <= 0.8 hands the result straight to the optimizer
    rates = {owner[id(p)]: g["lr"] for g in groups for p in g["params"]}
    assert rates == {(0, False): 1e-5, (0, True): 1e-5, (1, False): 1e-5, (1, True): 1e-5, (2, False): 1e-4, (2, True): 1e-4 * 16}
    assert sum(len(g["params"]) for g in groups) == len(owner) == len(network.get_trainable_params())
    groups, names = network.prepare_optimizer_params_with_multiple_te_lrs([2e-5, 0.0], None, 1e-3)
    rates = {owner[id(p)]: g["lr"] for g in groups for p in g["params"]}
    assert rates == {(0, False): 2e-5, (0, True): 2e-5, (2, False): 1e-3, (2, True): 1e-3 * 16}  # lr 0: text encoder 2 not trained
    assert names == ["textencoder 1", "unet", "unet plus"]
    torch.optim.AdamW(groups)


# ----------------------------------------------------------------------------- bad network_args


@pytest.mark.parametrize("args, fragments", [
    (["algo=glora"], ["algo='glora'", "loha", "lokr"]),
    (["convdim=4"], ["convdim", "conv_dim"]),
    (["conv_dim=four"], ["conv_dim='four'", "integer"]),
    (["conv_dim=0"], ["conv_dim=0", "positive"]),
    (["use_tucker=maybe"], ["use_tucker='maybe'", "boolean"]),
    (["dropout=lots"], ["dropout='lots'", "number"]),
    (["algo=lora", "factor=8"], ["factor", "lokr", "algo=lora"]),
    (["algo=loha", "train_norm=True"], ["train_norm", "sara"]),
    (["algo=ia3", "dora_wd=true"], ["dora_wd", "lora", "algo=ia3"]),  # a LyCORIS spelling, named as typed
    (["algo=ia3", "convdim=4"], ["conv_dim", "train_on_input"]),  # the accepted list is ia3's
    (["block_dims=2,2,2"], ["block_dims", "overrides"]),
    (["preset=full-lin"], ["preset='full-lin'", "kohya", "attn-mlp"]),
    (["loraplus_lr_ratio=x"], ["loraplus_lr_ratio='x'", "number"]),
])
def test_bad_network_args_raise_config_errors_naming_the_argument(args, fragments):
    kohya = importlib.import_module("lycoris_like.kohya")
    pipe = make_pipe(sdxl=False)
    with pytest.raises(ConfigError) as info:
        kohya.create_network(1.0, 4, 1.0, None, pipe.text_encoder, pipe.unet, **network_kwargs(args))
    for fragment in fragments:
        assert fragment in str(info.value)


def test_network_dropout_and_a_disagreeing_dropout_arg_are_refused():
    kohya = importlib.import_module("lycoris_like.kohya")
    pipe = make_pipe(sdxl=False)
    with pytest.raises(ConfigError, match="network_dropout"):
        kohya.create_network(1.0, 4, 1.0, None, pipe.text_encoder, pipe.unet, neuron_dropout=0.1, dropout="0.2")
    network = kohya.create_network(1.0, 4, 1.0, None, pipe.text_encoder, pipe.unet, neuron_dropout=0.1, dropout=0.1)
    network.apply_to(pipe.text_encoder, pipe.unet, True, True)
    assert {a.dropout for a in network.network} == {0.1}


def test_create_network_from_weights_refuses_a_file_without_kohya_names(tmp_path):
    from lycoris_like import create_network as lycoris_like_network

    kohya = importlib.import_module("lycoris_like.kohya")
    plain = lycoris_like_network(nn.Sequential(nn.Linear(4, 4)), dim=2)  # names lycoris_0…
    plain.save(tmp_path / "plain.safetensors")
    pipe = make_pipe(sdxl=False)
    with pytest.raises(IncompatibleFileError, match="lora_te_.*lora_unet_"):
        kohya.create_network_from_weights(1.0, str(tmp_path / "plain.safetensors"), None, pipe.text_encoder, pipe.unet)


def test_load_weights_refuses_a_file_of_another_algorithm_without_changing_anything(tmp_path):
    kohya = importlib.import_module("lycoris_like.kohya")
    pipe = make_pipe(sdxl=False)
    other = kohya.create_network(1.0, 4, 1.0, None, pipe.text_encoder, pipe.unet, algo="loha")
    fresh = pipe.copy()
    other.apply_to(pipe.text_encoder, pipe.unet, True, True)
    other.save_weights(str(tmp_path / "loha.safetensors"), None, None)
    network = kohya.create_network(1.0, 4, 1.0, None, fresh.text_encoder, fresh.unet, algo="lora")
    network.apply_to(fresh.text_encoder, fresh.unet, True, True)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    with pytest.raises(IncompatibleFileError, match="loha"):
        network.load_weights(str(tmp_path / "loha.safetensors"))
    assert all(torch.equal(v, before[k]) for k, v in network.state_dict().items())
    assert all(len(m.__dict__["forward"].adapters) == 1 for m in fresh.unet.modules() if "forward" in m.__dict__)


# ----------------------------------------------------------------------------- lycoris-lora reference setup


@pytest.fixture
def lycoris_preset_for(tmp_path):
    """sd-scripts' networks/lora.py targets as a lycoris-lora preset, with or without convolutions,
    applied to its kohya module (which keeps presets in class attributes; its default, "full",
    asserts on a duplicated name with diffusers 0.42). Returns the preset file."""
    pytest.importorskip("lycoris")
    from lycoris.kohya import LycorisNetworkKohya
    from lycoris.utils.preset import read_preset

    def apply(conv: bool) -> str:
        classes = ["Transformer2DModel"] + (["ResnetBlock2D", "Downsample2D", "Upsample2D"] if conv else [])
        path = tmp_path / "kohya.toml"
        path.write_text(f"enable_conv = {json.dumps(conv)}\nunet_target_module = {json.dumps(classes)}\nunet_target_name = []\n"
                        'text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]\ntext_encoder_target_name = []\n')
        LycorisNetworkKohya.apply_preset(read_preset(str(path)))
        return str(path)
    return apply


@pytest.fixture
def lycoris_preset(lycoris_preset_for) -> str:
    return lycoris_preset_for(True)
