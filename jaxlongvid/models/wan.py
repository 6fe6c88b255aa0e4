"""The Wan2.1 text-to-video diffusion transformer (DiT), channels last.

``WanTransformer(config, method, dtype)`` is called as ``model.apply({"params": p}, x, timesteps, context)`` with
latents ``x [B, F, H, W, in_channels]``, timesteps ``[B]`` (the flow-matching ``1000 * sigma``) and the umT5
context ``[B, L, text_dim]``; it returns the predicted velocity ``[B, F, H, W, out_channels]`` (float32).

The computation, as in the original ``wan/modules/model.py`` (and diffusers' ``WanTransformer3DModel``):

1. patch embedding: a Conv3d with kernel = stride = ``patch_size`` (1, 2, 2), tokens in (frame, row, column)
   order, ``S = F' H' W'`` of them;
2. time: the sinusoid of ``freq_dim`` (``[cos, sin]``, max period 10000) -> Linear-SiLU-Linear (``temb``), and
   ``SiLU -> Linear`` to the 6-way modulation ``[B, 6, dim]``; text: Linear-GELU(tanh)-Linear to ``dim``;
3. ``num_layers`` blocks, each with its own ``scale_shift_table [1, 6, dim]`` added to the modulation
   (shift, scale, gate of the self-attention, then of the feed-forward):
   ``x += gate1 * SelfAttn(LN(x) (1 + scale1) + shift1)``; ``x += CrossAttn(LN_affine(x), text)``;
   ``x += gate2 * FFN(LN(x) (1 + scale2) + shift2)``. Attention projections have biases; q and k are RMS-normed
   over all heads together (before the split into heads); self-attention rotates q and k with the 3D RoPE below;
   the FFN is Linear-GELU(tanh)-Linear;
4. the head: ``LN(x) (1 + scale) + shift`` with ``scale_shift_table [1, 2, dim] + temb``, a Linear to
   ``prod(patch) * out_channels``, and unpatchify.

3D RoPE (the original's ``rope_params`` / ``rope_apply``): the head dim d splits into a frame part of
``d - 4 (d // 6)`` channels and height and width parts of ``2 (d // 6)`` each (128 -> 44 / 42 / 42); each part
rotates adjacent channel pairs ``(2k, 2k+1)`` by ``position * theta^(-2k / part)`` with its own axis's token index.
The angle tables are computed in float64 on the host per axis for exactly the grid at hand (so any frame count
works; the originals precompute ``rope_max_seq_len`` = 1024 positions and stop there), rounded once to float32 and
broadcast to the tokens inside the program.

Numerics: LayerNorms, RMSNorms, the modulation and the residual stream run in float32 whatever the compute
``dtype``; matrix products run in ``dtype``. Parameter names follow diffusers (``attn1/to_q``, ``ffn/net_0/proj``,
``scale_shift_table``) so ``convert/wan.py`` is a rename table for either checkpoint layout.

Long-video methods: self-attention over all ``S`` tokens goes through :func:`self_attention`, which rotates the
height and width parts of q and k here (absolute rotations: a token's row and column never change) and hands the
frame part to the temporal-attention core (``jaxlongvid.attention.temporal_attention`` with ``tokens_per_frame =
h w``): its ``Encoding`` is RoPE on the first ``d - 4 (d // 6)`` channels -- the frame part, in the same
adjacent-pair layout and with the same frequencies -- so a method's frame position map ``P[i, j]`` replaces the
frame distance ``j - i`` of the frame component only, and its masks over latent frames cover blocks of ``h w``
tokens. With the ``direct`` method this is Wan's 3D RoPE attention unchanged. ``method`` is one Method for every
block or a ``MethodPlan`` over the block paths ``temporal_layer_names(config)`` (``blocks_i/attn1``); IFS scores
keyframes from each block's input (the residual stream before its norm), one latent frame = ``h w`` tokens.
Merges act over latent frames: FreeNoise's windows are blocks of whole frames' tokens, FreeLong blends the global
and local branches over (frames, h, w).

Sharding (under the sampler's mesh, ``jaxlongvid.sharding``): latents in and out are split over ``data`` (batch)
and ``frames`` (latent frames), and the token sequence ``[B, S, dim]`` stays split by blocks of whole frames
after the patch embedding, after every block and before the unpatchify. Self-attention needs every key: how it
gets them is planned once per call (``sharding.sequence_parallel``, the ``context_parallel`` field) and passed to
every block -- an all-to-all over heads under ``shard_map`` where the frames axis divides the heads (12 heads of
the 1.3B model: 2, 3, 4, 6 or 12 devices), the core running unchanged on all tokens of its heads, else the
compiler's partitioning. Probing (``jaxlongvid.probing``) reads each block's ``attn1`` statistics, sown at token
level while ``intermediates`` is mutable.

Nothing here assumes Wan's VAE or umT5: ``in_channels`` and ``text_dim`` are free, so the bundled tiny DiT
(``jaxlongvid/tiny/train.py``, ``TinyConfig.dit``) runs in pixel space (3 channels) on the tiny CLIP-style text
encoder's 64-wide context. :func:`original_init` draws weights as the original's ``init_weights`` does, for
training from scratch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from jaxlongvid import sharding
from jaxlongvid.attention import Encoding, probe_statistics, temporal_attention
from jaxlongvid.attention.plan import cudnn_takes
from jaxlongvid.configs import JsonConfig
from jaxlongvid.keyframes import select_keyframes
from jaxlongvid.methods import Method, MethodPlan, as_plan
from jaxlongvid.models.layers import TimestepEmbedding, plan_kernels, timestep_sinusoid

LATENTS_SPEC = P(sharding.DATA, sharding.FRAMES)  # [B, F, H, W, C]: batch over data, latent frames over frames
TOKENS_SPEC = P(sharding.DATA, sharding.FRAMES)  # [B, S, C]: tokens are frame-major, so frames split S


@dataclass(frozen=True)
class WanConfig(JsonConfig):
    """Static architecture of a :class:`WanTransformer` (defaults: Wan2.1-T2V-1.3B)."""

    patch_size: tuple[int, int, int] = (1, 2, 2)  # (frames, height, width) per token
    num_heads: int = 12
    head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096  # umT5-XXL width
    freq_dim: int = 256  # timestep sinusoid width
    ffn_dim: int = 8960
    num_layers: int = 30
    cross_attn_norm: bool = True  # affine LayerNorm before the cross-attention
    eps: float = 1e-6  # every LayerNorm and RMSNorm
    rope_theta: float = 10000.0
    rope_max_seq_len: int = 1024  # the originals' RoPE table length (kept for the round trip; not a limit here)
    native_frames: int = 21  # latent frames of the training clips (81 video frames): N0 of the methods' maps

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"WanConfig.patch_size must be 3 positive ints, got {self.patch_size}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"WanConfig.head_dim must be even and >= 6 (3D RoPE), got {self.head_dim}")
        for name in ("num_heads", "in_channels", "out_channels", "text_dim", "freq_dim", "ffn_dim", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"WanConfig.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def downsample_factor(self) -> int:
        """Latent pixels per token side (the pipeline's spatial factor is the VAE's times this)."""
        if self.patch_size[1] != self.patch_size[2]:
            raise ValueError(f"non-square patches {self.patch_size[1:]} have no single downsample factor")
        return self.patch_size[1]

    # ---- the released models ---------------------------------------------------------------------------------
    @classmethod
    def wan_1_3b(cls) -> "WanConfig":
        """Wan2.1-T2V-1.3B: dim 1536, ffn 8960, 12 heads x 128, 30 layers."""
        return cls(num_heads=12, head_dim=128, ffn_dim=8960, num_layers=30)

    @classmethod
    def wan_14b(cls) -> "WanConfig":
        """Wan2.1-T2V-14B: dim 5120, ffn 13824, 40 heads x 128, 40 layers."""
        return cls(num_heads=40, head_dim=128, ffn_dim=13824, num_layers=40)

    @classmethod
    def from_diffusers(cls, config: dict) -> "WanConfig":
        """From a diffusers ``transformer/config.json`` (``WanTransformer3DModel``); text-to-video only."""
        for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
            if config.get(key) is not None:
                raise ValueError(f"WanConfig.from_diffusers: {key}={config[key]} is an image-conditioned Wan "
                                 f"(I2V / FLF2V); only text-to-video transformers are supported")
        qk_norm = config.get("qk_norm", "rms_norm_across_heads")
        if qk_norm != "rms_norm_across_heads":
            raise ValueError(f"WanConfig.from_diffusers: qk_norm={qk_norm!r} is not supported "
                             f"(Wan2.1 uses 'rms_norm_across_heads')")
        return cls(patch_size=tuple(config.get("patch_size", (1, 2, 2))),
                   num_heads=config.get("num_attention_heads", 40), head_dim=config.get("attention_head_dim", 128),
                   in_channels=config.get("in_channels", 16), out_channels=config.get("out_channels") or
                   config.get("in_channels", 16), text_dim=config.get("text_dim", 4096),
                   freq_dim=config.get("freq_dim", 256), ffn_dim=config.get("ffn_dim", 13824),
                   num_layers=config.get("num_layers", 40), cross_attn_norm=config.get("cross_attn_norm", True),
                   eps=config.get("eps", 1e-6), rope_max_seq_len=config.get("rope_max_seq_len", 1024))

    @classmethod
    def from_original(cls, config: dict) -> "WanConfig":
        """From the original release's ``config.json`` (``WanModel``: ``dim``, ``num_heads``, ``in_dim`` ...)."""
        model_type = config.get("model_type", "t2v")
        if model_type != "t2v":
            raise ValueError(f"WanConfig.from_original: model_type={model_type!r}; only 't2v' is supported")
        dim, heads = config.get("dim", 2048), config.get("num_heads", 16)
        if dim % heads:
            raise ValueError(f"WanConfig.from_original: dim {dim} is not divisible by num_heads {heads}")
        return cls(patch_size=tuple(config.get("patch_size", (1, 2, 2))), num_heads=heads, head_dim=dim // heads,
                   in_channels=config.get("in_dim", 16), out_channels=config.get("out_dim", 16),
                   text_dim=config.get("text_dim", 4096), freq_dim=config.get("freq_dim", 256),
                   ffn_dim=config.get("ffn_dim", 8192), num_layers=config.get("num_layers", 32),
                   cross_attn_norm=config.get("cross_attn_norm", True), eps=config.get("eps", 1e-6))


# ---- 3D RoPE ----------------------------------------------------------------------------------------------------
def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of the head given to frames, height and width: ``d - 4 (d // 6)``, ``2 (d // 6)``, ``2 (d // 6)``."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_rotation(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0,
                  axes: tuple[int, ...] = (0, 1, 2)) -> tuple[jnp.ndarray, jnp.ndarray]:
    """float32 ``(cos, sin)``, each ``[f h w, pairs]``, of the chosen ``axes``' parts of the 3D RoPE.

    Pair k of an axis part of width ``c`` turns by ``position * theta ** (-2k / c)``, position being the token's
    index along that axis (frame, row, column); the parts are concatenated in axis order.

    Each axis's table (``[n, width / 2]``, float64 on the host, rounded once) is a small constant; the per-token
    tables are broadcast from them inside the program, so a long video's program does not carry ``[tokens, d]``
    constants (at 321 frames of 480x832 those were 42 MB per call, 2.5 GB over the 1.3B model).
    """
    cos, sin = [], []
    for axis in axes:
        n, width = grid[axis], rope_split(head_dim)[axis]
        freqs = 1.0 / theta ** (np.arange(0, width, 2, dtype=np.float64) / width)
        shape = [1, 1, 1, width // 2]
        shape[axis] = n
        angle = (np.arange(n, dtype=np.float64)[:, None] * freqs[None, :]).reshape(shape)
        full = tuple(grid) + (width // 2,)
        cos.append(jnp.broadcast_to(jnp.asarray(np.cos(angle), jnp.float32), full))
        sin.append(jnp.broadcast_to(jnp.asarray(np.sin(angle), jnp.float32), full))
    pairs = sum(c.shape[-1] for c in cos)
    return jnp.concatenate(cos, axis=-1).reshape(-1, pairs), jnp.concatenate(sin, axis=-1).reshape(-1, pairs)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate channel pairs ``(2k, 2k+1)`` of ``x [B, S, heads, d]`` by the angles of ``cos, sin [S, d / 2]``
    (float32 math)."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    pairs = x.astype(jnp.float32).reshape(x.shape[:-1] + (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


# ---- attention ----------------------------------------------------------------------------------------------------
def frame_encoding(config: WanConfig) -> Encoding:
    """The frame component of the 3D RoPE as the attention core's encoding: RoPE on the first ``d - 4 (d // 6)``
    channels of each head (adjacent pairs, ``theta^(-2k / width)``), native length ``config.native_frames``."""
    return Encoding(rope_dim=rope_split(config.head_dim)[0], rope_theta=config.rope_theta,
                    native_frames=config.native_frames)


def self_attention(q, k, v, grid: tuple[int, int, int], method: Method, encoding: Encoding, keyframes=None,
                   implementation: Optional[str] = None) -> jnp.ndarray:
    """Wan's 3D-RoPE self-attention of ``[B, S, heads, d]`` (un-rotated q, k) under ``method``.

    The height and width channels are rotated here by the tokens' absolute rows and columns; the frame channels
    (the encoding's ``rope_dim``) go to the core unrotated, which rotates them by the method's frame position
    maps (``module docstring``). ``keyframes``: IFS keyframes ``[B, n]`` over latent frames.
    """
    return temporal_attention(spatial_rotation(q, grid, encoding), spatial_rotation(k, grid, encoding), v,
                              encoding=encoding, method=method, keyframes=keyframes, spatial_shape=grid[1:],
                              implementation=implementation, tokens_per_frame=grid[1] * grid[2])


def spatial_rotation(x, grid: tuple[int, int, int], encoding: Encoding) -> jnp.ndarray:
    """``x [B, S, heads, d]`` with its height and width channels rotated by the tokens' rows and columns (the
    frame channels, the encoding's first ``rope_dim``, untouched: the core rotates them under the method)."""
    fw = encoding.rope_dim
    cos, sin = rope_rotation(grid, x.shape[-1], encoding.rope_theta, axes=(1, 2))  # height and width pairs
    return jnp.concatenate([x[..., :fw], apply_rope(x[..., fw:], cos, sin)], axis=-1)


def token_keyframes(features, grid: tuple[int, int, int], method: Method, native_frames: int) -> jnp.ndarray:
    """IFS keyframes ``[B, n]`` scored from tokens ``[B, f h w, C]``: each latent frame's ``h w`` tokens are its
    pixels (``keyframes.select_keyframes`` on ``[f, h w, C]`` per batch element)."""
    b, _, c = features.shape
    f, h, w = grid
    frames = features.reshape(b, f, h * w, c)
    segments = method.mask.segments(f, native_frames)
    return jax.vmap(lambda one: select_keyframes(one, segments))(frames)


def cross_implementation(choice: Optional[str], dtype, backend: Optional[str] = None) -> Optional[str]:
    """Cross attention's ``jax.nn.dot_product_attention`` implementation under the model's
    ``attention_implementation``: "auto" and "pallas" (which names the self-attention kernel) take cuDNN on
    GPUs in half precision and XLA elsewhere (``layers.plan_kernels``); other choices pass through."""
    if choice not in ("auto", "pallas"):
        return choice
    return plan_kernels(choice, backend or jax.default_backend(), dtype).spatial


def cross_attention(q, k, v, implementation: Optional[str] = None) -> jnp.ndarray:
    """Tokens ``[B, S, heads, d]`` attending to the text ``[B, L, heads, d]`` (no mask: padded rows included)."""
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * scale`` over the last axis (float32 statistics), back in ``dtype``."""

    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        y = (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)).astype(self.dtype)
        return y * scale.astype(self.dtype)


def layer_norm(x, eps: float) -> jnp.ndarray:
    """LayerNorm without affine parameters, float32 (two-pass variance)."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centered = x - mean
    return centered * jax.lax.rsqrt(jnp.mean(jnp.square(centered), axis=-1, keepdims=True) + eps)


class WanAttention(nn.Module):
    """Multi-head attention with biased projections and q / k RMS-normed across all heads (``attn1`` / ``attn2``).

    Self-attention (``grid`` given: the token grid ``(f, h, w)``): 3D RoPE under ``method`` (:func:`self_attention`),
    ``features`` the block input that IFS scores, run as ``parallel`` says under a mesh (all-to-all over heads:
    ``sharding.attend_over_heads``); while ``intermediates`` is mutable it sows the layer-probing statistics
    (``attention.probe_statistics``, token level). ``context``: cross-attention to the text.
    """

    heads: int
    head_dim: int
    eps: float
    dtype: jnp.dtype = jnp.float32
    implementation: Optional[str] = None
    method: Method = Method("direct")
    encoding: Encoding = Encoding()
    parallel: sharding.SequenceParallel = sharding.SequenceParallel()  # decided once by WanTransformer

    @nn.compact
    def __call__(self, x, context=None, grid=None, features=None):
        inner = self.heads * self.head_dim
        source = x if context is None else context
        dense = lambda name: nn.Dense(inner, dtype=self.dtype, name=name)
        split = lambda y: y.reshape(y.shape[:-1] + (self.heads, self.head_dim))
        q = split(RMSNorm(self.eps, self.dtype, name="norm_q")(dense("to_q")(x)))
        k = split(RMSNorm(self.eps, self.dtype, name="norm_k")(dense("to_k")(source)))
        v = split(dense("to_v")(source))
        if context is None:
            keyframes = None
            if self.method.needs_keyframes:
                keyframes = token_keyframes(x if features is None else features, grid, self.method,
                                            self.encoding.native_frames)
            if self.is_mutable_collection("intermediates"):  # layer probing only (jaxlongvid.probing)
                stats = probe_statistics(spatial_rotation(q, grid, self.encoding),
                                         spatial_rotation(k, grid, self.encoding), encoding=self.encoding,
                                         method=self.method, keyframes=keyframes, tokens_per_frame=grid[1] * grid[2])
                for name, value in stats.items():
                    self.sow("intermediates", name, value)
            extras = () if keyframes is None else (keyframes,)
            attend = lambda q, k, v, *kf: self_attention(q, k, v, grid, self.method, self.encoding, *kf,
                                                         implementation=self.implementation)
            if self.parallel.kind == "heads":
                out = sharding.attend_over_heads(attend, q, k, v, *extras)
            else:
                out = attend(q, k, v, *extras)
        else:
            out = cross_attention(q, k, v, self.implementation)
        out = out.reshape(out.shape[:-2] + (inner,))
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out)


class FeedForward(nn.Module):
    """Linear -> GELU (tanh approximation) -> Linear (``fc1``, ``fc2``)."""

    inner: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(self.inner, dtype=self.dtype, name="fc1")(x), approximate=True)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


class WanBlock(nn.Module):
    """One DiT block (module docstring, step 3). ``x [B, S, dim]`` float32; ``modulation [B, 6, dim]`` float32."""

    config: WanConfig
    dtype: jnp.dtype = jnp.float32
    implementation: Optional[str] = None
    method: Method = Method("direct")  # this block's self-attention method
    cross_implementation: Optional[str] = None  # cross attention's (``cross_implementation``)
    parallel: sharding.SequenceParallel = sharding.SequenceParallel()  # its context parallelism under a mesh

    @nn.compact
    def __call__(self, x, modulation, context, grid):
        cfg = self.config
        table = self.param("scale_shift_table", nn.initializers.normal(cfg.dim ** -0.5), (1, 6, cfg.dim))
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(table + modulation, 6, axis=1)  # [B, 1, dim]
        attention = lambda name, implementation, **kw: WanAttention(cfg.num_heads, cfg.head_dim, cfg.eps,
                                                                    self.dtype, implementation, name=name, **kw)
        h = (layer_norm(x, cfg.eps) * (1 + scale1) + shift1).astype(self.dtype)
        self_attn = attention("attn1", self.implementation, method=self.method, encoding=frame_encoding(cfg),
                              parallel=self.parallel)
        x = x + self_attn(h, grid=grid, features=x).astype(jnp.float32) * gate1
        h = x
        if cfg.cross_attn_norm:
            h = nn.LayerNorm(epsilon=cfg.eps, use_fast_variance=False, dtype=jnp.float32, name="norm2")(x)
        x = x + attention("attn2", self.cross_implementation)(h.astype(self.dtype), context=context).astype(
            jnp.float32)
        h = (layer_norm(x, cfg.eps) * (1 + scale2) + shift2).astype(self.dtype)
        x = x + FeedForward(cfg.ffn_dim, self.dtype, name="ffn")(h).astype(jnp.float32) * gate2
        return sharding.constrain(x, TOKENS_SPEC)


def temporal_layer_names(config: WanConfig) -> tuple[str, ...]:
    """Paths of the self-attentions the methods act on, in forward order (a MethodPlan's layer ``i`` is block
    ``i``)."""
    return tuple(f"blocks_{i}/attn1" for i in range(config.num_layers))


def layer_methods(config: WanConfig, method) -> tuple[Method, ...]:
    """Each block's Method: a preset name, Method or MethodPlan resolved once over ``temporal_layer_names``."""
    names = temporal_layer_names(config)
    plan = as_plan(method).resolve(names)
    return tuple(plan.for_layer(name) for name in names)


class TextProjection(nn.Module):
    """Linear -> GELU (tanh) -> Linear (``linear_1``, ``linear_2``): umT5 width to the model width."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x)
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.gelu(x, approximate=True))


class WanConditionEmbedder(nn.Module):
    """Timesteps -> (``temb [B, dim]``, modulation ``[B, 6, dim]``), float32; text ``[B, L, text_dim]`` -> ``dim``."""

    config: WanConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, timesteps, context):
        cfg = self.config
        sinusoid = timestep_sinusoid(jnp.asarray(timesteps, jnp.float32), cfg.freq_dim)
        temb = TimestepEmbedding(cfg.dim, jnp.float32, name="time_embedder")(sinusoid)
        modulation = nn.Dense(6 * cfg.dim, dtype=jnp.float32, name="time_proj")(nn.silu(temb))
        text = TextProjection(cfg.dim, self.dtype, name="text_embedder")(context.astype(self.dtype))
        return temb, modulation.reshape(-1, 6, cfg.dim), text


def unpatchify(tokens: jnp.ndarray, grid: tuple[int, int, int], patch: tuple[int, int, int],
               channels: int) -> jnp.ndarray:
    """``[B, f h w, pt ph pw C]`` (per token: patch offsets then channel) -> ``[B, f pt, h ph, w pw, C]``."""
    b = tokens.shape[0]
    (f, h, w), (pt, ph, pw) = grid, patch
    x = tokens.reshape(b, f, h, w, pt, ph, pw, channels)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, f * pt, h * ph, w * pw, channels)


class WanTransformer(nn.Module):
    """The Wan DiT (module docstring). ``method``: a preset name, Method or MethodPlan (per block);
    ``context_parallel``: how self-attention runs on tokens split over a mesh's frames axis ("auto", "heads",
    "xla": ``sharding.sequence_parallel``)."""

    config: WanConfig
    method: Union[str, Method, MethodPlan] = "direct"
    dtype: jnp.dtype = jnp.float32
    attention_implementation: Optional[str] = "auto"  # None (jnp) | auto | xla | cudnn | pallas, as the UNets'
    context_parallel: str = "auto"

    @nn.compact
    def __call__(self, x, timesteps, context):
        cfg = self.config
        methods = layer_methods(cfg, self.method)
        b, f, hh, ww, c = x.shape
        pt, ph, pw = cfg.patch_size
        if c != cfg.in_channels:
            raise ValueError(f"WanTransformer: latents have {c} channels, the model takes {cfg.in_channels}")
        if f % pt or hh % ph or ww % pw:
            raise ValueError(f"WanTransformer: latent grid {(f, hh, ww)} is not divisible by patch {cfg.patch_size}")
        if context.ndim != 3 or context.shape[-1] != cfg.text_dim:
            raise ValueError(f"WanTransformer: context must be [B, L, {cfg.text_dim}], got {context.shape}")
        grid = (f // pt, hh // ph, ww // pw)
        parallel = sharding.sequence_parallel(cfg.num_heads, math.prod(grid), b, self.context_parallel)
        x = sharding.constrain(x, LATENTS_SPEC)
        x = nn.Conv(cfg.dim, cfg.patch_size, strides=cfg.patch_size, padding="VALID", dtype=self.dtype,
                    name="patch_embedding")(x.astype(self.dtype))
        x = sharding.constrain(x.reshape(b, -1, cfg.dim).astype(jnp.float32), TOKENS_SPEC)

        temb, modulation, context = WanConditionEmbedder(cfg, self.dtype, name="condition_embedder")(
            timesteps, context)
        cross = cross_implementation(self.attention_implementation, self.dtype)
        for i in range(cfg.num_layers):
            x = WanBlock(cfg, self.dtype, self.attention_implementation, methods[i], cross, parallel,
                         name=f"blocks_{i}")(
                x, modulation, context, grid)

        table = self.param("scale_shift_table", nn.initializers.normal(cfg.dim ** -0.5), (1, 2, cfg.dim))
        shift, scale = jnp.split(table + temb[:, None, :], 2, axis=1)
        x = (layer_norm(x, cfg.eps) * (1 + scale) + shift).astype(self.dtype)
        x = nn.Dense(math.prod(cfg.patch_size) * cfg.out_channels, dtype=self.dtype, name="proj_out")(x)
        x = sharding.constrain(x.astype(jnp.float32), TOKENS_SPEC)
        return sharding.constrain(unpatchify(x, grid, cfg.patch_size, cfg.out_channels), LATENTS_SPEC)


# ---- memory estimate (jaxlongvid.memory) ----------------------------------------------------------------------
LOGIT_COPIES = 4  # float32 [queries x keys] arrays live at self-attention's peak where logits are formed
STREAM_COPIES = 8  # float32 [tokens, dim] arrays live in a block: residual, norm, q, k, v, attention, cross, spare
FFN_COPIES = 2  # float32 [tokens, ffn_dim] arrays: the hidden layer before and after its GELU


def token_grid(config: WanConfig, frames: int, h: int, w: int) -> tuple[int, int]:
    """``(frames of tokens, tokens per frame)`` of ``frames`` latent frames of ``h x w`` latents (a partial
    patch counted whole)."""
    pf, ph, pw = config.patch_size
    return -(-frames // pf), -(-h // ph) * -(-w // pw)


def attention_bytes(config: WanConfig, frames: int, keys: int, maps: int, h: int, w: int, batch: int, *,
                    backend: str, dtype: str, implementation: str) -> int:
    """Bytes of self-attention's float32 logits where its kernel forms them: ``LOGIT_COPIES`` x ``batch`` x heads
    x S query tokens x the ``keys`` key frames' tokens x ``maps`` position maps per query. Formed by the jnp path
    over token maps (CPUs; TPUs; GPUs in float32 or under 'xla' -- where that runs one fused XLA call per query
    frame it forms only that frame's rows, so this errs high). On a GPU with cuDNN's input (half precision, head
    dim a multiple of 8) under 'auto', 'cudnn' or 'pallas', every path (cuDNN over all tokens, one cuDNN call
    per query frame, the block-sparse kernel) keeps the logits on chip: 0."""
    on_chip = backend == "gpu" and cudnn_takes(dtype, config.head_dim) \
        and implementation != "xla"
    if on_chip:
        return 0
    f, t = token_grid(config, frames, h, w)
    key_tokens = token_grid(config, keys, h, w)[0] * t
    return LOGIT_COPIES * batch * config.num_heads * f * t * key_tokens * maps * 4


def activation_bytes(config: WanConfig, frames: int, h: int, w: int, batch: int) -> int:
    """Bytes of a block's live float32 activations over all S tokens: ``STREAM_COPIES`` of width ``dim`` and
    ``FFN_COPIES`` of width ``ffn_dim``."""
    f, t = token_grid(config, frames, h, w)
    return batch * f * t * (STREAM_COPIES * config.dim + FFN_COPIES * config.ffn_dim) * 4


# ---- training from scratch ----------------------------------------------------------------------------------------
EMBEDDER_STD = 0.02  # the original's N(0, 0.02) for the Linears of the time and text embedders


def original_init(params: dict, key) -> dict:
    """Weights drawn as the original ``WanModel.init_weights`` draws them, for a parameter tree of
    :class:`WanTransformer` (only its shapes are read), so that a model trained from scratch starts as Wan's own
    training does:

    * every Linear: Xavier-uniform kernel (``U(+-sqrt(6 / (fan_in + fan_out)))``), zero bias;
    * the patch embedding: Xavier-uniform over its kernel flattened to ``[dim, prod(patch) in_channels]``, bias
      as PyTorch's Conv3d draws it, ``U(+-1 / sqrt(fan_in))``;
    * the Linears of the time and text embedders (``time_embedder``, ``text_embedder``): kernels N(0, 0.02);
    * the output projection ``proj_out``: zero (the initial model predicts a zero velocity everywhere);
    * the ``scale_shift_table``\\ s: N(0, 1 / dim); norm scales one, norm biases zero.
    """
    flat = traverse_util.flatten_dict(params)
    # a layer's fan-in, from its kernel: Dense [in, out]; Conv [kt, kh, kw, in, out]
    fan_ins = {path[:-1]: math.prod(np.shape(leaf)[:-1]) for path, leaf in flat.items() if path[-1] == "kernel"}
    fresh = {path: initial_leaf(path, tuple(np.shape(leaf)), fan_ins.get(path[:-1], 0), jax.random.fold_in(key, i))
             for i, (path, leaf) in enumerate(sorted(flat.items()))}
    return traverse_util.unflatten_dict(fresh)


def initial_leaf(path: tuple[str, ...], shape: tuple[int, ...], fan_in: int, key) -> jnp.ndarray:
    """One leaf of :func:`original_init` from its path in the tree (``("blocks_0", "ffn", "fc1", "kernel")``) and
    its layer's fan-in."""
    layer, leaf = path[-2] if len(path) > 1 else "", path[-1]
    if leaf == "scale_shift_table":
        return jax.random.normal(key, shape) * shape[-1] ** -0.5
    if leaf == "scale":  # RMSNorm and LayerNorm gains
        return jnp.ones(shape)
    if layer == "proj_out" or (leaf == "bias" and layer != "patch_embedding"):
        return jnp.zeros(shape)
    if leaf == "bias":  # the patch embedding's
        return jax.random.uniform(key, shape, minval=-1.0, maxval=1.0) * fan_in ** -0.5
    if leaf != "kernel":
        raise ValueError(f"original_init: no rule for the parameter {'/'.join(path)} {shape}")
    if any(name in ("time_embedder", "text_embedder") for name in path):
        return jax.random.normal(key, shape) * EMBEDDER_STD
    bound = math.sqrt(6.0 / (fan_in + shape[-1]))
    return jax.random.uniform(key, shape, minval=-bound, maxval=bound)
