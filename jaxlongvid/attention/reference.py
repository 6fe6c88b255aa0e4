"""The jnp path: probabilities averaged over the maps, then applied to v. Plain and obviously correct; every
kernel is tested against it. Under mapped RoPE it runs over chunks of sequences (``AttentionPlan.chunk``)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxlongvid.attention.average import probabilities
from jaxlongvid.attention.encoding import Encoding
from jaxlongvid.attention.maps import MapInfo


def attend_jnp(q, k, v, maps, info: MapInfo, mask, encoding: Encoding, t5_table, rel_k, rel_v, rope: str,
               average: str):
    """[..., N, H, D] -> [..., N, H, Dv] in v's dtype."""
    rows = 0 if rel_v is None else rel_v.shape[0]
    probs, rel_mass = probabilities(q, k, maps, info, mask, encoding, t5_table, rel_k, rope, average, rows)
    out = jnp.einsum("...hij,...jhd->...ihd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    if rel_v is not None:
        out = out + jnp.einsum("...hir,rd->...ihd", rel_mass, rel_v.astype(jnp.float32))
    return out.astype(v.dtype)


def map_chunks(fn, operands: dict, batch: int):
    """``fn`` over consecutive chunks of ``batch`` entries of the operands' leading axis (the rest as one last
    chunk), concatenated. Unlike ``lax.map(..., batch_size=)``, ``fn`` is not vmapped: it sees each chunk's
    batch axis, so a ``lax.cond`` inside stays a branch instead of becoming a select of both."""
    count = len(next(iter(operands.values())))
    whole = count - count % batch
    steps = {key: x[:whole].reshape((whole // batch, batch) + x.shape[1:]) for key, x in operands.items()}
    out = jax.lax.map(fn, steps)
    out = out.reshape((whole,) + out.shape[2:])
    if whole < count:
        out = jnp.concatenate([out, fn({key: x[whole:] for key, x in operands.items()})])
    return out


def attend_jnp_chunked(q, k, v, maps, info: MapInfo, mask, encoding: Encoding, t5_table, rel_k, rel_v, rope: str,
                       average: str, chunk: int):
    """:func:`attend_jnp` over chunks of ``chunk`` sequences (0: all at once)."""
    lead = q.shape[:-3]
    count = math.prod(lead)
    if not chunk or chunk >= count:
        return attend_jnp(q, k, v, maps, info, mask, encoding, t5_table, rel_k, rel_v, rope, average)
    flat = lambda x: x.reshape((count,) + x.shape[len(lead):])
    operands = {"q": flat(q), "k": flat(k), "v": flat(v)}
    if mask is not None:
        operands["mask"] = flat(jnp.broadcast_to(mask, lead + mask.shape[-2:]))

    def one(x):
        return attend_jnp(x["q"], x["k"], x["v"], maps, info, x.get("mask"), encoding, t5_table, rel_k, rel_v,
                          rope, average)

    return map_chunks(one, operands, chunk).reshape(q.shape[:-1] + v.shape[-1:])
