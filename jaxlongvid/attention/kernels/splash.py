"""Splash attention (TPU, ``jax.experimental.pallas.ops.tpu.splash_attention``) for token attention under a
static frame mask with absolute RoPE: one map that is a multiple ``c (j - i)`` of the frame distance (direct,
interpolation, RIFLEx), so q and k are rotated once by their frames' absolute positions ``c * frame``, and the frame
mask (tiered, window; known before run time) expanded to blocks of T tokens is splash's block-sparse mask:
splash skips the blocks it hides and loads a partial block's mask only where frames change inside it. Splash
brings its own backward kernels. Interpreted on a CPU (``interpret=True``)."""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_masks

from jaxlongvid.attention.encoding import Encoding, rotate

BLOCK = 512  # splash's query and key blocks at most (a multiple of 128, Mosaic's lane width)
LANES = 128


class FrameBlockMask(splash_masks.Mask):
    """The token mask ``[P, P]`` of a frame mask ``[F, F]`` with T tokens per frame (token a in frame a // T),
    padded to P tokens: padded keys hidden, padded query rows see every real key. Splash reads it block by
    block (``mask[q_slice, k_slice]``), so the ``[tokens x tokens]`` array is never formed."""

    def __init__(self, frame_mask: np.ndarray, tokens_per_frame: int, padded: int):
        self.frame_mask = np.asarray(frame_mask, bool)
        self.tokens_per_frame, self.padded = tokens_per_frame, padded
        self.tokens = self.frame_mask.shape[-1] * tokens_per_frame

    @property
    def shape(self) -> tuple[int, int]:
        return self.padded, self.padded

    def __getitem__(self, idx) -> np.ndarray:
        rows, cols = (np.arange(self.padded)[part] for part in idx)
        t, n = self.tokens_per_frame, self.tokens
        real = lambda ids: np.minimum(ids, n - 1) // t
        keep = self.frame_mask[real(rows)[:, None], real(cols)[None, :]]
        return (keep | (rows >= n)[:, None]) & (cols < n)[None, :]

    def __eq__(self, other):
        return isinstance(other, FrameBlockMask) and self.key() == other.key()

    def __hash__(self):
        return hash(self.key())

    def key(self):
        return self.frame_mask.tobytes(), self.frame_mask.shape, self.tokens_per_frame, self.padded


def padded_length(tokens: int, block: int = BLOCK) -> tuple[int, int]:
    """The padded token count and splash's block for ``tokens``: a multiple of 128, then of the block."""
    lanes = -(-tokens // LANES) * LANES
    block = min(block, lanes)
    return -(-lanes // block) * block, block


def splash_forward(q, k, v, frame_mask: Optional[np.ndarray], coefficient: float, encoding: Encoding,
                   tokens_per_frame: int, interpret: bool, block: int = BLOCK):
    """Token attention ``[..., F T, H, D] -> [..., F T, H, Dv]`` (v's dtype) under the static frame mask (NumPy
    ``[F, F]``, None: every frame) with the frame RoPE dims rotated by absolute positions ``coefficient * frame``."""
    lead, (n, h, d) = q.shape[:-3], q.shape[-3:]
    t, r = tokens_per_frame, encoding.rope_dim
    if n % t:
        raise ValueError(f"tokens_per_frame {t} does not divide the {n} tokens")
    f = n // t
    frame_mask = np.ones((f, f), bool) if frame_mask is None else np.asarray(frame_mask, bool)
    if frame_mask.shape != (f, f):
        raise ValueError(f"splash attention takes one static frame mask [{f}, {f}], got {frame_mask.shape}")
    padded, block = padded_length(n, block)
    positions = coefficient * (np.arange(n) // t)
    turn = lambda x: jnp.concatenate([rotate(x[..., :r], positions, encoding.rope_freqs()),
                                      x[..., r:].astype(jnp.float32)], axis=-1).astype(x.dtype) if r else x

    def layout(x):  # [..., N, H, w] -> [S, H, padded, w]
        x = jnp.swapaxes(x.reshape((-1,) + x.shape[-3:]), 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, padded - n), (0, 0)))

    mask = splash_masks.MultiHeadMask([FrameBlockMask(frame_mask, t, padded)] * h)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    scaled = (turn(q).astype(jnp.float32) / math.sqrt(d)).astype(q.dtype)
    out = jax.vmap(kernel)(layout(scaled), layout(turn(k)), layout(v))  # [S, H, padded, Dv]
    out = jnp.swapaxes(out[:, :, :n], 1, 2)
    return out.reshape(lead + (n, h, v.shape[-1])).astype(v.dtype)
