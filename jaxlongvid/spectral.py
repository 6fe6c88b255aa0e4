"""FreeLong's spectral blend of a global and a local attention branch."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def gaussian_lowpass(shape: tuple[int, int, int], d_t: float = 0.25, d_s: float = 0.25, xp=np):
    """3D Gaussian low-pass ``exp(-((t/d_t)^2 + (h/d_s)^2 + (w/d_s)^2) / 2)`` on a centred [-1, 1) grid of
    normalised frequencies (the layout after ``fftshift``), float32 ``[T, H, W]``. ``xp=jax.numpy`` builds it in
    the traced program from iotas (in float32)."""
    if d_t <= 0 or d_s <= 0:
        raise ValueError(f"d_t and d_s must be > 0, got {d_t}, {d_s}")
    grids = [(xp.arange(n) / n - 0.5) * 2 for n in shape]
    t, h, w = xp.meshgrid(*grids, indexing="ij")
    return xp.exp(-0.5 * ((t / d_t) ** 2 + (h / d_s) ** 2 + (w / d_s) ** 2)).astype(xp.float32)


def freelong_blend(global_branch: jnp.ndarray, local_branch: jnp.ndarray, d_t: float = 0.25,
                   d_s: float = 0.25) -> jnp.ndarray:
    """Low frequencies from the global branch, high from the local one: ``[..., T, H, W, C]`` -> same.

    ``real(IFFT(LPF * FFT(global) + (1 - LPF) * FFT(local)))`` over (T, H, W), in float32 whatever the input
    dtype. The filter is built centred and moved to FFT order with ``ifftshift`` instead of shifting the data.
    """
    if global_branch.shape != local_branch.shape:
        raise ValueError(f"branch shapes differ: {global_branch.shape} vs {local_branch.shape}")
    if global_branch.ndim < 4:
        raise ValueError(f"expected [..., T, H, W, C], got {global_branch.shape}")
    t, h, w = global_branch.shape[-4:-1]
    lpf = jnp.fft.ifftshift(gaussian_lowpass((t, h, w), d_t, d_s, jnp))[..., None]
    axes = (-4, -3, -2)
    g = jnp.fft.fftn(global_branch.astype(jnp.float32), axes=axes)
    loc = jnp.fft.fftn(local_branch.astype(jnp.float32), axes=axes)
    out = jnp.fft.ifftn(lpf * g + (1.0 - lpf) * loc, axes=axes).real
    return out.astype(global_branch.dtype)
