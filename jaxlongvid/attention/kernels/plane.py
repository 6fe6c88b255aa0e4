"""The plane kernel: LongDiff-style mapped-RoPE attention in one Pallas kernel (Triton on GPUs, Mosaic on TPUs,
interpreted on a CPU; the TPU build uses 128-query blocks and is checked to lower, not yet run on a TPU). For a block of queries it computes the plane-cover logits on chip (q and k pre-rotated per plane),
selects each map's (or each slot's, with the slot average and its checked fallback, as on the jnp path),
averages the M softmaxes and takes one ``P @ V``, never writing logits to memory. Forward pass only: its
gradient is the jnp plane path's (recomputed in the backward pass)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxlongvid.attention.average import SLOT_GAP_LIMIT, pick
from jaxlongvid.attention.encoding import Encoding, plane_rotations, rotate, t5_bias
from jaxlongvid.attention.maps import MapInfo, plane_index, slot_maps

BLOCK_Q = 16  # query rows per program; each program holds M logit tiles of [block, padded N] float32
BLOCK_Q_TPU = 128  # Mosaic tiles: a block's last dim is a multiple of 128 (or the whole padded N)
NUM_WARPS = 4


def pow2(x: int, least: int = 16) -> int:
    """The padded size of a kernel block dim: a power of two, at least 16 (the smallest Triton dot)."""
    return max(least, 1 << max(0, int(x) - 1).bit_length())


def mask_rows(mask, lead: tuple, n: int, n_pad: int):
    """The mask as int32 rows ``[rows, n_pad, n_pad]`` and the number of consecutive sequences that share a row.

    Leading mask dims after its last non-1 dim are shared, not materialised (an IFS mask ``[B, 1, N, N]`` stays
    B rows for ``B x pixels`` sequences). Padded keys are never visible; padded query rows see the real keys."""
    keys = jnp.arange(n_pad) < n
    if mask is None:
        return jnp.broadcast_to(keys, (1, n_pad, n_pad)).astype(jnp.int32), math.prod(lead)
    pad_rows = ~keys[:, None] & keys[None, :]
    mask = jnp.asarray(mask)
    mlead = (1,) * (len(lead) - (mask.ndim - 2)) + mask.shape[:-2]
    split = max([t + 1 for t, size in enumerate(mlead) if size != 1], default=0)
    rows = math.prod(lead[:split])
    full = jnp.broadcast_to(mask.reshape(mlead + (n, n)), lead[:split] + mlead[split:] + (n, n)).reshape(rows, n, n)
    full = jnp.pad(full, ((0, 0), (0, n_pad - n), (0, n_pad - n))) | pad_rows
    return full.astype(jnp.int32), math.prod(lead[split:])


def plane_kernel(*refs, num_planes, num_logits, num_maps, head_dim, has_plain, has_bias, has_mask):
    """One (sequence, head, query block): the cover's plane logits, per-map (or per-slot) selection, the average
    of the maps' softmaxes, one P @ V.

    ``num_logits`` logit maps are formed: the maps themselves (``num_maps`` = 0: one softmax each), or the slots
    (then ``sel_ref`` says which slot each of the ``num_maps`` maps takes, the average is the slot average, and
    ``fits_ref`` gets, per query row, whether its sums cleared the floor)."""
    qr_ref, kr_ref, v_ref, idx_ref, *optional = refs
    optional = iter(optional)
    sel_ref = next(optional) if num_maps else None
    qp_ref, kp_ref = (next(optional), next(optional)) if has_plain else (None, None)
    bias_ref = next(optional) if has_bias else None
    mask_ref = next(optional) if has_mask else None
    out_ref = next(optional)
    fits_ref = next(optional) if num_maps else None
    dot_t = lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    logits = [None] * num_logits
    for p in range(num_planes):  # q and k rotated for plane p: its logits for every key
        s_p = dot_t(qr_ref[p].astype(jnp.float32), kr_ref[p].astype(jnp.float32))
        for m in range(num_logits):
            logits[m] = jnp.where(idx_ref[m] == p, s_p, 0.0 if logits[m] is None else logits[m])
    plain = dot_t(qp_ref[...].astype(jnp.float32), kp_ref[...].astype(jnp.float32)) if has_plain else None
    visible = mask_ref[...] != 0 if has_mask else None
    scale = math.sqrt(head_dim)
    for m in range(num_logits):  # the jnp path's order of operations, so both round alike
        x = logits[m] if plain is None else logits[m] + plain
        x = x / scale if bias_ref is None else x / scale + bias_ref[m]
        logits[m] = x if visible is None else jnp.where(visible, x, -jnp.inf)
    probs = 0.0
    if num_maps:  # slot average: one exp per slot against the rows' common maximum
        top = functools.reduce(jnp.maximum, [jnp.max(x, axis=-1) for x in logits])  # [block]
        exps = [jnp.exp(x - top[:, None]) for x in logits]
        floor = math.exp(-SLOT_GAP_LIMIT)
        no_key = top == -jnp.inf  # rows that see no key: NaN either way
        cleared = None  # every map's sum >= floor
        for m in range(num_maps):
            x = pick(sel_ref[m], exps)
            total = jnp.sum(x, axis=-1)  # map m's softmax sum
            ok = total >= floor
            cleared = ok if cleared is None else cleared & ok
            probs = probs + x * (1.0 / (num_maps * jnp.where(ok, total, 1.0)))[:, None]
        fits_ref[...] = (no_key | cleared).astype(jnp.int32)[None, :]
    else:
        for x in logits:
            e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
            probs = probs + e / jnp.sum(e, axis=-1, keepdims=True) / num_logits
    v = v_ref[...]
    out = jax.lax.dot_general(probs.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    out_ref[...] = out.astype(out_ref.dtype)


def compiler_params(target: str):
    """Triton parameters on GPUs, Mosaic's on TPUs (interpret mode on a CPU takes either)."""
    if target == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams()
    from jax.experimental.pallas import triton as pl_triton

    return pl_triton.CompilerParams(num_warps=NUM_WARPS, num_stages=1)


def pallas_forward(q, k, v, t5_table, mask, maps, info: MapInfo, encoding: Encoding, interpret: bool, average: str,
                   target: str = "gpu"):
    """The plane kernel over every (sequence, head, query block); [..., N, H, D] -> [..., N, H, Dv].

    With ``average="slots"`` the kernel forms the slot logits and takes the slot average; if a row's sums fall
    under the floor it says so, and the call reruns with one softmax per map (a run-time branch, as on the jnp
    path)."""
    from jax.experimental import pallas as pl  # imported here: only this path needs it

    lead, (n, h, d), dv, r = q.shape[:-3], q.shape[-3:], v.shape[-1], encoding.rope_dim
    count = math.prod(lead)
    n_pad, r_pad, dv_pad = pow2(n), pow2(r), pow2(dv)
    block = min(BLOCK_Q_TPU if target == "tpu" else BLOCK_Q, n_pad)
    slot_average = average == "slots"
    logit_maps, sel = slot_maps(maps, info.num_slots) if slot_average else (maps, None)
    planes = info.planes
    num_logits, p_pad, l_pad = len(logit_maps), pow2(len(planes), 1), pow2(len(logit_maps), 1)

    def heads_first(x, width):  # [..., N, H, w] -> [S, H, n_pad, width], zero padded
        x = jnp.swapaxes(x.reshape((count,) + x.shape[-3:]), 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, n_pad - n), (0, width - x.shape[-1])))

    rotations = [plane_rotations(s, c, n) for s, c in planes]  # (q, k) positions per plane

    def per_plane(x, which):  # x rotated for every plane -> [S, H, p_pad, n_pad, r_pad] (padding planes zero)
        rotated = [heads_first(rotate(x, pos[which], encoding.rope_freqs()), r_pad) for pos in rotations]
        return jnp.pad(jnp.stack(rotated, axis=2).astype(x.dtype),
                       ((0, 0), (0, 0), (0, p_pad - len(planes)), (0, 0), (0, 0)))

    def padded(table):  # int [L, N, N] -> [pow2(L), n_pad, n_pad]
        return jnp.pad(table.astype(jnp.int32), ((0, pow2(len(table), 1) - len(table)), (0, n_pad - n),
                                                 (0, n_pad - n)))

    operands = [per_plane(q[..., :r], 0), per_plane(k[..., :r], 1), heads_first(v, dv_pad),
                padded(plane_index(logit_maps, planes))]
    seq_head = lambda width, rows: pl.BlockSpec((None, None, rows, width), lambda s, hh, i: (s, hh, i, 0))
    whole = lambda width: pl.BlockSpec((None, None, n_pad, width), lambda s, hh, i: (s, hh, 0, 0))
    specs = [pl.BlockSpec((None, None, p_pad, block, r_pad), lambda s, hh, i: (s, hh, 0, i, 0)),
             pl.BlockSpec((None, None, p_pad, n_pad, r_pad), lambda s, hh, i: (s, hh, 0, 0, 0)),
             whole(dv_pad), pl.BlockSpec((l_pad, block, n_pad), lambda s, hh, i: (0, i, 0))]
    if slot_average:
        operands.append(padded(sel))
        specs.append(pl.BlockSpec((pow2(len(sel), 1), block, n_pad), lambda s, hh, i: (0, i, 0)))
    has_plain = r < d
    if has_plain:
        d_pad = pow2(d - r)
        operands += [heads_first(q[..., r:], d_pad), heads_first(k[..., r:], d_pad)]
        specs += [seq_head(d_pad, block), whole(d_pad)]
    has_bias = t5_table is not None
    if has_bias:
        bias = jnp.stack([t5_bias(p, info, encoding, t5_table) for p in logit_maps], axis=1)  # [H, L, N, N]
        operands.append(jnp.pad(bias, ((0, 0), (0, l_pad - num_logits), (0, n_pad - n), (0, n_pad - n))))
        specs.append(pl.BlockSpec((None, l_pad, block, n_pad), lambda s, hh, i: (hh, 0, i, 0)))
    has_mask = mask is not None or n_pad != n
    if has_mask:
        rows, shared = mask_rows(mask, lead, n, n_pad)
        operands.append(rows)
        specs.append(pl.BlockSpec((None, block, n_pad), lambda s, hh, i: (jax.lax.div(s, shared), i, 0)))
    kernel = functools.partial(plane_kernel, num_planes=len(planes), num_logits=num_logits,
                               num_maps=len(maps) if slot_average else 0, head_dim=d, has_plain=has_plain,
                               has_bias=has_bias, has_mask=has_mask)
    out_specs, out_shape = [seq_head(dv_pad, block)], [jax.ShapeDtypeStruct((count, h, n_pad, dv_pad), v.dtype)]
    if slot_average:  # per query row: did the slot sums clear the floor
        out_specs.append(pl.BlockSpec((None, None, 1, block), lambda s, hh, i: (s, hh, 0, i)))
        out_shape.append(jax.ShapeDtypeStruct((count, h, 1, n_pad), jnp.int32))
    out, *fits = pl.pallas_call(
        kernel, grid=(count, h, n_pad // block), in_specs=specs, out_specs=out_specs, out_shape=out_shape,
        interpret=interpret, compiler_params=compiler_params(target),
        name="plane_rope_attention")(*operands)
    out = jnp.swapaxes(out[:, :, :n, :dv], 1, 2).reshape(lead + (n, h, dv))
    if not slot_average:
        return out
    per_map = lambda: pallas_forward(q, k, v, t5_table, mask, maps, info, encoding, interpret, "per_map", target)
    return jax.lax.cond(jnp.all(fits[0][:, :, 0, :n] != 0), lambda: out, per_map)
