"""Fused attention through ``jax.nn.dot_product_attention`` (cuDNN flash attention on NVIDIA GPUs, XLA
elsewhere) for maps whose RoPE is an absolute rotation: one fused call per map, outputs averaged (which equals
averaging the probabilities, the output being linear in them); the T5 and relative-key terms enter as a bias."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

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
