"""The temporal-attention core shared by every model family and every long-video method.

``temporal_attention(q, k, v, encoding=..., method=...)`` works on ``[..., N, heads, dim]``: attention over the N
frames, independently for every leading index (video x pixel). What differs between methods is only:

* the relative-position map ``P[m, i, j]`` (one or several, see :mod:`jaxlongvid.positions`), which every
  position encoding reads instead of ``j - i``;
* the mask (static, or built from IFS keyframes at run time);
* the merge: average of the softmax probabilities over the M maps (LongDiff), FreeNoise window fusion, or
  FreeLong's spectral blend of a global and a local branch.

The average over M maps costs V exps per logit instead of M, V being the number of distinct values the maps
take at one (i, j) (:func:`map_slots`; GROUP+SHIFT: 2, against its 9 maps at 128 frames, 17 at 256). Every
position term depends only on the mapped value, so the logits are computed for V "slot" maps, exponentiated
once against a common row maximum, and each map's softmax sum is a 0/1-weighted sum of those exps (a product
with a static matrix per query row); the average is the exps weighted by the mean of each map's inverse sum. A
map whose row maximum lies far below the common one could lose its sum to float32 underflow: that is checked at
run time (``SLOT_GAP_LIMIT``), and such input takes one softmax per map instead (:func:`_slot_average`).

Position encodings, each exact for any map:

* RoPE on the first ``rope_dim`` dims of each head, interleaved pairs (LaVie). When a map is a multiple of
  ``j - i`` it is applied as the usual rotation of absolute positions. Any other map ``P`` takes one of two
  exact formulations (``rope_path`` picks, ``mapped_rope=`` forces one):

  - per value, for integer maps: with U the distinct values of all the call's maps, ``q . R(theta u) k =
    R(-theta u) q . k``, so q is rotated once per value and one batched matrix product gives the U logit
    planes; each map then gathers its logits from them with a static index. Its intermediate is U logit
    matrices, shared by all maps (LongDiff at 128 frames: 31 values for 9 maps).
  - per frequency, for any map (fractional too): ``q . R(theta P) k = sum_k A_k cos(theta_k P) + B_k
    sin(theta_k P)`` with ``A_k = qa ka + qb kb`` and ``B_k = qb ka - qa kb`` for the pair ``(a, b)`` of
    frequency k. Its intermediate is ``rope_dim`` logit matrices per map.
  - planes, for integer maps that are piecewise differences of per-frame positions: a plane rotates q_i by
    ``floor(i / s)`` and k_j by ``floor(j / s) + c`` (or only k, by a constant c), so it holds the logits of
    relative position ``floor(j / s) - floor(i / s) + c`` -- one ordinary rotated matrix product. A greedy
    cover (:func:`plane_cover`) assigns every map entry a plane of exactly its value; each map then selects its
    logits from the planes with static masks. GROUP+SHIFT's 9 maps at 128 frames need 3 planes (the group of
    ``j - i`` is ``floor(j / s) - floor(i / s)`` plus 0 or 1), clip 3, VRPR 11, against 31 values.

  Either way the batch of sequences is processed in chunks (``jax.lax.map`` with a batch size) that keep the
  intermediate under ``chunk_bytes``.
* T5 bucketed bias (LaVie): ``table[bucket(P)]`` per head, fractional maps rounded.
* Relative key/value tables (VideoCrafter1): row ``clamp(round(P), -R, R) + R``; the value term is the
  probability mass on each row times the table.

Softmax and the probability average run in float32 whatever the compute dtype. Masked keys get exactly zero
probability. ``implementation="cudnn"`` routes maps that need no mapped RoPE through
``jax.nn.dot_product_attention`` (one fused call per map, outputs averaged, which equals averaging
probabilities because the output is linear in them); ``implementation="pallas"`` routes integer maps that do
need it (no relative K/V tables) through a Pallas kernel (Triton on GPUs, interpreted on a CPU) that computes
the plane-cover logits of a block of queries on chip (q and k pre-rotated per plane), selects each map's (or
each slot's, with the slot average and its fallback as on the jnp path), and averages the M softmaxes before one
``P @ V``, never writing logits to memory (forward pass only: its gradient is the jnp plane path's); anything
else takes the jnp path.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxlongvid import masks
from jaxlongvid.methods import Method, MethodPlan, get_method
from jaxlongvid.positions import t5_bucket
from jaxlongvid.spectral import freelong_blend


@dataclass(frozen=True)
class Encoding:
    """How a model's temporal attention encodes frame positions (static)."""

    rope_dim: int = 0  # rotary dims at the start of each head (0: no RoPE); LaVie: 32
    rope_theta: float = 10000.0
    t5_buckets: int = 0  # T5 relative-bias buckets (0: none); LaVie: 32
    t5_max_distance: int = 32
    rel_distance: int = 0  # R of relative K/V tables with 2R+1 rows (0: none); VideoCrafter1: 16
    native_frames: int = 16  # N0: the clip length the model was trained on

    def __post_init__(self):
        if self.rope_dim < 0 or self.rope_dim % 2:
            raise ValueError(f"Encoding.rope_dim must be an even number >= 0, got {self.rope_dim}")
        if self.t5_buckets < 0 or self.t5_buckets % 4:
            raise ValueError(f"Encoding.t5_buckets must be a multiple of 4 >= 0, got {self.t5_buckets}")
        if self.rel_distance < 0:
            raise ValueError(f"Encoding.rel_distance must be >= 0, got {self.rel_distance}")
        if self.native_frames < 2:
            raise ValueError(f"Encoding.native_frames must be >= 2, got {self.native_frames}")

    def rope_freqs(self) -> np.ndarray:
        """``theta ** (-2k / rope_dim)``, k = 0 .. rope_dim/2 - 1 (float64, static)."""
        return self.rope_theta ** (-np.arange(0, self.rope_dim, 2, dtype=np.float64) / self.rope_dim)


# ---- position encodings -----------------------------------------------------------------------------------
def _linear_coefficient(pmap: np.ndarray) -> Optional[float]:
    """c if ``pmap == c * (j - i)`` (to float32 rounding of the map), else None (then RoPE cannot be an
    absolute rotation)."""
    n = pmap.shape[-1]
    if n == 1:
        return 1.0
    c = float(pmap[0, 1])
    d = (np.arange(n)[None, :] - np.arange(n)[:, None]).astype(np.float64)
    if np.issubdtype(pmap.dtype, np.integer):
        return c if np.array_equal(pmap, c * d) else None
    return c if np.allclose(pmap, c * d, rtol=1e-6, atol=1e-6 * max(1.0, abs(c) * n)) else None


def _rotate_pairs(x: jnp.ndarray, angles: np.ndarray) -> jnp.ndarray:
    """Rotate interleaved pairs of ``x [..., 2K]`` by static ``angles`` (float64, broadcastable to [..., K])."""
    cos, sin = jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)
    x = x.astype(jnp.float32)
    a, b = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1)
    return out.reshape(out.shape[:-2] + (-1,))


def rotate(x: jnp.ndarray, pos: np.ndarray, freqs: np.ndarray) -> jnp.ndarray:
    """Rotate interleaved pairs of ``x`` [..., N, H, 2K] by angle ``pos[n] * freqs[k]``."""
    angles = np.asarray(pos, np.float64)[:, None] * freqs[None, :]  # [N, K]
    return _rotate_pairs(x, angles[:, None, :])


def _is_integer_map(maps: np.ndarray) -> bool:
    maps = np.asarray(maps)
    return np.issubdtype(maps.dtype, np.integer) or bool(np.all(maps == np.rint(maps)))


def _distinct_values(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sorted distinct values of integer ``maps`` [M, N, N] and each entry's index among them (int32 [M, N, N])."""
    maps = np.asarray(maps)
    values, index = np.unique(maps, return_inverse=True)
    return values, index.reshape(maps.shape).astype(np.int32)


MAPPED_ROPE = ("auto", "planes", "per_value", "per_frequency")
# Chunk bounds of the mapped-RoPE intermediate. On a CPU a chunk that stays in the last-level cache runs 2-4x
# faster than one of 1 GiB (measured, docs/benchmarks.md); an accelerator wants large batches.
ACCELERATOR_CHUNK_BYTES = 1 << 30
CPU_CHUNK_BYTES = 16 << 20


def rope_path(maps: np.ndarray, encoding: Encoding, choice: str = "auto") -> str:
    """How RoPE is applied under ``maps`` [M, N, N]: "none" (no RoPE), "absolute" (every map is a multiple of
    ``j - i``: rotate absolute positions), else "planes", "per_value" or "per_frequency" (module doc).

    ``choice="auto"`` picks by the size of the intermediate, counted in logit-sized planes per sequence and
    head: the plane cover writes L planes, per-value one per distinct value (U), per-frequency ``rope_dim``
    per map (A_k, B_k for K = rope_dim/2 frequencies) for each of its M maps. For integer maps: planes when
    L < U, else per value when ``U <= M * rope_dim`` (its planes come from one matrix product instead of
    elementwise passes, so a tie goes to it). Fractional maps always take per-frequency."""
    if choice not in MAPPED_ROPE:
        raise ValueError(f"mapped_rope must be one of {MAPPED_ROPE}, got {choice!r}")
    if not encoding.rope_dim:
        return "none"
    if all(_linear_coefficient(p) is not None for p in maps):
        return "absolute"
    integer = _is_integer_map(maps)
    if choice in ("planes", "per_value") and not integer:
        raise ValueError(f"mapped_rope={choice!r} needs integer position maps (these have fractional values)")
    if choice != "auto":
        return choice
    if not integer:
        return "per_frequency"
    values = len(np.unique(maps))
    if len(plane_cover(maps)[0]) < values:
        return "planes"
    return "per_value" if values <= len(maps) * encoding.rope_dim else "per_frequency"


def _run_lengths(line: np.ndarray) -> np.ndarray:
    """Lengths of the runs of equal consecutive entries of a 1-D array."""
    edges = np.concatenate([[0], np.flatnonzero(np.diff(line)) + 1, [len(line)]])
    return np.diff(edges)


def _group_sizes(maps: np.ndarray, most: int = 6) -> list[int]:
    """Candidate group sizes s of the plane cover: 1 and the ``most`` commonest run lengths (weighted by length)
    of equal values along each map's first row and first column (a map's profile over distances)."""
    weight: dict[int, int] = {}
    for pmap in maps:
        for line in (pmap[0], pmap[:, 0]):
            for length in _run_lengths(line).tolist():
                weight[length] = weight.get(length, 0) + length
    return sorted({1, *sorted(weight, key=lambda s: -weight[s])[:most]})


def _cached_per_array(fn):
    """``fn(maps)`` cached on the array's contents: static maps come back at every trace."""
    @functools.lru_cache(maxsize=64)
    def cached(data: bytes, dtype: str, shape: tuple):
        return fn(np.frombuffer(data, np.dtype(dtype)).reshape(shape))

    @functools.wraps(fn)
    def wrapper(maps):
        maps = np.asarray(maps)
        return cached(maps.tobytes(), maps.dtype.str, maps.shape)

    return wrapper


@_cached_per_array
def plane_cover(maps: np.ndarray) -> tuple[tuple[tuple[int, int], ...], np.ndarray]:
    """Planes that hold every entry of the integer maps ``[M, N, N]``, and each entry's plane (int32 [M, N, N]).

    Plane ``(s, c)`` with s >= 1 has relative position ``floor(j / s) - floor(i / s) + c`` at (i, j); plane
    ``(0, c)`` has the constant c. An entry may use a plane only where that plane's position equals it, so the
    cover is exact by construction. Greedy: each step takes the candidate plane that holds the most entries
    not yet covered (candidates: the group sizes of :func:`_group_sizes`, every offset c, and the constants,
    which alone always cover, so the loop ends); if that takes more planes than the maps have values, one
    constant plane per value. Cached per map array."""
    maps = maps.astype(np.int64)
    shape = maps.shape
    frames = np.arange(shape[-1])
    offsets = {s: maps - (frames[None, :] // s - frames[:, None] // s) for s in _group_sizes(maps)}
    offsets[0] = maps
    index = np.full(shape, -1, np.int32)
    uncovered = np.ones(shape, bool)
    planes = []
    while uncovered.any():
        best = (-1, 0, 0)  # (entries covered, s, c)
        for s, offset in offsets.items():
            left = offset[uncovered]
            counts = np.bincount(left - left.min())
            if counts.max() > best[0]:
                best = (int(counts.max()), s, int(counts.argmax() + left.min()))
        _, s, c = best
        hit = uncovered & (offsets[s] == c)
        index[hit] = len(planes)
        planes.append((s, c))
        uncovered &= ~hit
    values, by_value = _distinct_values(maps)
    if len(planes) > len(values):  # greedy is not optimal: never worse than one constant plane per value
        planes, index = [(0, int(u)) for u in values], by_value
    index.setflags(write=False)
    return tuple(planes), index


def _per_value_rope_logits(q: jnp.ndarray, k: jnp.ndarray, maps: np.ndarray, freqs: np.ndarray) -> list:
    """``q_i . R(theta P_ij) k_j`` for integer maps ``[M, N, N]``: [..., N, H, 2K] x2 -> M arrays
    [..., H, N, N] (float32).

    ``q . R(theta u) k = R(-theta u) q . k``: q is rotated once per distinct value u, one batched matrix
    product gives every value's logits ``S[..., h, i, u, j]``, and map m reads ``S[..., h, i, index(P_mij),
    j]`` (a gather with a static index)."""
    values, index = _distinct_values(maps)
    n = q.shape[-3]
    angles = -values.astype(np.float64)[:, None] * freqs[None, :]  # [U, K]
    q_values = _rotate_pairs(q[..., None, :], angles)  # [..., N, H, U, 2K]
    s = jnp.einsum("...ihur,...jhr->...hiuj", q_values, k.astype(jnp.float32),
                   preferred_element_type=jnp.float32)
    s = s.reshape(s.shape[:-2] + (-1,))  # [..., H, N, U * N]
    flat = index * n + np.arange(n, dtype=np.int32)  # [M, N, N]
    lead = (1,) * (s.ndim - 2)
    return [jnp.take_along_axis(s, jnp.asarray(f.reshape(lead + f.shape)), axis=-1, mode="promise_in_bounds")
            for f in flat]


def _plane_positions(s: int, c: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The positions plane ``(s, c)`` rotates q and k by: ``floor(i / s)`` and ``floor(j / s) + c`` (s = 0: 0
    and c), so that its logits hold relative position ``k position - q position``."""
    grid = np.arange(n) // s if s else np.zeros(n, np.int64)
    return grid, grid + c


def _plane_rope_logits(q: jnp.ndarray, k: jnp.ndarray, maps: np.ndarray, freqs: np.ndarray) -> list:
    """``q_i . R(theta P_ij) k_j`` for integer maps ``[M, N, N]`` from the planes of :func:`plane_cover`:
    [..., N, H, 2K] x2 -> M arrays [..., H, N, N] (float32). Plane (s, c) is the product of q rotated by
    floor(i / s) and k rotated by floor(j / s) + c; each map takes, entry by entry, its plane's logits."""
    planes, index = plane_cover(maps)
    logits = []
    for s, c in planes:
        q_pos, k_pos = _plane_positions(s, c, q.shape[-3])
        logits.append(_dot(rotate(q, q_pos, freqs), rotate(k, k_pos, freqs)))
    out = []
    for which in index:
        used = np.unique(which)
        selected = logits[used[0]]
        for p in used[1:]:
            selected = jnp.where(which == p, logits[p], selected)
        out.append(selected)
    return out


def _mapped_rope_logits(q: jnp.ndarray, k: jnp.ndarray, pmap: np.ndarray, freqs: np.ndarray) -> jnp.ndarray:
    """``q_i . R(theta P_ij) k_j`` for an arbitrary map: [..., N, H, 2K] x2 -> [..., H, N, N] (float32)."""
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    qa, qb, ka, kb = q[..., 0::2], q[..., 1::2], k[..., 0::2], k[..., 1::2]
    pair = lambda x, y: jnp.einsum("...ihk,...jhk->...hijk", x, y)
    a = pair(qa, ka) + pair(qb, kb)
    b = pair(qb, ka) - pair(qa, kb)
    ang = np.asarray(pmap, np.float64)[..., None] * freqs  # [N, N, K]
    cos, sin = jnp.asarray(np.cos(ang), jnp.float32), jnp.asarray(np.sin(ang), jnp.float32)
    return jnp.sum(a * cos + b * sin, axis=-1)


def _dot(x, y) -> jnp.ndarray:
    """``x_i . y_j`` per head: [..., N, H, D] x2 -> [..., H, N, N] float32."""
    return jnp.einsum("...ihd,...jhd->...hij", x, y, preferred_element_type=jnp.float32)


def _rope_logits(q, k, maps, freqs, path: str) -> list:
    """The RoPE part's logits of every map (q, k: the rotary dims only), by ``path``."""
    if path == "per_value":
        return _per_value_rope_logits(q, k, maps, freqs)
    if path == "planes":
        return _plane_rope_logits(q, k, maps, freqs)
    out = []
    for pmap in maps:
        c = _linear_coefficient(pmap)
        if c is None:
            out.append(_mapped_rope_logits(q, k, pmap, freqs))
        else:
            pos = c * np.arange(q.shape[-3])
            out.append(_dot(rotate(q, pos, freqs), rotate(k, pos, freqs)))
    return out


def _content_logits(q, k, maps, encoding: Encoding, rel_k, mapped_rope: str = "auto") -> list:
    """Unscaled ``q . k`` with RoPE and relative-key terms under each map of ``maps``: M arrays [..., H, N, N]
    float32. The dims without RoPE are multiplied once for all maps."""
    r = encoding.rope_dim
    if r > q.shape[-1]:
        raise ValueError(f"Encoding.rope_dim ({r}) exceeds the head dim ({q.shape[-1]})")
    plain = _dot(q[..., r:], k[..., r:]) if r < q.shape[-1] else None
    path = rope_path(maps, encoding, mapped_rope)
    rope = _rope_logits(q[..., :r], k[..., :r], maps, encoding.rope_freqs(), path) if r else [None] * len(maps)
    out = []
    for pmap, logits in zip(maps, rope):
        logits = plain if logits is None else logits if plain is None else logits + plain
        if rel_k is not None:
            logits = logits + _rel_key_logits(q, rel_k, pmap, encoding.rel_distance)
        out.append(logits)
    return out


def _rel_key_logits(q, rel_k, pmap: np.ndarray, max_distance: int) -> jnp.ndarray:
    """``q_i . K[row(P_ij)]`` as [..., H, N, N] float32 (unscaled)."""
    rows = _rel_rows(pmap, max_distance)  # [N, N]
    qk_table = jnp.einsum("...ihd,rd->...hir", q, rel_k, preferred_element_type=jnp.float32)
    idx = jnp.broadcast_to(jnp.asarray(rows), qk_table.shape[:-1] + (rows.shape[-1],))
    return jnp.take_along_axis(qk_table, idx, axis=-1)


def _logits(q, k, maps, encoding: Encoding, t5_table, rel_k, mapped_rope: str = "auto") -> list:
    """Each map's attention logits: scaled content terms plus the T5 bias, M arrays [..., H, N, N]."""
    contents = _content_logits(q, k, maps, encoding, rel_k, mapped_rope)
    scale = math.sqrt(q.shape[-1])
    return [c / scale if t5_table is None else c / scale + _t5_bias(pmap, encoding, t5_table)
            for pmap, c in zip(maps, contents)]


def _rel_rows(pmap: np.ndarray, max_distance: int) -> np.ndarray:
    return (np.clip(np.rint(pmap), -max_distance, max_distance) + max_distance).astype(np.int32)


def _t5_bias(pmap: np.ndarray, encoding: Encoding, table) -> jnp.ndarray:
    """``table[bucket(P)]`` as [H, N, N] float32."""
    buckets = t5_bucket(pmap, encoding.t5_buckets, encoding.t5_max_distance)
    return jnp.moveaxis(jnp.asarray(table, jnp.float32)[jnp.asarray(buckets)], -1, 0)


def _check_tables(encoding: Encoding, heads: int, dim: int, t5_table, rel_k, rel_v):
    def need(flag, value, name, shape):
        if flag and value is None:
            raise ValueError(f"encoding needs {name} of shape {shape}, got None")
        if not flag and value is not None:
            raise ValueError(f"{name} was given but the encoding does not use it")
        if flag and tuple(value.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")

    need(encoding.t5_buckets > 0, t5_table, "t5_table", (encoding.t5_buckets, heads))
    rows = 2 * encoding.rel_distance + 1
    need(encoding.rel_distance > 0, rel_k, "rel_k", (rows, dim))
    need(encoding.rel_distance > 0, rel_v, "rel_v", (rows, dim))


# ---- attention under M maps and a mask ---------------------------------------------------------------------
def _mask_logits(logits: jnp.ndarray, mask) -> jnp.ndarray:
    """-inf where ``mask`` ([..., N, N] over the leading dims, broadcast over heads) is False."""
    return logits if mask is None else jnp.where(mask[..., None, :, :], logits, -jnp.inf)


def _masked_softmax(logits: jnp.ndarray, mask) -> jnp.ndarray:
    return jax.nn.softmax(_mask_logits(logits, mask), axis=-1)


MAP_AVERAGES = ("auto", "slots", "per_map")
# The slot average is kept only if every map's softmax sum, taken against the common row maximum, is at least
# exp(-SLOT_GAP_LIMIT) (see _slot_average): a bound on the float32 rounding it adds, far from underflow.
SLOT_GAP_LIMIT = 20.0


@_cached_per_array
def map_slots(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of ``maps [M, N, N]`` at each ``(i, j)`` as V "slot" maps, and which slot each map takes.

    Returns ``slots [V, N, N]`` (V: the most distinct values at any entry; they are listed in order of first
    appearance over m, so slot 0 is map 0, and an entry with fewer values repeats its last) and ``sel`` int32
    ``[M, N, N]`` with ``maps[m, i, j] == slots[sel[m, i, j], i, j]``. GROUP+SHIFT's s maps take 2 values at
    every entry (``sign(d) ceil(|d| / s)`` and ``sign(d) floor(|d| / s)``). Cached per map array."""
    shape = maps.shape
    flat = maps.reshape(shape[0], -1)
    first = np.argmax(flat[:, None] == flat[None, :], axis=1)  # [M, NN]: the first map with the same value
    is_new = first == np.arange(shape[0])[:, None]
    slot_of_new = np.cumsum(is_new, axis=0) - 1  # a new value's slot: values seen before it at its entry
    sel = np.take_along_axis(slot_of_new, first, axis=0)
    width = int(slot_of_new.max()) + 1
    slots = np.empty((width, flat.shape[1]), flat.dtype)
    for v in range(width):  # the value first seen as slot v, else the entry's last slot
        taken = np.minimum(v, slot_of_new[-1])
        slots[v] = np.take_along_axis(flat, np.argmax(is_new & (slot_of_new == taken), axis=0)[None], axis=0)[0]
    slots, sel = slots.reshape((width,) + shape[1:]), sel.reshape(shape).astype(np.int32)
    slots.setflags(write=False)
    sel.setflags(write=False)
    return slots, sel


def _rel_onehot(pmap: np.ndarray, encoding: Encoding, rows: int) -> jnp.ndarray:
    """Each entry's relative-table row, one-hot: [N, N, rows] float32."""
    return jax.nn.one_hot(_rel_rows(pmap, encoding.rel_distance), rows, dtype=jnp.float32)


# Sums over keys batched over query rows: at the highest precision, or a GPU may round them to TF32.
_row_einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)


def _per_map_probabilities(q, k, maps, mask, encoding, t5_table, rel_k, with_rel_rows=0, mapped_rope="auto"):
    """One masked softmax per map from each map's own logits, averaged (see :func:`_probabilities`)."""
    probs, rel_mass = 0.0, 0.0 if with_rel_rows else None
    for pmap, logits in zip(maps, _logits(q, k, maps, encoding, t5_table, rel_k, mapped_rope)):
        p = _masked_softmax(logits, mask) / len(maps)
        probs = probs + p
        if with_rel_rows:
            rel_mass = rel_mass + _row_einsum("...hij,ijr->...hir", p, _rel_onehot(pmap, encoding, with_rel_rows))
    return probs, rel_mass


def _slot_average(logits, slots, sel, encoding, with_rel_rows=0):
    """The average of the M maps' softmaxes from the V masked slot logits (:func:`map_slots`), with V exps per
    entry instead of M; returns ``(probs, rel_mass, fits)``.

    Map m's logits are ``L_sel[m]``. With a common row stabiliser c (the maximum over keys and slots), ``E_v =
    exp(L_v - c)``, map m's softmax sum is ``Z_m = sum_j E_sel[m, i, j]`` and the average is ``sum_v E_v W_v``
    with ``W_v = (1/M) sum_m [sel[m] = v] / Z_m``: per map only 0/1-weighted sums (products with a static 0/1
    matrix per query row), no exp.

    The guarantee: ``fits`` is False if a row that sees a key has ``Z_m < exp(-SLOT_GAP_LIMIT)`` in some map (the
    caller then takes one softmax per map). As ``exp(-gap) <= Z_m <= N exp(-gap)``, gap being c minus the map's
    own row maximum, it is True only if every gap <= SLOT_GAP_LIMIT + ln N (25.5 at 256 frames): each map's
    largest terms stay normal float32 (>= e^-25.5), the terms that underflow carry < N e^(gap - 87.3) < e^-56 of
    its mass, and the
    rounding of ``L - c`` adds at most gap * 2^-24 (1.5e-6) relative error to its largest terms."""
    top = functools.reduce(jnp.maximum, [jnp.max(x, axis=-1, keepdims=True) for x in logits])
    top = jax.lax.stop_gradient(top)  # the average does not depend on it
    exps = [jnp.exp(x - top) for x in logits]
    chosen = [(sel == v).astype(np.float32) for v in range(len(slots))]  # [M, N, N] 0/1, static
    sums = sum(_row_einsum("...ij,mij->...im", e, c) for e, c in zip(exps, chosen))  # Z_m(i): [..., H, N, M]
    floor = math.exp(-SLOT_GAP_LIMIT)
    # rows under the floor are never used, but a gradient passes through them (as zeros): keep them finite
    inverse = 1.0 / jnp.where(sums >= floor, sums, 1.0)
    weighted = [e * _row_einsum("...im,mij->...ij", inverse, c) / len(sel) for e, c in zip(exps, chosen)]
    rel_mass = None
    if with_rel_rows:  # each slot's probability mass on its relative-table rows
        rel_mass = sum(_row_einsum("...hij,ijr->...hir", w, _rel_onehot(s, encoding, with_rel_rows))
                       for w, s in zip(weighted, slots))
    fits = jnp.all((sums >= floor) | jnp.isneginf(top))  # rows that see no key: NaN either way
    return sum(weighted), rel_mass, fits


def _pick(which, options: list) -> jnp.ndarray:
    """``options[which]`` entry by entry (``which``: integer array of the options' shape, or broadcastable)."""
    out = options[0]
    for v in range(1, len(options)):
        out = jnp.where(which == v, options[v], out)
    return out


def _per_map_average(logits, slots, sel, encoding, with_rel_rows=0):
    """One softmax per map, each selected from the masked slot logits, averaged: the exact fallback of
    :func:`_slot_average` (same returns but ``fits``). A loop over the maps, so one map's probabilities are
    live at a time."""
    which = jnp.asarray(sel)
    onehots = [_rel_onehot(s, encoding, with_rel_rows) for s in slots] if with_rel_rows else []

    def one_map(m, total):
        probs, rel_mass = total
        p = jax.nn.softmax(_pick(which[m], logits), axis=-1) / len(sel)
        if with_rel_rows:
            rel_mass = rel_mass + sum(_row_einsum("...hij,ijr->...hir", jnp.where(which[m] == v, p, 0.0), onehot)
                                      for v, onehot in enumerate(onehots))
        return probs + p, rel_mass

    zeros = jnp.zeros_like(logits[0])
    rel_zeros = jnp.zeros(zeros.shape[:-1] + (with_rel_rows,), zeros.dtype) if with_rel_rows else None
    return jax.lax.fori_loop(0, len(sel), one_map, (zeros, rel_zeros))


def _check_map_average(map_average: str):
    if map_average not in MAP_AVERAGES:
        raise ValueError(f"map_average must be one of {MAP_AVERAGES}, got {map_average!r}")


def map_average_path(maps: np.ndarray, choice: str = "auto") -> str:
    """How :func:`_probabilities` averages the softmaxes of ``maps`` [M, N, N]: "slots" or "per_map" (``choice``
    "auto": slots where the maps take fewer distinct values per entry than there are maps)."""
    _check_map_average(choice)
    if choice != "auto":
        return choice
    return "slots" if len(map_slots(maps)[0]) < len(maps) else "per_map"


def _probabilities(q, k, maps, mask, encoding, t5_table, rel_k, with_rel_rows=0, mapped_rope="auto",
                   map_average="auto"):
    """Softmax probabilities averaged over the maps ([..., H, N, N] float32), and (when ``with_rel_rows``) the
    averaged probability mass on each relative-table row ([..., H, N, rows], else None).

    ``map_average``: "per_map" takes one softmax per map; "slots" computes the logits of the V distinct values
    at each entry (:func:`map_slots`) and takes their slot average (:func:`_slot_average`, V exps per entry
    instead of M), or, where that does not fit float32, one softmax per map from the same logits (a run-time
    branch: one under jit and ``lax.map``, a select of both under ``vmap``); "auto": slots where V < M
    (GROUP+SHIFT: 2 against s)."""
    if map_average_path(maps, map_average) == "per_map":
        return _per_map_probabilities(q, k, maps, mask, encoding, t5_table, rel_k, with_rel_rows, mapped_rope)
    slots, sel = map_slots(maps)
    logits = _logits(q, k, slots, encoding, t5_table, rel_k, mapped_rope)
    # -inf before exp, not a where after it: no inf * 0 in the gradient
    logits = [_mask_logits(x, mask) for x in logits]
    probs, rel_mass, fits = _slot_average(logits, slots, sel, encoding, with_rel_rows)
    # rematerialised: under grad its residuals are the logits, not M probability matrices
    per_map = jax.checkpoint(lambda x: _per_map_average(x, slots, sel, encoding, with_rel_rows))
    return jax.lax.cond(fits, lambda _: (probs, rel_mass), per_map, logits)


def _attend_reference(q, k, v, maps, mask, encoding, t5_table, rel_k, rel_v, mapped_rope="auto",
                      map_average="auto"):
    """Plain jnp: probabilities averaged over the maps, then applied to v (and the relative V table)."""
    rows = 0 if rel_v is None else rel_v.shape[0]
    probs, rel_mass = _probabilities(q, k, maps, mask, encoding, t5_table, rel_k, rows, mapped_rope, map_average)
    out = jnp.einsum("...hij,...jhd->...ihd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    if rel_v is not None:
        out = out + jnp.einsum("...hir,rd->...ihd", rel_mass, rel_v.astype(jnp.float32))
    return out.astype(v.dtype)


def _attend_fused(q, k, v, maps, mask, encoding, t5_table, rel_k, implementation):
    """One ``jax.nn.dot_product_attention`` call per map (RoPE as absolute rotation, the rest as bias)."""
    lead = q.shape[:-3]
    flat = lambda x: x.reshape((-1,) + x.shape[-3:])
    qf, kf, vf = flat(q), flat(k), flat(v)
    r = encoding.rope_dim
    out = 0.0
    for pmap in maps:
        qm, km = qf, kf
        if r:
            pos = _linear_coefficient(pmap) * np.arange(q.shape[-3])
            freqs = encoding.rope_freqs()
            qm = jnp.concatenate([rotate(qf[..., :r], pos, freqs).astype(q.dtype), qf[..., r:]], -1)
            km = jnp.concatenate([rotate(kf[..., :r], pos, freqs).astype(k.dtype), kf[..., r:]], -1)
        bias = None
        if t5_table is not None:
            bias = _t5_bias(pmap, encoding, t5_table)[None]
        if rel_k is not None:
            rel = _rel_key_logits(qf, rel_k, pmap, encoding.rel_distance) / math.sqrt(q.shape[-1])
            bias = rel if bias is None else bias + rel
        m = None
        if mask is not None:
            m = jnp.broadcast_to(mask, lead + mask.shape[-2:]).reshape((-1, 1) + mask.shape[-2:])
        if bias is not None:
            bias = bias.astype(q.dtype)
        out = out + jax.nn.dot_product_attention(
            qm, km, vf, bias=bias, mask=m, implementation=implementation).astype(jnp.float32)
    return (out / len(maps)).astype(v.dtype).reshape(q.shape[:-1] + v.shape[-1:])


# ---- Pallas kernel: plane-cover RoPE logits on chip ---------------------------------------------------------------
PALLAS_BLOCK_Q = 16  # query rows per program; each program holds M logit tiles of [block, padded N] float32
PALLAS_NUM_WARPS = 4


def _pow2(x: int, least: int = 16) -> int:
    """The padded size of a kernel block dim: a power of two, at least 16 (the smallest Triton dot)."""
    return max(least, 1 << max(0, int(x) - 1).bit_length())


def _mask_rows(mask, lead: tuple, n: int, n_pad: int):
    """The mask as int32 rows ``[rows, n_pad, n_pad]`` and the number of consecutive sequences that share a row.

    Leading mask dims after its last non-1 dim are shared, not materialised (an IFS mask ``[B, 1, N, N]`` stays
    B rows for ``B x pixels`` sequences). Padded keys are never visible; padded query rows see the real keys."""
    keys = np.arange(n_pad) < n
    if mask is None:
        return jnp.asarray(np.broadcast_to(keys, (1, n_pad, n_pad)), jnp.int32), int(np.prod(lead))
    pad_rows = jnp.asarray((~keys)[:, None] & keys[None, :])
    mask = jnp.asarray(mask)
    mlead = (1,) * (len(lead) - (mask.ndim - 2)) + mask.shape[:-2]
    split = max([t + 1 for t, size in enumerate(mlead) if size != 1], default=0)
    rows = int(np.prod(lead[:split]))
    full = jnp.broadcast_to(mask.reshape(mlead + (n, n)), lead[:split] + mlead[split:] + (n, n)).reshape(rows, n, n)
    full = jnp.pad(full, ((0, 0), (0, n_pad - n), (0, n_pad - n))) | pad_rows
    return full.astype(jnp.int32), int(np.prod(lead[split:]))


def _plane_kernel(*refs, maps_of_plane, num_logits, num_maps, head_dim, has_plain, has_bias, has_mask):
    """One (sequence, head, query block): the cover's plane logits, per-map (or per-slot) selection, the average
    of the maps' softmaxes, one P @ V.

    ``num_logits`` logit maps are formed: the maps themselves (``num_maps`` = 0: one softmax each), or the slots
    of :func:`map_slots` (then ``sel_ref`` says which slot each of the ``num_maps`` maps takes, the average is
    :func:`_slot_average`'s, and ``fits_ref`` gets, per query row, whether its sums cleared the floor)."""
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
    for p, maps in enumerate(maps_of_plane):  # q and k rotated for plane p: its logits for every key
        s_p = dot_t(qr_ref[p].astype(jnp.float32), kr_ref[p].astype(jnp.float32))
        for m in maps:
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
        no_key = jnp.isneginf(top)  # rows that see no key: NaN either way
        cleared = None  # every map's sum >= floor
        for m in range(num_maps):
            x = _pick(sel_ref[m], exps)
            total = jnp.sum(x, axis=-1)  # map m's softmax sum
            ok = total >= floor
            cleared = ok if cleared is None else cleared & ok
            probs = probs + x * (1.0 / (num_maps * jnp.where(ok, total, 1.0)))[:, None]
        fits_ref[...] = (no_key | cleared).astype(jnp.int32)
    else:
        for x in logits:
            e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
            probs = probs + e / jnp.sum(e, axis=-1, keepdims=True) / num_logits
    v = v_ref[...]
    out = jax.lax.dot_general(probs.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    out_ref[...] = out.astype(out_ref.dtype)


def _pallas_forward(q, k, v, t5_table, mask, maps, encoding: Encoding, interpret: bool, map_average="auto"):
    """The plane kernel over every (sequence, head, query block); [..., N, H, D] -> [..., N, H, Dv].

    Where :func:`map_average_path` says "slots", the kernel forms the slot logits and takes the slot average; if
    a row's sums fall under the floor it says so, and the call reruns with one softmax per map (a run-time
    branch, as on the jnp path)."""
    from jax.experimental import pallas as pl  # imported here: only this path needs them
    from jax.experimental.pallas import triton as pl_triton

    lead, (n, h, d), dv, r = q.shape[:-3], q.shape[-3:], v.shape[-1], encoding.rope_dim
    count = int(np.prod(lead))
    n_pad, r_pad, dv_pad = _pow2(n), _pow2(r), _pow2(dv)
    block = min(PALLAS_BLOCK_Q, n_pad)
    slot_average = map_average_path(maps, map_average) == "slots"
    logit_maps, sel = map_slots(maps) if slot_average else (maps, None)
    planes, index = plane_cover(logit_maps)
    num_logits, p_pad, l_pad = len(logit_maps), _pow2(len(planes), 1), _pow2(len(logit_maps), 1)

    def heads_first(x, width):  # [..., N, H, w] -> [S, H, n_pad, width], zero padded
        x = jnp.swapaxes(x.reshape((count,) + x.shape[-3:]), 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, n_pad - n), (0, width - x.shape[-1])))

    positions = [_plane_positions(s, c, n) for s, c in planes]  # (q, k) positions per plane

    def per_plane(x, which):  # x rotated for every plane -> [S, H, p_pad, n_pad, r_pad] (padding planes zero)
        rotated = [heads_first(rotate(x, pos[which], encoding.rope_freqs()), r_pad) for pos in positions]
        return jnp.pad(jnp.stack(rotated, axis=2).astype(x.dtype),
                       ((0, 0), (0, 0), (0, p_pad - len(planes)), (0, 0), (0, 0)))

    def padded(table):  # static int [L, N, N] -> [pow2(L), n_pad, n_pad]
        out = np.zeros((_pow2(len(table), 1), n_pad, n_pad), np.int32)
        out[:len(table), :n, :n] = table
        return jnp.asarray(out)

    operands = [per_plane(q[..., :r], 0), per_plane(k[..., :r], 1), heads_first(v, dv_pad), padded(index)]
    seq_head = lambda width, rows: pl.BlockSpec((None, None, rows, width), lambda s, hh, i: (s, hh, i, 0))
    whole = lambda width: pl.BlockSpec((None, None, n_pad, width), lambda s, hh, i: (s, hh, 0, 0))
    specs = [pl.BlockSpec((None, None, p_pad, block, r_pad), lambda s, hh, i: (s, hh, 0, i, 0)),
             pl.BlockSpec((None, None, p_pad, n_pad, r_pad), lambda s, hh, i: (s, hh, 0, 0, 0)),
             whole(dv_pad), pl.BlockSpec((l_pad, block, n_pad), lambda s, hh, i: (0, i, 0))]
    if slot_average:
        operands.append(padded(sel))
        specs.append(pl.BlockSpec((_pow2(len(sel), 1), block, n_pad), lambda s, hh, i: (0, i, 0)))
    has_plain = r < d
    if has_plain:
        d_pad = _pow2(d - r)
        operands += [heads_first(q[..., r:], d_pad), heads_first(k[..., r:], d_pad)]
        specs += [seq_head(d_pad, block), whole(d_pad)]
    has_bias = t5_table is not None
    if has_bias:
        bias = jnp.stack([_t5_bias(p, encoding, t5_table) for p in logit_maps], axis=1)  # [H, L, N, N]
        operands.append(jnp.pad(bias, ((0, 0), (0, l_pad - num_logits), (0, n_pad - n), (0, n_pad - n))))
        specs.append(pl.BlockSpec((None, l_pad, block, n_pad), lambda s, hh, i: (hh, 0, i, 0)))
    has_mask = mask is not None or n_pad != n
    if has_mask:
        rows, shared = _mask_rows(mask, lead, n, n_pad)
        operands.append(rows)
        specs.append(pl.BlockSpec((None, block, n_pad), lambda s, hh, i: (s // shared, i, 0)))
    maps_of_plane = tuple(tuple(m for m in range(num_logits) if np.any(index[m] == p)) for p in range(len(planes)))
    kernel = functools.partial(_plane_kernel, maps_of_plane=maps_of_plane, num_logits=num_logits,
                               num_maps=len(maps) if slot_average else 0, head_dim=d, has_plain=has_plain,
                               has_bias=has_bias, has_mask=has_mask)
    out_specs, out_shape = [seq_head(dv_pad, block)], [jax.ShapeDtypeStruct((count, h, n_pad, dv_pad), v.dtype)]
    if slot_average:  # per query row: did the slot sums clear the floor
        out_specs.append(pl.BlockSpec((None, None, block), lambda s, hh, i: (s, hh, i)))
        out_shape.append(jax.ShapeDtypeStruct((count, h, n_pad), jnp.int32))
    out, *fits = pl.pallas_call(
        kernel, grid=(count, h, n_pad // block), in_specs=specs, out_specs=out_specs, out_shape=out_shape,
        interpret=interpret, compiler_params=pl_triton.CompilerParams(num_warps=PALLAS_NUM_WARPS, num_stages=1),
        name="plane_rope_attention")(*operands)
    out = jnp.swapaxes(out[:, :, :n, :dv], 1, 2).reshape(lead + (n, h, dv))
    if not slot_average:
        return out
    per_map = lambda: _pallas_forward(q, k, v, t5_table, mask, maps, encoding, interpret, "per_map")
    return jax.lax.cond(jnp.all(fits[0][:, :, :n] != 0), lambda: out, per_map)


def _attend_pallas(q, k, v, maps, mask, encoding: Encoding, t5_table, chunk_bytes, map_average):
    """``implementation="pallas"`` under integer maps with mapped RoPE: the forward pass is one Pallas kernel
    (interpreted on a CPU) that never writes logits to memory; gradients are those of the jnp
    plane path (recomputed in the backward pass)."""
    interpret = jax.default_backend() == "cpu"

    @jax.custom_vjp
    def attend(q, k, v, t5, mask):
        return _pallas_forward(q, k, v, t5, mask, maps, encoding, interpret, map_average)

    def forward(q, k, v, t5, mask):
        return attend(q, k, v, t5, mask), (q, k, v, t5, mask)

    def backward(saved, grad):
        *arrays, mask = saved
        reference = lambda q, k, v, t5: _attend(q, k, v, maps, mask, encoding, t5, None, None, None, chunk_bytes,
                                                "planes", map_average)
        return (*jax.vjp(reference, *arrays)[1](grad), None)

    attend.defvjp(forward, backward)
    return attend(q, k, v, t5_table, None if mask is None else jnp.asarray(mask))


def _attend(q, k, v, maps, mask, encoding, t5_table, rel_k, rel_v, implementation, chunk_bytes,
            mapped_rope="auto", map_average="auto"):
    """Attention of every leading index under ``maps`` and ``mask`` ([..., N, N] bool or None)."""
    path = rope_path(maps, encoding, mapped_rope)
    mapped = path in ("planes", "per_value", "per_frequency")
    if implementation == "pallas":
        if mapped and rel_k is None and rel_v is None and _is_integer_map(maps):
            return _attend_pallas(q, k, v, maps, mask, encoding, t5_table, chunk_bytes, map_average)
        implementation = None  # nothing for the kernel to save: the jnp path
    if implementation is not None and rel_v is None and not mapped:
        return _attend_fused(q, k, v, maps, mask, encoding, t5_table, rel_k, implementation)
    args = (maps, encoding, t5_table, rel_k, rel_v, mapped_rope, map_average)
    if not mapped:
        return _attend_reference(q, k, v, maps, mask, *args[1:])
    # Mapped RoPE materialises L (planes), U (per value) or rope_dim (per frequency) logit-sized arrays per
    # sequence: bound them by chunking over the sequences.
    if chunk_bytes is None:
        chunk_bytes = CPU_CHUNK_BYTES if jax.default_backend() == "cpu" else ACCELERATOR_CHUNK_BYTES
    lead = q.shape[:-3]
    n, h = q.shape[-3], q.shape[-2]
    count = int(np.prod(lead)) if lead else 1
    planes = (len(plane_cover(maps)[0]) if path == "planes" else
              len(np.unique(maps)) if path == "per_value" else encoding.rope_dim)
    if map_average_path(maps, map_average) == "slots":  # and the exps and weights of each of its V slots
        planes += 2 * len(map_slots(maps)[0])
    per_seq = 4 * h * n * n * planes
    batch = max(1, min(count, chunk_bytes // per_seq))
    if batch >= count:
        return _attend_reference(q, k, v, maps, mask, *args[1:])
    flat = lambda x: x.reshape((count,) + x.shape[len(lead):])
    operands = {"q": flat(q), "k": flat(k), "v": flat(v)}
    if mask is not None:
        operands["mask"] = flat(jnp.broadcast_to(mask, lead + mask.shape[-2:]))

    def chunk(x):
        return _attend_reference(x["q"], x["k"], x["v"], maps, x.get("mask"), *args[1:])

    out = _map_chunks(chunk, operands, batch)
    return out.reshape(q.shape[:-1] + v.shape[-1:])


def _map_chunks(fn, operands: dict, batch: int):
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


def _method_mask_and_maps(method: Method, encoding: Encoding, n: int, keyframes, mask):
    """The method's full mask (static part, IFS part, caller's part) and its position maps for N frames."""
    full_mask = _combine_masks(method.static_mask(n), mask)
    if method.needs_keyframes:
        if keyframes is None:
            raise ValueError(f"method {method.name!r} uses IFS and needs keyframes [..., n]")
        full_mask = _combine_masks(masks.ifs_mask(n, keyframes, method.window), full_mask)
    elif keyframes is not None:
        raise ValueError(f"keyframes were given but method {method.name!r} does not use IFS")
    return full_mask, method.position_maps(n, encoding.native_frames)


def _one_layer(what: str, q, encoding, method, t5_table, rel_k, keyframes, mask):
    """Checks shared by the single-layer analysis functions; returns the full mask and the position maps."""
    method = get_method(method)
    if not isinstance(method, Method) or method.merge != "none":
        raise ValueError(f"{what} needs one layer's Method with merge='none'")
    _check_tables(encoding, q.shape[-2], q.shape[-1], t5_table, rel_k, rel_k)
    return method, *_method_mask_and_maps(method, encoding, q.shape[-3], keyframes, mask)


def attention_probabilities(q, k, *, encoding: Encoding = Encoding(), method="direct", t5_table=None,
                            rel_k=None, keyframes=None, mask=None):
    """The attention weights ``[..., heads, N, N]`` (float32) that ``temporal_attention`` applies to v, for
    methods without a window/spectral merge. Used by tests (masked keys are exactly 0) and layer probing."""
    _, full_mask, maps = _one_layer("attention_probabilities", q, encoding, method, t5_table, rel_k, keyframes,
                                    mask)
    return _probabilities(q, k, maps, full_mask, encoding, t5_table, rel_k)[0]


def attention_logsumexp(q, k, *, encoding: Encoding = Encoding(), method="direct", t5_table=None, rel_k=None,
                        keyframes=None, mask=None):
    """``logsumexp_j`` of the masked logits, ``[..., heads, N]`` float32 (-inf where a row sees no key), for a
    single-map method. With :func:`merge_passes` it combines attention computed over disjoint key sets."""
    method, full_mask, maps = _one_layer("attention_logsumexp", q, encoding, method, t5_table, rel_k, keyframes,
                                         mask)
    if len(maps) != 1:
        raise ValueError(f"method {method.name!r} averages {len(maps)} maps: its passes cannot be merged by "
                         "log-sum-exp")
    logits = _logits(q, k, maps, encoding, t5_table, rel_k)[0]
    if full_mask is not None:
        logits = jnp.where(full_mask[..., None, :, :], logits, -jnp.inf)
    return jax.nn.logsumexp(logits, axis=-1)


def merge_passes(outputs, lses):
    """Merge attention passes over DISJOINT key sets into the attention over their union (FreeLOC-style).

    ``outputs``: ``[P, ..., N, heads, dim]``, each pass's softmax-weighted values; ``lses``: ``[P, ..., heads,
    N]`` from :func:`attention_logsumexp`. Pass p's weight for a query is ``exp(lse_p - logsumexp_p lse_p)``;
    a pass whose row saw no key (lse = -inf) contributes nothing, even if its output is NaN.
    """
    lses = jnp.asarray(lses, jnp.float32)
    total = jax.nn.logsumexp(lses, axis=0)
    weights = jnp.where(jnp.isneginf(lses), 0.0, jnp.exp(lses - total))  # [P, ..., H, N]
    weights = jnp.swapaxes(weights, -1, -2)[..., None]  # [P, ..., N, H, 1]
    outputs = jnp.asarray(outputs, jnp.float32)
    return jnp.sum(jnp.where(weights > 0, weights * outputs, 0.0), axis=0)


# ---- public entry -------------------------------------------------------------------------------------------
def temporal_attention(q, k, v, *, encoding: Encoding = Encoding(), method="direct", t5_table=None, rel_k=None,
                       rel_v=None, keyframes=None, mask=None, spatial_shape: Optional[tuple[int, int]] = None,
                       implementation: Optional[str] = None, chunk_bytes: Optional[int] = None,
                       mapped_rope: str = "auto", map_average: str = "auto"):
    """Attention over frames of ``q, k, v: [..., N, heads, dim]`` under a long-video method.

    Args:
      encoding: the model's position encoding (static).
      method: preset name or :class:`~jaxlongvid.methods.Method` (a plan must be resolved to one layer's
        Method first, see ``method_for_layer``).
      t5_table: ``[buckets, heads]`` T5 bias table, when ``encoding.t5_buckets``.
      rel_k, rel_v: ``[2R+1, dim]`` relative key/value tables, when ``encoding.rel_distance``.
      keyframes: int ``[..., n]`` IFS keyframes, broadcastable over the leading dims (methods with IFS).
      mask: optional extra bool mask ``[..., N, N]`` (AND-ed with the method's).
      spatial_shape: ``(h, w)`` for FreeLong: the last leading dim must then be the flattened ``h * w``.
      implementation: None for the jnp path; ``"cudnn"`` (or ``"xla"``) for fused attention where the RoPE is
        an absolute rotation; ``"pallas"`` for the plane kernel where it is mapped (module doc).
      chunk_bytes: memory bound for the mapped-RoPE intermediate (planes, per-value or per-frequency); None:
        1 GiB on accelerators, 16 MiB on a CPU (``CPU_CHUNK_BYTES``).
      mapped_rope: how RoPE is computed under maps that are not a multiple of ``j - i``: "planes",
        "per_value", "per_frequency" (all exact, see the module doc), or "auto" (the smallest intermediate,
        see ``rope_path``). Maps that are multiples of ``j - i`` always use the absolute rotation.
      map_average: how the jnp path and the Pallas kernel average the softmaxes of several maps: "slots" (one
        exp per distinct value at each entry), "per_map" (one softmax per map), or "auto" (slots where the maps
        take fewer distinct values per entry than there are maps, as GROUP+SHIFT's). Both exact; see the
        module doc.
    Returns:
      ``[..., N, heads, dim]`` in v's dtype.
    """
    method = get_method(method)
    if isinstance(method, MethodPlan):
        raise TypeError("temporal_attention takes one layer's Method; resolve a MethodPlan with method_for_layer")
    if q.ndim < 3 or q.shape != k.shape or q.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"q, k, v must be [..., N, heads, dim] with equal shapes (v may differ in dim), got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}")
    n, heads, dim = q.shape[-3:]
    _check_tables(encoding, heads, dim, t5_table, rel_k, rel_v)
    if rel_v is not None and v.shape[-1] != dim:
        raise ValueError(f"rel_v needs v's dim ({v.shape[-1]}) to equal q's ({dim})")
    _check_map_average(map_average)
    attend = lambda q_, k_, v_, maps, m: _attend(q_, k_, v_, maps, m, encoding, t5_table, rel_k, rel_v,
                                                 implementation, chunk_bytes, mapped_rope, map_average)
    if method.merge == "freenoise":
        if keyframes is not None or mask is not None:
            raise ValueError("method with merge='freenoise' takes no keyframes or extra mask")
        return _freenoise(q, k, v, method, encoding.native_frames, attend)
    full_mask, maps = _method_mask_and_maps(method, encoding, n, keyframes, mask)
    out = attend(q, k, v, maps, full_mask)
    if method.merge == "freelong":
        local = _combine_masks(masks.local_window(n, method.local_window), full_mask)
        out = _freelong(out, attend(q, k, v, maps, local), method, spatial_shape)
    return out


def _combine_masks(a, b):
    if a is None or b is None:
        return b if a is None else jnp.asarray(a)
    return jnp.asarray(a) & jnp.asarray(b)


def _freenoise(q, k, v, method: Method, native_frames: int, attend):
    """Each window attends within itself; outputs fused with pyramid weights, normalised per frame."""
    n = q.shape[-3]
    windows = masks.context_windows(n, method.context_window, method.context_stride)
    size = windows[0][1] - windows[0][0]
    idx = np.array([np.arange(s, e) for s, e in windows])  # [nW, W]
    take = lambda x: jnp.take(x, jnp.asarray(idx), axis=-3)  # [..., nW, W, H, D]
    inner = method.replace(merge="none")
    out_w = attend(take(q), take(k), take(v), inner.position_maps(size, native_frames), _to_jnp(
        inner.static_mask(size)))
    weights = masks.pyramid_weights(size)
    scatter = np.zeros((len(windows), size, n), np.float32)
    for w, (s, e) in enumerate(windows):
        scatter[w, np.arange(size), np.arange(s, e)] = weights
    scatter /= scatter.sum(axis=(0, 1))[None, None, :]
    out = jnp.einsum("wtf,...wthd->...fhd", jnp.asarray(scatter), out_w.astype(jnp.float32))
    return out.astype(v.dtype)


def _to_jnp(x):
    return None if x is None else jnp.asarray(x)


def _freelong(global_out, local_out, method: Method, spatial_shape):
    """Spectral blend over (frames, h, w); the leading dim before N is the flattened h*w."""
    if spatial_shape is None:
        raise ValueError("method 'freelong' needs spatial_shape=(h, w) and q laid out as [..., h*w, N, H, D]")
    h, w = spatial_shape
    shape = global_out.shape
    if shape[-4] != h * w:
        raise ValueError(f"spatial_shape {spatial_shape} does not match the spatial axis of size {shape[-4]}")
    # [..., h*w, N, H, D] -> [..., N, h, w, H*D]
    to_video = lambda x: jnp.moveaxis(x.reshape(shape[:-4] + (h, w, shape[-3], -1)), -2, -4)
    blended = freelong_blend(to_video(global_out), to_video(local_out), method.freelong_d_t,
                             method.freelong_d_s)
    return jnp.moveaxis(blended, -4, -2).reshape(shape)


# ---- the Flax module that every model's temporal attention uses ------------------------------------------
import flax.linen as nn  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxlongvid import sharding  # noqa: E402
from jaxlongvid.keyframes import select_keyframes  # noqa: E402


class TemporalAttention(nn.Module):
    """Multi-head self-attention over frames of a ``[B, N, h, w, C]`` video tensor (channels last).

    Parameters (names follow the PyTorch originals so converters are rename tables): ``to_q``, ``to_k``,
    ``to_v`` (no bias by default), ``to_out`` (with bias), and, per the encoding, ``t5_bias`` ``[buckets,
    heads]``, ``rel_k`` / ``rel_v`` ``[2R+1, head_dim]``. Normalisation before the attention belongs to the
    calling block, which passes its un-normalised input as ``features`` for IFS keyframe selection.

    Under a mesh with a ``frames`` axis the sequences are resharded over pixels for the attention (every
    query needs every frame), and the caller's layout is restored by the compiler afterwards.
    """

    num_heads: int
    head_dim: int
    encoding: Encoding = Encoding()
    method: Method = Method("direct")  # this layer's method (resolve plans with method_for_layer)
    qkv_bias: bool = False
    out_bias: bool = True
    implementation: Optional[str] = None
    dtype: jnp.dtype = jnp.float32  # compute dtype; softmax statistics stay float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, features: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        b, n, h, w, c = x.shape
        inner = self.num_heads * self.head_dim
        seq = jnp.transpose(x, (0, 2, 3, 1, 4)).reshape(b, h * w, n, c)
        seq = sharding.constrain(seq, P(sharding.DATA, sharding.FRAMES))

        def project(name, bias):
            y = nn.Dense(inner, use_bias=bias, dtype=self.dtype, name=name)(seq)
            return y.reshape(b, h * w, n, self.num_heads, self.head_dim)

        q, k, v = project("to_q", self.qkv_bias), project("to_k", self.qkv_bias), project("to_v", self.qkv_bias)
        enc = self.encoding
        t5 = rel_k = rel_v = None
        if enc.t5_buckets:
            t5 = self.param("t5_bias", nn.initializers.normal(0.02), (enc.t5_buckets, self.num_heads))
        if enc.rel_distance:
            rows = 2 * enc.rel_distance + 1
            init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
            rel_k = self.param("rel_k", init, (rows, self.head_dim))
            rel_v = self.param("rel_v", init, (rows, self.head_dim))
        keyframes = None
        if self.method.needs_keyframes:
            f = x if features is None else features
            f = jnp.transpose(f, (0, 1, 4, 2, 3)).reshape(b, n, f.shape[-1], h * w)  # [B, N, C, hw]
            segments = self.method.segments(n, enc.native_frames)
            keyframes = jax.vmap(lambda one: select_keyframes(one, segments))(f)[:, None, :]  # [B, 1, n]
        if self.is_mutable_collection("intermediates"):  # layer probing only (jaxlongvid.probing)
            self._sow_probe_statistics(q, k, t5, rel_k, keyframes)
        out = temporal_attention(q, k, v, encoding=enc, method=self.method, t5_table=t5, rel_k=rel_k,
                                 rel_v=rel_v, keyframes=keyframes, spatial_shape=(h, w),
                                 implementation=self.implementation)
        out = nn.Dense(c, use_bias=self.out_bias, dtype=self.dtype, name="to_out")(
            out.reshape(b, h * w, n, inner))
        return jnp.transpose(out.reshape(b, h, w, n, c), (0, 3, 1, 2, 4))

    def _sow_probe_statistics(self, q, k, t5, rel_k, keyframes):
        """Statistics that FreeLOC's layer probing reads, sown only while ``intermediates`` is mutable
        (``apply(..., mutable=["intermediates"])``), so ordinary calls compute none of this:

        * ``attention_entropy`` ``[B, heads, N]``: entropy (nats) of each query frame's attention weights under
          this layer's method, averaged over pixels (methods with merge 'none');
        * at N <= N0 only, ``logits_sq`` and ``shift_change_sq`` ``[B, heads]``: the squared Frobenius norm of
          the logits under the model's own positions (no mask), and of their change when every relative
          distance d becomes d + sign(d) * N0 (all beyond the trained +-(N0 - 1)).
        """
        enc = self.encoding
        if self.method.merge == "none":
            p = attention_probabilities(q, k, encoding=enc, method=self.method, t5_table=t5, rel_k=rel_k,
                                        keyframes=keyframes)  # [B, hw, heads, N, N]
            plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
            self.sow("intermediates", "attention_entropy", -jnp.mean(jnp.sum(plogp, axis=-1), axis=1))
        n = q.shape[-3]
        if n <= enc.native_frames:
            d = np.arange(n)[None, :] - np.arange(n)[:, None]

            ori = _logits(q, k, d[None], enc, t5, rel_k)[0]
            change = _logits(q, k, (d + np.sign(d) * enc.native_frames)[None], enc, t5, rel_k)[0] - ori
            self.sow("intermediates", "logits_sq", jnp.sum(jnp.square(ori), axis=(1, 3, 4)))
            self.sow("intermediates", "shift_change_sq", jnp.sum(jnp.square(change), axis=(1, 3, 4)))
