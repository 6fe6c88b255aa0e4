"""Frame masks for temporal attention: ``mask[i, j]`` is True where query frame ``i`` may attend key frame ``j``.

Masks that depend only on the frame count are formulas over an array module ``xp``: NumPy values for tests and
analysis, or (``xp=jax.numpy``) built inside a traced program from iotas, never captured as constants. The IFS
mask depends on keyframes chosen from the features at run time, so it is always built with ``jax.numpy`` and
accepts traced keyframes. Every mask here keeps the diagonal, so no query row is ever fully masked.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from jaxlongvid.positions import _check_int, distance


def window(num_frames: int, radius: int, xp=np):
    """``|i - j| <= radius``."""
    r = _check_int("window", radius, 0)
    return xp.abs(distance(num_frames, xp)) <= r


def ifs_mask(num_frames: int, keyframes, window: int) -> jnp.ndarray:
    """LongDiff's IFS mask: ``|i - j| <= window`` or ``j`` is a keyframe.

    ``keyframes`` is int ``[..., n]`` (traced or concrete); the result is bool ``[..., N, N]``.
    """
    r = _check_int("window", window, 0)
    n = _check_int("num_frames", num_frames, 1)
    keyframes = jnp.asarray(keyframes)
    if keyframes.ndim < 1:
        raise ValueError(f"keyframes must have shape [..., n], got {keyframes.shape}")
    is_key = jnp.any(keyframes[..., :, None] == jnp.arange(n), axis=-2)  # [..., N] over key frames j
    return (jnp.abs(distance(n, jnp)) <= r) | is_key[..., None, :]


def tiered(num_frames: int, tiers: Sequence[tuple[int, int]], sink_frames: int = 0, xp=np):
    """Tiered sparse mask (FreeLOC's TSA for frame attention).

    ``tiers`` is a list of ``(max_distance, stride)`` in increasing distance: a key at ``|d| <= max_distance``
    of the first tier that reaches it is kept when ``|d| % stride == 0`` (stride 1 = dense). Keys beyond the last
    tier are dropped. The first ``sink_frames`` frames are visible to every query.
    """
    n = _check_int("num_frames", num_frames, 1)
    sink = _check_int("sink_frames", sink_frames, 0)
    if not tiers:
        raise ValueError("tiers must list at least one (max_distance, stride) pair")
    a = xp.abs(distance(n, xp))
    mask = covered = xp.zeros((n, n), dtype=bool)
    last = -1
    for max_d, stride in tiers:
        max_d = _check_int("tier max_distance", max_d, 0)
        stride = _check_int("tier stride", stride, 1)
        if max_d <= last:
            raise ValueError(f"tiers must have increasing max_distance, got {list(tiers)}")
        last = max_d
        here = (a <= max_d) & ~covered
        mask = mask | (here & (a % stride == 0))
        covered = covered | here
    return mask | (xp.arange(n) < sink)[None, :]


def local_window(num_frames: int, radius: int, xp=np):
    """FreeLong's local branch: each query sees ``2 * radius + 1`` consecutive frames centred on it, the
    window shifted inward at the edges so it always has full width (all frames when N is smaller)."""
    n = _check_int("num_frames", num_frames, 1)
    r = _check_int("window", radius, 0)
    width = min(2 * r + 1, n)
    start = xp.clip(xp.arange(n) - r, 0, n - width)
    j = xp.arange(n)
    return (j[None, :] >= start[:, None]) & (j[None, :] < start[:, None] + width)


def context_windows(num_frames: int, size: int, stride: int) -> list[tuple[int, int]]:
    """FreeNoise windows ``[i * stride, i * stride + size)``, plus one ending at N if the stride misses it."""
    n = _check_int("num_frames", num_frames, 1)
    size = _check_int("context_window", size, 1)
    stride = _check_int("context_stride", stride, 1)
    if n <= size:
        return [(0, n)]
    starts = list(range(0, n - size + 1, stride))
    if starts[-1] + size < n:
        starts.append(n - size)
    return [(s, s + size) for s in starts]


def pyramid_weights(size: int) -> np.ndarray:
    """FreeNoise's triangular fusion weights ``1, 2, .., ceil(W/2), .., 2, 1`` over one window."""
    size = _check_int("context_window", size, 1)
    i = np.arange(size)
    return np.minimum(i + 1, size - i).astype(np.float32)
