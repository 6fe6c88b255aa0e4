"""The temporal-attention core against the float64 NumPy reference, for every method and encoding.

Tolerance: max |out - ref| <= 2e-5 * max |ref| (float32 compute, float64 reference).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from jaxlongvid import masks
from jaxlongvid.attention import (Encoding, TemporalAttention, attention_logsumexp, attention_probabilities,
                                  merge_passes, temporal_attention)
from jaxlongvid.methods import PRESETS, Method

RTOL = 2e-5

# (name, encoding, head dim): LaVie-like (partial RoPE + T5 bias), VideoCrafter1-like (relative K/V), none.
ENCODINGS = {
    "rope_t5": (Encoding(rope_dim=8, t5_buckets=32, native_frames=16), 12),
    "rel_kv": (Encoding(rel_distance=16, native_frames=16), 8),
    "none": (Encoding(native_frames=16), 8),
}


def _inputs(n, dim, heads=2, seqs=2, seed=0):
    rng = np.random.default_rng(seed + n)
    q, k, v = (rng.standard_normal((seqs, n, heads, dim)).astype(np.float32) for _ in range(3))
    tables = dict(t5_table=rng.standard_normal((32, heads)).astype(np.float32) * 0.5,
                  rel_k=rng.standard_normal((33, dim)).astype(np.float32) * 0.5,
                  rel_v=rng.standard_normal((33, dim)).astype(np.float32) * 0.5)
    return q, k, v, tables


def _used_tables(enc, tables):
    return dict(t5_table=tables["t5_table"] if enc.t5_buckets else None,
                rel_k=tables["rel_k"] if enc.rel_distance else None,
                rel_v=tables["rel_v"] if enc.rel_distance else None)


def _ref_kwargs(enc, tables):
    t = _used_tables(enc, tables)
    return dict(rope_dim=enc.rope_dim, t5_table=t["t5_table"], rel_k=t["rel_k"], rel_v=t["rel_v"],
                rel_r=enc.rel_distance)


@functools.lru_cache(maxsize=None)
def _jitted(enc, method):
    def f(q, k, v, t5_table, rel_k, rel_v, keyframes):
        return temporal_attention(q, k, v, encoding=enc, method=method, t5_table=t5_table, rel_k=rel_k,
                                  rel_v=rel_v, keyframes=keyframes, spatial_shape=(1, q.shape[0]))
    return jax.jit(f)


def _keyframes(method, n, seqs, seed):
    if not method.needs_keyframes:
        return None
    segs = method.segments(n, 16)
    rng = np.random.default_rng(seed)
    return np.stack([np.sort(rng.choice(n, segs, replace=False)) for _ in range(seqs)]).astype(np.int32)


def _reference(method, enc, q, k, v, tables, keyframes):
    n = q.shape[1]
    kw = _ref_kwargs(enc, tables)
    if method.merge == "freenoise":
        return reference.freenoise_attention(q, k, v, method.context_window, method.context_stride, **kw)
    maps = method.position_maps(n, enc.native_frames)
    mask = method.static_mask(n)
    if keyframes is not None:
        ifs = np.zeros((q.shape[0], n, n), bool)
        for s in range(q.shape[0]):
            for i in range(n):
                for j in range(n):
                    ifs[s, i, j] = abs(i - j) <= method.window or j in keyframes[s]
        mask = ifs if mask is None else ifs & mask
    out = reference.attention(q, k, v, maps, mask, **kw)
    if method.merge == "freelong":
        local = masks.local_window(n, method.local_window)
        loc = reference.attention(q, k, v, maps, local if mask is None else local & mask, **kw)
        # spatial_shape (1, seqs): the sequence axis is the width of a one-row image
        g_vid = out.transpose(1, 0, 2, 3).reshape(n, 1, q.shape[0], -1)
        l_vid = loc.transpose(1, 0, 2, 3).reshape(n, 1, q.shape[0], -1)
        blended = reference.freelong_blend(g_vid, l_vid, method.freelong_d_t, method.freelong_d_s)
        out = blended.reshape(n, q.shape[0], q.shape[2], -1).transpose(1, 0, 2, 3)
    return out


def _check(method, enc_name, n, seed=0):
    enc, dim = ENCODINGS[enc_name]
    q, k, v, tables = _inputs(n, dim, seed=seed)
    kf = _keyframes(method, n, q.shape[0], seed)
    t = _used_tables(enc, tables)
    got = np.asarray(_jitted(enc, method)(q, k, v, t["t5_table"], t["rel_k"], t["rel_v"], kf))
    ref = _reference(method, enc, q, k, v, tables, kf)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= RTOL, f"{method.name} / {enc_name} / N={n}: relative error {err:.2e}"


ALL = sorted(PRESETS)


@pytest.mark.parametrize("n", [16, 17, 64])
@pytest.mark.parametrize("name", ALL)
def test_every_method_rope_t5(name, n):
    _check(PRESETS[name], "rope_t5", n)


@pytest.mark.parametrize("name", ["direct", "longdiff", "freeloc", "freenoise", "clip", "interpolate",
                                  "group-only", "freelong"])
def test_every_method_at_128_frames(name):
    _check(PRESETS[name], "rope_t5", 128)


@pytest.mark.parametrize("n", [17, 40])
@pytest.mark.parametrize("name", ALL)
def test_every_method_rel_kv(name, n):
    _check(PRESETS[name], "rel_kv", n)


@pytest.mark.parametrize("name", ["direct", "longdiff", "freeloc", "freenoise", "freelong"])
def test_every_method_no_encoding(name):
    _check(PRESETS[name], "none", 33)


@pytest.mark.parametrize("method", [
    Method("odd-groups", positions="group_shift", num_groups=7, mask="ifs", window=3, num_segments=5),
    Method("odd-window", mask="window", window=5),
    Method("odd-tiers", positions="vrpr", vrpr_params=(5, 9, 3, 5), mask="tiered", tiers=((3, 1), (11, 3)),
           sink_frames=2),
    Method("odd-freenoise", merge="freenoise", context_window=7, context_stride=3),
    Method("odd-freelong", merge="freelong", local_window=3, freelong_d_t=0.4, freelong_d_s=0.3),
])
@pytest.mark.parametrize("n", [17, 64])
def test_odd_settings(method, n):
    _check(method, "rope_t5", n, seed=3)


def test_lavie_head_shape_partial_rope():
    """LaVie's real shape: RoPE on 32 of 40 dims per head, grouped maps, 24 frames."""
    enc = Encoding(rope_dim=32, t5_buckets=32, native_frames=16)
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 24, 2, 40)).astype(np.float32) for _ in range(3))
    t5 = rng.standard_normal((32, 2)).astype(np.float32)
    method = Method("g", positions="group_shift", num_groups=8)
    got = np.asarray(temporal_attention(q, k, v, encoding=enc, method=method, t5_table=t5))
    ref = reference.attention(q, k, v, method.position_maps(24, 16), rope_dim=32, t5_table=t5)
    assert np.abs(got - ref).max() / np.abs(ref).max() <= RTOL


def test_masked_keys_have_exactly_zero_weight():
    enc, dim = ENCODINGS["rope_t5"]
    q, k, _, tables = _inputs(64, dim)
    for name in ["longdiff", "freeloc", "sliding-window"]:
        method = PRESETS[name]
        kf = _keyframes(method, 64, 2, 0)
        p = np.asarray(attention_probabilities(q, k, encoding=enc, method=method, t5_table=tables["t5_table"],
                                               keyframes=kf))
        allowed = method.static_mask(64)
        if kf is not None:
            allowed = np.asarray(masks.ifs_mask(64, kf, method.window))[:, None]
        allowed = np.broadcast_to(allowed, p.shape)
        assert np.all(p[~allowed] == 0.0), name
        assert np.all(p[allowed] > 0.0), name
        np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)


def test_chunked_per_frequency_path_equals_unchunked():
    enc, dim = ENCODINGS["rope_t5"]
    q, k, v, tables = _inputs(40, dim, seqs=6)
    kw = dict(encoding=enc, method="longdiff-no-ifs", t5_table=tables["t5_table"])
    whole = temporal_attention(q, k, v, **kw)
    chunked = temporal_attention(q, k, v, chunk_bytes=1, **kw)  # one sequence per chunk
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["direct", "interpolate", "sliding-window", "freenoise"])
def test_fused_xla_path_matches_reference(name):
    """``implementation="xla"`` takes jax.nn.dot_product_attention (the cuDNN path's code on CPU)."""
    enc, dim = ENCODINGS["rope_t5"]
    q, k, v, tables = _inputs(32, dim)
    kf = _keyframes(PRESETS[name], 32, 2, 0)
    kw = dict(encoding=enc, method=name, t5_table=tables["t5_table"], keyframes=kf)
    fused = temporal_attention(q, k, v, implementation="xla", **kw)
    plain = temporal_attention(q, k, v, **kw)
    np.testing.assert_allclose(fused, plain, rtol=2e-5, atol=2e-5)


# ---- transformations ------------------------------------------------------------------------------------------
def test_vmap_grad_and_no_retrace():
    enc, dim = ENCODINGS["rope_t5"]
    q, k, v, tables = _inputs(24, dim, seqs=4)
    t5 = tables["t5_table"]
    traces = []

    @jax.jit
    def loss(q, k, v, t5):
        traces.append(1)
        return jnp.sum(temporal_attention(q, k, v, encoding=enc, method="longdiff-no-ifs", t5_table=t5) ** 2)

    g = jax.grad(loss, argnums=(0, 3))(q, k, v, t5)
    assert all(np.isfinite(np.asarray(x)).all() for x in g) and np.abs(np.asarray(g[1])).sum() > 0
    loss(q + 1.0, k, v, t5)
    traced = len(traces)
    loss(q * 2.0, k - 1.0, v, t5 * 0.5)
    loss(q, k, v * 3.0, t5)
    assert traced >= 1 and len(traces) == traced  # new array values never retrace
    # vmap over an extra batch of sequences equals the batched call
    f = lambda q, k, v: temporal_attention(q, k, v, encoding=enc, method="freeloc", t5_table=t5)
    np.testing.assert_allclose(jax.vmap(f)(q[:, None], k[:, None], v[:, None])[:, 0], f(q, k, v),
                               rtol=1e-6, atol=1e-6)
    # gradient matches a finite difference along a random direction
    d = np.random.default_rng(0).standard_normal(q.shape).astype(np.float32)
    eps = 1e-2
    fd = (loss(q + eps * d, k, v, t5) - loss(q - eps * d, k, v, t5)) / (2 * eps)
    np.testing.assert_allclose(np.sum(np.asarray(g[0]) * d), fd, rtol=2e-2)


def test_module_jit_vmap_grad_every_preset():
    enc = Encoding(rope_dim=8, t5_buckets=32, native_frames=8)
    x = jax.random.normal(jax.random.key(0), (2, 20, 3, 2, 16))
    for name, method in PRESETS.items():
        mod = TemporalAttention(num_heads=2, head_dim=8, encoding=enc, method=method)
        params = mod.init(jax.random.key(1), x)
        y = jax.jit(mod.apply)(params, x)
        assert y.shape == x.shape and np.isfinite(np.asarray(y)).all(), name
    mod = TemporalAttention(num_heads=2, head_dim=8, encoding=enc, method=PRESETS["longdiff"])
    params = mod.init(jax.random.key(1), x)
    grads = jax.grad(lambda p: jnp.sum(mod.apply(p, x) ** 2))(params)
    assert np.abs(np.asarray(grads["params"]["t5_bias"])).sum() > 0
    yb = jax.vmap(lambda xi: mod.apply(params, xi[None])[0])(x)
    np.testing.assert_allclose(yb, mod.apply(params, x), rtol=1e-5, atol=1e-5)


# ---- bad input ----------------------------------------------------------------------------------------------------
def test_bad_input_errors_name_the_problem():
    enc, dim = ENCODINGS["rope_t5"]
    q, k, v, tables = _inputs(20, dim)
    t5 = tables["t5_table"]
    with pytest.raises(ValueError, match="equal shapes"):
        temporal_attention(q, k[:, :10], v, encoding=enc, t5_table=t5)
    with pytest.raises(ValueError, match="t5_table"):
        temporal_attention(q, k, v, encoding=enc)
    with pytest.raises(ValueError, match="t5_table must have shape"):
        temporal_attention(q, k, v, encoding=enc, t5_table=t5[:5])
    with pytest.raises(ValueError, match="rel_k was given"):
        temporal_attention(q, k, v, encoding=enc, t5_table=t5, rel_k=tables["rel_k"])
    with pytest.raises(ValueError, match="unknown method"):
        temporal_attention(q, k, v, encoding=enc, t5_table=t5, method="longdif")
    with pytest.raises(ValueError, match="needs keyframes"):
        temporal_attention(q, k, v, encoding=enc, t5_table=t5, method="longdiff")
    with pytest.raises(ValueError, match="spatial_shape"):
        temporal_attention(q, k, v, encoding=enc, t5_table=t5, method="freelong")
    with pytest.raises(ValueError, match="rope_dim"):
        temporal_attention(q, k, v, encoding=Encoding(rope_dim=16), method="direct")
    with pytest.raises(ValueError, match="rope_dim"):
        Encoding(rope_dim=3)


def test_merge_passes_over_disjoint_tiers_equals_one_softmax():
    """FreeLOC-style: the tiers of the tiered mask as separate passes, merged by log-sum-exp."""
    enc, dim = ENCODINGS["rope_t5"]
    q, k, v, tables = _inputs(64, dim)
    t5 = tables["t5_table"]
    method = PRESETS["freeloc"]
    tiered = method.static_mask(64)
    a = np.abs(np.arange(64)[None, :] - np.arange(64)[:, None])
    parts = [tiered & (a <= 8), tiered & (a > 8) & (a <= 24), tiered & (a > 24)]  # local, middle, sink only
    assert np.array_equal(parts[0] | parts[1] | parts[2], tiered) and not (parts[0] & parts[1]).any()
    kw = dict(encoding=enc, method=method, t5_table=t5)
    outs = [temporal_attention(q, k, v, mask=m, **kw) for m in parts]
    lses = [attention_logsumexp(q, k, mask=m, **kw) for m in parts]
    merged = merge_passes(jnp.stack(outs), jnp.stack(lses))
    whole = temporal_attention(q, k, v, **kw)
    assert np.isnan(np.asarray(outs[2])).any()  # rows near the start see no key beyond the middle tier
    np.testing.assert_allclose(merged, whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="averages 5 maps"):
        attention_logsumexp(q, k, encoding=enc, method="longdiff-no-ifs", t5_table=t5)
