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
    chunk), written into one output. Unlike ``lax.map(..., batch_size=)``, ``fn`` is not vmapped: it sees each
    chunk's batch axis, so a ``lax.cond`` inside stays a branch instead of becoming a select of both. The chunks
    are dynamic slices of the operands as they are (no reshape to ``[steps, batch, ...]``, which a compiler may
    answer with a relayout copy of every operand)."""
    count = len(next(iter(operands.values())))
    steps, rest = divmod(count, batch)

    def chunk(start, size):
        return {key: jax.lax.dynamic_slice_in_dim(x, start, size) for key, x in operands.items()}

    shape = jax.eval_shape(fn, chunk(0, batch))
    out = jnp.zeros((count,) + shape.shape[1:], shape.dtype)
    body = lambda i, out: jax.lax.dynamic_update_slice_in_dim(out, fn(chunk(i * batch, batch)), i * batch, 0)
    out = jax.lax.fori_loop(0, steps, body, out)
    if rest:
        out = out.at[steps * batch:].set(fn(chunk(steps * batch, rest)))
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
    mask_table = None
    if mask is not None:  # each sequence's index into the masks, not the masks broadcast to every sequence
        mask = jnp.asarray(mask)
        mask_table = mask.reshape((-1,) + mask.shape[-2:])
        index = jnp.arange(len(mask_table), dtype=jnp.int32).reshape(mask.shape[:-2])
        operands["mask_index"] = jnp.broadcast_to(index, lead).reshape(count)

    def one(x):
        chunk_mask = None if mask_table is None else mask_table[x["mask_index"]]
        return attend_jnp(x["q"], x["k"], x["v"], maps, info, chunk_mask, encoding, t5_table, rel_k, rel_v,
                          rope, average)

    return map_chunks(one, operands, chunk).reshape(q.shape[:-1] + v.shape[-1:])
