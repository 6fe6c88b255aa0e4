"""Stable Diffusion's KL-f8 autoencoder (diffusers ``AutoencoderKL``) in Flax, channels-last.

Every model family here (LaVie, VideoCrafter1/2, ModelScope) decodes frame by frame with this same image VAE.
The layout follows diffusers so conversion is a rename: ``encoder`` / ``decoder`` each hold ResNet blocks
(GroupNorm -> SiLU -> 3x3 conv, twice, plus a 1x1 shortcut when the width changes), a mid block
``resnets_0 -> attention -> resnets_1`` (single-head self-attention over all pixels), and 1x1 ``quant_conv`` /
``post_quant_conv`` around the latent. All GroupNorms use eps 1e-6 and compute their statistics in float32.

``encode`` returns the posterior mean times ``scaling_factor``; ``decode`` divides by it first, so
``decode(encode(x))`` is a reconstruction and the latents are the ones the video UNets are trained on. Both take
any leading dimensions (``[B, H, W, 3]`` or ``[B, F, H, W, 3]``) and run the frames in chunks with
``jax.lax.map`` so a long video never holds all its decoder activations at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlongvid.configs import JsonConfig

NORM_EPS = 1e-6  # every GroupNorm of the KL autoencoder


@dataclass(frozen=True)
class VAEConfig(JsonConfig):
    """Hyper-parameters of a KL autoencoder (names as in diffusers' ``AutoencoderKL`` config)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # one entry per resolution level
    layers_per_block: int = 2  # ResNets per encoder level (the decoder has one more)
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215  # latents = posterior mean * scaling_factor
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if not self.block_out_channels:
            raise ValueError("VAEConfig.block_out_channels must name at least one level")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"VAEConfig: block_out_channels {bad} are not divisible by "
                             f"norm_num_groups={self.norm_num_groups}")
        if self.layers_per_block < 1:
            raise ValueError(f"VAEConfig.layers_per_block must be >= 1, got {self.layers_per_block}")

    @classmethod
    def sd14(cls) -> "VAEConfig":
        """The Stable Diffusion 1.x VAE (``CompVis/stable-diffusion-v1-4/vae``), also used by LaVie,
        VideoCrafter1/2 and ModelScope."""
        return cls()

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def temporal_factor(self) -> int:
        """Video frames per latent frame: 1, every frame is coded alone."""
        return 1


# ---- building blocks --------------------------------------------------------------------------------------
def _group_norm(x, groups: int, name: str, dtype):
    """GroupNorm with float32 statistics (two-pass variance), output in the compute dtype."""
    norm = nn.GroupNorm(num_groups=groups, epsilon=NORM_EPS, use_fast_variance=False, dtype=jnp.float32,
                        name=name)
    return norm(x.astype(jnp.float32)).astype(dtype)


def _conv(features: int, name: str, dtype, kernel: int = 3):
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    """diffusers ``ResnetBlock2D`` without time embedding (dropout is inactive at inference)."""

    out_channels: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.silu(_group_norm(x, self.groups, "norm1", self.dtype))
        h = _conv(self.out_channels, "conv1", self.dtype)(h)
        h = nn.silu(_group_norm(h, self.groups, "norm2", self.dtype))
        h = _conv(self.out_channels, "conv2", self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, "conv_shortcut", self.dtype, kernel=1)(x)
        return x + h


class MidAttention(nn.Module):
    """Single-head self-attention over all H*W positions, with a GroupNorm in front and a residual."""

    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = _group_norm(x, self.groups, "group_norm", self.dtype).reshape(b, h * w, c)
        q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(y) for n in ("to_q", "to_k", "to_v"))
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * (c ** -0.5)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bqk,bkc->bqc", probs, v)
        out = nn.Dense(c, dtype=self.dtype, name="to_out")(out)
        return x + out.reshape(b, h, w, c)


class MidBlock(nn.Module):
    channels: int
    groups: int
    add_attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = ResnetBlock(self.channels, self.groups, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = MidAttention(self.groups, self.dtype, name="attention")(x)
        return ResnetBlock(self.channels, self.groups, self.dtype, name="resnets_1")(x)


class DownBlock(nn.Module):
    """ResNets, then (except at the last level) a stride-2 3x3 conv after padding one zero row/column at the
    bottom/right only (diffusers ``Downsample2D`` with padding 0)."""

    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            x = nn.Conv(self.out_channels, (3, 3), strides=(2, 2), padding="VALID", dtype=self.dtype,
                        name="downsample")(x)
        return x


class UpBlock(nn.Module):
    """ResNets, then (except at the last level) nearest-neighbour x2 and a 3x3 conv."""

    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            x = _conv(self.out_channels, "upsample", self.dtype)(x)
        return x


class Encoder(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        chans = cfg.block_out_channels
        h = _conv(chans[0], "conv_in", self.dtype)(x.astype(self.dtype))
        for i, ch in enumerate(chans):
            h = DownBlock(ch, cfg.layers_per_block, cfg.norm_num_groups, i < len(chans) - 1, self.dtype,
                          name=f"down_blocks_{i}")(h)
        h = MidBlock(chans[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, self.dtype, name="mid_block")(h)
        h = nn.silu(_group_norm(h, cfg.norm_num_groups, "conv_norm_out", self.dtype))
        return _conv(2 * cfg.latent_channels, "conv_out", self.dtype)(h)  # mean and log-variance


class Decoder(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        chans = tuple(reversed(cfg.block_out_channels))
        h = _conv(chans[0], "conv_in", self.dtype)(z.astype(self.dtype))
        h = MidBlock(chans[0], cfg.norm_num_groups, cfg.mid_block_add_attention, self.dtype, name="mid_block")(h)
        for i, ch in enumerate(chans):
            h = UpBlock(ch, cfg.layers_per_block + 1, cfg.norm_num_groups, i < len(chans) - 1, self.dtype,
                        name=f"up_blocks_{i}")(h)
        h = nn.silu(_group_norm(h, cfg.norm_num_groups, "conv_norm_out", self.dtype))
        return _conv(cfg.out_channels, "conv_out", self.dtype)(h)


class AutoencoderKL(nn.Module):
    """KL autoencoder on channels-last images ``[B, H, W, C]``. Methods: ``posterior`` (mean, log-variance),
    ``encode`` (posterior mean, unscaled), ``decode`` (unscaled latents -> images); ``__call__`` reconstructs."""

    config: VAEConfig
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv(2 * cfg.latent_channels, (1, 1), dtype=self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1), dtype=self.dtype)

    def posterior(self, images):
        moments = self.encoder(images)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp

    def encode(self, images):
        return self.posterior(images)[0]

    def decode(self, latents):
        z = latents.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, images):
        return self.decode(self.encode(images))


# ---- pure functions on params -----------------------------------------------------------------------------
def _map_images(fn, x, chunk: int):
    """Apply ``fn`` (batch of images -> batch of images) over all leading dims, ``chunk`` images at a time.
    The batch is zero-padded to a multiple of ``chunk`` (every layer works per image, so padding cannot leak
    into real images) so ``fn`` is traced and compiled once."""
    lead = x.shape[:-3]
    flat = x.reshape((-1,) + x.shape[-3:])
    n = flat.shape[0]
    if chunk <= 0 or chunk >= n:
        out = fn(flat)
    else:
        steps = -(-n // chunk)
        padded = jnp.pad(flat, ((0, steps * chunk - n),) + ((0, 0),) * 3)
        out = jax.lax.map(fn, padded.reshape((steps, chunk) + flat.shape[1:]))
        out = out.reshape((steps * chunk,) + out.shape[2:])[:n]
    return out.reshape(lead + out.shape[1:])


@partial(jax.jit, static_argnames=("config", "chunk", "dtype"))
def encode(params, config: VAEConfig, images, chunk: int = 8, dtype=jnp.float32):
    """Images ``[..., H, W, in_channels]`` in [-1, 1] -> latents ``[..., H/f, W/f, latent_channels]`` (posterior
    mean times ``config.scaling_factor``), float32."""
    model = AutoencoderKL(config, dtype)
    fn = lambda x: model.apply({"params": params}, x, method=AutoencoderKL.encode)
    return _map_images(fn, images, chunk) * config.scaling_factor


@partial(jax.jit, static_argnames=("config", "chunk", "dtype"))
def decode(params, config: VAEConfig, latents, chunk: int = 8, dtype=jnp.float32):
    """Latents ``[..., h, w, latent_channels]`` as ``encode`` returns them -> images ``[..., 8h, 8w, out_channels]``
    (about [-1, 1], not clipped), float32. ``chunk`` images are decoded at a time."""
    model = AutoencoderKL(config, dtype)
    fn = lambda z: model.apply({"params": params}, z, method=AutoencoderKL.decode)
    return _map_images(fn, latents / config.scaling_factor, chunk).astype(jnp.float32)


def _init(config: VAEConfig, rng):
    s = config.downsample_factor
    dummy = jnp.zeros((1, s, s, config.in_channels), jnp.float32)
    return AutoencoderKL(config).init(rng, dummy)["params"]


def param_shapes(config: VAEConfig):
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
    return jax.eval_shape(lambda: _init(config, jax.random.key(0)))


def init_params(config: VAEConfig, rng):
    """Random parameters (Flax default initialisers), e.g. for a VAE trained from scratch."""
    return jax.jit(_init, static_argnums=0)(config, rng)
