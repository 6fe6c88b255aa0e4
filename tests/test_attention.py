"""The temporal-attention core against the float64 NumPy reference, for every method and encoding.

Tolerance: max |out - ref| <= 2e-5 * max |ref| (float32 compute, float64 reference). The two exact formulations
of RoPE under a mapped position (per value, per frequency) and the Pallas kernel agree with each other to 2e-6
relative (measured: at most 5e-7), gradients included.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from jaxlongvid import masks
from jaxlongvid.attention import (SLOT_GAP_LIMIT, Encoding, TemporalAttention, attention_logsumexp,
                                  attention_probabilities, info_of_array, info_of_positions, logits, map_slots,
                                  merge_passes, plane_cover, rope_path, slot_average, slot_maps, temporal_attention)
from jaxlongvid.attention.maps import plane_index
from jaxlongvid.attention.reference import map_chunks
from jaxlongvid.methods import (IFS, PRESETS, VRPR, FreeLongBlend, FreeNoiseWindows, GroupShift, Identity, Method,
                                RIFLEx, Tiered, Window)
from jaxlongvid.positions import t5_bucket

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
def _jitted(enc, method, mapped_rope="auto"):
    def f(q, k, v, t5_table, rel_k, rel_v, keyframes):
        return temporal_attention(q, k, v, encoding=enc, method=method, t5_table=t5_table, rel_k=rel_k,
                                  rel_v=rel_v, keyframes=keyframes, spatial_shape=(1, q.shape[0]),
                                  mapped_rope=mapped_rope)
    return jax.jit(f)


def _keyframes(method, n, seqs, seed):
    if not method.needs_keyframes:
        return None
    segs = method.mask.segments(n, 16)
    rng = np.random.default_rng(seed)
    return np.stack([np.sort(rng.choice(n, segs, replace=False)) for _ in range(seqs)]).astype(np.int32)


def _reference(method, enc, q, k, v, tables, keyframes):
    n = q.shape[1]
    kw = _ref_kwargs(enc, tables)
    if isinstance(method.merge, FreeNoiseWindows):
        return reference.freenoise_attention(q, k, v, method.merge.window, method.merge.stride, **kw)
    maps = _maps(method, n)
    mask = None if method.mask is None else method.mask.static(n, np)
    if keyframes is not None:
        ifs = np.zeros((q.shape[0], n, n), bool)
        for s in range(q.shape[0]):
            for i in range(n):
                for j in range(n):
                    ifs[s, i, j] = abs(i - j) <= method.mask.window or j in keyframes[s]
        mask = ifs if mask is None else ifs & mask
    if isinstance(method.positions, RIFLEx) and n > 16 and enc.rope_dim:
        # RIFLEx's component: the frequency whose period round(2 pi / freq) is closest to N0 = 16 frames
        periods = np.rint(2 * np.pi / reference.rope_freqs(enc.rope_dim, 10000.0))
        kw["freqs"] = reference.rope_freqs(enc.rope_dim, 10000.0, method.positions.k or
                                           1 + int(np.argmin(np.abs(periods - 16))), n)
    out = reference.attention(q, k, v, maps, mask, **kw)
    if isinstance(method.merge, FreeLongBlend):
        local = masks.local_window(n, method.merge.local_window)
        exact = Identity().maps(n, 16, np)  # the local branch reads exact distances
        loc = reference.attention(q, k, v, exact, local if mask is None else local & mask, **kw)
        # spatial_shape (1, seqs): the sequence axis is the width of a one-row image
        g_vid = out.transpose(1, 0, 2, 3).reshape(n, 1, q.shape[0], -1)
        l_vid = loc.transpose(1, 0, 2, 3).reshape(n, 1, q.shape[0], -1)
        blended = reference.freelong_blend(g_vid, l_vid, method.merge.d_t, method.merge.d_s)
        out = blended.reshape(n, q.shape[0], q.shape[2], -1).transpose(1, 0, 2, 3)
    return out


def _maps(method, n, n0=16):
    """The method's position maps as NumPy (the reference's input)."""
    return method.positions.maps(n, n0, np)


def _check(method, enc_name, n, seed=0, mapped_rope="auto"):
    enc, dim = ENCODINGS[enc_name]
    q, k, v, tables = _inputs(n, dim, seed=seed)
    kf = _keyframes(method, n, q.shape[0], seed)
    t = _used_tables(enc, tables)
    got = np.asarray(_jitted(enc, method, mapped_rope)(q, k, v, t["t5_table"], t["rel_k"], t["rel_v"], kf))
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
    Method("odd-groups", positions=GroupShift(7), mask=IFS(window=3, num_segments=5)),
    Method("odd-window", mask=Window(5)),
    Method("odd-tiers", positions=VRPR(5, 9, 3, 5), mask=Tiered(((3, 1), (11, 3)), sink_frames=2)),
    Method("odd-freenoise", merge=FreeNoiseWindows(7, 3)),
    Method("odd-freelong", merge=FreeLongBlend(3, d_t=0.4, d_s=0.3)),
    Method("grouped-freelong", positions=GroupShift(), merge=FreeLongBlend()),  # the local branch stays exact
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
    method = Method("g", positions=GroupShift(8))
    got = np.asarray(temporal_attention(q, k, v, encoding=enc, method=method, t5_table=t5))
    ref = reference.attention(q, k, v, _maps(method, 24), rope_dim=32, t5_table=t5)
    assert np.abs(got - ref).max() / np.abs(ref).max() <= RTOL


def test_masked_keys_have_exactly_zero_weight():
    enc, dim = ENCODINGS["rope_t5"]
    q, k, _, tables = _inputs(64, dim)
    for name in ["longdiff", "freeloc", "sliding-window"]:
        method = PRESETS[name]
        kf = _keyframes(method, 64, 2, 0)
        p = np.asarray(attention_probabilities(q, k, encoding=enc, method=method, t5_table=tables["t5_table"],
                                               keyframes=kf))
        allowed = method.mask.static(64, np)
        if kf is not None:
            allowed = np.asarray(masks.ifs_mask(64, kf, method.mask.window))[:, None]
        allowed = np.broadcast_to(allowed, p.shape)
        assert np.all(p[~allowed] == 0.0), name
        assert np.all(p[allowed] > 0.0), name
        np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("mapped_rope", ["planes", "per_value", "per_frequency"])
def test_chunked_mapped_rope_equals_unchunked(mapped_rope):
    enc, dim = ENCODINGS["rope_t5"]
    q, k, v, tables = _inputs(40, dim, seqs=6)
    kw = dict(encoding=enc, method="longdiff-no-ifs", t5_table=tables["t5_table"], mapped_rope=mapped_rope)
    whole = temporal_attention(q, k, v, **kw)
    chunked = temporal_attention(q, k, v, chunk_bytes=1, **kw)  # one sequence per chunk
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)


def test_chunked_path_takes_each_sequences_own_mask():
    # IFS keyframes differ per batch entry and broadcast over the pixels: [B, 1, n] against q [B, hw, N, H, D]
    enc, dim = ENCODINGS["rope_t5"]
    q, k, v, tables = _inputs(48, dim, seqs=2 * 3)
    q, k, v = (x.reshape(2, 3, *x.shape[1:]) for x in (q, k, v))
    keyframes = np.array([[[1, 20, 40]], [[9, 30, 47]]], np.int32)
    kw = dict(encoding=enc, method="longdiff", t5_table=tables["t5_table"], keyframes=keyframes)
    whole = temporal_attention(q, k, v, **kw)
    chunked = temporal_attention(q, k, v, chunk_bytes=1, **kw)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)


def test_map_chunks_covers_a_last_partial_chunk():
    x = jnp.arange(10.0)[:, None] * jnp.ones((1, 3))
    got = map_chunks(lambda ops: ops["x"] * 2 + ops["y"][:, None], {"x": x, "y": jnp.arange(10.0)}, 4)
    np.testing.assert_array_equal(got, x * 2 + jnp.arange(10.0)[:, None])


def test_chunked_path_holds_no_mask_per_sequence():
    # LaVie's temporal attention at 1,024 frames ran out of memory on an 80 GB GPU partly because the IFS mask
    # [B, 1, N, N] was broadcast to every pixel's sequence before chunking (5 GiB at LaVie's first level). The
    # compiled program's temporaries must stay under the size of that broadcast (here 64 MiB; measured 35 MiB, and
    # 181 MiB with the broadcast).
    b, hw, n, heads, dim = 2, 512, 256, 2, 8
    enc = Encoding(rope_dim=4, t5_buckets=8, native_frames=16)
    attend = lambda q, k, v, t5, kf: temporal_attention(q, k, v, encoding=enc, method="longdiff", t5_table=t5,
                                                        keyframes=kf, chunk_bytes=1 << 20)
    arg = jax.ShapeDtypeStruct((b, hw, n, heads, dim), jnp.float32)
    compiled = jax.jit(attend).lower(arg, arg, arg, jax.ShapeDtypeStruct((8, heads), jnp.float32),
                                     jax.ShapeDtypeStruct((b, 1, 16), jnp.int32)).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < b * hw * n * n


# ---- mapped RoPE: plane-cover, per-value and per-frequency formulations -------------------------------------------
MAPPED = ["longdiff", "clip", "group-only", "freeloc"]


def _rel_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@functools.lru_cache(maxsize=None)
def _value_and_grad(enc, method, mapped_rope):
    """Output and the gradient of a random projection of it w.r.t. q, k, v and the T5 table, jitted."""
    def f(q, k, v, t5, keyframes, weight):
        out = temporal_attention(q, k, v, encoding=enc, method=method, t5_table=t5, keyframes=keyframes,
                                 mapped_rope=mapped_rope)
        return jnp.sum(out * weight), out
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))


@pytest.mark.parametrize("n", [17, 64, 128])
@pytest.mark.parametrize("name", MAPPED)
def test_mapped_rope_formulations_agree_with_gradients(name, n):
    """The three exact formulations of RoPE under a mapped position, float32: outputs and gradients agree."""
    enc, dim = ENCODINGS["rope_t5"]
    method = PRESETS[name]
    maps = _maps(method, n)
    for path in ("planes", "per_value", "per_frequency"):
        assert rope_path(maps, enc, path) == path
    q, k, v, tables = _inputs(n, dim, seed=5)
    kf = _keyframes(method, n, q.shape[0], 5)
    weight = np.random.default_rng(n).standard_normal(q.shape).astype(np.float32)
    args = (q, k, v, tables["t5_table"], kf, weight)
    (_, by_freq), grads_freq = _value_and_grad(enc, method, "per_frequency")(*args)
    for path in ("planes", "per_value"):
        (_, out), grads = _value_and_grad(enc, method, path)(*args)
        assert _rel_err(out, by_freq) <= 2e-6, f"{name} N={n} {path}: outputs differ by {_rel_err(out, by_freq):.1e}"
        for what, g, gf in zip(["q", "k", "v", "t5"], grads, grads_freq):
            assert _rel_err(g, gf) <= 2e-6, f"{name} N={n} {path}: d/d{what} differs by {_rel_err(g, gf):.1e}"


@pytest.mark.parametrize("mapped_rope", ["planes", "per_value"])
@pytest.mark.parametrize("name", MAPPED)
def test_integer_map_paths_match_reference(name, mapped_rope):
    _check(PRESETS[name], "rope_t5", 17, mapped_rope=mapped_rope)


def _assert_cover_exact(maps):
    planes, index = plane_cover(maps)
    n = maps.shape[-1]
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    assert index.shape == maps.shape and index.min() == 0 and index.max() == len(planes) - 1
    # each entry takes the first plane that holds it: what the program computes from the maps
    np.testing.assert_array_equal(np.asarray(plane_index(jnp.asarray(maps), planes)), index)
    for p, (s, c) in enumerate(planes):
        position = np.broadcast_to(j // s - i // s + c if s else np.full((n, n), c), maps.shape)
        assert np.array_equal(position[index == p], maps[index == p]), (s, c)
    return planes


def test_plane_cover_is_exact_and_small():
    # the counts the module doc quotes, at 128 frames (31 distinct values each)
    counts = {name: len(_assert_cover_exact(_maps(PRESETS[name], 128)))
              for name in ("longdiff", "clip", "group-only", "freeloc")}
    assert counts == {"longdiff": 3, "clip": 3, "group-only": 3, "freeloc": 11}
    # GROUP+SHIFT's planes are the group grid of j - i plus 0 or +-1: s = ceil(127 / 15) = 9
    assert sorted(plane_cover(_maps(PRESETS["longdiff"], 128))[0]) == [(9, -1), (9, 0), (9, 1)]
    # any integer maps: the cover is exact (at worst one constant plane per value)
    rng = np.random.default_rng(3)
    for shape in [(1, 9, 9), (3, 16, 16), (2, 33, 33)]:
        maps = rng.integers(-7, 8, shape)
        assert len(_assert_cover_exact(maps)) <= len(np.unique(maps))


def test_rope_path_choice():
    lavie = Encoding(rope_dim=32, t5_buckets=32, native_frames=16)
    longdiff = _maps(PRESETS["longdiff"], 128)
    assert longdiff.shape[0] == 9 and len(np.unique(longdiff)) == 31
    assert rope_path(longdiff, lavie) == "planes"  # 3 planes < 31 values
    assert rope_path(longdiff, lavie, "per_value") == "per_value"
    assert rope_path(longdiff, Encoding(t5_buckets=32)) == "none"
    assert rope_path(_maps(PRESETS["longdiff-no-pm"], 128), lavie) == "absolute"
    assert rope_path(_maps(PRESETS["interpolate"], 128), lavie) == "absolute"
    # a fractional map that is not a multiple of j - i: only the per-frequency formulation applies
    bent = np.sign(longdiff[:1]) * np.sqrt(np.abs(longdiff[:1]))
    assert rope_path(bent, lavie) == "per_frequency"
    for choice in ("per_value", "planes"):
        with pytest.raises(ValueError, match=f"{choice}.*integer"):
            rope_path(bent, lavie, choice)
    with pytest.raises(ValueError, match="mapped_rope must be one of"):
        rope_path(longdiff, lavie, "per-value")
    # more distinct values than the per-frequency intermediate has planes: per frequency
    wide = np.cumsum(np.ones((1, 48, 48), np.int32), axis=-1) ** 2  # 48 distinct values, one map
    assert rope_path(wide, Encoding(rope_dim=32)) == "per_frequency"
    assert rope_path(wide[..., :20, :20], Encoding(rope_dim=32)) == "per_value"  # no cover smaller than U


# ---- the plane-cover Pallas kernel (interpreted on the CPU) --------------------------------------------------------
@pytest.mark.parametrize("n", [17, 64])
@pytest.mark.parametrize("name", MAPPED)
def test_pallas_kernel_matches_jnp_path(name, n):
    enc, dim = ENCODINGS["rope_t5"]
    method = PRESETS[name]
    q, k, v, tables = _inputs(n, dim, seed=7)
    run = jax.jit(lambda q, k, v, t5, kf, impl: temporal_attention(
        q, k, v, encoding=enc, method=method, t5_table=t5, keyframes=kf, implementation=impl,
        mapped_rope="per_value"), static_argnums=5)
    args = (q, k, v, tables["t5_table"], _keyframes(method, n, 2, 7))
    assert _rel_err(run(*args, "pallas"), run(*args, None)) <= 2e-6


def test_pallas_kernel_lavie_shape_shared_mask_rows_and_gradients():
    """LaVie's head (RoPE on 32 of 40 dims), two leading dims with a per-video mask [B, 1, N, N] whose rows the
    kernel shares over pixels, 80 frames (padded to 128 in the kernel); then RoPE on the whole head without T5
    (no plain part, no bias)."""
    n = 80
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((2, 2, n, 2, 40)).astype(np.float32) for _ in range(3))
    t5 = rng.standard_normal((32, 2)).astype(np.float32)
    mask = rng.random((2, 1, n, n)) < 0.7
    mask[..., np.arange(n), np.arange(n)] = True
    enc = Encoding(rope_dim=32, t5_buckets=32, native_frames=16)

    def value_and_grad(implementation):
        def loss(q, k, v, t5):
            out = temporal_attention(q, k, v, encoding=enc, method="longdiff-no-ifs", t5_table=t5, mask=mask,
                                     implementation=implementation, mapped_rope="per_value")
            return jnp.sum(jnp.sin(out)), out
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, t5)

    (_, kernel), g_kernel = value_and_grad("pallas")
    (_, jnp_path), g_jnp = value_and_grad(None)
    assert _rel_err(kernel, jnp_path) <= 2e-6
    for a, b in zip(g_kernel, g_jnp):  # the backward pass is the jnp path's
        assert _rel_err(a, b) <= 2e-6
    # RoPE on the whole head, no T5 bias, the tiered mask (static), three leading dims
    whole = jax.jit(lambda q, k, v, impl: temporal_attention(
        q, k, v, encoding=Encoding(rope_dim=40, native_frames=16), method="freeloc", implementation=impl,
        mapped_rope="per_value"), static_argnums=3)
    q, k, v = q[:, :, None], k[:, :, None], v[:, :, None]
    assert _rel_err(whole(q, k, v, "pallas"), whole(q, k, v, None)) <= 2e-6


def test_pallas_kernel_slot_average():
    """The kernel's slot average (LongDiff at 64 frames: 5 maps, 2 slots) against one softmax per map in the
    kernel and the float64 reference; its fallback is checked in the underflow test below."""
    enc, dim = ENCODINGS["rope_t5"]
    method = PRESETS["longdiff"]
    q, k, v, tables = _inputs(64, dim, seed=5)
    kf = _keyframes(method, 64, 2, 5)
    ref = _reference(method, enc, q, k, v, tables, kf)
    slots, per_map = (_pallas(enc, method, average)(q, k, v, tables["t5_table"], kf)
                      for average in ("slots", "per_map"))
    assert _rel_err(slots, ref) <= RTOL and _rel_err(slots, per_map) <= 2e-6


def _pallas(enc, method, map_average):
    """Jitted ``(q, k, v, t5, keyframes) -> out`` through the Pallas kernel."""
    return jax.jit(lambda q, k, v, t5, kf: temporal_attention(
        q, k, v, encoding=enc, method=method, t5_table=t5, keyframes=kf, implementation="pallas",
        map_average=map_average))


def test_pallas_kernel_over_key_blocks_equals_one_block():
    """Keys taken 16 at a time (two passes: row maxima and sums, then P @ V) against the kernel's one block and the
    float64 reference: LongDiff's slot average and one softmax per map under IFS, with padded keys in the last
    block; FreeLOC's tiered mask; token-level maps (2 tokens a frame: the slot table is indexed by frame distance);
    the underflow fallback; and a query row that sees no key (NaN either way)."""
    from jaxlongvid.attention.kernels.plane import pallas_forward
    from jaxlongvid.attention.maps import token_maps

    enc, dim = ENCODINGS["rope_t5"]

    def kernel(method, n, average, key_block, tokens=1):
        positions, frames = method.positions, n // tokens
        info = info_of_positions(positions, frames, 16).for_tokens(tokens) if tokens > 1 else \
            info_of_positions(positions, n, 16)
        maps = positions.maps(frames, 16)
        maps = token_maps(maps, tokens) if tokens > 1 else maps
        return jax.jit(lambda q, k, v, t5, mask: pallas_forward(q, k, v, t5, mask, maps, info, enc, interpret=True,
                                                                  average=average, key_block=key_block))

    longdiff = PRESETS["longdiff"]
    q, k, v, tables = _inputs(48, dim, seed=11)
    kf = _keyframes(longdiff, 48, 2, 11)
    mask = masks.ifs_mask(48, kf, 8)
    ref = _reference(longdiff, enc, q, k, v, tables, kf)
    for average in ("slots", "per_map"):
        blocks, one = (kernel(longdiff, 48, average, kb)(q, k, v, tables["t5_table"], mask) for kb in (16, 256))
        assert _rel_err(blocks, ref) <= RTOL and _rel_err(blocks, one) <= 2e-6, average
    freeloc = PRESETS["freeloc"]
    q, k, v, tables = _inputs(40, dim, seed=12)
    tiers = jnp.asarray(freeloc.mask.static(40, np))
    blocks, one = (kernel(freeloc, 40, "per_map", kb)(q, k, v, tables["t5_table"], tiers)
                   for kb in (16, 256))
    assert _rel_err(blocks, _reference(freeloc, enc, q, k, v, tables, None)) <= RTOL
    assert _rel_err(blocks, one) <= 2e-6
    q, k, v, tables = _inputs(48, dim, seed=13)  # 24 frames x 2 tokens
    blocks, one = (kernel(longdiff.replace(mask=None), 48, "slots", kb, tokens=2)(q, k, v, tables["t5_table"], None)
                   for kb in (16, 256))
    assert _rel_err(blocks, one) <= 2e-6
    # the fallback: copies 4 and 5 of rows 0 and 1 lie ~100 below the others (the underflow test's input)
    method, n = Method("g", positions=GroupShift(4)), 17
    q, k, v, tables = _inputs(n, dim)
    t5 = tables["t5_table"].copy()
    t5[int(t5_bucket(np.array(3), 32, 32))] = 100.0
    ref = reference.attention(q, k, v, _maps(method, n), rope_dim=enc.rope_dim, t5_table=t5)
    assert _rel_err(kernel(method, n, "slots", 16)(q, k, v, t5, None), ref) <= RTOL
    # query 5 of sequence 0 sees no key
    q, k, v, tables = _inputs(40, dim, seed=14)
    hidden = np.ones((2, 1, 40, 40), bool)
    hidden[0, 0, 5] = False
    for average in ("slots", "per_map"):
        out = np.asarray(kernel(longdiff, 40, average, 16)(q, k, v, tables["t5_table"], jnp.asarray(hidden)))
        assert np.isnan(out[0, 5]).all() and np.isfinite(np.delete(out[0], 5, axis=0)).all() \
            and np.isfinite(out[1]).all(), average


def test_slot_rows_over_frame_distance_equal_the_dense_table():
    """``distance_rows``: entry (i, j) of a map that depends on the frame distance alone is row ``d + F - 1``; the
    slot choice computed on the rows is the dense one's, at frame and at token level."""
    from jaxlongvid.attention.maps import distance_rows, slot_maps, token_maps

    for frames, tokens in [(40, 1), (12, 3)]:
        maps = token_maps(PRESETS["longdiff"].positions.maps(frames, 16), tokens)
        n = frames * tokens
        rows = np.asarray(distance_rows(maps, tokens))
        d = np.arange(n)[None, :] // tokens - np.arange(n)[:, None] // tokens + frames - 1
        np.testing.assert_array_equal(rows[:, d], np.asarray(maps))
        dense = np.asarray(slot_maps(maps, 2)[1])
        np.testing.assert_array_equal(np.asarray(slot_maps(jnp.asarray(rows)[:, None, :], 2)[1])[:, 0][:, d], dense)


def test_pallas_kernel_lowers_to_triton_for_gpus():
    """No GPU here: check that the kernel lowers for CUDA through Triton (block shapes, ops), not that it runs."""
    from jaxlongvid.attention.kernels.plane import pallas_forward

    enc = Encoding(rope_dim=32, t5_buckets=32, native_frames=16)
    positions = PRESETS["longdiff"].positions
    shape = jax.ShapeDtypeStruct((2, 3, 128, 2, 40), jnp.bfloat16)
    for key_block in (256, 32):  # one block of keys; four, in two passes with the slot table gathered by distance
        forward = lambda q, k, v, t5, mask: pallas_forward(q, k, v, t5, mask, positions.maps(128, 16),
                                                           info_of_positions(positions, 128, 16), enc,
                                                           interpret=False, average="slots", key_block=key_block)
        lowered = jax.jit(forward).trace(shape, shape, shape, jax.ShapeDtypeStruct((32, 2), jnp.float32),
                                         jax.ShapeDtypeStruct((2, 1, 128, 128), jnp.bool_))
        assert "__gpu$xla.gpu.triton" in lowered.lower(lowering_platforms=("cuda",)).as_text()


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
    with pytest.raises(ValueError, match="map_average must be one of"):
        temporal_attention(q, k, v, encoding=enc, t5_table=t5, map_average="slot")


def test_merge_passes_over_disjoint_tiers_equals_one_softmax():
    """FreeLOC-style: the tiers of the tiered mask as separate passes, merged by log-sum-exp."""
    enc, dim = ENCODINGS["rope_t5"]
    q, k, v, tables = _inputs(64, dim)
    t5 = tables["t5_table"]
    method = PRESETS["freeloc"]
    tiered = method.mask.static(64, np)
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


# ---- LongDiff's average over maps: slots (one exp per distinct value) against one softmax per map -----------------
def test_map_slots_recover_every_map():
    rng = np.random.default_rng(4)
    for shape, spread in [((1, 5, 5), 3), ((6, 9, 9), 3), ((4, 16, 16), 1), ((3, 8, 8), 100)]:
        maps = rng.integers(-spread, spread + 1, shape)
        slots, sel = map_slots(maps)
        assert np.array_equal(np.take_along_axis(slots, sel, axis=0), maps)  # every map value recovered exactly
        distinct = np.array([[len(np.unique(maps[:, i, j])) for j in range(shape[2])] for i in range(shape[1])])
        assert len(slots) == distinct.max() and np.array_equal(slots[0], maps[0])
        assert np.array_equal(np.max(sel, axis=0) + 1, distinct)  # each map takes the first slot of its value
        in_program = jax.jit(slot_maps, static_argnums=1)(jnp.asarray(maps), len(slots))
        assert all(np.array_equal(np.asarray(a), b) for a, b in zip(in_program, (slots, sel)))
    for n in (64, 128, 256):  # GROUP+SHIFT: 2 slots, copies 0 and s - 1 (ceil and floor of |d| / s)
        maps = _maps(PRESETS["longdiff"], n)
        slots, _ = map_slots(maps)
        assert len(maps) > 2 and np.array_equal(slots, maps[[0, -1]])


@functools.lru_cache(maxsize=None)
def _averaged(enc, method, map_average, chunk_bytes=None):
    """Output, and the gradient of a random projection of it w.r.t. q, k, v and the tables, jitted."""
    def f(q, k, v, t5, rel_k, rel_v, keyframes, weight):
        out = temporal_attention(q, k, v, encoding=enc, method=method, t5_table=t5, rel_k=rel_k, rel_v=rel_v,
                                 keyframes=keyframes, map_average=map_average, chunk_bytes=chunk_bytes)
        return jnp.sum(out * weight), out
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4, 5), has_aux=True))


LAVIE = Encoding(rope_dim=32, t5_buckets=32, native_frames=16)  # head dim 40


@pytest.mark.parametrize("name, enc_name, n", [
    ("longdiff", "lavie", 17), ("longdiff-no-ifs", "lavie", 64), ("longdiff", "lavie", 128),
    ("longdiff-no-ifs", "lavie", 256), ("longdiff-no-ifs", "rel_kv", 17), ("longdiff", "rel_kv", 64)])
def test_slot_average_equals_one_softmax_per_map(name, enc_name, n):
    """Float32, outputs and gradients: at most 2e-6 relative apart (measured: outputs 3.3e-7, gradients 1.2e-6,
    d/dt5 at 128 frames), except d/dt5 at 256
    frames, 5e-6: a sum over 256 x 256 entries per bucket, where the per-map loop's own error against a float64
    gradient is 3.7e-6 (the slots': 1.0e-6). N = 17 has 2 maps and 2 slots: the slots are forced."""
    enc, dim = (LAVIE, 40) if enc_name == "lavie" else ENCODINGS[enc_name]
    method = PRESETS[name]
    q, k, v, tables = _inputs(n, dim, seqs=1, seed=9)
    weight = np.random.default_rng(n).standard_normal(v.shape).astype(np.float32)
    t = _used_tables(enc, tables)
    args = (q, k, v, t["t5_table"], t["rel_k"], t["rel_v"], _keyframes(method, n, 1, 9), weight)
    (_, slots), g_slots = _averaged(enc, method, "slots")(*args)
    (_, per_map), g_per_map = _averaged(enc, method, "per_map")(*args)
    assert _rel_err(slots, per_map) <= 2e-6, f"outputs differ by {_rel_err(slots, per_map):.1e}"
    for what, a, b in zip(["q", "k", "v", "t5", "rel_k", "rel_v"], g_slots, g_per_map):
        if b is not None:
            tolerance = 5e-6 if what == "t5" and n == 256 else 2e-6
            assert _rel_err(a, b) <= tolerance, f"d/d{what} differs by {_rel_err(a, b):.1e}"


def _gaps(q, k, maps, enc, t5):
    """Float64: each map's row maximum below the common one (over keys and maps), [seqs, heads, maps, N]."""
    logits = np.array([[[reference.logits_one(q[s, :, h], k[s, :, h], p, enc.rope_dim, enc.rope_theta, t5[:, h],
                                              None, 0) for p in maps] for h in range(q.shape[2])]
                       for s in range(q.shape[0])])  # [S, H, M, N, N]
    return logits.max(axis=(2, 4))[:, :, None] - logits.max(axis=4)


def _slot_fits(maps, enc):
    """Jitted ``(q, k, t5) -> fits``: whether the slot average of ``maps`` is kept."""
    info, rope = info_of_array(maps), rope_path(maps, enc)

    def fits(q, k, t5):
        slots, sel = slot_maps(jnp.asarray(maps), info.num_slots)
        return slot_average(logits(q, k, slots, info, enc, t5, None, rope), slots, sel, enc)[2]
    return jax.jit(fits)


def test_slot_average_guards_against_underflow():
    """A map whose row maximum lies far below the common stabiliser: the slot sums are checked, and the call
    takes one softmax per map instead, so outputs stay within RTOL of the float64 reference, gradients too."""
    enc, dim = ENCODINGS["rope_t5"]
    n = 17
    method = Method("g", positions=GroupShift(4))  # 6 maps, 2 slots; relative position +3 is reached in the
    maps = _maps(method, n)  # first rows by copies 0-3 only
    q, k, v, tables = _inputs(n, dim)
    bucket = int(t5_bucket(np.array(3), 32, 32))
    slot_fits = _slot_fits(maps, enc)
    weight = np.random.default_rng(1).standard_normal(v.shape).astype(np.float32)
    for bias, fits_expected in [(14.0, True), (60.0, False), (100.0, False)]:
        t5 = tables["t5_table"].copy()
        t5[bucket] = bias  # copies 4 and 5 of rows 0 and 1 lie ~bias below the others
        gaps = _gaps(q, k, maps, enc, t5)
        fits = slot_fits(q, k, t5)
        assert bool(fits) == fits_expected, bias
        if fits:  # the bound the check guarantees
            assert gaps.max() <= SLOT_GAP_LIMIT + math.log(n)
        else:
            assert gaps.max() > SLOT_GAP_LIMIT
        if bias == 100.0:  # one common stabiliser would leave these maps' largest terms subnormal
            assert np.exp(-gaps.max()) < np.finfo(np.float32).tiny
        ref = reference.attention(q, k, v, maps, rope_dim=enc.rope_dim, t5_table=t5)
        # the Pallas kernel flags the same rows and reruns with one softmax per map
        assert _rel_err(_pallas(enc, method, "slots")(q, k, v, t5, None), ref) <= RTOL, bias
        args = (q, k, v, t5, None, None, None, weight)
        (_, out), grads = _averaged(enc, method, "slots")(*args)  # the fallback's gradient where it is taken
        (_, per_map), per_map_grads = _averaged(enc, method, "per_map")(*args)
        assert _rel_err(out, ref) <= RTOL and _rel_err(per_map, ref) <= RTOL, bias
        for a, b in zip(grads[:4], per_map_grads[:4]):
            assert _rel_err(a, b) <= 2e-6, bias
    # huge q and k norms (logits up to ~100, gaps far above the limit), IFS mask; chunked (one sequence per
    # lax.map step: the fallback stays a branch) and under vmap (a select of both) alike
    q, k, v, tables = _inputs(40, dim, seed=2)
    q, k = q * 6, k * 6
    method = PRESETS["longdiff"]
    kf = _keyframes(method, 40, 2, 2)
    assert not _slot_fits(_maps(method, 40), enc)(q, k, tables["t5_table"])
    ref = _reference(method, enc, q, k, v, tables, kf)
    kw = dict(encoding=enc, method=method, t5_table=tables["t5_table"])
    attend = lambda q, k, v, kf: temporal_attention(q, k, v, keyframes=kf, chunk_bytes=1, **kw)
    assert _rel_err(jax.jit(attend)(q, k, v, kf), ref) <= RTOL
    batched = jax.jit(jax.vmap(attend))(q[:, None], k[:, None], v[:, None], kf[:, None])[:, 0]
    assert _rel_err(batched, ref) <= RTOL


# ---- token-level attention (video DiTs): F frames x T tokens ------------------------------------------------------
@pytest.mark.parametrize("name", ["direct", "longdiff", "freeloc", "interpolate"])
def test_token_level_attention_applies_frame_maps_to_token_blocks(name):
    """Every token of frame f takes frame f's positions and mask: the float64 reference under the frame maps
    and masks expanded to T x T token blocks; the Pallas kernel (where it applies) agrees with the jnp path."""
    enc, dim = ENCODINGS["rope_t5"]
    frames, t = 20, 3
    method = PRESETS[name]
    q, k, v, tables = _inputs(frames * t, dim, seed=4)
    kf = _keyframes(method, frames, 2, 4)
    blocks = lambda a: np.repeat(np.repeat(a, t, axis=-2), t, axis=-1)
    mask = None if method.mask is None else method.mask.static(frames, np)
    if kf is not None:
        mask = np.asarray(masks.ifs_mask(frames, kf, method.mask.window))
    ref = reference.attention(q, k, v, blocks(_maps(method, frames)), None if mask is None else blocks(mask),
                              **_ref_kwargs(enc, tables))
    run = jax.jit(lambda q, k, v, t5, kf, impl: temporal_attention(
        q, k, v, encoding=enc, method=method, t5_table=t5, keyframes=kf, tokens_per_frame=t, implementation=impl),
        static_argnums=5)
    got = run(q, k, v, tables["t5_table"], kf, None)
    assert _rel_err(got, ref) <= RTOL
    if name in ("longdiff", "freeloc"):
        assert _rel_err(run(q, k, v, tables["t5_table"], kf, "pallas"), got) <= 2e-6
    with pytest.raises(ValueError, match="tokens_per_frame must be an int >= 1 that divides"):
        temporal_attention(q, k, v, encoding=enc, t5_table=tables["t5_table"], tokens_per_frame=7)
    with pytest.raises(ValueError, match="spatial_shape \\(2, 2\\) does not match 3 tokens per frame"):
        temporal_attention(q, k, v, encoding=enc, t5_table=tables["t5_table"], method="freelong", tokens_per_frame=3,
                           spatial_shape=(2, 2))


# ---- the plan: kernels per backend; the plane kernel's TPU build ---------------------------------------------------
def test_auto_plan_picks_kernels_per_backend():
    from jaxlongvid.attention import make_plan

    lavie = Encoding(rope_dim=32, t5_buckets=32, native_frames=16)
    longdiff = info_of_positions(PRESETS["longdiff"].positions, 128, 16)
    direct = info_of_positions(PRESETS["direct"].positions, 128, 16)
    plan = lambda info, backend, dtype="bfloat16", rel=(False, False): make_plan(
        info, lavie, 4096, 8, 40, dtype, rel, "auto", backend=backend)
    assert (plan(longdiff, "gpu").kernel, plan(longdiff, "gpu").implementation) == ("pallas", "gpu")
    assert (plan(direct, "gpu").kernel, plan(direct, "gpu").implementation) == ("fused", "cudnn")
    assert plan(direct, "gpu", "float32").kernel == "jnp"  # cuDNN takes half precision only
    assert plan(longdiff, "gpu", rel=(True, True)).kernel == "jnp"  # the kernel has no relative tables
    long = info_of_positions(PRESETS["longdiff"].positions, 1024, 16)
    assert plan(long, "gpu").kernel == "jnp" and plan(long, "gpu").chunk > 0  # beyond the kernel's measured range
    chosen = lambda info, impl: make_plan(info, lavie, 4096, 8, 40, "bfloat16", (False, False), impl, backend="gpu")
    assert chosen(long, "pallas").kernel == "pallas"  # asked for: at any length
    assert (chosen(direct, "pallas").kernel, chosen(direct, "pallas").implementation) == ("fused", "cudnn")
    assert (plan(longdiff, "tpu").kernel, plan(longdiff, "tpu").implementation) == ("pallas", "tpu")
    assert plan(direct, "tpu").kernel == plan(longdiff, "cpu").kernel == "jnp"
    assert (plan(longdiff, "cpu").rope, plan(longdiff, "cpu").average) == ("planes", "slots")
    with pytest.raises(ValueError, match="implementation must be one of"):
        make_plan(direct, lavie, 1, 8, 40, "float32", (False, False), "flash")


def test_plane_kernel_tpu_build_lowers_to_mosaic_and_matches_in_interpret_mode():
    """No TPU here: the TPU build (128-query blocks, Mosaic parameters) lowers for TPUs, and interpreted it
    equals the jnp path."""
    from jaxlongvid.attention.kernels.plane import pallas_forward

    enc, dim = ENCODINGS["rope_t5"]
    positions = PRESETS["longdiff"].positions
    q, k, v, tables = _inputs(64, dim, seed=7)
    kf = _keyframes(PRESETS["longdiff"], 64, 2, 7)
    mask = masks.ifs_mask(64, kf, 8)

    def tpu_kernel(q, k, v, t5, mask, interpret):
        return pallas_forward(q, k, v, t5, mask, positions.maps(64, 16), info_of_positions(positions, 64, 16), enc,
                              interpret=interpret, average="slots", target="tpu")

    got = jax.jit(functools.partial(tpu_kernel, interpret=True))(q, k, v, tables["t5_table"], mask)
    want = temporal_attention(q, k, v, encoding=enc, method="longdiff", t5_table=tables["t5_table"], keyframes=kf)
    assert _rel_err(got, want) <= 2e-6
    lowered = jax.jit(functools.partial(tpu_kernel, interpret=False)).trace(
        q, k, v, tables["t5_table"], mask).lower(lowering_platforms=("tpu",))
    assert "tpu_custom_call" in lowered.as_text()


def test_module_resolves_a_plan_by_its_own_path():
    """One MethodPlan passed unchanged to every layer: each runs the Method of its path in the model."""
    import flax.linen as nn

    from jaxlongvid.methods import MethodPlan

    enc = Encoding(rope_dim=8, t5_buckets=32, native_frames=8)

    class Nested(nn.Module):
        method: object

        @nn.compact
        def __call__(self, x):
            x = x + TemporalAttention(2, 8, enc, self.method, name="first")(x)
            return x + Inner(self.method, name="block")(x)

    class Inner(nn.Module):
        method: object

        @nn.compact
        def __call__(self, x):
            return TemporalAttention(2, 8, enc, self.method, name="second")(x)

    x = jax.random.normal(jax.random.key(0), (1, 20, 2, 2, 16))
    plan = MethodPlan(default=PRESETS["direct"], layers=(("block/second", PRESETS["freeloc"]),))
    planned = Nested(plan)
    params = planned.init(jax.random.key(1), x)
    out = planned.apply(params, x)

    class Split(nn.Module):  # the same layers and parameters with the methods given per layer
        @nn.compact
        def __call__(self, x):
            x = x + TemporalAttention(2, 8, enc, PRESETS["direct"], name="first")(x)
            return x + Inner(PRESETS["freeloc"], name="block")(x)

    np.testing.assert_allclose(out, Split().apply(params, x), rtol=1e-6, atol=1e-6)
    assert np.max(np.abs(out - Nested(PRESETS["direct"]).apply(params, x))) > 1e-4  # the routing matters
