"""The merges of several attentions into one output: FreeNoise's windows and FreeLong's spectral blend."""

from __future__ import annotations

import jax.numpy as jnp

from jaxlongvid import masks
from jaxlongvid.attention.maps import info_of_positions
from jaxlongvid.spectral import freelong_blend


def freenoise(q, k, v, method, native_frames: int, attend):
    """FreeNoise: each window of ``method.merge.window`` frames (every ``stride``) attends within itself with the
    method's positions and mask at the window's length; outputs fused with pyramid weights, normalised per
    frame. ``attend(q, k, v, maps, info, mask)`` runs one attention."""
    n = q.shape[-3]
    windows = masks.context_windows(n, method.merge.window, method.merge.stride)
    size = windows[0][1] - windows[0][0]
    starts = jnp.asarray([s for s, _ in windows], jnp.int32)
    frames = starts[:, None] + jnp.arange(size, dtype=jnp.int32)  # [nW, W]: each window's frames
    take = lambda x: jnp.take(x, frames, axis=-3)  # [..., nW, W, H, D]
    static = None if method.mask is None else method.mask.static(size)
    out_w = attend(take(q), take(k), take(v), method.positions.maps(size, native_frames),
                   info_of_positions(method.positions, size, native_frames), static)
    weights = jnp.asarray(masks.pyramid_weights(size))
    scatter = jnp.where(frames[..., None] == jnp.arange(n), weights[None, :, None], 0.0)  # [nW, W, N]
    scatter = scatter / scatter.sum(axis=(0, 1))[None, None, :]
    out = jnp.einsum("wtf,...wthd->...fhd", scatter, out_w.astype(jnp.float32))
    return out.astype(v.dtype)


def freelong(global_out, local_out, merge, spatial_shape):
    """FreeLong: spectral blend over (frames, h, w); the leading dim before N is the flattened h*w."""
    if spatial_shape is None:
        raise ValueError("method 'freelong' needs spatial_shape=(h, w) and q laid out as [..., h*w, N, H, D]")
    h, w = spatial_shape
    shape = global_out.shape
    if shape[-4] != h * w:
        raise ValueError(f"spatial_shape {spatial_shape} does not match the spatial axis of size {shape[-4]}")
    # [..., h*w, N, H, D] -> [..., N, h, w, H*D]
    to_video = lambda x: jnp.moveaxis(x.reshape(shape[:-4] + (h, w, shape[-3], -1)), -2, -4)
    blended = freelong_blend(to_video(global_out), to_video(local_out), merge.d_t, merge.d_s)
    return jnp.moveaxis(blended, -4, -2).reshape(shape)
