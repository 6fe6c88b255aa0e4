"""The umT5 encoder and the Wan VAE against the ORIGINAL Wan2.1 code (Wan-Video/Wan2.1 ``wan/modules/t5.py``,
``wan/modules/vae.py``), run once with tiny random weights to make ``tests/fixtures/wan/`` (see its README):
release names converted by ``convert/umt5.py`` / ``convert/wan_vae.py``, text encoder <= 1e-5, VAE <= 1e-4."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from convert.readers import CheckpointError
from convert.umt5 import convert_original_umt5
from convert.wan_vae import convert_original_wan_vae
from jaxlongvid.models import umt5, wan_vae

FIXTURES = Path(__file__).parent / "fixtures" / "wan"
CONFIGS = json.loads((FIXTURES / "configs.json").read_text())


def channels_last(x):
    return np.moveaxis(x, 1, -1)


@pytest.fixture(scope="module")
def vae():
    c = CONFIGS["vae"]
    config = wan_vae.WanVAEConfig(base_dim=c["dim"], z_dim=c["z_dim"], dim_mult=tuple(c["dim_mult"]),
                                  num_res_blocks=c["num_res_blocks"],
                                  temporal_downsample=tuple(c["temperal_downsample"]),
                                  latents_mean=tuple(c["latents_mean"]), latents_std=tuple(c["latents_std"]))
    return config, convert_original_wan_vae(FIXTURES / "vae_tiny.pth", config)


def test_vae_decode_matches_the_original(vae):
    config, params = vae
    data = np.load(FIXTURES / "vae_tiny.npz")
    want = channels_last(data["frames"])
    got = np.asarray(wan_vae.decode(params, config, channels_last(data["latents"]), 2))
    assert got.shape == want.shape == (1, 9, 24, 40, 3)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_vae_encode_matches_the_original(vae):
    config, params = vae
    data = np.load(FIXTURES / "vae_tiny.npz")
    want = channels_last(data["mu"])
    got = np.asarray(wan_vae.encode(params, config, channels_last(data["video"])))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_umt5_matches_the_original():
    c = CONFIGS["umt5"]
    config = umt5.UMT5Config(vocab_size=c["vocab"], dim=c["dim"], ffn_dim=c["dim_ffn"], num_heads=c["num_heads"],
                             head_dim=c["dim_attn"] // c["num_heads"], num_layers=c["num_layers"],
                             num_buckets=c["num_buckets"], max_distance=128, text_len=20)
    params = convert_original_umt5(FIXTURES / "umt5_tiny.pth", config)
    data = np.load(FIXTURES / "umt5_tiny.npz")
    got = np.asarray(umt5.encode(params, config, data["ids"].astype(np.int32), data["mask"].astype(bool)))
    want = data["context"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert not got[1, 7:].any()


def test_release_names_are_not_diffusers_names(vae):
    config, _ = vae
    import torch

    state = torch.load(FIXTURES / "vae_tiny.pth", weights_only=True)
    from convert.wan_vae import convert_diffusers_wan_vae

    with pytest.raises(CheckpointError, match=r"not a Wan VAE \(diffusers AutoencoderKLWan\) checkpoint"):
        convert_diffusers_wan_vae(state, config)
