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
                        implementation: str):
    """Token-level attention (``tokens_per_frame`` T > 1, tokens laid out frame by frame) under frame maps
    ``[M, F, F]`` and a frame mask ``[..., F, F]`` (or None), one fused attention per query frame and map: the
    query frame's T tokens against all N = F T keys, the RoPE dims of key frame j rotated by ``P[m, i, j]`` and
    the query's left unrotated (``q . R(theta P) k``), key frame j hidden where ``mask[i, j]`` is False. The
    token-level maps, mask and logits are never formed outside the kernel; the M outputs are averaged (= the
    average of the probabilities). Integer maps read cos / sin from float64 per-value tables, fractional ones
    take float32 angles (as ``per_frequency``). Returns ``[..., N, H, Dv]`` in v's dtype."""
    lead, (n, heads, dim) = q.shape[:-3], q.shape[-3:]
    t, r = tokens_per_frame, encoding.rope_dim
    f = n // t
    flat = lambda x: x.reshape((-1,) + x.shape[-3:])
    qf, kf, vf = flat(q), flat(k), flat(v)
    b = qf.shape[0]
    queries = jnp.moveaxis(qf.reshape(b, f, t, heads, dim), 1, 0)  # [F, B, T, H, D]
    freqs = encoding.rope_freqs()
    if info.integer:
        angles = np.asarray(info.values, np.float64)[:, None] * freqs  # [U, r/2]
        tables = jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)
    masks = None
    if frame_mask is not None:
        masks = jnp.broadcast_to(frame_mask, lead + frame_mask.shape[-2:]).reshape(-1, f, f)

    def rotated_keys(row):
        """k with key frame j's RoPE dims turned by ``row[j]`` (one query frame's map row, [F])."""
        if info.integer:
            index = jnp.searchsorted(jnp.asarray(info.values, row.dtype), row)
            cos, sin = tables[0][index], tables[1][index]  # [F, r/2]
        else:
            angle = row.astype(jnp.float32)[:, None] * jnp.asarray(freqs, jnp.float32)
            cos, sin = jnp.cos(angle), jnp.sin(angle)
        tokens = lambda x: jnp.repeat(x, t, axis=0)[:, None, :]  # [N, 1, r/2]
        a, c = kf[..., :r:2].astype(jnp.float32), kf[..., 1:r:2].astype(jnp.float32)
        cos, sin = tokens(cos), tokens(sin)
        turned = jnp.stack([a * cos - c * sin, c * cos + a * sin], axis=-1).reshape(kf.shape[:-1] + (r,))
        return jnp.concatenate([turned.astype(k.dtype), kf[..., r:]], axis=-1)

    def one_frame(args):
        i, query = args
        m = None
        if masks is not None:
            m = jnp.broadcast_to(jnp.repeat(masks[:, i, :], t, axis=-1)[:, None, None, :], (b, 1, t, n))
        out = 0.0
        for pmap in frame_maps:
            out = out + jax.nn.dot_product_attention(query, rotated_keys(pmap[i]), vf, mask=m,
                                                     implementation=implementation).astype(jnp.float32)
        return (out / len(frame_maps)).astype(v.dtype)

    outs = jax.lax.map(one_frame, (jnp.arange(f), queries))  # [F, B, T, H, Dv]
    return jnp.moveaxis(outs, 0, 1).reshape(lead + (n, heads) + v.shape[-1:])
