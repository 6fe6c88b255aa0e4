"""Initial noise for long videos, with an explicit ``jax.random`` key."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlongvid.positions import _check_int


def gaussian(key: jax.Array, shape, dtype=jnp.float32) -> jnp.ndarray:
    """Independent standard normal noise."""
    return jax.random.normal(key, shape, dtype)


def freenoise(key: jax.Array, shape, window: int = 16, stride: int = 4, axis: int = 1,
              dtype=jnp.float32) -> jnp.ndarray:
    """FreeNoise noise rescheduling along the frame ``axis``.

    Draws noise for all frames, then for ``k = W, W + S, ... < N`` replaces frames ``[k, k + S)`` by a random
    permutation of frames ``[k - W, k - W + S)``. The chunks are processed in order, so a later chunk can copy
    frames that an earlier one already shuffled. The frame count is static, so the loop unrolls at trace time.
    """
    window = _check_int("window", window, 1)
    stride = _check_int("stride", stride, 1)
    shape = tuple(shape)
    n = shape[axis]
    noise_key, perm_key = jax.random.split(key)
    x = jnp.moveaxis(jax.random.normal(noise_key, shape, dtype), axis, 0)
    for i, k in enumerate(range(window, n, stride)):
        src = k - window
        length = min(stride, n - k)
        perm = jax.random.permutation(jax.random.fold_in(perm_key, i), stride)[:length]
        x = x.at[k:k + length].set(x[src + perm])
    return jnp.moveaxis(x, 0, axis)
