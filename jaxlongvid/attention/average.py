"""LongDiff's average of the softmaxes over M position maps, and the masked softmax it is built from.

The average over M maps costs V exps per logit instead of M, V being the number of distinct values the maps
take at one (i, j) (``MapInfo.num_slots``; GROUP+SHIFT: 2, against its 9 maps at 128 frames, 17 at 256). Every
position term depends only on the mapped value, so the logits are computed for V "slot" maps, exponentiated
once against a common row maximum, and each map's softmax sum is a 0/1-weighted sum of those exps; the average
is the exps weighted by the mean of each map's inverse sum (:func:`slot_average`). A map whose row maximum lies
far below the common one could lose its sum to float32 underflow: that is checked at run time
(``SLOT_GAP_LIMIT``), and such input takes one softmax per map instead (:func:`per_map_average`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxlongvid.attention.encoding import Encoding, logits as map_logits, rel_rows
from jaxlongvid.attention.maps import MapInfo, slot_maps

# The slot average is kept only if every map's softmax sum, taken against the common row maximum, is at least
# exp(-SLOT_GAP_LIMIT) (see slot_average): a bound on the float32 rounding it adds, far from underflow.
SLOT_GAP_LIMIT = 20.0

# Sums over keys batched over query rows: at the highest precision, or a GPU may round them to TF32.
row_einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)


def mask_logits(logits: jnp.ndarray, mask) -> jnp.ndarray:
    """-inf where ``mask`` ([..., N, N] over the leading dims, broadcast over heads) is False."""
    return logits if mask is None else jnp.where(mask[..., None, :, :], logits, -jnp.inf)


def rel_onehot(pmap: jnp.ndarray, encoding: Encoding, rows: int) -> jnp.ndarray:
    """Each entry's relative-table row, one-hot: [N, N, rows] float32."""
    return jax.nn.one_hot(rel_rows(pmap, encoding.rel_distance), rows, dtype=jnp.float32)


def pick(which, options: list) -> jnp.ndarray:
    """``options[which]`` entry by entry (``which``: integer array of the options' shape, or broadcastable)."""
    out = options[0]
    for v in range(1, len(options)):
        out = jnp.where(which == v, options[v], out)
    return out


def per_map_probabilities(logits: list, maps, mask, encoding: Encoding, with_rel_rows: int = 0):
    """One masked softmax per map, averaged: ``(probs [..., H, N, N], rel_mass [..., H, N, rows] or None)``."""
    probs, rel_mass = 0.0, 0.0 if with_rel_rows else None
    for pmap, x in zip(maps, logits):
        p = jax.nn.softmax(mask_logits(x, mask), axis=-1) / len(logits)
        probs = probs + p
        if with_rel_rows:
            rel_mass = rel_mass + row_einsum("...hij,ijr->...hir", p, rel_onehot(pmap, encoding, with_rel_rows))
    return probs, rel_mass


def slot_average(logits: list, slots, sel, encoding: Encoding, with_rel_rows: int = 0):
    """The average of the M maps' softmaxes from the V masked slot logits, with V exps per entry instead of M;
    returns ``(probs, rel_mass, fits)``.

    Map m's logits are ``L_sel[m]``. With a common row stabiliser c (the maximum over keys and slots), ``E_v =
    exp(L_v - c)``, map m's softmax sum is ``Z_m = sum_j E_sel[m, i, j]`` and the average is ``sum_v E_v W_v``
    with ``W_v = (1/M) sum_m [sel[m] = v] / Z_m``: per map only 0/1-weighted sums, no exp.

    The guarantee: ``fits`` is False if a row that sees a key has ``Z_m < exp(-SLOT_GAP_LIMIT)`` in some map (the
    caller then takes one softmax per map). As ``exp(-gap) <= Z_m <= N exp(-gap)``, gap being c minus the map's
    own row maximum, it is True only if every gap <= SLOT_GAP_LIMIT + ln N (25.5 at 256 frames): each map's
    largest terms stay normal float32 (>= e^-25.5), the terms that underflow carry < N e^(gap - 87.3) < e^-56 of
    its mass, and the rounding of ``L - c`` adds at most gap * 2^-24 (1.5e-6) relative error to its largest
    terms."""
    top = functools.reduce(jnp.maximum, [jnp.max(x, axis=-1, keepdims=True) for x in logits])
    top = jax.lax.stop_gradient(top)  # the average does not depend on it
    exps = [jnp.exp(x - top) for x in logits]
    chosen = [(sel == v).astype(jnp.float32) for v in range(len(logits))]  # [M, N, N] 0/1
    sums = sum(row_einsum("...ij,mij->...im", e, c) for e, c in zip(exps, chosen))  # Z_m(i): [..., H, N, M]
    floor = math.exp(-SLOT_GAP_LIMIT)
    # rows under the floor are never used, but a gradient passes through them (as zeros): keep them finite
    inverse = 1.0 / jnp.where(sums >= floor, sums, 1.0)
    weighted = [e * row_einsum("...im,mij->...ij", inverse, c) / len(sel) for e, c in zip(exps, chosen)]
    rel_mass = None
    if with_rel_rows:  # each slot's probability mass on its relative-table rows
        rel_mass = sum(row_einsum("...hij,ijr->...hir", w, rel_onehot(s, encoding, with_rel_rows))
                       for w, s in zip(weighted, slots))
    fits = jnp.all((sums >= floor) | jnp.isneginf(top))  # rows that see no key: NaN either way
    return sum(weighted), rel_mass, fits


def per_map_average(logits: list, slots, sel, encoding: Encoding, with_rel_rows: int = 0):
    """One softmax per map, each selected from the masked slot logits, averaged: the exact fallback of
    :func:`slot_average` (same returns but ``fits``). A loop over the maps, so one map's probabilities are
    live at a time."""
    onehots = [rel_onehot(s, encoding, with_rel_rows) for s in slots] if with_rel_rows else []

    def one_map(m, total):
        probs, rel_mass = total
        p = jax.nn.softmax(pick(sel[m], logits), axis=-1) / len(sel)
        if with_rel_rows:
            rel_mass = rel_mass + sum(row_einsum("...hij,ijr->...hir", jnp.where(sel[m] == v, p, 0.0), onehot)
                                      for v, onehot in enumerate(onehots))
        return probs + p, rel_mass

    zeros = jnp.zeros_like(logits[0])
    rel_zeros = jnp.zeros(zeros.shape[:-1] + (with_rel_rows,), zeros.dtype) if with_rel_rows else None
    return jax.lax.fori_loop(0, len(sel), one_map, (zeros, rel_zeros))


def probabilities(q, k, maps, info: MapInfo, mask, encoding: Encoding, t5_table, rel_k, rope: str, average: str,
                  with_rel_rows: int = 0):
    """Softmax probabilities averaged over the maps ([..., H, N, N] float32), and (when ``with_rel_rows``) the
    averaged probability mass on each relative-table row ([..., H, N, rows], else None).

    ``average``: "per_map" takes one softmax per map; "slots" computes the logits of the V slot maps and takes
    their slot average, or, where that does not fit float32, one softmax per map from the same logits (a
    run-time branch: one under jit and ``lax.map``, a select of both under ``vmap``)."""
    if average == "per_map":
        return per_map_probabilities(map_logits(q, k, maps, info, encoding, t5_table, rel_k, rope), maps, mask,
                                     encoding, with_rel_rows)
    slots, sel = slot_maps(maps, info.num_slots)
    # -inf before exp, not a where after it: no inf * 0 in the gradient
    logits = [mask_logits(x, mask) for x in map_logits(q, k, slots, info, encoding, t5_table, rel_k, rope)]
    probs, rel_mass, fits = slot_average(logits, slots, sel, encoding, with_rel_rows)
    # rematerialised: under grad its residuals are the logits, not M probability matrices
    per_map = jax.checkpoint(lambda x: per_map_average(x, slots, sel, encoding, with_rel_rows))
    return jax.lax.cond(fits, lambda _: (probs, rel_mass), per_map, logits)
