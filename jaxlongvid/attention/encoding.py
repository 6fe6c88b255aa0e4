"""Position encodings and the attention logits under position maps.

A model's temporal attention encodes frame positions with some of (:class:`Encoding`):

* RoPE on the first ``rope_dim`` dims of each head, interleaved pairs (LaVie). Where a map is a multiple of
  ``j - i`` it is the usual rotation of absolute positions ("absolute"). Any other map ``P`` takes one of three
  exact formulations (the plan picks, ``jaxlongvid.attention.plan``):

  - "per_value", integer maps: with U the distinct values of the maps, ``q . R(theta u) k = R(-theta u) q . k``,
    so q is rotated once per value and one batched matrix product gives the U logit planes; each map gathers
    its logits from them by each entry's value index.
  - "per_frequency", any map: ``q . R(theta P) k = sum_k A_k cos(theta_k P) + B_k sin(theta_k P)`` with ``A_k =
    qa ka + qb kb`` and ``B_k = qb ka - qa kb`` for the pair ``(a, b)`` of frequency k.
  - "planes", integer maps: plane ``(s, c)`` rotates q_i by ``floor(i / s)`` and k_j by ``floor(j / s) + c`` (or
    only k, by a constant c), so it holds the logits of relative position ``floor(j / s) - floor(i / s) + c`` --
    one ordinary rotated matrix product. Each map entry takes the first plane of an exact cover
    (``maps.plane_cover``) whose position equals it. GROUP+SHIFT needs 3 planes at any length.
* T5 bucketed bias (LaVie): ``table[bucket(P)]`` per head, fractional maps rounded (a lookup over the integer
  distances, so bucket edges are NumPy's, bit for bit).
* Relative key/value tables (VideoCrafter1): row ``clamp(round(P), -R, R) + R``.

Maps are jnp arrays ``[L, N, N]`` built in the program; the static facts come with them as a ``MapInfo``.
Every function returns float32 logits ``[..., H, N, N]`` per map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from jaxlongvid.attention.maps import MapInfo, plane_index, value_index
from jaxlongvid.positions import t5_bucket


@dataclass(frozen=True)
class Encoding:
    """How a model's temporal attention encodes frame positions (static)."""

    rope_dim: int = 0  # rotary dims at the start of each head (0: no RoPE); LaVie: 32
    rope_theta: float = 10000.0
    t5_buckets: int = 0  # T5 relative-bias buckets (0: none); LaVie: 32
    t5_max_distance: int = 32
    rel_distance: int = 0  # R of relative K/V tables with 2R+1 rows (0: none); VideoCrafter1: 16
    native_frames: int = 16  # N0: the clip length the model was trained on
    # (index, frequency) pairs replacing entries of the RoPE frequencies (RIFLEx's lowered intrinsic frequency,
    # set by the method's positions part: ``Positions.encoding_at``); () for the model's own
    rope_freq_overrides: tuple[tuple[int, float], ...] = ()

    def __post_init__(self):
        if self.rope_dim < 0 or self.rope_dim % 2:
            raise ValueError(f"Encoding.rope_dim must be an even number >= 0, got {self.rope_dim}")
        if self.t5_buckets < 0 or self.t5_buckets % 4:
            raise ValueError(f"Encoding.t5_buckets must be a multiple of 4 >= 0, got {self.t5_buckets}")
        if self.rel_distance < 0:
            raise ValueError(f"Encoding.rel_distance must be >= 0, got {self.rel_distance}")
        if self.native_frames < 2:
            raise ValueError(f"Encoding.native_frames must be >= 2, got {self.native_frames}")
        bad = [i for i, _ in self.rope_freq_overrides if not 0 <= i < self.rope_dim // 2]
        if bad:
            raise ValueError(f"Encoding.rope_freq_overrides index {bad[0]} is outside the {self.rope_dim // 2} "
                             f"RoPE frequencies")

    def rope_freqs(self) -> np.ndarray:
        """``theta ** (-2k / rope_dim)``, k = 0 .. rope_dim/2 - 1, with ``rope_freq_overrides`` (float64,
        static)."""
        freqs = self.rope_theta ** (-np.arange(0, self.rope_dim, 2, dtype=np.float64) / self.rope_dim)
        for index, frequency in self.rope_freq_overrides:
            freqs[index] = frequency
        return freqs


def check_tables(encoding: Encoding, heads: int, dim: int, t5_table, rel_k, rel_v):
    """The tables the encoding needs are given, with their shapes; no others."""
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


# ---- RoPE ------------------------------------------------------------------------------------------------------
def rotate_pairs(x: jnp.ndarray, angles: np.ndarray) -> jnp.ndarray:
    """Rotate interleaved pairs of ``x [..., 2K]`` by static ``angles`` (float64, broadcastable to [..., K])."""
    cos, sin = jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)
    x = x.astype(jnp.float32)
    a, b = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1)
    return out.reshape(out.shape[:-2] + (-1,))


def rotate(x: jnp.ndarray, pos: np.ndarray, freqs: np.ndarray) -> jnp.ndarray:
    """Rotate interleaved pairs of ``x`` [..., N, H, 2K] by angle ``pos[n] * freqs[k]``.

    Token positions repeat each frame's position over its T tokens: the angle table is built per run of T and
    broadcast in the program, so the constant is [N / T, K], not [N, K] (2.9 MB per call at 81 latent frames
    of 480x832 on Wan, 30 layers x q and k)."""
    pos = np.asarray(pos, np.float64)
    t = run_length(pos)
    angles = pos[::t, None] * freqs[None, :]  # [N / T, K]
    runs = x.reshape(x.shape[:-3] + (x.shape[-3] // t, t) + x.shape[-2:])
    return rotate_pairs(runs, angles[:, None, None, :]).reshape(x.shape)


def run_length(pos: np.ndarray) -> int:
    """The largest T such that ``pos`` is constant over each of its consecutive blocks of T entries (T divides
    its length): the gcd of the length and of every index where the value changes."""
    changes = np.flatnonzero(np.diff(pos)) + 1
    return int(np.gcd.reduce(np.append(changes, pos.size)))


def dot(x, y) -> jnp.ndarray:
    """``x_i . y_j`` per head: [..., N, H, D] x2 -> [..., H, N, N] float32."""
    return jnp.einsum("...ihd,...jhd->...hij", x, y, preferred_element_type=jnp.float32)


def plane_rotations(s: int, c: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The positions plane ``(s, c)`` rotates q and k by: ``floor(i / s)`` and ``floor(j / s) + c`` (s = 0: 0
    and c), so that its logits hold relative position ``k position - q position``."""
    grid = np.arange(n) // s if s else np.zeros(n, np.int64)
    return grid, grid + c


def absolute_rope_logits(q, k, info: MapInfo, freqs) -> list:
    """Maps that are multiples ``c (j - i)`` (of frames): rotate absolute positions ``c i`` (``info.positions``)."""
    n = q.shape[-3]
    return [dot(rotate(q, info.positions(c, n), freqs), rotate(k, info.positions(c, n), freqs))
            for c in info.coefficients]


def per_value_rope_logits(q, k, maps, info: MapInfo, freqs) -> list:
    """``q . R(-theta u) k`` for every distinct value u in one matrix product, then each map gathers its own."""
    n = q.shape[-3]
    angles = -np.asarray(info.values, np.float64)[:, None] * freqs[None, :]  # [U, K]
    q_values = rotate_pairs(q[..., None, :], angles)  # [..., N, H, U, 2K]
    s = jnp.einsum("...ihur,...jhr->...hiuj", q_values, k.astype(jnp.float32), preferred_element_type=jnp.float32)
    s = s.reshape(s.shape[:-2] + (-1,))  # [..., H, N, U * N]
    flat = value_index(maps, info.values) * n + jnp.arange(n, dtype=jnp.int32)  # [L, N, N]
    lead = (1,) * (s.ndim - 2)
    return [jnp.take_along_axis(s, f.reshape(lead + f.shape), axis=-1, mode="promise_in_bounds") for f in flat]


def plane_rope_logits(q, k, maps, info: MapInfo, freqs) -> list:
    """One rotated matrix product per plane of the cover; each map entry takes its plane's logits."""
    n = q.shape[-3]
    planes = [dot(rotate(q, qp, freqs), rotate(k, kp, freqs)) for qp, kp in
              (plane_rotations(s, c, n) for s, c in info.planes)]
    index = plane_index(maps, info.planes)
    out = []
    for which in index:
        selected = planes[0]
        for p in range(1, len(planes)):
            selected = jnp.where(which == p, planes[p], selected)
        out.append(selected)
    return out


def per_frequency_rope_logits(q, k, maps, info: MapInfo, freqs) -> list:
    """``sum_k A_k cos(theta_k P) + B_k sin(theta_k P)``; integer maps read cos and sin from a per-value table
    (float64 angles, as the other formulations), fractional ones take float32 angles in the program."""
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    qa, qb, ka, kb = q[..., 0::2], q[..., 1::2], k[..., 0::2], k[..., 1::2]
    pair = lambda x, y: jnp.einsum("...ihk,...jhk->...hijk", x, y)
    a = pair(qa, ka) + pair(qb, kb)
    b = pair(qb, ka) - pair(qa, kb)
    out = []
    for pmap in maps:
        if info.integer:
            angles = np.asarray(info.values, np.float64)[:, None] * freqs  # [U, K]
            idx = value_index(pmap, info.values)
            cos, sin = (jnp.asarray(f(angles), jnp.float32)[idx] for f in (np.cos, np.sin))
        else:
            ang = pmap.astype(jnp.float32)[..., None] * jnp.asarray(freqs, jnp.float32)
            cos, sin = jnp.cos(ang), jnp.sin(ang)
        out.append(jnp.sum(a * cos + b * sin, axis=-1))
    return out


ROPE_LOGITS = {"absolute": absolute_rope_logits, "per_value": per_value_rope_logits, "planes": plane_rope_logits,
               "per_frequency": per_frequency_rope_logits}


# ---- biases and tables ------------------------------------------------------------------------------------------
def value_bound(info: MapInfo) -> int:
    """The largest ``|round(P)|`` of the maps."""
    return int(np.ceil(max(abs(v) for v in info.values)))


def rel_rows(pmap: jnp.ndarray, max_distance: int) -> jnp.ndarray:
    """Each entry's relative-table row ``clamp(round(P), -R, R) + R``, int32."""
    return (jnp.clip(jnp.rint(pmap), -max_distance, max_distance) + max_distance).astype(jnp.int32)


def rel_key_logits(q, rel_k, pmap: jnp.ndarray, max_distance: int) -> jnp.ndarray:
    """``q_i . K[row(P_ij)]`` as [..., H, N, N] float32 (unscaled)."""
    rows = rel_rows(pmap, max_distance)  # [N, N]
    qk_table = jnp.einsum("...ihd,rd->...hir", q, rel_k, preferred_element_type=jnp.float32)
    idx = jnp.broadcast_to(rows, qk_table.shape[:-1] + (rows.shape[-1],))
    return jnp.take_along_axis(qk_table, idx, axis=-1)


def t5_bias(pmap: jnp.ndarray, info: MapInfo, encoding: Encoding, table) -> jnp.ndarray:
    """``table[bucket(round(P))]`` as [H, N, N] float32; the buckets of the integer distances up to the maps'
    bound are a small static table (``positions.t5_bucket``), looked up in the program."""
    bound = value_bound(info)
    lut = t5_bucket(np.arange(-bound, bound + 1), encoding.t5_buckets, encoding.t5_max_distance)
    buckets = jnp.asarray(lut)[jnp.rint(pmap).astype(jnp.int32) + bound]
    return jnp.moveaxis(jnp.asarray(table, jnp.float32)[buckets], -1, 0)


# ---- logits --------------------------------------------------------------------------------------------------------
def content_logits(q, k, maps, info: MapInfo, encoding: Encoding, rel_k, rope: str) -> list:
    """Unscaled ``q . k`` with RoPE (by the formulation ``rope``) and relative-key terms under each map: L arrays
    [..., H, N, N] float32. The dims without RoPE are multiplied once for all maps."""
    r = encoding.rope_dim
    if r > q.shape[-1]:
        raise ValueError(f"Encoding.rope_dim ({r}) exceeds the head dim ({q.shape[-1]})")
    plain = dot(q[..., r:], k[..., r:]) if r < q.shape[-1] else None
    if r:
        args = (q[..., :r], k[..., :r]) + (() if rope == "absolute" else (maps,)) + (info, encoding.rope_freqs())
        rotary = ROPE_LOGITS[rope](*args)
    else:
        rotary = [None] * len(maps)
    out = []
    for m, logits in enumerate(rotary):
        logits = plain if logits is None else logits if plain is None else logits + plain
        if rel_k is not None:
            logits = logits + rel_key_logits(q, rel_k, maps[m], encoding.rel_distance)
        out.append(logits)
    return out


def logits(q, k, maps, info: MapInfo, encoding: Encoding, t5_table, rel_k, rope: str) -> list:
    """Each map's attention logits: scaled content terms plus the T5 bias, L arrays [..., H, N, N] float32."""
    contents = content_logits(q, k, maps, info, encoding, rel_k, rope)
    scale = math.sqrt(q.shape[-1])
    return [c / scale if t5_table is None else c / scale + t5_bias(pmap, info, encoding, t5_table)
            for pmap, c in zip(maps, contents)]

