"""One configurable 3D UNet for LaVie, VideoCrafter1/2 and ModelScope / ZeroScope (Flax Linen, channels last).

``UNet3D(config, method)`` is called as ``model.apply({"params": p}, x, timesteps, context, fps=None)`` with
``x: [B, F, H, W, C_in]``, ``timesteps: [B]`` (or a scalar), ``context: [B, L, D]`` and returns
``[B, F, H, W, C_out]`` (float32). The released architectures are the presets ``UNet3DConfig.lavie()``,
``.videocrafter1()``, ``.videocrafter2()`` and ``.modelscope()``; the converters in ``convert/unet.py`` turn
the original constructor arguments into a config.

Layout, shared by all families: per-frame 2-D convolutions; levels of ResNet blocks, each optionally followed
by attention; a stride-2 conv between levels; a middle block (ResNet, attention, ResNet); a decoder with one
more ResNet per level fed with the encoder's skips (concatenated ``[h, skip]``) and nearest x2 upsampling.
The families differ only in where the temporal layers sit (config fields):

* ``temporal_layout="in_spatial"`` (LaVie): inside every spatial transformer block, after the text
  cross-attention: LayerNorm ``norm_temp`` -> temporal attention (RoPE on the first 32 dims of each head +
  T5 bias) -> residual.
* ``temporal_layout="transformer"`` (VideoCrafter, ModelScope): a temporal transformer after every spatial
  one (two temporal self-attentions + GEGLU), plus ``temporal_in``: one more right after ``conv_in`` (8 heads,
  VideoCrafter ``init_attn`` / ModelScope ``transformer_in``); ``temporal_conv`` adds the 4-conv temporal
  block after every ResNet (VideoCrafter2 ``temopral_conv``, ModelScope ``temp_convs``).

GroupNorm statistics, per frame or pooled over all frames of a video, follow each original exactly:

===============================  ==============================  =======================================
module                           LaVie                           VideoCrafter1/2, ModelScope
===============================  ==============================  =======================================
ResNet norms, output norm        pooled over frames              per frame
spatial transformer input norm   per frame                       per frame
temporal transformer input norm  (none)                          pooled over frames
temporal conv norms              (none)                          pooled over frames
LayerNorms                       per token                       per token
===============================  ==============================  =======================================

(``frame_pooled_resnet_norm`` selects the first row.) Activations carry the sharding ``P("data", "frames")``
so under a mesh the frame axis stays split over devices; pooled statistics become cross-device reductions.

Every temporal attention is :class:`jaxlongvid.attention.TemporalAttention`. Layer ``i`` in forward order,
named by its parameter path (``temporal_layer_names(config)``), runs ``as_plan(method).resolve(names).for_layer(path)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlongvid.attention import Encoding
from jaxlongvid.configs import JsonConfig
from jaxlongvid.methods import Method, MethodPlan, as_plan
from jaxlongvid.models.layers import (KernelPlan, ResnetBlock, SpatialTransformer, TemporalTransformer,
                                      TimestepEmbedding, GroupNorm, conv2d, plan_kernels, shard_frames,
                                      timestep_sinusoid, upsample_nearest)

TEMPORAL_LAYOUTS = ("in_spatial", "transformer")
DEFAULT_FPS = 16  # VideoCrafter2's UNetModel.forward default when no fps is given


@dataclass(frozen=True)
class UNet3DConfig(JsonConfig):
    """Static architecture of a :class:`UNet3D` (hashable; ``to_dict`` / ``from_dict`` for JSON).

    Defaults are LaVie base. ``attention_heads[level]`` is the number of heads at a level (head dim =
    channels / heads); the middle block uses the last level's.
    """

    family: str = "lavie"  # lavie | videocrafter1 | videocrafter2 | modelscope | custom (informative)
    in_channels: int = 4
    out_channels: int = 4
    block_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2  # ResNets per encoder level (the decoder has one more)
    attention_levels: tuple[bool, ...] = (True, True, True, False)  # attention after each ResNet of a level
    attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    cross_attention_dim: int = 768
    transformer_depth: int = 1  # blocks per spatial and per temporal transformer
    norm_groups: int = 32
    norm_eps: float = 1e-5  # ResNet and output GroupNorms (transformer input norms use 1e-6)
    temporal_layout: str = "in_spatial"  # in_spatial (LaVie) | transformer (VideoCrafter, ModelScope)
    frame_pooled_resnet_norm: bool = True  # ResNet / output GroupNorm statistics over all frames (LaVie)
    temporal_conv: bool = False  # 4-conv temporal block after every ResNet (VideoCrafter2, ModelScope)
    temporal_in: bool = False  # temporal transformer after conv_in (VideoCrafter, ModelScope)
    temporal_in_heads: int = 8
    temporal_in_head_dim: int = 64
    fps_conditioning: bool = False  # VideoCrafter2: an fps embedding added to the time embedding
    rope_dim: int = 32  # temporal position encoding (see jaxlongvid.attention.Encoding)
    t5_buckets: int = 32
    t5_max_distance: int = 32
    rel_distance: int = 0
    native_frames: int = 16

    def __post_init__(self):
        for name in ("block_channels", "attention_levels", "attention_heads"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "attention_levels", tuple(bool(a) for a in self.attention_levels))
        levels = len(self.block_channels)
        if levels < 1:
            raise ValueError("UNet3DConfig.block_channels must name at least one level")
        for name in ("attention_levels", "attention_heads"):
            if len(getattr(self, name)) != levels:
                raise ValueError(f"UNet3DConfig.{name} needs one entry per level ({levels}), got "
                                 f"{getattr(self, name)}")
        if self.temporal_layout not in TEMPORAL_LAYOUTS:
            raise ValueError(f"UNet3DConfig.temporal_layout must be one of {TEMPORAL_LAYOUTS}, got "
                             f"{self.temporal_layout!r}")
        for name in ("in_channels", "out_channels", "layers_per_block", "cross_attention_dim",
                     "transformer_depth", "norm_groups", "temporal_in_heads", "temporal_in_head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"UNet3DConfig.{name} must be >= 1, got {getattr(self, name)}")
        for level, (ch, heads) in enumerate(zip(self.block_channels, self.attention_heads)):
            if ch % self.norm_groups:
                raise ValueError(f"level {level}: {ch} channels are not divisible by norm_groups={self.norm_groups}")
            if heads < 1 or ch % heads:
                raise ValueError(f"level {level}: {ch} channels cannot be split into {heads} attention heads")
        self.encoding  # validates the encoding fields
        for dim in self.temporal_head_dims():
            if self.rope_dim > dim:
                raise ValueError(f"rope_dim={self.rope_dim} exceeds a temporal head dim ({dim})")

    # ---- derived -------------------------------------------------------------------------------------------
    @property
    def encoding(self) -> Encoding:
        return Encoding(rope_dim=self.rope_dim, t5_buckets=self.t5_buckets, t5_max_distance=self.t5_max_distance,
                        rel_distance=self.rel_distance, native_frames=self.native_frames)

    @property
    def num_levels(self) -> int:
        return len(self.block_channels)

    def head_dim(self, level: int) -> int:
        return self.block_channels[level] // self.attention_heads[level]

    def temporal_head_dims(self) -> list[int]:
        dims = [self.head_dim(l) for l, a in enumerate(self.attention_levels) if a] + [self.head_dim(-1)]
        return dims + ([self.temporal_in_head_dim] if self.temporal_in else [])

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self.num_levels - 1)

    # ---- the released architectures ------------------------------------------------------------------------
    @classmethod
    def lavie(cls) -> "UNet3DConfig":
        """LaVie base: SD 1.4's UNet inflated (8 heads per level), RoPE(32) + T5 bias temporal attention."""
        return cls()

    @classmethod
    def videocrafter1(cls) -> "UNet3DConfig":
        """VideoCrafter1 t2v 512 (``inference_t2v_512_v1.0.yaml``): 64-dim heads, relative K/V tables R=16."""
        return cls(family="videocrafter1", attention_heads=(5, 10, 20, 20), cross_attention_dim=1024,
                   temporal_layout="transformer", frame_pooled_resnet_norm=False, temporal_in=True,
                   rope_dim=0, t5_buckets=0, rel_distance=16)

    @classmethod
    def videocrafter2(cls) -> "UNet3DConfig":
        """VideoCrafter2 t2v 512 (``inference_t2v_512_v2.0.yaml``): temporal convs, fps conditioning, no
        temporal position encoding."""
        return cls.videocrafter1().replace(family="videocrafter2", temporal_conv=True, fps_conditioning=True,
                                           rel_distance=0)

    @classmethod
    def modelscope(cls) -> "UNet3DConfig":
        """ModelScope text-to-video 1.7B / ZeroScope v2 (diffusers ``UNet3DConditionModel`` defaults)."""
        return cls.videocrafter2().replace(family="modelscope", fps_conditioning=False)


PRESETS = {"lavie": UNet3DConfig.lavie, "videocrafter1": UNet3DConfig.videocrafter1,
           "videocrafter2": UNet3DConfig.videocrafter2, "modelscope": UNet3DConfig.modelscope}


# ---- temporal layers in forward order ----------------------------------------------------------------------
def _attention_modules(config: UNet3DConfig) -> list[str]:
    """Paths of the modules that hold temporal attention, in forward order."""
    kind = "attentions" if config.temporal_layout == "in_spatial" else "temp_attentions"
    paths = ["transformer_in"] if config.temporal_in else []
    for level, attn in enumerate(config.attention_levels):
        if attn:
            paths += [f"down_blocks_{level}/{kind}_{j}" for j in range(config.layers_per_block)]
    paths.append(f"mid_block/{kind}_0")
    for i, level in enumerate(reversed(range(config.num_levels))):
        if config.attention_levels[level]:
            paths += [f"up_blocks_{i}/{kind}_{j}" for j in range(config.layers_per_block + 1)]
    return paths


def _layers_in(config: UNet3DConfig, module: str) -> list[str]:
    blocks = range(config.transformer_depth)
    if config.temporal_layout == "in_spatial" and module != "transformer_in":
        return [f"{module}/transformer_blocks_{d}/attn_temp" for d in blocks]
    return [f"{module}/transformer_blocks_{d}/attn{i}" for d in blocks for i in (1, 2)]


def temporal_layer_names(config: UNet3DConfig) -> tuple[str, ...]:
    """Parameter paths of every temporal attention, in forward order (layer ``i`` is entry ``i``)."""
    return tuple(name for module in _attention_modules(config) for name in _layers_in(config, module))


# ---- blocks ----------------------------------------------------------------------------------------------------
class _Stage(nn.Module):
    """Shared constructors for the encoder, middle and decoder blocks of one level."""

    config: UNet3DConfig
    level: int
    methods: tuple[tuple[Method, ...], ...] = ()  # per attention module of this block, in forward order
    dtype: jnp.dtype = jnp.float32
    kernels: KernelPlan = KernelPlan()

    def resnet(self, name: str):
        cfg = self.config
        return ResnetBlock(cfg.block_channels[self.level], cfg.norm_groups, cfg.norm_eps,
                           cfg.frame_pooled_resnet_norm, cfg.temporal_conv, dtype=self.dtype, name=name)

    def attention(self, x, context, j: int, methods: tuple[Method, ...]):
        cfg = self.config
        heads, head_dim = cfg.attention_heads[self.level], cfg.head_dim(self.level)
        in_spatial = cfg.temporal_layout == "in_spatial"
        x = SpatialTransformer(heads, head_dim, cfg.norm_groups, cfg.transformer_depth,
                               methods if in_spatial else (), cfg.encoding, self.dtype, self.kernels,
                               name=f"attentions_{j}")(x, context)
        if not in_spatial:
            x = TemporalTransformer(heads, head_dim, cfg.norm_groups, methods, cfg.encoding, self.dtype,
                                    self.kernels, name=f"temp_attentions_{j}")(x)
        return x


class DownBlock(_Stage):
    @nn.compact
    def __call__(self, x, temb, context):
        cfg = self.config
        skips = []
        for j in range(cfg.layers_per_block):
            x = self.resnet(f"resnets_{j}")(x, temb)
            if cfg.attention_levels[self.level]:
                x = self.attention(x, context, j, self.methods[j])
            skips.append(x)
        if self.level != cfg.num_levels - 1:
            x = shard_frames(conv2d(x.shape[-1], 3, "downsamplers_0", self.dtype, stride=2)(x))
            skips.append(x)
        return x, skips


class MidBlock(_Stage):
    @nn.compact
    def __call__(self, x, temb, context):
        x = self.resnet("resnets_0")(x, temb)
        x = self.attention(x, context, 0, self.methods[0])
        return self.resnet("resnets_1")(x, temb)


class UpBlock(_Stage):
    @nn.compact
    def __call__(self, x, skips, temb, context):
        cfg = self.config
        for j in range(cfg.layers_per_block + 1):
            x = shard_frames(jnp.concatenate([x, skips.pop()], axis=-1))
            x = self.resnet(f"resnets_{j}")(x, temb)
            if cfg.attention_levels[self.level]:
                x = self.attention(x, context, j, self.methods[j])
        if self.level != 0:
            x = conv2d(x.shape[-1], 3, "upsamplers_0", self.dtype)(upsample_nearest(x))
            x = shard_frames(x)
        return x


def _per_video(name: str, value, batch: int) -> jnp.ndarray:
    value = jnp.asarray(value)
    if value.ndim == 0:
        return jnp.broadcast_to(value, (batch,))
    if value.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or have shape [{batch}] (one per video), got {value.shape}")
    return value


class UNet3D(nn.Module):
    """The 3D UNet (see the module docstring). ``method``: preset name, Method or MethodPlan (static)."""

    config: UNet3DConfig
    method: Union[str, Method, MethodPlan] = "direct"
    dtype: jnp.dtype = jnp.float32  # compute dtype (parameters may be float32 or cast_params'd to it)
    attention_implementation: str = "auto"  # auto | xla | cudnn | pallas: see layers.plan_kernels
    chunk_bytes: Optional[int] = None  # bound on a frame chunk's intermediate; None: per backend (plan_kernels)

    def _layer_methods(self) -> dict[str, Method]:
        names = temporal_layer_names(self.config)
        plan = as_plan(self.method).resolve(names)
        return {name: plan.for_layer(name) for name in names}

    def _check_inputs(self, x, context):
        cfg = self.config
        if x.ndim != 5 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"x must be [B, F, H, W, {cfg.in_channels}] (channels last), got {x.shape}")
        f = cfg.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"height and width ({x.shape[2]}, {x.shape[3]}) must be multiples of {f} "
                             f"(2 ** (levels - 1))")
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(f"context must be [B={x.shape[0]}, L, {cfg.cross_attention_dim}], got {context.shape}")

    @nn.compact
    def __call__(self, x, timesteps, context, fps=None):
        cfg = self.config
        self._check_inputs(x, context)
        b = x.shape[0]
        methods = self._layer_methods()
        kernels = plan_kernels(self.attention_implementation, jax.default_backend(), self.dtype, self.chunk_bytes)
        per_module = lambda path: tuple(m for n, m in methods.items() if n.startswith(path + "/"))
        stage = lambda cls, level, name, paths: cls(cfg, level, tuple(per_module(p) for p in paths), self.dtype,
                                                     kernels, name=name)
        kind = "attentions" if cfg.temporal_layout == "in_spatial" else "temp_attentions"

        c0 = cfg.block_channels[0]
        t = _per_video("timesteps", timesteps, b)
        temb = TimestepEmbedding(4 * c0, self.dtype, name="time_embedding")(timestep_sinusoid(t, c0))
        if cfg.fps_conditioning:
            fps = _per_video("fps", DEFAULT_FPS if fps is None else fps, b)
            temb = temb + TimestepEmbedding(4 * c0, self.dtype, name="fps_embedding")(timestep_sinusoid(fps, c0))
        elif fps is not None:
            raise ValueError(f"fps was given but this {cfg.family} UNet has no fps conditioning")

        h = shard_frames(conv2d(c0, 3, "conv_in", self.dtype)(x.astype(self.dtype)))
        if cfg.temporal_in:
            h = TemporalTransformer(cfg.temporal_in_heads, cfg.temporal_in_head_dim, cfg.norm_groups,
                                    per_module("transformer_in"), cfg.encoding, self.dtype, kernels,
                                    name="transformer_in")(h)
        skips = [h]
        for level in range(cfg.num_levels):
            paths = [f"down_blocks_{level}/{kind}_{j}" for j in range(cfg.layers_per_block)]
            h, level_skips = stage(DownBlock, level, f"down_blocks_{level}", paths)(h, temb, context)
            skips += level_skips
        h = stage(MidBlock, cfg.num_levels - 1, "mid_block", [f"mid_block/{kind}_0"])(h, temb, context)
        for i, level in enumerate(reversed(range(cfg.num_levels))):
            paths = [f"up_blocks_{i}/{kind}_{j}" for j in range(cfg.layers_per_block + 1)]
            h = stage(UpBlock, level, f"up_blocks_{i}", paths)(h, skips, temb, context)

        h = GroupNorm(cfg.norm_groups, cfg.norm_eps, cfg.frame_pooled_resnet_norm, self.dtype,
                      name="conv_norm_out")(h)
        out = conv2d(cfg.out_channels, 3, "conv_out", self.dtype)(nn.silu(h))
        return shard_frames(out.astype(jnp.float32))


@functools.lru_cache(maxsize=16)
def init_shapes(config: UNet3DConfig, frames: int = 2) -> Any:
    """The parameter shape tree of ``UNet3D(config)`` via ``jax.eval_shape`` (no weights are materialised;
    cached per config: treat the result as read-only)."""
    size = config.downsample_factor
    x = jax.ShapeDtypeStruct((1, frames, size, size, config.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    ctx = jax.ShapeDtypeStruct((1, 1, config.cross_attention_dim), jnp.float32)
    model = UNet3D(config)
    fps = jax.ShapeDtypeStruct((1,), jnp.int32) if config.fps_conditioning else None
    return jax.eval_shape(model.init, jax.random.key(0), x, t, ctx, fps)["params"]


def count_parameters(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


# ---- memory estimate (jaxlongvid.memory) ----------------------------------------------------------------------
ACTIVATION_COPIES = 32  # live copies of the widest feature map (calibrated: see jaxlongvid.memory)


def attention_levels(config: UNet3DConfig) -> list[tuple[int, int]]:
    """``(downsampling of the feature map, heads)`` of each level that has temporal attention."""
    found = [(2 ** i, h) for i, (on, h) in enumerate(zip(config.attention_levels, config.attention_heads)) if on]
    if config.temporal_in:
        found.append((1, config.temporal_in_heads))
    return found or [(1, 1)]


def attention_bytes(config: UNet3DConfig, frames: int, keys: int, maps: int, h: int, w: int, batch: int, *,
                    backend: str, dtype: str, implementation: str) -> int:
    """Bytes of the largest temporal attention's float32 logits, exponentials and probabilities: ``batch`` x
    ``h x w`` latent pixels at that level x heads x ``frames`` queries x ``keys`` key frames x ``maps`` position
    maps per query, three times. The frame-level jnp path on every backend (``backend``, ``dtype`` and
    ``implementation`` are not read: the constants were calibrated with it)."""
    return max(3 * batch * (h // s) * (w // s) * heads * frames * keys * 4 * maps
               for s, heads in attention_levels(config))


def activation_bytes(config: UNet3DConfig, frames: int, h: int, w: int, batch: int) -> int:
    """Bytes of ``ACTIVATION_COPIES`` float32 copies of the widest feature map, ``[batch, frames, h, w,
    block_channels[0]]``."""
    return ACTIVATION_COPIES * batch * frames * h * w * config.block_channels[0] * 4
