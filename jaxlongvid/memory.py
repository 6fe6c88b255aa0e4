"""A memory estimate of a sampling request, made from the pipeline's config before anything is compiled.

The estimate is deliberately simple and errs high: it is there to refuse requests that cannot fit (4096 frames
on one GPU) in seconds instead of after minutes of compilation, not to predict XLA's allocator. Per device:

    weights           parameter bytes (the checkpoint's size on disk), replicated on every device
    attention         the largest temporal attention's logits, exponentials and probabilities, float32:
                      3 x batch x (h x w at that level) x heads x F x F x 4 bytes, x 2 for GROUP+SHIFT's two
                      slot logits; FreeNoise attends within windows (F x window instead of F x F);
                      split over all devices (temporal attention reshards to the pixel axis)
    activations       ACTIVATION_COPIES live copies of the widest feature map, batch x F x h x w x C x 4 bytes,
                      split over all devices
    runtime           RUNTIME_BYTES for the JAX/XLA runtime itself

``batch`` counts the classifier-free-guidance pair. The constants are set from two measurements of the tiny
model (no guidance): FreeLOC at 128 frames peaks at 1.3 GB resident on CPU (README, ``/usr/bin/time -v``;
estimate 1.3 GB), and at 4096 frames XLA asked for 126.8 GB (issue 13; estimate 121 GB).
"""

from __future__ import annotations

import os

import numpy as np

ACTIVATION_COPIES = 32
RUNTIME_BYTES = 700 * 2**20
GB = 1e9


def attention_levels(unet) -> list[tuple[int, int]]:
    """``(downsampling of the feature map, heads)`` of each level that has temporal attention."""
    levels = getattr(unet, "attention_levels", (True,))
    heads = getattr(unet, "attention_heads", (1,) * len(levels))
    found = [(2 ** i, h) for i, (on, h) in enumerate(zip(levels, heads)) if on]
    if getattr(unet, "temporal_in", False):
        found.append((1, getattr(unet, "temporal_in_heads", 1)))
    return found or [(1, 1)]


def estimate_bytes(config, num_frames: int, height: int, width: int, method, devices: int = 1, prompts: int = 1,
                   guided: bool = True, weight_bytes: int = 0) -> int:
    """Peak bytes per device of sampling ``prompts`` videos of ``num_frames`` at ``height x width`` (see the
    module docstring for the terms)."""
    from jaxlongvid.methods import FreeNoiseWindows, MethodPlan, TimePlan, get_method

    method = get_method(method)
    phases = [m for _, m in method.phases] if isinstance(method, TimePlan) else [method]
    layer_methods = [x for p in phases for x in
                     ([p.default, *(m for _, m in p.layers)] if isinstance(p, MethodPlan) else [p])]
    batch = prompts * (2 if guided else 1)
    f = config.latent_factor
    h, w = max(1, height // f), max(1, width // f)
    native = getattr(config, "native_frames", None) or num_frames
    keys = max(min(num_frames, m.merge.window) if isinstance(m.merge, FreeNoiseWindows) else num_frames
               for m in layer_methods)
    one = np.zeros(1, np.int32)  # the maps at one distance: their count without O(M N) work (M ~ N for longdiff)
    maps = max(len(m.positions.mapped(one, num_frames, native, np)) for m in layer_methods)  # planes per query
    attention = max(3 * batch * (h // s) * (w // s) * heads * num_frames * keys * 4 * maps
                    for s, heads in attention_levels(config.unet))
    channels = max(getattr(config.unet, "block_channels", (getattr(config.unet, "channels", 320),))[:1])
    activations = ACTIVATION_COPIES * batch * num_frames * h * w * channels * 4
    return int(weight_bytes + RUNTIME_BYTES + (attention + activations) / devices)


def available_bytes(device=None) -> int:
    """Memory of one device: the accelerator's allocator limit, or the host's available memory on CPU."""
    import jax

    device = device or jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"])
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def frames_that_fit(budget: int, step: int = 1, **request) -> int:
    """The most frames (a multiple of ``step``) whose :func:`estimate_bytes` is within ``budget``; 0 if none."""
    low, high = 0, 1
    while estimate_bytes(num_frames=high * step, **request) <= budget and high < 2**22:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if estimate_bytes(num_frames=mid * step, **request) <= budget else (low, mid)
    return low * step


def folder_bytes(path: str) -> int:
    """Total size of the files under ``path`` (a pipeline's weights on disk)."""
    return sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(path) for n in names)
