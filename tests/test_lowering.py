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
