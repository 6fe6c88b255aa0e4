"""Block-sparse token attention under a frame mask, in one Pallas kernel (Triton on GPUs, interpreted on a CPU).

Token-level attention of a video DiT (``tokens_per_frame`` T > 1, tokens laid out frame by frame) under a
method's frame maps ``P [M, F, F]`` and frame mask ``[..., F, F]``. Each frame's T tokens are padded to a
multiple of the block and cut into blocks, so a query block and a key block each lie in one frame. A query block
of frame i visits, in order, only the key frames its mask row keeps -- a list of at most ``visible`` frames (a
static bound) built in the program from the mask, so static masks (tiered, window) and traced ones (IFS
keyframes) run alike -- and each of their key blocks, with an online softmax. The frame RoPE dims of key frame j
are turned by ``P[m, i, j]`` inside the kernel: ``q . R(theta P) k = (q C + q' S) . k`` with the RoPE pairs of q
and k laid out as (evens | odds | rest), ``q'`` = (odds | evens | 0) and C, S the row of float64 cos / sin
tables for P's value (``MapInfo.values``: integer and fractional maps alike). M maps make M passes whose
normalised outputs are averaged (= the average of the M softmaxes, as the project defines it). No logits, token
maps or token masks are written to memory. A query row that sees no key gives NaN, as on the jnp path.

Forward pass only: ``core.attend_sparse`` gives it the gradient of the per-query-frame fused path."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jaxlongvid.attention.encoding import Encoding
from jaxlongvid.attention.kernels.plane import compiler_params, pow2
from jaxlongvid.attention.maps import MapInfo

BLOCK = 64  # tokens per query and key block (at most; the power of two >= T when T is smaller, at least 16)


def block_of(tokens_per_frame: int) -> int:
    """The kernel's block for T tokens per frame."""
    return min(BLOCK, pow2(tokens_per_frame))


def visible_lists(frame_mask, lead: tuple, frames: int, visible: int):
    """The key frames each query frame sees, in order, then -1: int32 ``[R, F, K]`` (K = pow2(visible)), and how
    many consecutive sequences share a list. A mask ``[F, F]`` (or None: every frame) is one list for all
    sequences; a mask over the leading dims is one per sequence."""
    width = pow2(visible, 1)
    if frame_mask is None:
        every = jnp.where(jnp.arange(width) < frames, jnp.arange(width), -1).astype(jnp.int32)
        return jnp.broadcast_to(every, (1, frames, width)), math.prod(lead)
    frame_mask = jnp.asarray(frame_mask)
    if frame_mask.ndim == 2:
        rows, shared = frame_mask[None], math.prod(lead)
    else:
        rows, shared = jnp.broadcast_to(frame_mask, lead + (frames, frames)).reshape(-1, frames, frames), 1
    keep = lambda row: jnp.nonzero(row, size=width, fill_value=-1)[0]
    return jax.vmap(jax.vmap(keep))(rows).astype(jnp.int32), shared


def value_rows(frame_maps, info: MapInfo, seen):
    """Each visited (query frame i, key slot) pair's row in the cos / sin tables per map: int32 ``[R, F, M, K]``,
    the index of ``P[m, i, seen]`` among ``info.values`` (the nearest one: fractional maps built in float32 in the
    program need not round as the float64 values do; distinct values lie far apart)."""
    values = jnp.asarray(info.values, jnp.float32)
    frames = frame_maps.shape[-1]
    x = frame_maps.astype(jnp.float32)[:, jnp.arange(frames)[None, :, None], jnp.maximum(seen, 0)]  # [M, R, F, K]
    x = jnp.moveaxis(x, 0, 2)
    if len(info.values) == 1:
        return jnp.zeros(x.shape, jnp.int32)
    high = jnp.clip(jnp.searchsorted(values, x), 1, len(info.values) - 1)
    low = high - 1
    return jnp.where(x - values[low] <= values[high] - x, low, high).astype(jnp.int32)


def turn_tables(info: MapInfo, encoding: Encoding, width: int):
    """float32 ``[pow2(U), width]`` cos and sin rows of each map value u, laid out for ``(evens | odds | rest)``:
    C = (cos | cos | 1), S = (sin | -sin | 0), from float64 angles ``u * freqs``."""
    half = encoding.rope_dim // 2
    angles = np.asarray(info.values, np.float64)[:, None] * encoding.rope_freqs()[None, :]  # [U, r/2]
    cos, sin = np.zeros((pow2(len(angles), 1), width)), np.zeros((pow2(len(angles), 1), width))
    cos[:len(angles), :half], cos[:len(angles), half:2 * half] = np.cos(angles), np.cos(angles)
    cos[:len(angles), 2 * half:] = 1.0  # the rest (and the padding, which q holds as zeros)
    sin[:len(angles), :half], sin[:len(angles), half:2 * half] = np.sin(angles), -np.sin(angles)
    return jnp.asarray(cos, jnp.float32), jnp.asarray(sin, jnp.float32)


def sparse_kernel(q_ref, qs_ref, k_ref, v_ref, seen_ref, rows_ref, cos_ref, sin_ref, out_ref, *, num_maps, tokens,
                  block, blocks_per_frame, head_dim, precision):
    """One (sequence, head, query block of frame i): for each map, an online softmax over the key blocks of the
    frames in ``seen_ref`` (the list of frame i), the query turned by each frame's map value."""
    dot = lambda a, b, dims: jax.lax.dot_general(a, b, (dims, ((), ())), precision=precision,
                                                 preferred_element_type=jnp.float32)
    q, q_swapped = q_ref[...].astype(jnp.float32), qs_ref[...].astype(jnp.float32)
    steps = jnp.sum((seen_ref[...] >= 0).astype(jnp.int32)) * blocks_per_frame
    key_ids = jnp.arange(block)
    scale = math.sqrt(head_dim)
    out = 0.0
    for m in range(num_maps):
        def visit(step, carry, m=m):
            top, total, acc = carry
            slot, part = jax.lax.div(step, blocks_per_frame), jax.lax.rem(step, blocks_per_frame)
            row = rows_ref[m, slot]
            turned = q * cos_ref[row, :][None, :] + q_swapped * sin_ref[row, :][None, :]
            start = (seen_ref[slot] * blocks_per_frame + part) * block
            keys, values = k_ref[pl.ds(start, block), :], v_ref[pl.ds(start, block), :]
            x = dot(turned.astype(keys.dtype), keys, ((1,), (1,))) / scale
            x = jnp.where((part * block + key_ids < tokens)[None, :], x, -jnp.inf)  # the frame's padding
            new_top = jnp.maximum(top, jnp.max(x, axis=-1))  # every block holds a real key: finite
            fade = jnp.exp(top - new_top)
            p = jnp.exp(x - new_top[:, None])
            acc = acc * fade[:, None] + dot(p.astype(values.dtype), values, ((1,), (0,)))
            return new_top, total * fade + jnp.sum(p, axis=-1), acc

        start = (jnp.full((block,), -jnp.inf, jnp.float32), jnp.zeros((block,), jnp.float32),
                 jnp.zeros((block, out_ref.shape[-1]), jnp.float32))
        _, total, acc = jax.lax.fori_loop(0, steps, visit, start)
        out = out + acc / total[:, None]  # no key seen: 0 / 0
    out_ref[...] = (out / num_maps).astype(out_ref.dtype)


def sparse_forward(q, k, v, frame_maps, info: MapInfo, frame_mask, encoding: Encoding, tokens_per_frame: int,
                   visible: int, interpret: bool, block: int = 0):
    """Token attention ``[..., F T, H, D] -> [..., F T, H, Dv]`` (v's dtype) under frame maps ``[M, F, F]`` (jnp,
    ``info`` their facts) and a frame mask ``[..., F, F]`` or None, each query frame seeing at most ``visible``
    key frames (a static bound; a row with more would lose keys). ``block``: tokens per block (0: ``block_of``;
    tests take small ones to cut frames into several blocks)."""
    lead, (n, h, d), dv = q.shape[:-3], q.shape[-3:], v.shape[-1]
    t, r = tokens_per_frame, encoding.rope_dim
    if n % t:
        raise ValueError(f"tokens_per_frame {t} does not divide the {n} tokens")
    if r > d:
        raise ValueError(f"Encoding.rope_dim ({r}) exceeds the head dim ({d})")
    f, count = n // t, math.prod(lead)
    block = block or block_of(t)
    blocks_per_frame = -(-t // block)
    t_pad, d_pad, dv_pad = blocks_per_frame * block, pow2(d), pow2(dv)

    def layout(x, width):  # [..., F T, H, w] -> [S, H, F t_pad, width], each frame's tokens zero padded
        x = x.reshape((count, f, t, h, x.shape[-1]))
        x = jnp.pad(x, ((0, 0), (0, 0), (0, t_pad - t), (0, 0), (0, width - x.shape[-1])))
        return jnp.transpose(x, (0, 3, 1, 2, 4)).reshape(count, h, f * t_pad, width)

    pairs = lambda x: (x[..., 0:r:2], x[..., 1:r:2])
    (qa, qb), (ka, kb) = pairs(q), pairs(k)
    seen, shared = visible_lists(frame_mask, lead, f, visible)
    rows = value_rows(frame_maps, info, seen)
    cos, sin = turn_tables(info, encoding, d_pad)
    operands = [layout(jnp.concatenate([qa, qb, q[..., r:]], -1), d_pad),
                layout(jnp.concatenate([qb, qa], -1), d_pad),
                layout(jnp.concatenate([ka, kb, k[..., r:]], -1), d_pad), layout(v, dv_pad),
                seen, rows, cos, sin]
    query = lambda width: pl.BlockSpec((None, None, block, width), lambda s, hh, g: (s, hh, g, 0))
    whole = lambda width: pl.BlockSpec((None, None, f * t_pad, width), lambda s, hh, g: (s, hh, 0, 0))
    per_frame = lambda g: jax.lax.div(g, blocks_per_frame)
    table = pl.BlockSpec(cos.shape, lambda s, hh, g: (0, 0))
    specs = [query(d_pad), query(d_pad), whole(d_pad), whole(dv_pad),
             pl.BlockSpec((None, None, seen.shape[-1]), lambda s, hh, g: (jax.lax.div(s, shared), per_frame(g), 0)),
             pl.BlockSpec((None, None) + rows.shape[-2:],
                          lambda s, hh, g: (jax.lax.div(s, shared), per_frame(g), 0, 0)),
             table, table]
    # float32 input keeps float32 products (a GPU would round them to TF32 by default); half precision as it is
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(q.dtype) == jnp.float32 else None
    kernel = functools.partial(sparse_kernel, num_maps=len(frame_maps), tokens=t, block=block,
                               blocks_per_frame=blocks_per_frame, head_dim=d, precision=precision)
    out = pl.pallas_call(kernel, grid=(count, h, f * blocks_per_frame), in_specs=specs, out_specs=query(dv_pad),
                         out_shape=jax.ShapeDtypeStruct((count, h, f * t_pad, dv_pad), v.dtype),
                         interpret=interpret, compiler_params=compiler_params("gpu"),
                         name="block_sparse_frame_attention")(*operands)
    out = out.reshape(count, h, f, t_pad, dv_pad)[:, :, :, :t, :dv]
    return jnp.transpose(out, (0, 2, 3, 1, 4)).reshape(lead + (n, h, dv))
