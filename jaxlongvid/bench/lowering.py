"""What a compiled denoiser step costs to build: lowering seconds, program size and the constants it captures.

Maps and masks are built inside the program from iotas, so a step's program should not grow with the frame
count squared. :func:`lower_denoiser` lowers one denoiser call of a pipeline config for shapes only (no weights
are materialised) and :func:`constant_sizes` lists the bytes of every constant in the StableHLO text.
"""

from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlongvid.models.unet3d import init_shapes
from jaxlongvid.pipeline import PipelineConfig, apply_denoiser

_CONSTANT = re.compile(r"stablehlo\.constant\b.*:\s*tensor<([^>]*)>\s*$")
_BYTES = {"i1": 1, "i8": 1, "ui8": 1, "i16": 2, "bf16": 2, "f16": 2, "i32": 4, "ui32": 4, "f32": 4, "i64": 8,
          "ui64": 8, "f64": 8}


def constant_sizes(text: str) -> list[int]:
    """Bytes of every ``stablehlo.constant`` in a lowered module's text (its result type's element count times
    the element size)."""
    sizes = []
    for line in text.splitlines():
        if "stablehlo.constant" not in line:
            continue
        match = _CONSTANT.search(line)
        if match is None:
            continue
        *dims, element = match.group(1).split("x")
        sizes.append(int(np.prod([int(d) for d in dims], dtype=np.int64)) * _BYTES.get(element, 4))
    return sizes


def lower_denoiser(config: PipelineConfig, method, frames: int, batch: int = 1, latent_size=None):
    """``(lowered, seconds)``: one denoiser call on ``[batch, frames, h, w, C]`` latents, lowered for shapes;
    ``latent_size`` (h, w) defaults to the pipeline's image size over its VAE factor."""
    unet = config.unet
    factor = config.latent_factor
    h, w = latent_size or (config.height // factor, config.width // factor)
    params = init_shapes(unet)
    x = jax.ShapeDtypeStruct((batch, frames, h, w, unet.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    ctx = jax.ShapeDtypeStruct((batch, 8, unet.cross_attention_dim), jnp.float32)
    start = time.perf_counter()
    lowered = jax.jit(lambda p, x, t, c: apply_denoiser(config, method, p, x, t, c)).lower(params, x, t, ctx)
    return lowered, time.perf_counter() - start
