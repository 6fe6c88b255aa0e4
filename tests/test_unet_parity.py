"""UNet3D against the original PyTorch models.

* LaVie / VideoCrafter1 / VideoCrafter2: tiny random checkpoints and outputs computed by the original code
  (``tests/fixtures/tiny``, see ``/work/shared/fixtures/README.md``) at 16 and 24 frames, and the time (+fps)
  embedding; two single-module fixtures (LaVie multi-head temporal attention with partial RoPE and T5 bias,
  VideoCrafter ResBlock with the temporal conv block).
* ModelScope: a tiny random diffusers ``UNet3DConditionModel`` built here.
* The same outputs with the frame axis sharded over 8 host devices (pooled GroupNorm statistics become
  cross-device reductions).

Errors are max |out - ref| / max |ref|, measured on CPU in float32 (the original's own float32-vs-float64
noise is ~1e-6): LaVie 0.95e-6 / 1.05e-6 (16 / 24 frames), VideoCrafter1 0.72e-6 / 0.94e-6, VideoCrafter2
1.7e-6 / 1.9e-6, ModelScope 2.0e-6; time embeddings <= 6.1e-7; the two modules <= 3.9e-7. The tolerances
below leave headroom for other CPUs.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.unet import (convert_lavie_unet, convert_modelscope_unet, convert_state, convert_videocrafter_unet,
                          lavie_rules, open_checkpoint, videocrafter_rules)
from jaxlongvid import sharding
from jaxlongvid.attention import Encoding, TemporalAttention
from jaxlongvid.methods import Method
from jaxlongvid.models.layers import ResnetBlock, TimestepEmbedding, timestep_sinusoid
from jaxlongvid.models.unet3d import UNet3D, UNet3DConfig, init_shapes
from jaxlongvid.positions import identity, t5_bucket

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny"
NETWORK_RTOL = 2e-5  # max |out - ref| / max |ref| for whole networks (measured <= 2e-6)
MODULE_RTOL = 1e-5  # the same for embeddings and single modules (measured <= 6.1e-7)


@functools.cache
def tiny(family: str):
    """``(config, params, io)`` of a fixture model, converted with the fixture's constructor kwargs."""
    folder = TINY / family
    config = folder / "config.json"
    if family == "lavie":
        cfg, params = convert_lavie_unet(folder / "model.safetensors", config)
    elif family == "videocrafter1":
        cfg, params = convert_videocrafter_unet(folder / "model.safetensors", 1, config)
    else:  # the .ckpt exercises the torch reader
        cfg, params = convert_videocrafter_unet(folder / "model.ckpt", 2, config)
    return cfg, params, dict(np.load(folder / "io.npz"))


def channels_last(x: np.ndarray) -> np.ndarray:  # [B, C, F, H, W] -> [B, F, H, W, C]
    return np.transpose(x, (0, 2, 3, 4, 1))


def inputs(io: dict, frames: int):
    fps = io.get(f"fps_f{frames}")
    return channels_last(io[f"x_f{frames}"]), io[f"t_f{frames}"], io[f"context_f{frames}"], fps


def relative_error(out, ref) -> float:
    return float(np.max(np.abs(np.asarray(out, np.float64) - ref)) / np.max(np.abs(ref)))


@functools.cache
def jitted_apply(family: str):
    cfg = tiny(family)[0]
    return jax.jit(UNet3D(cfg).apply)


@pytest.mark.parametrize("frames", [16, 24])
@pytest.mark.parametrize("family", ["lavie", "videocrafter1", "videocrafter2"])
def test_tiny_unet_matches_original(family, frames):
    cfg, params, io = tiny(family)
    out = jitted_apply(family)({"params": params}, *inputs(io, frames))
    ref = channels_last(io[f"out_f{frames}"])
    assert out.shape == ref.shape and out.dtype == jnp.float32
    assert relative_error(out, ref) < NETWORK_RTOL


@pytest.mark.parametrize("family", ["lavie", "videocrafter1", "videocrafter2"])
def test_time_embedding_matches_original(family):
    cfg, params, io = tiny(family)
    c0 = cfg.block_channels[0]
    for frames in (16, 24):
        embed = lambda name, values: TimestepEmbedding(4 * c0).apply({"params": params[name]},
                                                                     timestep_sinusoid(values, c0))
        temb = embed("time_embedding", io[f"t_f{frames}"])
        if cfg.fps_conditioning:
            temb = temb + embed("fps_embedding", io[f"fps_f{frames}"])
        ref = io[f"temb_f{frames}"]
        assert relative_error(temb, ref) < MODULE_RTOL


def test_lavie_temporal_attention_module():
    """2 heads x 40 dims: RoPE on the first 32 dims of each head, per-head T5 bias; buckets and bias too."""
    folder = FIXTURES / "modules" / "lavie_temporal_attention"
    io = np.load(folder / "io.npz")
    encoding = Encoding(rope_dim=32, t5_buckets=32, t5_max_distance=32)
    module = TemporalAttention(num_heads=2, head_dim=40, encoding=encoding)
    x0 = jnp.zeros((1, 16, 1, 1, 80))
    expected = jax.eval_shape(module.init, jax.random.key(0), x0)["params"]
    params = convert_state(open_checkpoint(folder / "model.safetensors"), lavie_rules(UNet3DConfig.lavie()), expected)
    for frames in (16, 24):
        buckets = t5_bucket(identity(frames), 32, 32)
        np.testing.assert_array_equal(buckets, io[f"rel_pos_bucket_f{frames}"])
        bias = np.moveaxis(params["t5_bias"][buckets], -1, 0)
        np.testing.assert_array_equal(bias, io[f"rel_pos_bias_f{frames}"])
        x = io[f"hidden_states_f{frames}"]  # [N, F, C]: one temporal sequence per row
        out = jax.jit(module.apply)({"params": params}, x[:, :, None, None, :])[:, :, 0, 0, :]
        assert relative_error(out, io[f"out_f{frames}"]) < MODULE_RTOL


def test_videocrafter_resblock_with_temporal_conv():
    """64 channels, 2 per GroupNorm group: the time embedding and the temporal convs both matter here."""
    folder = FIXTURES / "modules" / "videocrafter_resblock_tempconv"
    io = np.load(folder / "io.npz")
    block = ResnetBlock(64, groups=32, eps=1e-5, pool_frames=False, temporal_conv=True)
    x0, e0 = jnp.zeros((1, 2, 3, 4, 64)), jnp.zeros((1, 128))
    expected = jax.eval_shape(block.init, jax.random.key(0), x0, e0)["params"]
    rules = videocrafter_rules(UNet3DConfig.videocrafter2(), 2)
    params = convert_state(open_checkpoint(folder / "model.safetensors"), rules, expected)
    for frames in (16, 24):
        b = int(io[f"batch_size_f{frames}"])
        x = io[f"x_f{frames}"]  # [(B*F), C, H, W], index b*F + f
        video = x.reshape(b, frames, *x.shape[1:]).transpose(0, 1, 3, 4, 2)
        emb = io[f"emb_f{frames}"].reshape(b, frames, -1)
        assert np.array_equal(emb, np.broadcast_to(emb[:, :1], emb.shape))  # one embedding per video
        out = jax.jit(block.apply)({"params": params}, video, emb[:, 0])
        ref = io[f"out_f{frames}"].reshape(b, frames, *x.shape[1:]).transpose(0, 1, 3, 4, 2)
        assert relative_error(out, ref) < MODULE_RTOL


def _randomised_modelscope_unet():
    """A tiny diffusers UNet3DConditionModel whose zero-initialised layers and norm affines are randomised."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.UNet3DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif not p.any():  # the temporal convs' last conv is zero-initialised: make it matter
                p.normal_(0, 0.5 / np.sqrt(p[0].numel() if p.ndim > 1 else p.shape[0]))
    return model.eval()


def test_modelscope_matches_diffusers(tmp_path):
    torch = pytest.importorskip("torch")
    model = _randomised_modelscope_unet()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, 8, generator=g)
    t = torch.tensor([10, 900])
    context = torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        ref = channels_last(model(x, t, context).sample.numpy())
    model.save_pretrained(tmp_path)  # a diffusers folder: config.json + safetensors
    cfg, params = convert_modelscope_unet(tmp_path)
    assert cfg.family == "modelscope" and cfg.attention_heads == (4, 8) and cfg.temporal_in_head_dim == 8
    out = jax.jit(UNet3D(cfg).apply)({"params": params}, channels_last(x.numpy()), t.numpy(), context.numpy())
    assert relative_error(out, ref) < NETWORK_RTOL


@pytest.mark.parametrize("family", ["lavie", "videocrafter2"])
def test_frame_sharded_equals_original(family):
    """Frames split over 8 devices: LaVie pools every ResNet norm over frames, VC2 its temporal-conv and
    temporal-transformer norms; the result must not change."""
    cfg, params, io = tiny(family)
    mesh = sharding.make_mesh(frames=8, data=1)
    args = inputs(io, 16)
    with jax.set_mesh(mesh):
        apply = jax.jit(UNet3D(cfg).apply)
        out = apply({"params": params}, *args)
        compiled = apply.lower({"params": params}, *args).compile().as_text()
    assert out.sharding.spec[1] == sharding.FRAMES
    assert "all-reduce" in compiled  # pooled statistics reduced across devices
    assert relative_error(out, channels_last(io["out_f16"])) < NETWORK_RTOL


def test_small_lavie_style_config():
    """The project's tiny model: LaVie layout at pixel level (3 channels, 2 levels 64/128, 32-dim heads)."""
    cfg = UNet3DConfig(family="custom", in_channels=3, out_channels=3, block_channels=(64, 128),
                       layers_per_block=1, attention_levels=(True, True), attention_heads=(2, 4),
                       cross_attention_dim=32)
    assert cfg.head_dim(0) == cfg.head_dim(1) == 32 == cfg.rope_dim
    model = UNet3D(cfg)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 8, 8, 3)).astype(np.float32)
    context = rng.normal(size=(2, 5, 32)).astype(np.float32)
    t = jnp.array([3, 700])
    params = random_params(init_shapes(cfg), rng)  # model.init works too, but compiles its initialisers slowly
    attn = params["down_blocks_1"]["attentions_0"]["transformer_blocks_0"]["attn_temp"]
    assert attn["t5_bias"].shape == (32, 4) and attn["to_q"]["kernel"].shape == (128, 128)
    apply = jax.jit(model.apply)
    out = apply({"params": params}, x, t, context)
    assert out.shape == (2, 6, 8, 8, 3) and bool(jnp.all(jnp.isfinite(out)))
    # Frames interact (temporal attention with positions): reversing the input does not just reverse the output.
    flipped = apply({"params": params}, x[:, ::-1], t, context)[:, ::-1]
    assert float(jnp.max(jnp.abs(flipped - out))) > 1e-3


def random_params(shapes, rng: np.random.Generator):
    """Random weights for a shape tree: kernels ~ N(0, 1/fan_in), norm scales ~ 1, other leaves small."""
    def leaf(path, s):
        name = path[-1].key
        if name == "kernel":
            return (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
        return ((name == "scale") + 0.1 * rng.normal(size=s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def test_config_validation_errors():
    with pytest.raises(ValueError, match="rope_dim=32 exceeds"):
        UNet3DConfig(block_channels=(64,), attention_levels=(True,), attention_heads=(4,))
    with pytest.raises(ValueError, match="one entry per level"):
        UNet3DConfig(block_channels=(64, 128), attention_levels=(True,), attention_heads=(2, 4))
    with pytest.raises(ValueError, match="temporal_layout"):
        UNet3DConfig(temporal_layout="sideways")
    cfg = UNet3DConfig.videocrafter2()
    assert UNet3DConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        UNet3DConfig.from_dict({**cfg.to_dict(), "heads": 3})


def test_input_validation_errors():
    cfg, params, io = tiny("videocrafter1")
    model = UNet3D(cfg)
    x, t, ctx, _ = inputs(io, 16)
    with pytest.raises(ValueError, match="channels last"):
        model.apply({"params": params}, np.moveaxis(x, -1, 1), t, ctx)
    with pytest.raises(ValueError, match="multiples of 2"):
        model.apply({"params": params}, x[:, :, :5], t, ctx)
    with pytest.raises(ValueError, match="no fps conditioning"):
        model.apply({"params": params}, x, t, ctx, fps=np.array([8, 8]))
    with pytest.raises(ValueError, match="MethodPlan names temporal layer 99"):
        from jaxlongvid.methods import MethodPlan
        UNet3D(cfg, method=MethodPlan(layers=((99, Method("direct")),))).apply({"params": params}, x, t, ctx)
