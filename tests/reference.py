"""Slow, obviously-correct float64 NumPy references for the temporal-attention methods.

Written from METHODS.md independently of the library: explicit loops where they make the meaning plain,
plain formulas elsewhere. Nothing here imports jaxlongvid except the static position maps and masks, which
have their own hand-worked tests.
"""

from __future__ import annotations

import math

import numpy as np


def t5_bucket_one(d: int, buckets: int = 32, max_distance: int = 32) -> int:
    half = buckets // 2
    exact = half // 2
    base = half if d > 0 else 0
    m = abs(d)
    if m < exact:
        return base + m
    return base + min(half - 1, exact + int(math.log(m / exact) / math.log(max_distance / exact) * (half - exact)))


def rotate_pairs(x: np.ndarray, angle_scale: float, freqs: np.ndarray) -> np.ndarray:
    """Rotate interleaved pairs (2k, 2k+1) of vector x by angle ``angle_scale * freqs[k]``."""
    out = x.copy()
    for kk, f in enumerate(freqs):
        a, b = x[2 * kk], x[2 * kk + 1]
        c, s = math.cos(angle_scale * f), math.sin(angle_scale * f)
        out[2 * kk], out[2 * kk + 1] = a * c - b * s, b * c + a * s
    return out


def rope_freqs(rope_dim, theta, riflex_k=None, num_frames=None):
    """``theta^(-2k / rope_dim)``; RIFLEx: component ``riflex_k`` (1-based) set to ``0.9 * 2 pi / num_frames``."""
    freqs = theta ** (-np.arange(0, rope_dim, 2) / rope_dim) if rope_dim else np.zeros(0)
    if riflex_k is not None:
        freqs[riflex_k - 1] = 0.9 * 2 * np.pi / num_frames
    return freqs


def logits_one(q, k, pmap, rope_dim, theta, t5_table, rel_k, rel_r, freqs=None):
    """[N, N] logits of one sequence and head: q.R(theta P)k on the rotary part, plain dot elsewhere."""
    n, dim = q.shape
    freqs = rope_freqs(rope_dim, theta) if freqs is None else freqs
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            kj = k[j].copy()
            if rope_dim:
                kj[:rope_dim] = rotate_pairs(k[j][:rope_dim], pmap[i, j], freqs)
            val = q[i] @ kj
            if rel_k is not None:
                val += q[i] @ rel_k[int(np.clip(np.rint(pmap[i, j]), -rel_r, rel_r)) + rel_r]
            out[i, j] = val / math.sqrt(dim)
    if t5_table is not None:
        out += np.array([[t5_table[t5_bucket_one(int(np.rint(p)), t5_table.shape[0])] for p in row]
                         for row in pmap])
    return out


def attention(q, k, v, maps, mask=None, rope_dim=0, theta=10000.0, t5_table=None, rel_k=None, rel_v=None,
              rel_r=0, freqs=None):
    """q, k, v: [S, N, H, D] -> [S, N, H, D]; probabilities averaged over maps; masked keys get 0. ``freqs``: the
    RoPE frequencies when not the model's own (:func:`rope_freqs`)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s, n, h, d = q.shape
    out = np.zeros((s, n, h, v.shape[-1]))
    for si in range(s):
        m_ = None if mask is None else np.broadcast_to(mask, (s, n, n))[si]
        for hi in range(h):
            t5 = None if t5_table is None else np.asarray(t5_table, np.float64)[:, hi]
            for pmap in maps:
                lg = logits_one(q[si, :, hi], k[si, :, hi], pmap, rope_dim, theta, t5, rel_k, rel_r, freqs)
                if m_ is not None:
                    lg = np.where(m_, lg, -np.inf)
                p = np.exp(lg - lg.max(axis=1, keepdims=True))
                p /= p.sum(axis=1, keepdims=True)
                for i in range(n):
                    for j in range(n):
                        if p[i, j] == 0:
                            continue
                        val = v[si, j, hi].copy()
                        if rel_v is not None:
                            val = val + rel_v[int(np.clip(np.rint(pmap[i, j]), -rel_r, rel_r)) + rel_r]
                        out[si, i, hi] += p[i, j] * val / len(maps)
    return out


def freenoise_attention(q, k, v, window, stride, **enc):
    """Windows [i*stride, i*stride + window) plus one ending at N; pyramid weights; normalised per frame."""
    n = q.shape[1]
    starts = list(range(0, n - window + 1, stride)) if n > window else [0]
    size = min(window, n)
    if starts[-1] + size < n:
        starts.append(n - size)
    weights = np.array([min(t + 1, size - t) for t in range(size)], np.float64)
    num = np.zeros(q.shape[:-1] + (v.shape[-1],))
    den = np.zeros(n)
    ident = (np.arange(size)[None, :] - np.arange(size)[:, None])[None]
    for s0 in starts:
        sl = slice(s0, s0 + size)
        o = attention(q[:, sl], k[:, sl], v[:, sl], ident, **enc)
        num[:, sl] += weights[None, :, None, None] * o
        den[sl] += weights
    return num / den[None, :, None, None]


def freelong_blend(g, loc, d_t, d_s):
    """g, loc: [T, H, W, C] -> blended; FFT, fftshift, Gaussian low-pass on the centred grid, inverse."""
    t, h, w = g.shape[:3]
    lpf = np.zeros((t, h, w))
    for a in range(t):
        for b in range(h):
            for c in range(w):
                ft, fh, fw = 2 * a / t - 1, 2 * b / h - 1, 2 * c / w - 1
                lpf[a, b, c] = math.exp(-0.5 * ((ft / d_t) ** 2 + (fh / d_s) ** 2 + (fw / d_s) ** 2))
    out = np.zeros_like(g, dtype=np.float64)
    for ch in range(g.shape[-1]):
        fg = np.fft.fftshift(np.fft.fftn(g[..., ch]))
        fl = np.fft.fftshift(np.fft.fftn(loc[..., ch]))
        out[..., ch] = np.fft.ifftn(np.fft.ifftshift(lpf * fg + (1 - lpf) * fl)).real
    return out


def keyframes(features, num_segments):
    """features [N, C, hw] -> keyframe per segment, with the README's documented choices."""
    f = np.asarray(features, np.float64)
    n = f.shape[0]
    pv = np.stack([f.max(1), f.mean(1), f.min(1)], 1)
    pv = (pv - pv.min()) * 255.0 / max(pv.max() - pv.min(), 1e-12)
    ent = np.zeros(n)
    diff = np.zeros(n)
    for t in range(n):
        hist = np.bincount(np.clip(np.floor(pv[t].ravel()), 0, 255).astype(int), minlength=256)
        p = hist[hist > 0] / hist.sum()
        ent[t] = -(p * np.log2(p)).sum()
        if t > 0:
            diff[t] = np.abs(pv[t] - pv[t - 1]).mean()
    if n > 1:
        diff[0] = diff[1]

    def z(x):
        return (x - x.mean()) / x.std() if x.std() > 0 else np.zeros_like(x)

    score = z(ent) + z(diff)
    out = []
    for seg in range(num_segments):
        lo, hi = math.ceil(seg * n / num_segments), math.ceil((seg + 1) * n / num_segments)
        out.append(lo + int(np.argmax(score[lo:hi])))
    return np.array(out)
