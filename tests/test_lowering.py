"""Maps and masks are built in the program: a long video's step captures no map-sized constant, and the
program does not grow with the frame count squared."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxlongvid.attention import Encoding, temporal_attention
from jaxlongvid.bench.lowering import constant_sizes, lower_denoiser
from jaxlongvid.pipeline import load_config

MB = 1 << 20


def test_constant_sizes_reads_stablehlo_types():
    text = jax.jit(lambda x: x + jnp.asarray(np.ones((64, 1024), np.float32))).lower(
        jax.ShapeDtypeStruct((64, 1024), jnp.float32)).as_text()
    assert max(constant_sizes(text)) == 64 * 1024 * 4  # a captured NumPy array is found, with its size


def test_longdiff_at_1024_frames_on_the_tiny_model_captures_no_large_constant():
    lowered, seconds = lower_denoiser(load_config("tiny"), "longdiff", 1024)
    sizes = constant_sizes(lowered.as_text())
    assert sizes and max(sizes) < MB, f"largest constant {max(sizes)} bytes"


def test_every_method_core_at_512_frames_captures_no_large_constant():
    """The core alone, every preset (its maps, masks, slots, plane indices, FreeNoise scatter, FreeLong filter)."""
    from jaxlongvid.methods import PRESETS

    n, enc = 512, Encoding(rope_dim=8, t5_buckets=32, native_frames=16)
    shape = jax.ShapeDtypeStruct((1, 4, n, 1, 16), jnp.float32)
    t5 = jax.ShapeDtypeStruct((32, 1), jnp.float32)
    for name, method in PRESETS.items():
        kf = jax.ShapeDtypeStruct((1, 1, n // 16), jnp.int32) if method.needs_keyframes else None
        fn = lambda q, k, v, t, kf: temporal_attention(q, k, v, encoding=enc, method=method, t5_table=t,
                                                       keyframes=kf, spatial_shape=(2, 2))
        sizes = constant_sizes(jax.jit(fn).lower(shape, shape, shape, t5, kf).as_text())
        assert max(sizes, default=0) < MB, (name, max(sizes))


def test_wan_step_at_many_tokens_captures_no_token_sized_constant():
    """The DiT's 3D RoPE tables (height, width and the methods' frame positions) are broadcast from per-axis tables
    inside the program: no constant holds even one float32 per token (they were [tokens, d / 2] per layer)."""
    from jaxlongvid.models.wan import WanConfig, WanTransformer

    config = WanConfig(num_heads=2, head_dim=24, ffn_dim=32, num_layers=2, text_dim=8, native_frames=4)
    grid = (17, 32, 32)  # 17 x 16 x 16 = 4,352 tokens after the (1, 2, 2) patch
    tokens = grid[0] * (grid[1] // 2) * (grid[2] // 2)
    x = jax.ShapeDtypeStruct((1,) + grid + (config.in_channels,), jnp.float32)
    t, context = jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct((1, 3, 8), jnp.float32)
    for name in ("direct", "longdiff", "freeloc"):
        model = WanTransformer(config, method=name)
        params = jax.eval_shape(model.init, jax.random.key(0), x, t, context)
        sizes = constant_sizes(jax.jit(model.apply).lower(params, x, t, context).as_text())
        assert max(sizes, default=0) < 4 * tokens, (name, max(sizes))
