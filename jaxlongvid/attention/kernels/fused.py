"""Fused attention through ``jax.nn.dot_product_attention`` (cuDNN flash attention on NVIDIA GPUs, XLA
elsewhere) for maps whose RoPE is an absolute rotation: one fused call per map, outputs averaged (which equals
averaging the probabilities, the output being linear in them); the T5 and relative-key terms enter as a bias.
At token level (video DiTs) any frame map and frame mask also run fused, one query frame at a time
(:func:`attend_fused_frames`)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlongvid.attention.encoding import Encoding, rel_key_logits, rotate, t5_bias
from jaxlongvid.attention.maps import MapInfo

# Bytes of gathered, turned keys and values that one step of ``attend_fused_frames`` may hold: it runs as many query
# frames per fused call as fit, because one frame's call is too small a grid to fill a GPU (T / 128 query blocks per
# head). Sized for an 80 GB card: on an H100 at Wan's 81 latent frames, LongDiff's attention took 1.30x direct with
# 4 GiB, 1.19x with 12 GiB, 1.42x one frame per call (docs/benchmarks.md).
FRAMES_CALL_BYTES = 12 << 30


def attend_fused(q, k, v, maps, info: MapInfo, mask, encoding: Encoding, t5_table, rel_k, implementation: str):
    """[..., N, H, D] -> [..., N, H, Dv] in v's dtype; ``mask`` [..., N, N] bool or None."""
    lead = q.shape[:-3]
    flat = lambda x: x.reshape((-1,) + x.shape[-3:])
    qf, kf, vf = flat(q), flat(k), flat(v)
    r = encoding.rope_dim
    m = None
    if mask is not None:
        m = jnp.broadcast_to(mask, lead + mask.shape[-2:]).reshape((-1, 1) + mask.shape[-2:])
    out = 0.0
    for pmap, c in zip(maps, info.coefficients):
        qm, km = qf, kf
        if r:
            pos = info.positions(c, q.shape[-3])
            freqs = encoding.rope_freqs()
            qm = jnp.concatenate([rotate(qf[..., :r], pos, freqs).astype(q.dtype), qf[..., r:]], -1)
            km = jnp.concatenate([rotate(kf[..., :r], pos, freqs).astype(k.dtype), kf[..., r:]], -1)
        bias = None
        if t5_table is not None:
            bias = t5_bias(pmap, info, encoding, t5_table)[None]
        if rel_k is not None:
            rel = rel_key_logits(qf, rel_k, pmap, encoding.rel_distance) / math.sqrt(q.shape[-1])
            bias = rel if bias is None else bias + rel
        if bias is not None:
            bias = bias.astype(q.dtype)
        out = out + jax.nn.dot_product_attention(
            qm, km, vf, bias=bias, mask=m, implementation=implementation).astype(jnp.float32)
    return (out / len(maps)).astype(v.dtype).reshape(q.shape[:-1] + v.shape[-1:])


def attend_fused_frames(q, k, v, frame_maps, info: MapInfo, frame_mask, encoding: Encoding, tokens_per_frame: int,
                        implementation: str, visible: int):
    """Token-level attention (``tokens_per_frame`` T > 1, tokens laid out frame by frame) under frame maps
    ``[M, F, F]`` and a frame mask ``[..., F, F]`` (or None), one fused attention per query frame and map: the
    query frame's T tokens against the keys of the frames it sees, the RoPE dims of key frame j rotated by
    ``P[m, i, j]`` and the query's left unrotated (``q . R(theta P) k``). With a mask, each query frame gathers
    the key frames its mask row keeps (at most ``visible``, a static bound; unused slots come last and are cut
    off by a key length), so hidden frames cost nothing. Query frames run in groups, as many per step as
    ``FRAMES_CALL_BYTES`` of gathered keys and values allow. The token-level maps, mask and logits are never formed
    outside the kernel; the M outputs
    are averaged (= the average of the probabilities). Integer maps read cos / sin from float64 per-value tables,
    fractional ones take float32 angles (as ``per_frequency``). Returns ``[..., N, H, Dv]`` in v's dtype."""
    lead, (n, heads, dim) = q.shape[:-3], q.shape[-3:]
    t, r = tokens_per_frame, encoding.rope_dim
    f = n // t
    flat = lambda x: x.reshape((-1,) + x.shape[-3:])
    qf, kf, vf = flat(q), flat(k), flat(v)
    b = qf.shape[0]
    queries = jnp.moveaxis(qf.reshape(b, f, t, heads, dim), 1, 0)  # [F, B, T, H, D]
    by_frame = lambda x: x.reshape(b, f, t, heads, x.shape[-1])
    freqs = encoding.rope_freqs()
    if info.integer:
        angles = np.asarray(info.values, np.float64)[:, None] * freqs  # [U, r/2]
        tables = jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)
    masks = None
    if frame_mask is not None:
        masks = jnp.broadcast_to(frame_mask, (b,) + frame_mask.shape[-2:]) if frame_mask.ndim == 2 else \
            jnp.broadcast_to(frame_mask, lead + frame_mask.shape[-2:]).reshape(-1, f, f)

    def turn(keys, values):
        """``keys [..., S, H, D]`` with the RoPE dims of each key turned by ``values [..., S]`` (positions)."""
        if info.integer:
            index = jnp.searchsorted(jnp.asarray(info.values, values.dtype), values)
            cos, sin = tables[0][index], tables[1][index]
        else:
            angle = values.astype(jnp.float32)[..., None] * jnp.asarray(freqs, jnp.float32)
            cos, sin = jnp.cos(angle), jnp.sin(angle)
        cos, sin = cos[..., None, :], sin[..., None, :]  # over heads
        a, c = keys[..., :r:2].astype(jnp.float32), keys[..., 1:r:2].astype(jnp.float32)
        turned = jnp.stack([a * cos - c * sin, c * cos + a * sin], axis=-1).reshape(keys.shape[:-1] + (r,))
        return jnp.concatenate([turned.astype(keys.dtype), keys[..., r:]], axis=-1)

    def one_frame(args):
        i, query = args
        if masks is None:  # every key frame
            keys, values, m = kf, vf, None
            positions = lambda pmap: jnp.repeat(pmap[i], t)  # [N]
        else:  # the key frames this row keeps, in order; slots past their count are masked
            row = masks[:, i, :]  # [B, F]
            seen = jax.vmap(lambda x: jnp.nonzero(x, size=visible, fill_value=0)[0])(row)  # [B, K]
            gather = lambda x: jnp.take_along_axis(by_frame(x), seen[:, :, None, None, None], axis=1).reshape(
                b, visible * t, heads, x.shape[-1])
            keys, values = gather(kf), gather(vf)
            m = (jnp.sum(row, axis=-1) * t).astype(jnp.int32)  # [B]: the kept frames' tokens come first
            positions = lambda pmap: jnp.repeat(pmap[i][seen], t, axis=-1)  # [B, K T]
        out = 0.0
        for pmap in frame_maps:  # kept keys as a length, not a mask: cuDNN's padding mask, no [T, K T] tensor
            out = out + jax.nn.dot_product_attention(query, turn(keys, positions(pmap)), values,
                                                     key_value_seq_lengths=m,
                                                     implementation=implementation).astype(jnp.float32)
        return (out / len(frame_maps)).astype(v.dtype)

    per_frame = b * visible * t * heads * (dim + v.shape[-1]) * jnp.dtype(k.dtype).itemsize
    group = max(1, min(f, FRAMES_CALL_BYTES // per_frame))
    outs = jax.lax.map(one_frame, (jnp.arange(f), queries), batch_size=group)  # [F, B, T, H, Dv]
    return jnp.moveaxis(outs, 0, 1).reshape(lead + (n, heads) + v.shape[-1:])
