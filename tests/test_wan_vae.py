"""Wan2.1 VAE: parity with diffusers' ``AutoencoderKLWan`` built tiny and random here (decode and encode <= 1e-4,
float32), latents (de)normalised with the config's mean/std, chunked decode equal to the whole-video decode,
frame counts 1 + 4 (F - 1), and clear errors for bad inputs and unsupported configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convert.readers import CheckpointError
from convert.wan_vae import convert_diffusers_wan_vae, load_diffusers_wan_vae, wan_vae_config_from_diffusers
from jaxlongvid.models.wan_vae import WanVAEConfig, decode, encode, param_shapes

Z = 4
MEAN, STD = list(np.linspace(-1, 1, Z)), list(np.linspace(0.5, 2, Z))


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    model = AutoencoderKLWan(base_dim=8, z_dim=Z, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                             temperal_downsample=[False, True, True], latents_mean=MEAN, latents_std=STD).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gamma" in name:
                p.normal_(1.0, 0.3)
    folder = tmp_path_factory.mktemp("wan_vae")
    model.save_pretrained(folder)
    config, params = load_diffusers_wan_vae(str(folder))
    return model, config, params


def to_torch(x):
    return torch.from_numpy(x).permute(0, 4, 1, 2, 3)


def from_torch(x):
    return x.permute(0, 2, 3, 4, 1).numpy()


def stats():
    return torch.tensor(MEAN).view(1, Z, 1, 1, 1).float(), torch.tensor(STD).view(1, Z, 1, 1, 1).float()


def test_config(vae):
    _, config, _ = vae
    assert config == WanVAEConfig(base_dim=8, z_dim=Z, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                                  latents_mean=tuple(MEAN), latents_std=tuple(STD))
    assert (config.temporal_factor, config.spatial_factor) == (4, 8)


def test_decode_parity_and_chunks(vae):
    model, config, params = vae
    z = np.random.default_rng(0).standard_normal((1, 4, 3, 5, Z)).astype(np.float32)
    mean, std = stats()
    with torch.no_grad():
        want = from_torch(model.decode(to_torch(z) * std + mean).sample)
    got = np.asarray(decode(params, config, z, 1))
    assert got.shape == (1, 1 + 4 * 3, 24, 40, 3)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    for chunk in (3, 2):  # the whole rest at once (no scan step left); one scan step then a remainder
        np.testing.assert_allclose(np.asarray(decode(params, config, z, chunk)), got, rtol=0, atol=1e-5)


def test_encode_parity_and_chunks(vae):
    model, config, params = vae
    video = np.random.default_rng(1).uniform(-1, 1, (1, 9, 16, 24, 3)).astype(np.float32)
    mean, std = stats()
    with torch.no_grad():
        want = from_torch((model.encode(to_torch(video)).latent_dist.mode() - mean) / std)
    got = np.asarray(encode(params, config, video, 1))
    assert got.shape == (1, 3, 2, 3, Z)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    np.testing.assert_allclose(np.asarray(encode(params, config, video, 2)), got, rtol=0, atol=1e-5)


def test_bad_inputs(vae):
    _, config, params = vae
    with pytest.raises(ValueError, match=r"latents must be \[B, F, h, w, 4\]"):
        decode(params, config, np.zeros((1, 2, 3, 3, 3), np.float32))
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        decode(params, config, np.zeros((1, 2, 3, 3, Z), np.float32), 0)
    with pytest.raises(ValueError, match=r"video must be \[B, 1 \+ 4k, H, W, 3\]"):
        encode(params, config, np.zeros((1, 8, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match="temporal_downsample needs 3 entries"):
        WanVAEConfig(temporal_downsample=(True,))


def test_unsupported_configs_and_wrong_weights(vae):
    model, config, _ = vae
    with pytest.raises(CheckpointError, match="is_residual=True"):
        wan_vae_config_from_diffusers({"is_residual": True, "patch_size": None})
    with pytest.raises(CheckpointError, match="expected AutoencoderKLWan"):
        wan_vae_config_from_diffusers({"_class_name": "AutoencoderKL"})
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("decoder.up_blocks.1.")}
    with pytest.raises(CheckpointError, match=r"model parameters have no checkpoint key: decoder/up_blocks_1/"):
        convert_diffusers_wan_vae(state, config)
    bigger = config.replace(base_dim=16)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        convert_diffusers_wan_vae(model.state_dict(), bigger)
    assert param_shapes(bigger)["decoder"]["conv_out"]["kernel"].shape == (3, 3, 3, 16, 3)


def test_full_size_manifest_maps_onto_the_default_config():
    """Every key of diffusers' full Wan2.1 VAE (names + shapes, built on the meta device) maps onto one leaf of
    the default config's ``eval_shape`` tree, with the shapes after the layout changes."""
    import json
    from pathlib import Path

    from convert.rules import plan_conversion
    from convert.tree import flat_shapes
    from convert.wan_vae import DIFFUSERS_RULES

    m = json.loads((Path(__file__).parent / "fixtures/manifests/wan21_vae.json").read_text())
    config = WanVAEConfig()
    assert wan_vae_config_from_diffusers(m["constructor_config"]) == config
    shapes = {k: tuple(v[0]) for k, v in m["keys"].items()}
    expected = param_shapes(config)
    plan = plan_conversion(shapes, DIFFUSERS_RULES, expected, "wan21 vae manifest")
    assert len(plan) == len(shapes) == len(flat_shapes(expected))
    assert sum(int(np.prod(s)) for s in flat_shapes(expected).values()) == m["num_elements"]
