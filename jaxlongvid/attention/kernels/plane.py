"""The plane kernel: LongDiff-style mapped-RoPE attention in one Pallas kernel (Triton on GPUs, Mosaic on TPUs,
interpreted on a CPU; the TPU build uses 128-query blocks and is checked to lower, not yet run on a TPU). For a
block of queries it computes the plane-cover logits on chip (q and k pre-rotated per plane), selects each map's
(or each slot's, with the slot average and its checked fallback, as on the jnp path), averages the M softmaxes
and multiplies by V, a block of keys at a time, never writing logits to memory. Forward pass only: its
gradient is the jnp plane path's (recomputed in the backward pass)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxlongvid.attention.average import SLOT_GAP_LIMIT, pick
from jaxlongvid.attention.encoding import Encoding, plane_rotations, rotate, t5_bias
from jaxlongvid.attention.maps import MapInfo, distance_rows, plane_index, slot_maps

BLOCK_Q = 16  # query rows per program; each program holds its logit tiles of [block, key block] float32
BLOCK_Q_TPU = 128  # Mosaic tiles: a block's last dim is a multiple of 128 (or the whole padded N)
# Keys per tile: the widest tile measured (256 frames, H200, docs/benchmarks.md); longer videos loop over key blocks
KEY_BLOCK = 256
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


def plane_kernel(*refs, num_planes, num_logits, num_maps, head_dim, has_plain, has_bias, has_mask, key_block,
                 distance_sel):
    """One (sequence, head, query block): the cover's plane logits, per-map (or per-slot) selection, the average
    of the maps' softmaxes, P @ V.

    ``num_logits`` logit maps are formed: the maps themselves (``num_maps`` = 0: one softmax each), or the slots
    (then ``sel_ref`` says which slot each of the ``num_maps`` maps takes, the average is the slot average, and
    ``fits_ref`` gets, per query row, whether its sums cleared the floor). ``sel_ref`` is dense ``[M, N, N]``, or
    with ``distance_sel`` one row per map over the frame distance ``[M, 2F - 1]`` (``maps.distance_rows``: M rows
    instead of M N x N tables, read from cache at any length).

    Keys are taken ``key_block`` at a time, so no tile is wider. With one block the logits are formed once, in the
    jnp path's order of operations, so both round alike; with more, a first pass over the blocks gathers each
    row's maxima and softmax sums (rescaled to the running maximum) and a second forms the logits again and
    accumulates the averaged probabilities times V."""
    qr_ref, kr_ref, v_ref, idx_ref, *optional = refs
    optional = iter(optional)
    sel_ref = next(optional) if num_maps else None
    qp_ref, kp_ref = (next(optional), next(optional)) if has_plain else (None, None)
    bias_ref = next(optional) if has_bias else None
    mask_ref = next(optional) if has_mask else None
    out_ref = next(optional)
    fits_ref = next(optional) if num_maps else None
    block, num_blocks = qr_ref.shape[1], kr_ref.shape[1] // key_block
    dot_t = lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    scale = math.sqrt(head_dim)

    def key_slice(b):
        return slice(None) if num_blocks == 1 else pl.ds(b * key_block, key_block)

    def logit_tiles(b) -> list:  # [block, key_block] per logit map, masked
        keys = key_slice(b)
        logits = [None] * num_logits
        for p in range(num_planes):  # q and k rotated for plane p: its logits for these keys
            s_p = dot_t(qr_ref[p].astype(jnp.float32), kr_ref[p, keys, :].astype(jnp.float32))
            for m in range(num_logits):
                logits[m] = jnp.where(idx_ref[m, :, keys] == p, s_p, 0.0 if logits[m] is None else logits[m])
        plain = dot_t(qp_ref[...].astype(jnp.float32), kp_ref[keys, :].astype(jnp.float32)) if has_plain else None
        visible = mask_ref[:, keys] != 0 if has_mask else None
        for m in range(num_logits):
            x = logits[m] if plain is None else logits[m] + plain
            x = x / scale if bias_ref is None else x / scale + bias_ref[m, :, keys]
            logits[m] = x if visible is None else jnp.where(visible, x, -jnp.inf)
        return logits

    if distance_sel:  # each tile entry's frame distance, as a row index (padding clipped into the table)
        tokens, frames = distance_sel
        tile = lambda axis: jax.lax.broadcasted_iota(jnp.int32, (block, key_block), axis)
        query_frame, key_index = (pl.program_id(2) * block + tile(0)) // tokens, tile(1)

    def slot_of(m, b):  # which slot map m takes on this tile
        if not distance_sel:
            return sel_ref[m, :, key_slice(b)]
        d = (b * key_block + key_index) // tokens - query_frame + frames - 1
        return sel_ref[m, jnp.clip(d, 0, 2 * frames - 2)]

    floor = math.exp(-SLOT_GAP_LIMIT)

    def times_v(b, logits, tops, sums):
        """The averaged probabilities of key block ``b`` times its values, and per map whether its sum cleared the
        floor; ``sums`` None: this block holds every key, and each sum is taken here (as on the jnp path)."""
        probs, cleared = 0.0, []
        if num_maps:  # slot average: one exp per slot against the rows' common maximum
            exps = [jnp.exp(x - tops[:, None]) for x in logits]
            for m in range(num_maps):
                x = pick(slot_of(m, b), exps)
                total = jnp.sum(x, axis=-1) if sums is None else sums[m]  # map m's softmax sum
                ok = total >= floor
                cleared.append(ok)
                probs = probs + x * (1.0 / (num_maps * jnp.where(ok, total, 1.0)))[:, None]
        else:
            for m, x in enumerate(logits):
                e = jnp.exp(x - tops[m][:, None])
                probs = probs + e / (jnp.sum(e, axis=-1, keepdims=True) if sums is None else sums[m][:, None]) \
                    / num_logits
        v = v_ref[key_slice(b), :]
        return jax.lax.dot_general(probs.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32), cleared

    def gather(b, stats):
        """Pass 1 over the key blocks: per row the running maximum and the softmax sums against it (slots: one
        maximum, a sum per map), rescaled as the maximum grows."""
        logits, (tops, sums) = logit_tiles(b), stats
        if num_maps:
            top = functools.reduce(jnp.maximum, [jnp.max(x, axis=-1) for x in logits], tops)
            safe = jnp.where(top == -jnp.inf, 0.0, top)  # rows that see no key yet
            exps = [jnp.exp(x - safe[:, None]) for x in logits]
            rescale = jnp.exp(tops - safe)
            return top, tuple(s * rescale + jnp.sum(pick(slot_of(m, b), exps), axis=-1) for m, s in enumerate(sums))
        top = tuple(jnp.maximum(t, jnp.max(x, axis=-1)) for t, x in zip(tops, logits))
        safe = [jnp.where(t == -jnp.inf, 0.0, t) for t in top]
        return top, tuple(s * jnp.exp(t0 - t) + jnp.sum(jnp.exp(x - t[:, None]), axis=-1)
                          for s, t0, t, x in zip(sums, tops, safe, logits))

    if num_blocks == 1:  # the logits once
        logits = logit_tiles(0)
        row_max = [jnp.max(x, axis=-1) for x in logits]
        tops = functools.reduce(jnp.maximum, row_max) if num_maps else row_max
        out, cleared = times_v(0, logits, tops, None)
    else:  # pass 1 for the maxima and sums, pass 2 for P @ V
        rows = lambda value, count: tuple(jnp.full((block,), value, jnp.float32) for _ in range(count))
        init = (jnp.full((block,), -jnp.inf, jnp.float32), rows(0.0, num_maps)) if num_maps else \
            (rows(-jnp.inf, num_logits), rows(0.0, num_logits))
        tops, sums = jax.lax.fori_loop(0, num_blocks, gather, init)
        out = jax.lax.fori_loop(0, num_blocks, lambda b, acc: acc + times_v(b, logit_tiles(b), tops, sums)[0],
                                jnp.zeros(out_ref.shape, jnp.float32))
        cleared = [s >= floor for s in sums] if num_maps else []
    if num_maps:  # rows that see no key are NaN either way; else the slot average holds if every sum cleared
        fits_ref[...] = ((tops == -jnp.inf) | functools.reduce(jnp.logical_and, cleared)).astype(jnp.int32)[None, :]
    out_ref[...] = out.astype(out_ref.dtype)


def compiler_params(target: str):
    """Triton parameters on GPUs, Mosaic's on TPUs (interpret mode on a CPU takes either)."""
    if target == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams()
    from jax.experimental.pallas import triton as pl_triton

    return pl_triton.CompilerParams(num_warps=NUM_WARPS, num_stages=1)


def pallas_forward(q, k, v, t5_table, mask, maps, info: MapInfo, encoding: Encoding, interpret: bool, average: str,
                   target: str = "gpu", key_block: int = KEY_BLOCK):
    """The plane kernel over every (sequence, head, query block); [..., N, H, D] -> [..., N, H, Dv].

    With ``average="slots"`` the kernel forms the slot logits and takes the slot average; if a row's sums fall
    under the floor it says so, and the call reruns with one softmax per map (a run-time branch, as on the jnp
    path). On GPUs each map's slot choice goes in as one row over the frame distance (the maps depend on it
    alone), gathered in the kernel; Mosaic has no such gather, so TPUs take the dense ``[M, N, N]`` table."""
    lead, (n, h, d), dv, r = q.shape[:-3], q.shape[-3:], v.shape[-1], encoding.rope_dim
    count = math.prod(lead)
    n_pad, r_pad, dv_pad = pow2(n), pow2(r), pow2(dv)
    block = min(BLOCK_Q_TPU if target == "tpu" else BLOCK_Q, n_pad)
    key_block = min(key_block, n_pad)
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
    distance_sel = None
    if slot_average and target == "gpu":
        t = info.tokens_per_frame
        distance_sel = (t, n // t)
        sel = slot_maps(distance_rows(maps, t)[:, None, :], info.num_slots)[1][:, 0, :]  # [M, 2F - 1]
        sel = jnp.pad(sel, ((0, pow2(len(sel), 1) - len(sel)), (0, pow2(sel.shape[1]) - sel.shape[1])))
        operands.append(sel)
        specs.append(pl.BlockSpec(sel.shape, lambda s, hh, i: (0, 0)))
    elif slot_average:
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
                               has_bias=has_bias, has_mask=has_mask, key_block=key_block, distance_sel=distance_sel)
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
    per_map = lambda: pallas_forward(q, k, v, t5_table, mask, maps, info, encoding, interpret, "per_map", target,
                                     key_block)
    return jax.lax.cond(jnp.all(fits[0][:, :, 0, :n] != 0), lambda: out, per_map)
