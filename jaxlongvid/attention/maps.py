"""Position maps as the attention core sees them: static facts for the plan, arrays built in the program.

The maps ``[M, N, N]`` of a method's positions part are built inside the traced program from iotas
(``positions.maps(n, n0, jax.numpy)``), never captured as constants. What the plan needs to know before
tracing -- how many maps, whether they are integers, which are multiples of ``j - i``, their distinct values,
how many distinct values an entry takes over the maps, the plane cover -- is a :class:`MapInfo`, computed once
per (part, N, N0) from the maps' profile over the 2N-1 distances (every map depends on ``j - i`` alone), so it
costs O(M N), not O(M N^2). Explicit map arrays (tests, probing) get the same facts from the array itself.

Everything that depends on the map entries -- each entry's value index, its plane, the slots of the map
average -- is computed in the program by the jnp functions at the end of this module.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional

import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class MapInfo:
    """Static facts about position maps ``[M, N, N]`` (module doc)."""

    num_maps: int
    num_frames: int
    integer: bool
    coefficients: tuple  # per map: c where the map is c * (j - i), else None (RoPE is then not a rotation)
    values: tuple  # the sorted distinct values of all maps
    num_slots: int  # the most distinct values the maps take at one entry (the slot average's V)
    planes: Optional[tuple]  # an exact plane cover (integer maps that are not all multiples of j - i), else None
    tokens_per_frame: int = 1  # T > 1: the maps are frame maps expanded to blocks of T tokens (token_maps)

    @property
    def linear(self) -> bool:
        return all(c is not None for c in self.coefficients)

    def positions(self, coefficient: float, n: int) -> np.ndarray:
        """The absolute positions whose rotation realises ``coefficient * (frame(j) - frame(i))``: ``c * i // T``
        for the n query/key indices."""
        return coefficient * (np.arange(n) // self.tokens_per_frame)

    def for_tokens(self, tokens_per_frame: int) -> "MapInfo":
        """The facts of these frame maps expanded to ``T`` tokens per frame (:func:`token_maps`): the same values
        and slots; plane ``(s, c)`` of frames is plane ``(s T, c)`` of tokens."""
        t = tokens_per_frame
        planes = None if self.planes is None else tuple((s * t, c) for s, c in self.planes)
        return dataclasses.replace(self, num_frames=self.num_frames * t, planes=planes, tokens_per_frame=t)


def linear_coefficient(values: np.ndarray, distance: np.ndarray) -> Optional[float]:
    """c if ``values == c * distance`` (to float32 rounding for fractional values), else None."""
    if distance.size <= 1 or not np.any(distance == 1):
        return 1.0 if np.array_equal(values, distance) else None
    c = float(values[distance == 1].flat[0])
    d = distance.astype(np.float64)
    if np.issubdtype(values.dtype, np.integer):
        return c if np.array_equal(values, c * d) else None
    n = int(np.abs(distance).max()) + 1
    return c if np.allclose(values, c * d, rtol=1e-6, atol=1e-6 * max(1.0, abs(c) * n)) else None


def is_integer(maps: np.ndarray) -> bool:
    maps = np.asarray(maps)
    return np.issubdtype(maps.dtype, np.integer) or bool(np.all(maps == np.rint(maps)))


def distinct_per_entry(maps: np.ndarray) -> int:
    """The most distinct values over the first axis at any entry of ``maps [M, ...]``."""
    ordered = np.sort(maps.reshape(maps.shape[0], -1), axis=0)
    return int((1 + np.sum(ordered[1:] != ordered[:-1], axis=0)).max())


@functools.lru_cache(maxsize=256)
def info_of_positions(part, num_frames: int, native_frames: int) -> MapInfo:
    """The MapInfo of a positions part at N frames (cached per value: parts are hashable)."""
    profile = part.profile(num_frames, native_frames)  # [M, 2N - 1] over d = -(N-1) .. N-1
    d = np.arange(-(num_frames - 1), num_frames)
    integer = is_integer(profile)
    coefficients = tuple(linear_coefficient(p, d) for p in profile)
    planes = None
    if integer and not all(c is not None for c in coefficients):
        planes = part.planes(num_frames, native_frames) or plane_cover(part.maps(num_frames, native_frames, np))[0]
    return MapInfo(len(profile), num_frames, integer, coefficients, tuple(np.unique(profile).tolist()),
                   distinct_per_entry(profile), planes)


def info_of_array(maps: np.ndarray) -> MapInfo:
    """The MapInfo of explicit maps ``[M, N, N]`` (NumPy)."""
    maps = np.asarray(maps)
    n = maps.shape[-1]
    d = np.arange(n)[None, :] - np.arange(n)[:, None]
    integer = is_integer(maps)
    coefficients = tuple(linear_coefficient(p, d) for p in maps)
    planes = plane_cover(maps)[0] if integer and not all(c is not None for c in coefficients) else None
    return MapInfo(len(maps), n, integer, coefficients, tuple(np.unique(maps).tolist()), distinct_per_entry(maps),
                   planes)


# ---- the plane cover (static, NumPy) -------------------------------------------------------------------------------
def run_lengths(line: np.ndarray) -> np.ndarray:
    """Lengths of the runs of equal consecutive entries of a 1-D array."""
    edges = np.concatenate([[0], np.flatnonzero(np.diff(line)) + 1, [len(line)]])
    return np.diff(edges)


def group_sizes(maps: np.ndarray, most: int = 6) -> list[int]:
    """Candidate group sizes s of the plane cover: 1 and the ``most`` commonest run lengths (weighted by length)
    of equal values along each map's first row and first column (a map's profile over distances)."""
    weight: dict[int, int] = {}
    for pmap in maps:
        for line in (pmap[0], pmap[:, 0]):
            for length in run_lengths(line).tolist():
                weight[length] = weight.get(length, 0) + length
    return sorted({1, *sorted(weight, key=lambda s: -weight[s])[:most]})


def plane_cover(maps: np.ndarray) -> tuple[tuple[tuple[int, int], ...], np.ndarray]:
    """Planes that hold every entry of the integer maps ``[M, N, N]``, and each entry's plane (int32 [M, N, N]).

    Plane ``(s, c)`` with s >= 1 has relative position ``floor(j / s) - floor(i / s) + c`` at (i, j); plane
    ``(0, c)`` has the constant c. An entry may use a plane only where that plane's position equals it, so the
    cover is exact by construction. Greedy: each step takes the candidate plane that holds the most entries
    not yet covered (candidates: the group sizes of :func:`group_sizes`, every offset c, and the constants,
    which alone always cover, so the loop ends); if that takes more planes than the maps have values, one
    constant plane per value. Each entry's plane is the first plane of the list that holds it (as
    :func:`plane_index` computes in the program). Positions parts with a closed-form cover (GROUP, GROUP+SHIFT)
    skip this search."""
    maps = np.asarray(maps).astype(np.int64)
    shape = maps.shape
    frames = np.arange(shape[-1])
    offsets = {s: maps - (frames[None, :] // s - frames[:, None] // s) for s in group_sizes(maps)}
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
    values, by_value = np.unique(maps, return_inverse=True)
    if len(planes) > len(values):  # greedy is not optimal: never worse than one constant plane per value
        planes, index = [(0, int(u)) for u in values], by_value.reshape(shape).astype(np.int32)
    return tuple(planes), index


def map_slots(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of ``maps [M, N, N]`` at each ``(i, j)`` as V "slot" maps, and which slot each map takes
    (NumPy; :func:`slot_maps` computes the same in the program).

    Returns ``slots [V, N, N]`` (V: the most distinct values at any entry; they are listed in order of first
    appearance over m, so slot 0 is map 0, and an entry with fewer values repeats its last) and ``sel`` int32
    ``[M, N, N]`` with ``maps[m, i, j] == slots[sel[m, i, j], i, j]``. GROUP+SHIFT's s maps take 2 values at
    every entry (``sign(d) ceil(|d| / s)`` and ``sign(d) floor(|d| / s)``)."""
    maps = np.asarray(maps)
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
    return slots.reshape((width,) + shape[1:]), sel.reshape(shape).astype(np.int32)


# ---- in the program (jnp) ------------------------------------------------------------------------------------------
def token_maps(frame_maps: jnp.ndarray, tokens_per_frame: int) -> jnp.ndarray:
    """Frame-level ``[..., F, F]`` (maps or masks) expanded to token level ``[..., F T, F T]``: token ``a`` belongs
    to frame ``a // T`` (tokens laid out frame by frame)."""
    t = tokens_per_frame
    return jnp.repeat(jnp.repeat(frame_maps, t, axis=-2), t, axis=-1)


def value_index(maps: jnp.ndarray, values: tuple) -> jnp.ndarray:
    """Each entry's index among the sorted static ``values`` (integer maps: exact), int32."""
    return jnp.searchsorted(jnp.asarray(values, maps.dtype), maps).astype(jnp.int32)


def plane_position(s: int, c: int, n: int) -> jnp.ndarray:
    """Plane ``(s, c)``'s relative position ``floor(j / s) - floor(i / s) + c`` (s = 0: c), int32 [N, N]."""
    idx = jnp.arange(n, dtype=jnp.int32)
    if not s:
        return jnp.full((n, n), c, jnp.int32)
    return idx[None, :] // s - idx[:, None] // s + c


def plane_index(maps: jnp.ndarray, planes: tuple) -> jnp.ndarray:
    """Each entry's plane: the first of ``planes`` whose position equals it (an exact cover holds one), int32."""
    n = maps.shape[-1]
    index = jnp.zeros(maps.shape, jnp.int32)
    for p in reversed(range(len(planes))):
        index = jnp.where(maps == plane_position(*planes[p], n), p, index)
    return index


def distance_rows(maps: jnp.ndarray, tokens_per_frame: int = 1) -> jnp.ndarray:
    """Maps ``[..., N, N]`` that depend on the frame distance alone (every positions part's) as rows ``[..., 2F - 1]``
    over ``d = frame(j) - frame(i)`` from ``-(F - 1)`` to ``F - 1``, F = N / T frames: entry ``(i, j)`` is row
    ``d + F - 1``."""
    frames = maps[..., ::tokens_per_frame, ::tokens_per_frame]
    return jnp.concatenate([frames[..., :0:-1, 0], frames[..., 0, :]], axis=-1)


def slot_maps(maps: jnp.ndarray, num_slots: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """:func:`map_slots` in the program: ``slots [V, N, N]`` (values in order of first appearance over the maps,
    an entry with fewer values repeating its last) and ``sel`` int32 ``[M, N, N]`` (the first slot of each map's
    value)."""
    slots = [maps[0]]
    for _ in range(1, num_slots):
        new = functools.reduce(jnp.logical_and, [maps != s for s in slots])  # [M, N, N]: values not seen yet
        first = jnp.argmax(new, axis=0)
        value = jnp.take_along_axis(maps, first[None], axis=0)[0]
        slots.append(jnp.where(jnp.any(new, axis=0), value, slots[-1]))
    sel = jnp.zeros(maps.shape, jnp.int32)
    for v in reversed(range(num_slots)):
        sel = jnp.where(maps == slots[v], v, sel)
    return jnp.stack(slots), sel
