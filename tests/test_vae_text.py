"""Parity of the Flax KL autoencoder and CLIP text encoders with their PyTorch originals, and converter errors.

* VAE: a tiny random diffusers ``AutoencoderKL`` (3 levels, 2 ResNets per level, GroupNorm 8, affine params
  perturbed), converted from its saved folder and from an LDM-named ``.ckpt`` (names checked against diffusers' own
  single-file converter). encode = posterior mean x scaling factor; decode = ``vae.decode(z / scaling)``.
  Tolerance: max abs error <= 1e-4 x max |reference| (measured about 1e-6).
* HF CLIP text: tiny random transformers ``CLIPTextModel`` (quick_gelu and gelu), ``last_hidden_state`` and the
  ``clip_skip``-style output (final LayerNorm after the second-to-last layer). Tolerance 1e-5 relative
  (measured about 5e-7).
* OpenCLIP text tower: VideoCrafter's "penultimate" and the full forward against the stored outputs of the
  original open_clip module (``tests/fixtures/openclip_text_tiny``). Tolerance 1e-5 relative (measured about 7e-7).
"""

import re
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from convert.readers import CheckpointError
from convert.text import (convert_hf_clip_text, convert_openclip_text, load_hf_text_encoder, load_openclip_text,
                          text_config_from_hf)
from convert.vae import convert_diffusers_vae, load_diffusers_vae, load_ldm_vae, vae_config_from_diffusers
from jaxlongvid.models import text, vae
from jaxlongvid.models.text import TextConfig
from jaxlongvid.models.vae import VAEConfig

FIXTURE = Path(__file__).parent / "fixtures" / "openclip_text_tiny"
VAE_TOL = 1e-4
TEXT_TOL = 1e-5


def rel_err(got, want) -> float:
    want = np.asarray(want)
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def assert_same_tree(a, b):
    fa, fb = flatten_dict(a), flatten_dict(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


def _perturb_1d_params(model, scale=0.1):
    """Norm weights/biases are 1/0 at init; move them (and all biases) so a wrong mapping shows."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(scale * torch.randn_like(p))


# ---- VAE -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torch_vae():
    torch.manual_seed(0)
    model = TorchAutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64),
                               down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                               layers_per_block=2, norm_num_groups=8).eval()
    _perturb_1d_params(model)
    return model


@pytest.fixture(scope="module")
def vae_folder(torch_vae, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    torch_vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vae_state(torch_vae):
    return {k: v.numpy() for k, v in torch_vae.state_dict().items()}


def test_vae_encode_decode_match_diffusers(torch_vae, vae_folder):
    config, params = load_diffusers_vae(str(vae_folder))
    assert config == VAEConfig(block_out_channels=(32, 32, 64), layers_per_block=2, norm_num_groups=8)
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 16, 24, generator=gen) * 2 - 1
    latents = torch.randn(3, 4, 4, 6, generator=gen)
    with torch.no_grad():
        want_latents = torch_vae.encode(images).latent_dist.mean * config.scaling_factor
        want_images = torch_vae.decode(latents / config.scaling_factor).sample
    got_latents = vae.encode(params, config, images.numpy().transpose(0, 2, 3, 1))
    got_images = vae.decode(params, config, latents.numpy().transpose(0, 2, 3, 1), chunk=2)  # 2 + remainder 1
    err_enc = rel_err(got_latents, want_latents.numpy().transpose(0, 2, 3, 1))
    err_dec = rel_err(got_images, want_images.numpy().transpose(0, 2, 3, 1))
    print(f"VAE max rel err: encode {err_enc:.2e}, decode {err_dec:.2e}")
    assert err_enc < VAE_TOL and err_dec < VAE_TOL


def test_vae_decode_chunks_and_leading_dims():
    torch.manual_seed(0)  # random weights from a small torch model (jitting Flax's random init compiles slowly)
    small = TorchAutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                               up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4)
    config = vae_config_from_diffusers(dict(small.config))
    params = convert_diffusers_vae({k: v.numpy() for k, v in small.state_dict().items()}, config)
    z = np.random.default_rng(0).standard_normal((2, 3, 2, 3, 4)).astype(np.float32)  # [B, F, h, w, C]
    chunked = vae.decode(params, config, z, chunk=4)  # 6 frames: two chunks of 4, the last padded
    whole = vae.decode(params, config, z.reshape(6, 2, 3, 4), chunk=0)
    assert chunked.shape == (2, 3, 4, 6, 3)
    np.testing.assert_allclose(np.asarray(chunked).reshape(whole.shape), whole, rtol=1e-5, atol=1e-6)
    assert vae.encode(params, config, chunked, chunk=4).shape == z.shape


def _diffusers_to_ldm(key: str, num_levels: int) -> str:
    """Test-side CompVis names (checked below against diffusers' own LDM converter)."""
    rules = [
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"encoder.down.{m[1]}.block.{m[2]}."),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"encoder.down.{m[1]}.downsample."),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
         lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}."),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.upsample."),
        (r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}."),
        (r"mid_block\.attentions\.0\.group_norm\.", lambda m: "mid.attn_1.norm."),
        (r"mid_block\.attentions\.0\.to_(q|k|v)\.", lambda m: f"mid.attn_1.{m[1]}."),
        (r"mid_block\.attentions\.0\.to_out\.0\.", lambda m: "mid.attn_1.proj_out."),
        (r"conv_shortcut", lambda m: "nin_shortcut"),
        (r"conv_norm_out", lambda m: "norm_out"),
    ]
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def test_ldm_checkpoint_converts_like_diffusers_folder(torch_vae, vae_state, tmp_path):
    config = vae_config_from_diffusers(dict(torch_vae.config))
    ldm = {}
    for key, value in torch_vae.state_dict().items():
        new = _diffusers_to_ldm(key, len(config.block_out_channels))
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", new):
            value = value[:, :, None, None]  # LDM uses 1x1 convs there
        ldm["first_stage_model." + new] = value.clone()
    assert len(ldm) == len(vae_state)
    # the test-side names are real LDM names: diffusers' single-file converter maps them back exactly
    back = convert_ldm_vae_checkpoint(dict(ldm), dict(torch_vae.config))
    assert back.keys() == vae_state.keys()
    for k, v in back.items():
        np.testing.assert_array_equal(v.numpy(), vae_state[k], err_msg=k)

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {**ldm, "model.diffusion_model.other.weight": torch.zeros(2)}}, ckpt)
    got_config, got = load_ldm_vae(str(ckpt), config)
    assert got_config == config
    assert_same_tree(got, convert_diffusers_vae(vae_state, config))


def test_vae_deprecated_attention_names(vae_state):
    config = VAEConfig(block_out_channels=(32, 32, 64), layers_per_block=2, norm_num_groups=8)
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {re.sub(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f"attentions.0.{old_names[m[1]]}.",
                      k): v for k, v in vae_state.items()}
    assert any(".query." in k for k in renamed)
    assert_same_tree(convert_diffusers_vae(renamed, config), convert_diffusers_vae(vae_state, config))


def test_vae_converter_reports_every_problem_at_once(vae_state):
    config = VAEConfig(block_out_channels=(32, 32, 64), layers_per_block=2, norm_num_groups=8)
    bad = dict(vae_state)
    del bad["decoder.conv_out.bias"]
    bad["encoder.conv_in.weight"] = np.zeros((16, 3, 3, 3), np.float32)
    bad["encoder.extra_layer.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError) as info:
        convert_diffusers_vae(bad, config)
    msg = str(info.value)
    assert "1 missing: decoder/conv_out/bias" in msg
    assert "1 unexpected: encoder.extra_layer.weight" in msg
    assert "encoder/conv_in/kernel: got (3, 3, 3, 16), expected (3, 3, 3, 32)" in msg
    with pytest.raises(CheckpointError, match="no keys start with 'first_stage_model.'"):
        load_ldm_vae(vae_state, config)
    with pytest.raises(CheckpointError, match="down_block_types"):
        vae_config_from_diffusers({"block_out_channels": [32], "down_block_types": ["AttnDownEncoderBlock2D"]})


def test_vae_config_presets_and_json():
    sd = VAEConfig.sd14()
    assert VAEConfig.from_dict(sd.to_dict()) == sd and hash(sd) == hash(VAEConfig.from_dict(sd.to_dict()))
    assert sd.scaling_factor == 0.18215 and sd.downsample_factor == 8
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(vae.param_shapes(sd)))
    assert n == 83_653_863  # the SD 1.x VAE's parameter count
    with pytest.raises(ValueError, match="norm_num_groups"):
        VAEConfig(block_out_channels=(48,), norm_num_groups=32)


# ---- HF CLIP text encoder ------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_hf_clip_text_matches_transformers(activation, tmp_path):
    torch.manual_seed(0)
    hf_config = CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                               num_attention_heads=4, max_position_embeddings=20, hidden_act=activation,
                               bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = CLIPTextModel(hf_config).eval()
    _perturb_1d_params(model)
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 99, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        want_skip = model.final_layer_norm(out.hidden_states[-2])

    config, params = load_hf_text_encoder(str(tmp_path))
    assert config == TextConfig(vocab_size=99, context_length=20, width=32, num_layers=3, num_heads=4, mlp_dim=37,
                                activation=activation)
    err = rel_err(text.encode(params, config, ids.numpy()), out.last_hidden_state.numpy())
    skip_config, skip_params = load_hf_text_encoder(str(tmp_path), skip_last_layers=1)
    assert "layers_2" not in skip_params
    err_skip = rel_err(text.encode(skip_params, skip_config, ids.numpy()), want_skip.numpy())
    print(f"CLIP text ({activation}) max rel err: last {err:.2e}, skip-1 {err_skip:.2e}")
    assert err < TEXT_TOL and err_skip < TEXT_TOL

    # files written by transformers < 5 carry a "text_model." prefix and the position_ids buffer
    legacy = {"text_model." + k: v.numpy() for k, v in model.state_dict().items()}
    legacy["text_model.embeddings.position_ids"] = np.arange(20)[None]
    assert_same_tree(convert_hf_clip_text(legacy, config), params)


# ---- OpenCLIP text tower (VideoCrafter) ----------------------------------------------------------------------
def _openclip_fixture_state() -> dict[str, np.ndarray]:
    """The fixture's state dict with the full [49408, 32] token table rebuilt (rows the prompts never use are 0)."""
    state = load_file(FIXTURE / "model_slim.safetensors")
    key = "cond_stage_model.model.token_embedding.weight"
    rows, row_ids = state.pop(key + ".rows"), state.pop(key + ".row_ids")
    table = np.zeros((49408, rows.shape[1]), np.float32)
    table[row_ids] = rows
    state[key] = table
    return state


def _openclip_tiny_config(skip_last_layers: int) -> TextConfig:
    return TextConfig(vocab_size=49408, context_length=77, width=32, num_layers=3, num_heads=2, mlp_dim=128,
                      activation="gelu", skip_last_layers=skip_last_layers)


@pytest.mark.parametrize("skip, output", [(1, "out_penultimate"), (0, "out_last")])
def test_openclip_text_tower_matches_fixture(skip, output, tmp_path):
    io = np.load(FIXTURE / "io.npz")
    ckpt = tmp_path / "model.ckpt"  # VideoCrafter's format: {"state_dict": {prefixed keys}}
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in _openclip_fixture_state().items()}}, ckpt)
    config, params = load_openclip_text(str(ckpt), _openclip_tiny_config(skip))
    assert len([k for k in params if k.startswith("layers_")]) == 3 - skip
    err = rel_err(text.encode(params, config, io["token_ids"]), io[output])
    print(f"OpenCLIP tower {output} max rel err {err:.2e}")
    assert err < TEXT_TOL


def test_text_converter_reports_every_problem_at_once():
    state = _openclip_fixture_state()
    prefix = "cond_stage_model.model."
    del state[prefix + "ln_final.bias"]
    state[prefix + "transformer.resblocks.0.mlp.c_fc.weight"] = np.zeros((64, 32), np.float32)
    state[prefix + "transformer.resblocks.7.ln_1.weight"] = np.zeros(32, np.float32)
    with pytest.raises(CheckpointError) as info:
        convert_openclip_text(state, _openclip_tiny_config(1))
    msg = str(info.value)
    assert "1 missing: ln_final/bias" in msg
    assert "1 unexpected: transformer.resblocks.7.ln_1.weight" in msg  # named inside the prefix
    assert "layers_0/fc1/kernel: got (32, 64), expected (32, 128)" in msg
    with pytest.raises(CheckpointError, match="hidden_act='relu'"):
        text_config_from_hf({"hidden_act": "relu"})


def test_text_config_presets_and_json():
    for config in (TextConfig.clip_vit_l14(), TextConfig.openclip_vit_h14(), TextConfig.tiny(vocab_size=40)):
        assert TextConfig.from_dict(config.to_dict()) == config
    n_l14 = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(text.param_shapes(TextConfig.clip_vit_l14())))
    assert n_l14 == 123_060_480  # transformers CLIPTextModel for openai/clip-vit-large-patch14
    h14 = TextConfig.openclip_vit_h14()
    assert h14.used_layers == 23 and h14.activation == "gelu" and h14.width == 1024
    with pytest.raises(ValueError, match="activation"):
        TextConfig(activation="relu")
