"""Relative-position maps for temporal attention.

A map ``P[i, j]`` is the relative distance the model is shown for query frame ``i`` attending to key frame
``j``. The unmodified model uses ``P = j - i``; every long-video method in this module replaces it by a map
whose values stay inside the range the model saw in training. Every map is a function of ``d = j - i`` alone:
each formula is written once (``*_of(d, ..., xp)``) over an array module ``xp``, so the same code gives the
NumPy value (tests, static analysis of a map's values over the 2N-1 distances) and, with ``xp=jax.numpy``,
builds the map inside a traced program from iotas, never as a captured constant.
"""

from __future__ import annotations

import math

import numpy as np


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def distance(num_frames: int, xp=np):
    """``d[i, j] = j - i`` as int32 ``[N, N]``. ``xp=jax.numpy`` builds it from iotas inside a traced program
    (every map below takes the same ``xp``: one formula for the NumPy value and the in-program one)."""
    n = _check_int("num_frames", num_frames, 1)
    idx = xp.arange(n, dtype=xp.int32)
    return idx[None, :] - idx[:, None]


def identity(num_frames: int, xp=np):
    """The model's own positions: ``P = j - i``."""
    return distance(num_frames, xp)


def clip_of(d, max_distance: int, xp=np):
    """``clip(d, -max_distance, max_distance)`` of distances ``d`` (any shape)."""
    m = _check_int("max_distance", max_distance, 0)
    return xp.clip(d, -m, m).astype(xp.int32)


def clip(num_frames: int, max_distance: int, xp=np):
    """``clip(j - i, -max_distance, max_distance)`` (the paper's Clip ablation uses ``N0 - 1``)."""
    return clip_of(distance(num_frames, xp), max_distance, xp)


def interpolate_of(d, num_frames: int, native_frames: int, xp=np):
    """``d * (N0 - 1) / (N - 1)`` (float32; ``d`` unchanged when N <= N0)."""
    n0 = _check_int("native_frames", native_frames, 2)
    if num_frames <= n0:
        return d.astype(xp.float32)
    return xp.true_divide(d * (n0 - 1), num_frames - 1).astype(xp.float32)


def interpolate(num_frames: int, native_frames: int, xp=np):
    """``(j - i) * (N0 - 1) / (N - 1)``: fractional distances squeezed into the trained range (float32)."""
    return interpolate_of(distance(num_frames, xp), num_frames, native_frames, xp)


def group_size(num_frames: int, num_groups: int) -> int:
    """``s = ceil((N - 1) / (G - 1))``: how many distances share one group."""
    n = _check_int("num_frames", num_frames, 1)
    g = _check_int("num_groups", num_groups, 2)
    return max(1, math.ceil((n - 1) / (g - 1)))


def grouped_of(d, s: int, shift: int, xp=np):
    """Copy ``shift`` of the grouped distances: ``sign(d) * ceil(max(|d| - shift, 0) / s)``."""
    mag = xp.maximum(xp.abs(d) - shift, 0)
    return (xp.sign(d) * ((mag + s - 1) // s)).astype(xp.int32)


def group(num_frames: int, num_groups: int, xp=np):
    """GROUP: ``sign(d) * ceil(|d| / s)``, mapping the 2N-1 distances onto 2G-1 groups."""
    return grouped_of(distance(num_frames, xp), group_size(num_frames, num_groups), 0, xp)


def group_shift_of(d, s: int, xp=np):
    """The ``s`` GROUP+SHIFT copies of distances ``d``: ``[s, *d.shape]`` (see :func:`group_shift`)."""
    return xp.stack([grouped_of(d, s, m, xp) for m in range(s)])


def group_shift(num_frames: int, num_groups: int, xp=np):
    """GROUP+SHIFT: int32 ``[s, N, N]``, copy ``m`` is ``sign(d) * ceil(max(|d| - m, 0) / s)``.

    Copy ``m`` shifts the lower triangle of the grouped matrix down by ``m`` rows and the upper triangle right
    by ``m`` columns, so every copy stays antisymmetric. The tuple of the ``s`` copies at ``(i, j)`` (the
    "assignment record") is distinct for every distinct ``d``: its first entry gives the group and the copy at
    which it drops gives ``|d| mod s``. ``s = 1`` (``N <= G``) gives the identity map.
    """
    n = _check_int("num_frames", num_frames, 1)
    g = _check_int("num_groups", num_groups, 2)
    if n < g:
        raise ValueError(
            f"group_shift: num_frames ({n}) is smaller than num_groups ({g}); position mapping is for videos "
            "at least as long as the native length (use the identity map below it)"
        )
    return group_shift_of(distance(n, xp), group_size(n, g), xp)


def vrpr_of(d, w1: int, w2: int, g1: int, g2: int, max_distance: int, xp=np):
    """FreeLOC's re-encoding of distances ``d`` (any shape), see :func:`vrpr`."""
    w1 = _check_int("w1", w1, 0)
    w2 = _check_int("w2", w2, w1)
    g1 = _check_int("g1", g1, 1)
    g2 = _check_int("g2", g2, 1)
    cap = _check_int("max_distance", max_distance, 0)
    a = xp.abs(d)
    mid = w1 + (a - w1) // g1
    far = w2 - (w2 - w1) // g1 + (a - w2) // g2
    mapped = xp.where(a < w1, a, xp.where(a < w2, mid, far))
    return (xp.sign(d) * xp.minimum(mapped, cap)).astype(xp.int32)


def vrpr(num_frames: int, w1: int, w2: int, g1: int, g2: int, max_distance: int, xp=np):
    """FreeLOC's multi-granularity re-encoding, symmetric in sign, int32 ``[N, N]``.

    ``|d| < W1``: unchanged; ``W1 <= |d| < W2``: ``W1 + floor((|d| - W1) / G1)``;
    ``|d| >= W2``: ``W2 - floor((W2 - W1) / G1) + floor((|d| - W2) / G2)``; all capped at ``max_distance``.
    Unlike the reference code's five-pass realisation, every distance is covered (no unattended gap).
    """
    return vrpr_of(distance(num_frames, xp), w1, w2, g1, g2, max_distance, xp)


def t5_bucket(rel: np.ndarray, num_buckets: int = 32, max_distance: int = 32) -> np.ndarray:
    """T5-style bidirectional bucket of a (possibly mapped) relative distance ``rel = j - i``.

    Keys at or before the query use buckets ``[0, B/2)``, keys after it ``[B/2, B)``. Within a half, distances
    below ``B/4`` are exact and larger ones are log-spaced up to ``max_distance``. Fractional maps are rounded
    (a bucketed bias has no value between buckets). The logarithm is taken in float32, as the original does,
    so the bucket edges agree bit for bit.
    """
    rel = np.rint(np.asarray(rel)).astype(np.int64)
    half = num_buckets // 2
    exact = half // 2
    out = np.where(rel > 0, half, 0)
    m = np.abs(rel)
    with np.errstate(divide="ignore"):
        log_ratio = np.log(np.maximum(m, 1).astype(np.float32) / np.float32(exact)) / np.float32(
            math.log(max_distance / exact)
        )
    large = exact + (log_ratio * np.float32(half - exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (out + np.where(m < exact, m, large)).astype(np.int32)
