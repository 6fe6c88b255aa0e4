"""The Wan2.1 video VAE in Flax: causal 3D convolutions, z 16, stride 4x8x8, decoded chunk by chunk.

Layout channels-last: videos ``[B, T, H, W, 3]`` in [-1, 1], latents ``[B, F, H/8, W/8, z]`` with
``T = 1 + 4 (F - 1)``: the first frame is coded alone, every further 4 frames make one latent frame.

Parts (names as diffusers' ``AutoencoderKLWan``, so ``convert/wan_vae.py`` is a rename table):

* ``CausalConv3d``: a 3D convolution padded only towards the past in time (``kt - 1`` frames) and ``k // 2`` in
  space. It runs on a chunk of frames given a *cache*, the last ``kt - 1`` input frames of the previous chunk
  (zeros before the first chunk, which is exactly the zero padding). Running the whole video at once or chunk by
  chunk gives the same result: the decoder is causal in time everywhere.
* RMS norm over channels (``x / max(|x|, 1e-12) * sqrt(C) * gamma``), residual blocks
  ``shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))``, a single-head spatial attention per frame in the
  middle block.
* Resampling: spatial ``downsample2d`` (pad right/bottom by one, 3x3 stride 2) and ``upsample2d`` (nearest x2,
  3x3 conv halving channels); their ``3d`` forms add a temporal conv. Temporal downsampling (kernel 3, stride 2,
  no padding) keeps the first frame as it is and then runs over the whole sequence ``f0, f1, ...``; temporal
  upsampling keeps the first frame and doubles each later one with a causal kernel-3 conv over the frames after
  the first (channels ``[2C]`` -> two frames).

``decode(params, config, latents, chunk)`` de-normalises the latents (``z * std + mean``) and decodes the first
latent frame, then the others ``chunk`` at a time inside ``lax.scan`` carrying every conv's cache, as the original
does frame by frame; memory is bounded by the chunk, not the video. ``encode`` does the same over frames
(1, then ``4 * chunk`` at a time) and returns the normalised posterior mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlongvid.configs import JsonConfig

WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass(frozen=True)
class WanVAEConfig(JsonConfig):
    """Hyper-parameters of the Wan2.1 VAE (defaults: the released one)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # per encoder level but the last
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    in_channels: int = 3
    out_channels: int = 3

    def __post_init__(self):
        for name in ("dim_mult", "temporal_downsample", "latents_mean", "latents_std"):  # JSON gives lists
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"WanVAEConfig: temporal_downsample needs {len(self.dim_mult) - 1} entries, "
                             f"got {len(self.temporal_downsample)}")
        if not len(self.latents_mean) == len(self.latents_std) == self.z_dim:
            raise ValueError(f"WanVAEConfig: latents_mean and latents_std need z_dim={self.z_dim} entries")

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    # the names a pipeline reads from any VAE config (jaxlongvid.pipeline.PipelineConfig)
    @property
    def downsample_factor(self) -> int:
        return self.spatial_factor

    @property
    def latent_channels(self) -> int:
        return self.z_dim


# ---- layers -------------------------------------------------------------------------------------------------------
def silu(x):
    return x * jax.nn.sigmoid(x)


class RMSNorm(nn.Module):
    """``x / max(|x|_2, 1e-12) * sqrt(C) * gamma`` over channels (F.normalize), statistics in float32."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        gamma = self.param("gamma", nn.initializers.ones, (c,))
        x32 = x.astype(jnp.float32)
        inv = jax.lax.rsqrt(jnp.maximum(jnp.sum(x32 * x32, axis=-1, keepdims=True), 1e-24))
        return (x32 * inv * c ** 0.5 * gamma).astype(x.dtype)


def cache_frames(inp, n: int):
    """The last ``n`` frames of a conv's (cache + chunk) input: the next chunk's cache."""
    return inp[:, inp.shape[1] - n:] if n else None


class CausalConv3d(nn.Module):
    """Kernel ``(kt, k, k)``: ``kt - 1`` cached (or zero) frames in front, ``k // 2`` zeros around in space.
    ``(chunk [B, T, H, W, C], cache [B, kt-1, H, W, C] or None for zeros) -> (out, next cache)``."""

    features: int
    kernel: tuple[int, int, int] = (3, 3, 3)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cache):
        kt, kh, kw = self.kernel
        w = self.param("kernel", nn.initializers.lecun_normal(), (kt, kh, kw, x.shape[-1], self.features))
        b = self.param("bias", nn.initializers.zeros, (self.features,))
        if kt > 1:
            if cache is None:
                cache = jnp.zeros((x.shape[0], kt - 1, *x.shape[2:]), x.dtype)
            x = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), w.astype(self.dtype), (1, 1, 1),
                                         ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)),
                                         dimension_numbers=("NTHWC", "THWIO", "NTHWC"))
        return y + b.astype(self.dtype), cache_frames(x, kt - 1)


class ResidualBlock(nn.Module):
    out_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cache):
        cache = cache or {}
        shortcut = x
        if x.shape[-1] != self.out_dim:
            shortcut, _ = CausalConv3d(self.out_dim, (1, 1, 1), self.dtype, name="conv_shortcut")(x, None)
        h, c1 = CausalConv3d(self.out_dim, dtype=self.dtype, name="conv1")(silu(RMSNorm(name="norm1")(x)),
                                                                          cache.get("conv1"))
        h, c2 = CausalConv3d(self.out_dim, dtype=self.dtype, name="conv2")(silu(RMSNorm(name="norm2")(h)),
                                                                          cache.get("conv2"))
        return h + shortcut, {"conv1": c1, "conv2": c2}


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no temporal mixing, so no cache)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, t, h, w, c = x.shape
        qkv = nn.Dense(3 * c, dtype=self.dtype, name="to_qkv")(RMSNorm(name="norm")(x)).reshape(b * t, h * w, 3 * c)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        logits = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32) * c ** -0.5
        out = jnp.einsum("nqk,nkc->nqc", jax.nn.softmax(logits, axis=-1).astype(self.dtype), v)
        return x + nn.Dense(c, dtype=self.dtype, name="proj")(out.reshape(b, t, h, w, c))


class MidBlock(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cache):
        cache = cache or {}
        dim = x.shape[-1]
        x, c0 = ResidualBlock(dim, self.dtype, name="resnets_0")(x, cache.get("resnets_0"))
        x = AttentionBlock(self.dtype, name="attentions_0")(x)
        x, c1 = ResidualBlock(dim, self.dtype, name="resnets_1")(x, cache.get("resnets_1"))
        return x, {"resnets_0": c0, "resnets_1": c1}


def per_frame(fn, x):
    """A 2D layer applied to every frame of ``[B, T, H, W, C]``."""
    b, t = x.shape[:2]
    y = fn(x.reshape(b * t, *x.shape[2:]))
    return y.reshape(b, t, *y.shape[1:])


class Downsample(nn.Module):
    """Spatial /2 (pad right and bottom by one, 3x3 stride 2); with ``temporal``, then time /2 (kernel 3, stride 2,
    no padding) over the whole sequence, the first frame kept: the cache is the last frame before the chunk."""

    temporal: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cache, first: bool):
        dim = x.shape[-1]
        conv = nn.Conv(dim, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)), dtype=self.dtype, name="resample_1")
        x = per_frame(conv, x)
        if not self.temporal:
            return x, None
        time_conv = nn.Conv(dim, (3, 1, 1), strides=(2, 1, 1), padding="VALID", dtype=self.dtype, name="time_conv")
        if first:  # the first frame passes; build the layer so its weights exist
            if self.is_initializing():
                time_conv(jnp.concatenate([x, x, x], axis=1))
            return x, x[:, -1:]
        return time_conv(jnp.concatenate([cache.astype(x.dtype), x], axis=1)), x[:, -1:]


class Upsample(nn.Module):
    """With ``temporal``: the first frame kept, each later frame -> two (a causal kernel-3 conv to 2C channels over
    the frames after the first); then nearest x2 in space and a 3x3 conv to ``out_dim`` channels."""

    out_dim: int
    temporal: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cache, first: bool):
        b, t, h, w, c = x.shape
        new_cache = None
        if self.temporal:
            time_conv = CausalConv3d(2 * c, (3, 1, 1), self.dtype, name="time_conv")
            if first:  # the first frame is not doubled; the sequence the temporal conv sees starts after it
                if self.is_initializing():
                    time_conv(x, None)
                new_cache = jnp.zeros((b, 2, h, w, c), x.dtype)
            else:
                y, new_cache = time_conv(x, cache)
                x = y.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
        x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
        conv = nn.Conv(self.out_dim, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="resample_1")
        return per_frame(conv, x), new_cache


class Encoder(nn.Module):
    config: WanVAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cache, first: bool):
        cfg = self.config
        cache = cache or {}
        new = {}
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        x, new["conv_in"] = CausalConv3d(dims[0], dtype=self.dtype, name="conv_in")(x, cache.get("conv_in"))
        k = 0
        for level, out_dim in enumerate(dims[1:]):
            for _ in range(cfg.num_res_blocks):
                name = f"down_blocks_{k}"
                x, new[name] = ResidualBlock(out_dim, self.dtype, name=name)(x, cache.get(name))
                k += 1
            if level != len(cfg.dim_mult) - 1:
                name = f"down_blocks_{k}"
                x, new[name] = Downsample(cfg.temporal_downsample[level], self.dtype, name=name)(
                    x, cache.get(name), first)
                k += 1
        x, new["mid_block"] = MidBlock(self.dtype, name="mid_block")(x, cache.get("mid_block"))
        x = silu(RMSNorm(name="norm_out")(x))
        x, new["conv_out"] = CausalConv3d(2 * cfg.z_dim, dtype=self.dtype, name="conv_out")(x, cache.get("conv_out"))
        return x, new


class UpBlock(nn.Module):
    out_dim: int
    upsample: Optional[bool]  # None: no upsampler (the last block); else whether it is temporal too
    num_res_blocks: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cache, first: bool):
        cache = cache or {}
        new = {}
        for j in range(self.num_res_blocks + 1):
            name = f"resnets_{j}"
            x, new[name] = ResidualBlock(self.out_dim, self.dtype, name=name)(x, cache.get(name))
        if self.upsample is not None:
            up = Upsample(self.out_dim // 2, self.upsample, self.dtype, name="upsamplers_0")
            x, new["upsamplers_0"] = up(x, cache.get("upsamplers_0"), first)
        return x, new


class Decoder(nn.Module):
    config: WanVAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cache, first: bool):
        cfg = self.config
        cache = cache or {}
        new = {}
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        x, new["conv_in"] = CausalConv3d(dims[0], dtype=self.dtype, name="conv_in")(x, cache.get("conv_in"))
        x, new["mid_block"] = MidBlock(self.dtype, name="mid_block")(x, cache.get("mid_block"))
        for i, out_dim in enumerate(dims[1:]):
            name = f"up_blocks_{i}"
            upsample = temporal_upsample[i] if i != len(cfg.dim_mult) - 1 else None
            x, new[name] = UpBlock(out_dim, upsample, cfg.num_res_blocks, self.dtype, name=name)(
                x, cache.get(name), first)
        x = silu(RMSNorm(name="norm_out")(x))
        x, new["conv_out"] = CausalConv3d(cfg.out_channels, dtype=self.dtype, name="conv_out")(
            x, cache.get("conv_out"))
        return x, new


# ---- the whole model: chunked encode / decode -----------------------------------------------------------------
def _stats(config: WanVAEConfig):
    return jnp.asarray(config.latents_mean, jnp.float32), jnp.asarray(config.latents_std, jnp.float32)


def _chunked(run, x, first_len: int, chunk_len: int):
    """``run(x_chunk, cache, first) -> (out, cache)`` over the frames of ``x``: the first ``first_len`` frames, then
    ``chunk_len`` at a time in ``lax.scan`` carrying the cache, then any remainder; outputs concatenated in time."""
    out, cache = run(x[:, :first_len], None, True)
    rest = x[:, first_len:]
    n = rest.shape[1] // chunk_len
    outs = [out]
    if n:
        xs = rest[:, :n * chunk_len].reshape(rest.shape[0], n, chunk_len, *rest.shape[2:]).swapaxes(0, 1)
        cache, ys = jax.lax.scan(lambda c, xc: run(xc, c, False)[::-1], cache, xs)
        ys = ys.swapaxes(0, 1)
        outs.append(ys.reshape(ys.shape[0], -1, *ys.shape[3:]))
    if rest.shape[1] > n * chunk_len:
        outs.append(run(rest[:, n * chunk_len:], cache, False)[0])
    return jnp.concatenate(outs, axis=1)


@partial(jax.jit, static_argnames=("config", "chunk", "dtype"))
def decode(params, config: WanVAEConfig, latents, chunk: int = 1, dtype=jnp.float32):
    """Normalised latents ``[B, F, h, w, z]`` -> frames ``[B, 1 + 4 (F - 1), 8h, 8w, 3]`` in [-1, 1] (float32),
    ``chunk`` latent frames at a time after the first (the result does not depend on ``chunk``)."""
    if latents.ndim != 5 or latents.shape[-1] != config.z_dim:
        raise ValueError(f"wan_vae.decode: latents must be [B, F, h, w, {config.z_dim}], got {latents.shape}")
    if chunk < 1:
        raise ValueError(f"wan_vae.decode: chunk must be >= 1, got {chunk}")
    mean, std = _stats(config)
    z = latents.astype(jnp.float32) * std + mean
    z, _ = CausalConv3d(config.z_dim, (1, 1, 1), dtype).apply({"params": params["post_quant_conv"]}, z, None)
    decoder = Decoder(config, dtype)
    run = lambda x, cache, first: decoder.apply({"params": params["decoder"]}, x, cache, first)  # noqa: E731
    return jnp.clip(_chunked(run, z, 1, chunk).astype(jnp.float32), -1.0, 1.0)


@partial(jax.jit, static_argnames=("config", "chunk", "dtype"))
def encode(params, config: WanVAEConfig, video, chunk: int = 1, dtype=jnp.float32):
    """Frames ``[B, 1 + 4k, H, W, 3]`` in [-1, 1] -> normalised posterior mean ``[B, 1 + k, H/8, W/8, z]``
    (float32), ``4 * chunk`` frames at a time after the first."""
    t = config.temporal_factor
    if video.ndim != 5 or video.shape[-1] != config.in_channels or (video.shape[1] - 1) % t:
        raise ValueError(f"wan_vae.encode: video must be [B, 1 + {t}k, H, W, {config.in_channels}], got {video.shape}")
    if chunk < 1:
        raise ValueError(f"wan_vae.encode: chunk must be >= 1, got {chunk}")
    encoder = Encoder(config, dtype)
    run = lambda x, cache, first: encoder.apply({"params": params["encoder"]}, x, cache, first)  # noqa: E731
    h = _chunked(run, video.astype(dtype), 1, t * chunk)
    h, _ = CausalConv3d(2 * config.z_dim, (1, 1, 1), dtype).apply({"params": params["quant_conv"]}, h, None)
    mean, std = _stats(config)
    return (h[..., :config.z_dim].astype(jnp.float32) - mean) / std


def _init(config: WanVAEConfig, rng):
    keys = jax.random.split(rng, 4)
    s = config.spatial_factor
    video = jnp.zeros((1, 1, s, s, config.in_channels))
    z = jnp.zeros((1, 1, 1, 1, config.z_dim))
    return {"encoder": Encoder(config).init(keys[0], video, None, True)["params"],
            "quant_conv": CausalConv3d(2 * config.z_dim, (1, 1, 1)).init(keys[1], z.repeat(2, -1), None)["params"],
            "post_quant_conv": CausalConv3d(config.z_dim, (1, 1, 1)).init(keys[2], z, None)["params"],
            "decoder": Decoder(config).init(keys[3], z, None, True)["params"]}


def param_shapes(config: WanVAEConfig):
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
    return jax.eval_shape(lambda: _init(config, jax.random.key(0)))


def init_params(config: WanVAEConfig, rng):
    """Random parameters (Flax default initialisers)."""
    return jax.jit(_init, static_argnums=0)(config, rng)
