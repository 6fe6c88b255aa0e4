"""Building blocks shared by the 3D UNets (channels last: video tensors are ``[B, F, H, W, C]``).

Every block keeps the frame axis as its own axis (never folded into the batch), so that under a mesh the
frames can stay sharded: per-frame operations are local, and statistics pooled over all frames (the
``pool_frames`` GroupNorms) become cross-device reductions that XLA inserts.

Parameter names follow the diffusers / LaVie layout (``norm1``, ``conv1``, ``time_emb_proj``, ``to_q``,
``ff/proj``...) so the converters in ``convert/unet.py`` are short rename tables. Normalisation statistics and
softmax run in float32 whatever the compute ``dtype``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxlongvid import sharding
from jaxlongvid.attention import Encoding, TemporalAttention
from jaxlongvid.methods import Method

VIDEO_SPEC = P(sharding.DATA, sharding.FRAMES)  # [B, F, H, W, C]: batch on "data", frames on "frames"
TRANSFORMER_NORM_EPS = 1e-6  # input GroupNorm of every spatial / temporal transformer (all families)
LAYER_NORM_EPS = 1e-5


IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas")  # attention_implementation choices
HALF_DTYPES = (jnp.bfloat16, jnp.float16)  # cuDNN's fused attention takes only these


@dataclass(frozen=True)
class KernelPlan:
    """Which kernel each attention call site runs and how large a frame chunk may get: decided once per model
    call (:func:`plan_kernels`) and passed down unchanged.

    ``spatial``: ``jax.nn.dot_product_attention``'s implementation for spatial and cross attention (None: XLA,
    "cudnn": fused flash attention). ``temporal``: ``temporal_attention``'s implementation (None: jnp, "auto",
    "cudnn", "pallas"). ``chunk_bytes``: bound on the largest intermediate of one chunk of frames in the per-frame parts
    of a transformer block (spatial + cross attention, feed-forward); None: no chunking.
    """

    spatial: Optional[str] = None
    temporal: Optional[str] = None
    chunk_bytes: Optional[int] = None


CHUNK_BYTES = {"cpu": 256 * 2 ** 20}  # per backend; accelerators: ACCELERATOR_CHUNK_BYTES
ACCELERATOR_CHUNK_BYTES = 8 * 2 ** 30  # LaVie at 128 frames, 320x512: no chunks


def plan_kernels(choice: str, backend: str, dtype, chunk_bytes: Optional[int] = None) -> KernelPlan:
    """The kernel plan for ``attention_implementation=choice`` on ``backend`` ("cpu", "gpu", "tpu") at compute
    ``dtype``.

    * "auto": on GPUs with a bfloat16 / float16 compute dtype, cuDNN flash attention for spatial and cross
      attention; temporal attention is left to the core's own "auto" (``attention.plan.make_plan``: the Pallas
      kernel where positions are mapped, cuDNN where they are not); everywhere else XLA / jnp.
    * "xla": XLA / jnp everywhere. "cudnn": cuDNN everywhere it applies. "pallas": the Pallas kernel for mapped
      temporal attention, with cuDNN for spatial and cross attention on GPUs and XLA elsewhere (the Pallas
      kernel is temporal-only).
    """
    if choice not in IMPLEMENTATIONS:
        raise ValueError(f"attention_implementation must be one of {IMPLEMENTATIONS}, got {choice!r}")
    if chunk_bytes is None:
        chunk_bytes = CHUNK_BYTES.get(backend, ACCELERATOR_CHUNK_BYTES)
    fused = backend == "gpu" and jnp.dtype(dtype) in HALF_DTYPES
    spatial, temporal = {"auto": ("cudnn" if fused else None, "auto"), "xla": (None, None),
                         "cudnn": ("cudnn", "cudnn"),
                         "pallas": ("cudnn" if fused else None, "pallas")}[choice]
    return KernelPlan(spatial, temporal, chunk_bytes)


def frame_steps(frames: int, bytes_per_frame: int, chunk_bytes: Optional[int]) -> int:
    """Chunks to split ``frames`` into so one chunk's intermediate stays under ``chunk_bytes``: the smallest
    divisor of ``frames`` that does it (``frames`` when even one frame exceeds it); 1 without a bound."""
    if chunk_bytes is None:
        return 1
    fits = [d for d in range(1, frames + 1) if frames % d == 0 and (frames // d) * bytes_per_frame <= chunk_bytes]
    return fits[0] if fits else frames


def scan_frames(module: nn.Module, fn, x: jnp.ndarray, *shared, steps: int) -> jnp.ndarray:
    """``fn(module, x, *shared)`` for a per-frame computation on ``x [B, F, ...]``, run as ``steps`` sequential
    chunks (``nn.scan``, parameters shared): chunk j holds frames j, j + steps, j + 2 steps... so a layout
    sharded over contiguous frames stays evenly split. Equal to one call up to float rounding."""
    if steps == 1:
        return fn(module, x, *shared)
    b, f = x.shape[:2]
    xs = jnp.moveaxis(x.reshape((b, f // steps, steps) + x.shape[2:]), 2, 0)
    body = lambda mdl, carry, y: (carry, fn(mdl, y, *carry))
    _, ys = nn.scan(body, variable_broadcast="params", split_rngs={"params": False})(module, shared, xs)
    return jnp.moveaxis(ys, 0, 2).reshape((b, f) + ys.shape[3:])


def shard_frames(x: jnp.ndarray) -> jnp.ndarray:
    """Keep a ``[B, F, ...]`` activation sharded over frames (no-op without a mesh)."""
    return sharding.constrain(x, VIDEO_SPEC)


def timestep_sinusoid(t: jnp.ndarray, dim: int, max_period: float = 10000.0) -> jnp.ndarray:
    """``[B] -> [B, dim]`` float32: ``[cos(t f_k), sin(t f_k)]`` with ``f_k = exp(-ln(max_period) k / half)``.

    The exponent is computed in float32 in the originals' order of operations and its exponential rounded
    correctly to float32 (via float64), which is what PyTorch's float32 ``exp`` gives here: the frequencies
    multiply timesteps up to 1000, so one ulp of difference in a frequency would show in the embedding.
    """
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    args = jnp.asarray(t, jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear (``linear_1``, ``linear_2``)."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x)
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(x))


class GroupNorm(nn.Module):
    """GroupNorm on ``[B, F, H, W, C]``; statistics per frame, or pooled over all frames of a video.

    The originals differ per module (see ``unet3d`` docstring): a 5-D PyTorch GroupNorm pools over frames, a
    4-D one on ``(B*F)`` frames does not.
    """

    groups: int
    eps: float
    pool_frames: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, f, h, w, c = x.shape
        if c % self.groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible into {self.groups} groups")
        xg = x.astype(jnp.float32).reshape(b, f, h, w, self.groups, c // self.groups)
        axes = (1, 2, 3, 5) if self.pool_frames else (2, 3, 5)
        mean = jnp.mean(xg, axis=axes, keepdims=True)
        centered = xg - mean
        var = jnp.mean(jnp.square(centered), axis=axes, keepdims=True)
        y = (centered * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        return (y * scale + bias).astype(self.dtype)


def layer_norm(name: str, dtype) -> nn.LayerNorm:
    # Two-pass variance (use_fast_variance=False): E[x^2] - E[x]^2 loses digits on activations with a large mean.
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, dtype=dtype, name=name)


def conv2d(features: int, kernel: int, name: str, dtype, stride: int = 1) -> nn.Conv:
    """A per-frame 2-D convolution (the frame axis is a batch axis for ``nn.Conv``), PyTorch padding k//2."""
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   dtype=dtype, name=name)


class Attention(nn.Module):
    """Multi-head attention of tokens ``[N, Q, C]`` to themselves or to ``context [N, K, D]`` (per frame)."""

    heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32
    implementation: Optional[str] = None  # jax.nn.dot_product_attention's: None (XLA) or "cudnn"

    @nn.compact
    def __call__(self, x, context=None):
        context = x if context is None else context
        inner = self.heads * self.head_dim
        split = lambda y: y.reshape(y.shape[:-1] + (self.heads, self.head_dim))
        q = split(nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_q")(x))
        k = split(nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_k")(context))
        v = split(nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_v")(context))
        # The XLA path computes logits with float32 accumulation and a float32 softmax.
        out = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
        out = out.reshape(out.shape[:-2] + (inner,))
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out")(out)


class FeedForward(nn.Module):
    """GEGLU feed-forward: ``proj`` to 2 x mult x dim, value * GELU(gate) (exact erf GELU), ``out`` back."""

    mult: int = 4
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        h = nn.Dense(2 * self.mult * dim, dtype=self.dtype, name="proj")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return nn.Dense(dim, dtype=self.dtype, name="out")(value * nn.gelu(gate, approximate=False))


class TemporalConv(nn.Module):
    """ModelScope / VideoCrafter2 temporal conv block: 4 x [GroupNorm (pooled over frames) -> SiLU ->
    Conv3d (3, 1, 1) with zero padding in time], added to the input. Dropout is inactive at inference.

    The last conv starts at zero, as in both originals, so a freshly added block is the identity."""

    groups: int
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = x
        for i in range(1, 5):
            h = GroupNorm(self.groups, self.eps, pool_frames=True, dtype=self.dtype, name=f"norm{i}")(h)
            init = {"kernel_init": nn.initializers.zeros, "bias_init": nn.initializers.zeros} if i == 4 else {}
            h = nn.Conv(x.shape[-1], (3, 1, 1), padding=((1, 1), (0, 0), (0, 0)), dtype=self.dtype,
                        name=f"conv{i}", **init)(nn.silu(h))
        return x + h


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv -> + time embedding -> GroupNorm -> SiLU -> 3x3 conv -> + skip, then the
    optional temporal conv block (VideoCrafter2 inside the ResBlock, ModelScope right after it: same place)."""

    out_channels: int
    groups: int
    eps: float
    pool_frames: bool  # LaVie: True (5-D norms); VideoCrafter / ModelScope: False (norms on (B*F) frames)
    temporal_conv: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb):
        norm = lambda name: GroupNorm(self.groups, self.eps, self.pool_frames, dtype=self.dtype, name=name)
        h = conv2d(self.out_channels, 3, "conv1", self.dtype)(nn.silu(norm("norm1")(x)))
        t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
        h = h + t[:, None, None, None, :]
        h = conv2d(self.out_channels, 3, "conv2", self.dtype)(nn.silu(norm("norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = conv2d(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
        h = shard_frames(x + h)
        if self.temporal_conv:
            h = shard_frames(TemporalConv(self.groups, dtype=self.dtype, name="temp_conv")(h))
        return h


class SpatialBlock(nn.Module):
    """Self-attention over the pixels of each frame, cross-attention to the text, (LaVie: temporal attention),
    GEGLU feed-forward; each with a pre-LayerNorm and a residual. Input and output ``[B, F, H, W, C]``.

    The per-frame parts (the two attentions; the feed-forward) run over chunks of frames (:func:`scan_frames`)
    when their largest intermediate would exceed ``kernels.chunk_bytes``: XLA's attention scores, float32
    ``[heads, HW, HW]`` per frame, or the feed-forward's ``2 * mult`` times wider hidden activation."""

    heads: int
    head_dim: int
    temporal_method: Optional[Method] = None  # LaVie: the temporal attention's Method; None: no temporal attn
    encoding: Encoding = Encoding()
    dtype: jnp.dtype = jnp.float32
    kernels: KernelPlan = KernelPlan()

    def setup(self):
        attn = lambda name: Attention(self.heads, self.head_dim, self.dtype, self.kernels.spatial, name=name)
        self.norm1, self.attn1 = layer_norm("norm1", self.dtype), attn("attn1")
        self.norm2, self.attn2 = layer_norm("norm2", self.dtype), attn("attn2")
        if self.temporal_method is not None:
            self.norm_temp = layer_norm("norm_temp", self.dtype)
            self.attn_temp = TemporalAttention(self.heads, self.head_dim, self.encoding, self.temporal_method,
                                               implementation=self.kernels.temporal, dtype=self.dtype,
                                               name="attn_temp")
        self.norm3, self.ff = layer_norm("norm3", self.dtype), FeedForward(dtype=self.dtype, name="ff")

    def frame_attention(self, x, context):
        """Self- then cross-attention of every frame of ``x [B, F', H, W, C]`` (any number of frames)."""
        b, f, h, w, c = x.shape
        tokens = x.reshape(b * f, h * w, c)
        tokens = tokens + self.attn1(self.norm1(tokens))
        ctx = jnp.repeat(context.astype(self.dtype), f, axis=0)  # the same text for every frame (index b*F+f)
        tokens = tokens + self.attn2(self.norm2(tokens), ctx)
        return shard_frames(tokens.reshape(x.shape))

    def feed_forward(self, x):
        return x + self.ff(self.norm3(x))

    def __call__(self, x, context):
        b, f, h, w, c = x.shape
        hw, inner, size = h * w, self.heads * self.head_dim, jnp.dtype(self.dtype).itemsize
        scores = 4 * self.heads * hw * max(hw, context.shape[1]) if self.kernels.spatial is None else 0
        attn_bytes = b * max(scores, 6 * hw * inner * size)  # per frame: XLA's scores, or q, k, v, out...
        ff_bytes = b * hw * 3 * self.ff.mult * c * size  # per frame: the hidden activation and its gated half
        x = scan_frames(self, SpatialBlock.frame_attention, x, context,
                        steps=frame_steps(f, attn_bytes, self.kernels.chunk_bytes))
        if self.temporal_method is not None:
            x = shard_frames(x + self.attn_temp(self.norm_temp(x), features=x))
        return scan_frames(self, SpatialBlock.feed_forward, x,
                           steps=frame_steps(f, ff_bytes, self.kernels.chunk_bytes))


class SpatialTransformer(nn.Module):
    """Per-frame GroupNorm -> ``proj_in`` -> blocks -> ``proj_out`` -> + input (1x1 convs of the originals are
    the same linear maps; the converter reshapes them into ``Dense`` kernels)."""

    heads: int
    head_dim: int
    groups: int
    depth: int = 1
    temporal_methods: tuple[Method, ...] = ()  # LaVie: one per block; empty: no temporal attention inside
    encoding: Encoding = Encoding()
    dtype: jnp.dtype = jnp.float32
    kernels: KernelPlan = KernelPlan()

    @nn.compact
    def __call__(self, x, context):
        inner = self.heads * self.head_dim
        y = GroupNorm(self.groups, TRANSFORMER_NORM_EPS, pool_frames=False, dtype=self.dtype, name="norm")(x)
        y = nn.Dense(inner, dtype=self.dtype, name="proj_in")(y)
        for d in range(self.depth):
            method = self.temporal_methods[d] if self.temporal_methods else None
            y = SpatialBlock(self.heads, self.head_dim, method, self.encoding, self.dtype, self.kernels,
                             name=f"transformer_blocks_{d}")(y, context)
        return shard_frames(x + nn.Dense(x.shape[-1], dtype=self.dtype, name="proj_out")(y))


class TemporalBlock(nn.Module):
    """VideoCrafter / ModelScope temporal block: two temporal self-attentions (``attn1``, ``attn2``, own
    weights; no text) and a GEGLU feed-forward, each with a pre-LayerNorm and a residual. The feed-forward runs
    over chunks of frames as in :class:`SpatialBlock`."""

    heads: int
    head_dim: int
    methods: tuple[Method, Method]
    encoding: Encoding = Encoding()
    dtype: jnp.dtype = jnp.float32
    kernels: KernelPlan = KernelPlan()

    def setup(self):
        attn = lambda i, method: TemporalAttention(self.heads, self.head_dim, self.encoding, method,
                                                   implementation=self.kernels.temporal, dtype=self.dtype,
                                                   name=f"attn{i}")
        self.norm1, self.attn1 = layer_norm("norm1", self.dtype), attn(1, self.methods[0])
        self.norm2, self.attn2 = layer_norm("norm2", self.dtype), attn(2, self.methods[1])
        self.norm3, self.ff = layer_norm("norm3", self.dtype), FeedForward(dtype=self.dtype, name="ff")

    def feed_forward(self, x):
        return x + self.ff(self.norm3(x))

    def __call__(self, x):
        x = shard_frames(x + self.attn1(self.norm1(x), features=x))
        x = shard_frames(x + self.attn2(self.norm2(x), features=x))
        b, f, h, w, c = x.shape
        ff_bytes = b * h * w * 3 * self.ff.mult * c * jnp.dtype(self.dtype).itemsize
        return scan_frames(self, TemporalBlock.feed_forward, x,
                           steps=frame_steps(f, ff_bytes, self.kernels.chunk_bytes))


class TemporalTransformer(nn.Module):
    """GroupNorm pooled over frames -> ``proj_in`` -> temporal blocks -> ``proj_out`` -> + input."""

    heads: int
    head_dim: int
    groups: int
    methods: tuple[Method, ...]  # two per block, in forward order
    encoding: Encoding = Encoding()
    dtype: jnp.dtype = jnp.float32
    kernels: KernelPlan = KernelPlan()

    @nn.compact
    def __call__(self, x):
        if len(self.methods) % 2 or not self.methods:
            raise ValueError("TemporalTransformer needs two Methods per block")
        inner = self.heads * self.head_dim
        y = GroupNorm(self.groups, TRANSFORMER_NORM_EPS, pool_frames=True, dtype=self.dtype, name="norm")(x)
        y = nn.Dense(inner, dtype=self.dtype, name="proj_in")(y)
        for d in range(len(self.methods) // 2):
            y = TemporalBlock(self.heads, self.head_dim, tuple(self.methods[2 * d:2 * d + 2]), self.encoding,
                              self.dtype, self.kernels, name=f"transformer_blocks_{d}")(y)
        return shard_frames(x + nn.Dense(x.shape[-1], dtype=self.dtype, name="proj_out")(y))


def upsample_nearest(x: jnp.ndarray) -> jnp.ndarray:
    """Nearest x2 on H and W of ``[B, F, H, W, C]`` (frames unchanged)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
