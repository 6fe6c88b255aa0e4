"""Informative Frame Selection (LongDiff): pick one keyframe per segment from a layer's input features.

Choices where the paper is silent (also in the README's method notes):
- the pseudo-video is rescaled to [0, 255] with one min and max over the whole pseudo-video, then binned to
  integers by truncation (as a uint8 image would be) for the 256-bin entropy histogram;
- frame 0 has no previous frame: its frame difference is taken to frame 1;
- entropy and frame difference are each z-scored over the N frames (a constant term scores 0) before adding;
- segment k holds the frames t with ``floor(t n / N) == k``; ties go to the earliest frame.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxlongvid.positions import _check_int


def pseudo_video(features: jnp.ndarray) -> jnp.ndarray:
    """``[N, hw, C]`` features (channels last, as the models hold them) -> ``[N, 3, hw]`` (channel max, mean,
    min) rescaled to [0, 255], float32."""
    f = jnp.asarray(features, jnp.float32)
    v = jnp.stack([f.max(axis=-1), f.mean(axis=-1), f.min(axis=-1)], axis=1)
    lo, hi = v.min(), v.max()
    return (v - lo) * (255.0 / jnp.maximum(hi - lo, 1e-12))


def frame_entropy(video: jnp.ndarray) -> jnp.ndarray:
    """Shannon entropy (bits) of each frame's 256-bin histogram; ``video`` in [0, 255], ``[N, ...]``."""
    n = video.shape[0]
    bins = jnp.clip(jnp.floor(video.reshape(n, -1)), 0, 255).astype(jnp.int32)
    counts = jnp.zeros((n, 256), jnp.float32).at[jnp.arange(n)[:, None], bins].add(1.0)
    p = counts / bins.shape[1]
    return -jnp.sum(jnp.where(p > 0, p * jnp.log2(jnp.where(p > 0, p, 1.0)), 0.0), axis=1)


def frame_difference(video: jnp.ndarray) -> jnp.ndarray:
    """Mean absolute difference of each frame to the previous one (frame 0: to frame 1)."""
    n = video.shape[0]
    flat = video.reshape(n, -1)
    if n == 1:
        return jnp.zeros((1,), flat.dtype)
    diff = jnp.mean(jnp.abs(flat[1:] - flat[:-1]), axis=1)
    return jnp.concatenate([diff[:1], diff])


def _zscore(x: jnp.ndarray) -> jnp.ndarray:
    std = x.std()
    return jnp.where(std > 0, (x - x.mean()) / jnp.where(std > 0, std, 1.0), 0.0)


def segment_ids(num_frames: int, num_segments: int) -> np.ndarray:
    """Segment index of every frame for ``n`` even segments (static)."""
    n = _check_int("num_frames", num_frames, 1)
    k = _check_int("num_segments", num_segments, 1)
    if k > n:
        raise ValueError(f"num_segments ({k}) must not exceed num_frames ({n})")
    return (np.arange(n) * k) // n


def frame_scores(features: jnp.ndarray) -> jnp.ndarray:
    """IFS score of each frame: z(entropy) + z(frame difference) of the pseudo-video."""
    video = pseudo_video(features)
    return _zscore(frame_entropy(video)) + _zscore(frame_difference(video))


def select_keyframes(features: jnp.ndarray, num_segments: int) -> jnp.ndarray:
    """Keyframe index (int32 ``[num_segments]``) = highest-scoring frame of each segment.

    ``features`` is one batch element's ``[N, hw, C]``; jit- and vmap-friendly (shapes are static).
    """
    features = jnp.asarray(features)
    if features.ndim != 3:
        raise ValueError(f"features must have shape [N, hw, C], got {features.shape}")
    seg = jnp.asarray(segment_ids(features.shape[0], num_segments))
    scores = frame_scores(features)
    member = seg[None, :] == jnp.arange(num_segments)[:, None]  # [n, N]
    return jnp.argmax(jnp.where(member, scores[None, :], -jnp.inf), axis=1).astype(jnp.int32)

