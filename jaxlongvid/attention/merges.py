"""The merges of several attentions into one output: FreeNoise's windows and FreeLong's spectral blend."""

from __future__ import annotations

import jax.numpy as jnp

from jaxlongvid import masks
from jaxlongvid.attention.maps import info_of_positions
from jaxlongvid.spectral import freelong_blend


def freenoise(q, k, v, method, native_frames: int, attend, tokens_per_frame: int = 1):
    """FreeNoise: each window of ``method.merge.window`` frames (every ``stride``) attends within itself with the
    method's positions and mask at the window's length; outputs fused with pyramid weights, normalised per
    frame. ``attend(q, k, v, maps, info, mask)`` runs one attention under frame maps and a frame mask. At token
    level (``tokens_per_frame`` T > 1, tokens frame by frame) a window of frames is the block of their tokens."""
    t = tokens_per_frame
    n = q.shape[-3] // t
    windows = masks.context_windows(n, method.merge.window, method.merge.stride)
    size = windows[0][1] - windows[0][0]
    starts = jnp.asarray([s for s, _ in windows], jnp.int32)
    frames = starts[:, None] + jnp.arange(size, dtype=jnp.int32)  # [nW, W]: each window's frames
    by_frame = lambda x: x.reshape(x.shape[:-3] + (n, t) + x.shape[-2:])  # [..., N, T, H, D]
    # [..., nW, W T, H, D]: each window's tokens, frame by frame
    take = lambda x: jnp.take(by_frame(x), frames, axis=-4).reshape(x.shape[:-3] + (len(windows), size * t)
                                                                     + x.shape[-2:])
    static = None if method.mask is None or method.mask.hides_nothing(size) else method.mask.static(size)
    out_w = attend(take(q), take(k), take(v), method.positions.maps(size, native_frames),
                   info_of_positions(method.positions, size, native_frames), static)
    out_w = out_w.reshape(out_w.shape[:-3] + (size, t) + out_w.shape[-2:])  # [..., nW, W, T, H, D]
    weights = jnp.asarray(masks.pyramid_weights(size))
    scatter = jnp.where(frames[..., None] == jnp.arange(n), weights[None, :, None], 0.0)  # [nW, W, N]
    scatter = scatter / scatter.sum(axis=(0, 1))[None, None, :]
    out = jnp.einsum("wtf,...wtshd->...fshd", scatter, out_w.astype(jnp.float32))
    return out.reshape(v.shape).astype(v.dtype)


def freelong(global_out, local_out, merge, spatial_shape, tokens_per_frame: int = 1):
    """FreeLong: spectral blend over (frames, h, w). Frame attention (T = 1): the leading dim before N is the
    flattened ``h*w``; token level (T = h w): the N tokens are frame by frame, row-major within a frame."""
    if spatial_shape is None:
        raise ValueError("method 'freelong' needs spatial_shape=(h, w) and q laid out as [..., h*w, N, H, D] "
                         "(or N = frames * h * w tokens)")
    h, w = spatial_shape
    shape = global_out.shape
    if tokens_per_frame > 1:
        if h * w != tokens_per_frame:
            raise ValueError(f"spatial_shape {spatial_shape} does not match {tokens_per_frame} tokens per frame")
        # [..., F*h*w, H, D] -> [..., F, h, w, H*D]
        to_video = lambda x: x.reshape(shape[:-3] + (shape[-3] // (h * w), h, w, -1))
        blended = freelong_blend(to_video(global_out), to_video(local_out), merge.d_t, merge.d_s)
        return blended.reshape(shape)
    if shape[-4] != h * w:
        raise ValueError(f"spatial_shape {spatial_shape} does not match the spatial axis of size {shape[-4]}")
    # [..., h*w, N, H, D] -> [..., N, h, w, H*D]
    to_video = lambda x: jnp.moveaxis(x.reshape(shape[:-4] + (h, w, shape[-3], -1)), -2, -4)
    blended = freelong_blend(to_video(global_out), to_video(local_out), merge.d_t, merge.d_s)
    return jnp.moveaxis(blended, -4, -2).reshape(shape)
