"""A memory estimate of a sampling request, made from the pipeline's config before anything is compiled.

The estimate is deliberately simple and errs high: it is there to refuse requests that cannot fit (4096 frames
on one GPU) in seconds instead of after minutes of compilation, not to predict XLA's allocator. Per device:

    weights           parameter bytes (the checkpoint's size on disk), replicated on every device
    attention         the denoiser's ``attention_bytes``: its largest temporal attention's float32 logits,
                      exponentials and probabilities where its kernel forms them, over F query frames, the key
                      frames each sees (F; FreeNoise: its window) and the position maps per query (2 for
                      GROUP+SHIFT's slots); split over all devices (temporal attention reshards)
    activations       the denoiser's ``activation_bytes``: its live feature maps, split over all devices
    runtime           RUNTIME_BYTES for the JAX/XLA runtime itself

The two denoiser terms are functions of the Python module that defines the denoiser's class (as
``temporal_layer_names`` is), so each model family states its own; F counts latent frames. ``batch`` counts the
classifier-free-guidance pair.

UNets (``models.unet3d``): attention 3 x batch x (h x w at that level) x heads x F x F x maps x 4 bytes at the
level that makes it largest; activations ``ACTIVATION_COPIES`` x batch x F x h x w x C x 4 bytes (C the widest
feature map's channels). The constants are set from two measurements of the tiny model (no guidance): FreeLOC at
128 frames peaks at 1.3 GB resident on CPU (README, ``/usr/bin/time -v``; estimate 1.3 GB), and at 4096 frames
XLA asked for 126.8 GB (issue 13; estimate 121 GB).

DiTs (``models.wan``): S = F' x (h / ph) x (w / pw) tokens of width ``dim``. Attention ``LOGIT_COPIES`` x batch x
heads x S x (key frames' tokens) x maps x 4 bytes where the kernel forms the logits -- the jnp path over token
maps, which CPUs take -- and nothing on a GPU whose cuDNN / per-query-frame / block-sparse paths keep them on
chip; activations batch x S x (``STREAM_COPIES`` x dim + ``FFN_COPIES`` x ffn_dim) x 4 bytes. Measured with the
tiny random Wan of the tests (4 heads, dim 48, 32 x 32 pixels = 256 tokens a frame, guidance, one step; peak
resident set, ``resource.getrusage``, on CPU) against the estimate: direct at 1 / 8 / 16 / 24 frames 0.37 / 0.80 /
2.04 / 5.25 GB (estimate 0.74 / 1.28 / 2.90 / 5.59 GB), longdiff at 16 frames 5.32 GB (11.5 GB: its mapped RoPE
is chunked one sequence at a time, not counted), FreeNoise at 16 frames 1.99 GB (2.90 GB). The logits there
take 3.1 to 4 copies, hence ``LOGIT_COPIES = 4``; the tiny model's activations are under 1% of its peak, so
``STREAM_COPIES`` and ``FFN_COPIES`` count a block's live arrays instead of being measured.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

RUNTIME_BYTES = 700 * 2**20
GB = 1e9


def denoiser_functions(denoiser_config):
    """The module defining the denoiser's class, with its ``attention_bytes`` and ``activation_bytes``."""
    from jaxlongvid.pipeline import component_functions

    family = component_functions(denoiser_config)
    for name in ("attention_bytes", "activation_bytes"):
        if not hasattr(family, name):
            raise ValueError(f"{family.__name__} defines no {name}() beside {type(denoiser_config).__name__}: "
                             f"cannot estimate its memory")
    return family


def estimate_bytes(config, num_frames: int, height: int, width: int, method, devices: int = 1, prompts: int = 1,
                   guided: bool = True, weight_bytes: int = 0, backend: Optional[str] = None) -> int:
    """Peak bytes per device of sampling ``prompts`` videos of ``num_frames`` (latent frames) at ``height x
    width`` on ``backend`` (None: JAX's default; see the module docstring for the terms)."""
    import jax

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
    family = denoiser_functions(config.unet)
    attention = family.attention_bytes(config.unet, num_frames, keys, maps, h, w, batch,
                                       backend=backend or jax.default_backend(), dtype=config.dtype,
                                       implementation=config.attention_implementation)
    activations = family.activation_bytes(config.unet, num_frames, h, w, batch)
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
