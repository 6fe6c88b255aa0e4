"""Position maps, masks, keyframes, noise and the spectral blend against hand-worked cases and references."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from jaxlongvid import keyframes, masks, noise, positions, spectral
from jaxlongvid.methods import (IFS, PRESETS, VRPR, Clip, FreeNoiseWindows, Group, GroupShift, Identity,
                                Interpolate, Method, MethodPlan, Window, as_plan, get_method, parse_method)


# ---- position maps -------------------------------------------------------------------------------------------
def test_identity_and_clip_hand_worked():
    np.testing.assert_array_equal(positions.identity(3), [[0, 1, 2], [-1, 0, 1], [-2, -1, 0]])
    np.testing.assert_array_equal(positions.clip(4, 2)[0], [0, 1, 2, 2])
    np.testing.assert_array_equal(positions.clip(4, 2)[3], [-2, -2, -1, 0])


def test_group_hand_worked():
    # N = 7, G = 3: s = ceil(6 / 2) = 3; d = 0..6 -> 0, 1, 1, 1, 2, 2, 2
    np.testing.assert_array_equal(positions.group(7, 3)[0], [0, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(positions.group(7, 3)[6], [-2, -2, -2, -1, -1, -1, 0])
    # paper default: N = 128, G = 16 -> s = 9, groups -15..15
    assert positions.group_size(128, 16) == 9
    g = positions.group(128, 16)
    assert g.min() == -15 and g.max() == 15


def test_group_shift_hand_worked():
    p = positions.group_shift(7, 3)  # s = 3 copies
    assert p.shape == (3, 7, 7) and p.dtype == np.int32
    # row 0 (d = j): copy m is ceil(max(d - m, 0) / 3)
    np.testing.assert_array_equal(p[0, 0], [0, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(p[1, 0], [0, 0, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(p[2, 0], [0, 0, 0, 1, 1, 1, 2])
    # the lower triangle shifts down: column 0 of copy 1 is the negated row
    np.testing.assert_array_equal(p[1, :, 0], -p[1, 0])


@pytest.mark.parametrize("n,g", [(16, 16), (17, 16), (64, 16), (128, 16), (100, 7), (33, 5)])
def test_group_shift_properties(n, g):
    p = positions.group_shift(n, g)
    s = positions.group_size(n, g)
    assert p.shape == (s, n, n)
    np.testing.assert_array_equal(p, -np.swapaxes(p, 1, 2))  # antisymmetric in every copy
    assert np.abs(p).max() <= g - 1  # inside the trained range
    np.testing.assert_array_equal(p[0], positions.group(n, g))
    # the assignment record identifies the distance: distinct d <-> distinct tuples, equal d <-> equal tuples
    d = positions.distance(n)
    records = {}
    for i in range(n):
        for j in range(n):
            rec = tuple(p[:, i, j])
            assert records.setdefault(rec, d[i, j]) == d[i, j]
    assert len(records) == 2 * n - 1


def test_group_shift_rejects_short_video():
    with pytest.raises(ValueError, match="num_frames"):
        positions.group_shift(8, 16)
    with pytest.raises(ValueError, match="num_groups"):
        positions.group_shift(16, 1)


def test_interpolate():
    p = positions.interpolate(31, 16)
    assert p.dtype == np.float32
    np.testing.assert_allclose(p[0, -1], 15.0)
    np.testing.assert_allclose(p[0, 2], 1.0)
    np.testing.assert_array_equal(positions.interpolate(8, 16), positions.identity(8))


def test_vrpr_hand_worked():
    # W1, W2, G1, G2 = 10, 14, 2, 8, cap 15
    row = positions.vrpr(60, 10, 14, 2, 8, 15)[0]
    expected = []
    for d in range(60):
        if d < 10:
            expected.append(d)
        elif d < 14:
            expected.append(10 + (d - 10) // 2)
        else:
            expected.append(min(15, 14 - 2 + (d - 14) // 8))
    np.testing.assert_array_equal(row, expected)
    p = positions.vrpr(60, 10, 14, 2, 8, 15)
    np.testing.assert_array_equal(p, -p.T)
    # monotone in |d| (no distance falls in a gap) and capped
    assert np.all(np.diff(row) >= 0) and row.max() == 15


def test_t5_bucket_matches_reference_and_fixture_table():
    d = np.arange(-40, 41)
    got = positions.t5_bucket(d)
    np.testing.assert_array_equal(got, [reference.t5_bucket_one(int(x)) for x in d])
    # the fixture README's table: d <= 0 halves and d > 0 halves
    table = {0: 0, 1: 1, 7: 7, 8: 8, 9: 8, 10: 9, 12: 10, 14: 11, 16: 12, 19: 12, 20: 13, 22: 13, 23: 14}
    for m, b in table.items():
        assert positions.t5_bucket(np.array([-m]))[0] == b
        if m:
            assert positions.t5_bucket(np.array([m]))[0] == b + 16


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_window_names_parameter(bad):
    with pytest.raises((ValueError, TypeError), match="window"):
        masks.window(8, bad)


# ---- masks ---------------------------------------------------------------------------------------------------
def test_tiered_mask_hand_worked():
    m = masks.tiered(12, [(2, 1), (6, 2)], sink_frames=1)
    row5 = [j for j in range(12) if m[5, j]]
    # dense |d| <= 2: 3..7; stride-2 tier 2 < |d| <= 6: d = -4, 4, 6 -> 1, 9, 11; sink 0
    assert row5 == [0, 1, 3, 4, 5, 6, 7, 9, 11]
    with pytest.raises(ValueError, match="increasing"):
        masks.tiered(12, [(6, 1), (2, 2)])


def test_ifs_mask_matches_loops():
    n, window = 20, 3
    kf = np.array([[2, 9, 17], [0, 11, 19]])
    got = np.asarray(masks.ifs_mask(n, kf, window))
    for b in range(2):
        for i in range(n):
            for j in range(n):
                assert got[b, i, j] == (abs(i - j) <= window or j in kf[b])


def test_local_window_edges():
    m = masks.local_window(30, 8)
    assert np.all(m.sum(1) == 17)
    assert m[0, :17].all() and m[29, 13:].all() and m[15, 7:24].all() and not m[15, 6]


def test_context_windows():
    assert masks.context_windows(24, 16, 4) == [(0, 16), (4, 20), (8, 24)]
    assert masks.context_windows(26, 16, 4) == [(0, 16), (4, 20), (8, 24), (10, 26)]
    assert masks.context_windows(10, 16, 4) == [(0, 10)]
    np.testing.assert_array_equal(masks.pyramid_weights(6), [1, 2, 3, 3, 2, 1])


# ---- keyframes -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,segments", [(16, 1), (64, 4), (50, 3)])
def test_keyframes_match_reference(n, segments):
    rng = np.random.default_rng(n)
    feats = rng.standard_normal((n, 6, 20)).astype(np.float32) * rng.uniform(0.2, 3, (n, 1, 1))
    channels_last = feats.transpose(0, 2, 1)  # [N, hw, C]
    got = np.asarray(jax.jit(keyframes.select_keyframes, static_argnums=1)(channels_last, segments))
    np.testing.assert_array_equal(got, reference.keyframes(feats, segments))
    assert got.dtype == np.int32 and got.shape == (segments,)


def test_keyframes_pick_the_informative_frame():
    feats = np.zeros((32, 16, 4), np.float32)
    feats[20] = np.random.default_rng(0).standard_normal((16, 4))  # one textured frame in segment 1
    got = np.asarray(keyframes.select_keyframes(feats, 2))
    assert got[1] in (20, 21)  # itself (entropy) or its successor (largest difference back to flat)
    with pytest.raises(ValueError, match="num_segments"):
        keyframes.select_keyframes(feats, 40)


# ---- noise and spectral blend -----------------------------------------------------------------------------------
def test_freenoise_noise_structure():
    shape, w, s = (2, 30, 3, 3, 4), 8, 3
    x = np.asarray(noise.freenoise(jax.random.key(0), shape, w, s))
    base = np.asarray(jax.random.normal(jax.random.split(jax.random.key(0))[0], shape))
    np.testing.assert_array_equal(x[:, :w], base[:, :w])  # the first window is fresh noise
    for k in range(w, 30, s):
        length = min(s, 30 - k)
        src = {x[0, f].tobytes() for f in range(k - w, k - w + s)}
        assert all(x[0, f].tobytes() in src for f in range(k, k + length))
        # and the same permutation for every batch element
        idx = [next(f for f in range(k - w, k - w + s) if np.array_equal(x[0, f], x[0, t])) for t in
               range(k, k + length)]
        for t, f in zip(range(k, k + length), idx):
            np.testing.assert_array_equal(x[1, t], x[1, f])
    again = np.asarray(noise.freenoise(jax.random.key(0), shape, w, s))
    np.testing.assert_array_equal(x, again)
    assert not np.array_equal(x, np.asarray(noise.freenoise(jax.random.key(1), shape, w, s)))


def test_freelong_blend_matches_reference():
    rng = np.random.default_rng(0)
    g, loc = rng.standard_normal((2, 2, 9, 5, 6, 3))
    got = np.asarray(spectral.freelong_blend(jnp.asarray(g, jnp.float32), jnp.asarray(loc, jnp.float32),
                                             0.25, 0.4))
    for b in range(2):
        ref = reference.freelong_blend(g[b], loc[b], 0.25, 0.4)
        np.testing.assert_allclose(got[b], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(spectral.freelong_blend(jnp.asarray(g), jnp.asarray(g)), g, atol=1e-5)


# ---- methods -----------------------------------------------------------------------------------------------------
def test_presets_and_errors():
    assert {"direct", "freenoise", "freelong", "longdiff", "freeloc", "longdiff-no-pm", "longdiff-no-ifs",
            "clip", "interpolate", "group-only"} <= set(PRESETS)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_method("nope")
    with pytest.raises(ValueError, match="Method.mask must be one of"):
        Method(mask="sparse")
    with pytest.raises(ValueError, match="Window.radius must be >= 0"):
        Window(-1)
    with pytest.raises(ValueError, match="GroupShift.num_groups must be >= 2"):
        GroupShift(1)
    with pytest.raises(ValueError, match="cannot be combined with an IFS mask"):
        Method(merge=FreeNoiseWindows(), mask=IFS())
    assert hash(PRESETS["longdiff"]) == hash(Method("longdiff", positions=GroupShift(), mask=IFS()))
    ld = PRESETS["longdiff"]
    assert ld.positions.maps(128, 16).shape == (9, 128, 128)
    assert ld.positions.maps(16, 16).shape == (1, 16, 16)  # native length: identity
    assert ld.mask.segments(128, 16) == 8 and ld.needs_keyframes
    assert math.isclose(PRESETS["freelong"].merge.d_t, 0.25)


def test_plan_routes_by_layer_path():
    ld = PRESETS["longdiff"]
    plan = MethodPlan(default=PRESETS["freeloc"], layers=((0, PRESETS["direct"]), ("up.1", ld)))
    resolved = plan.resolve(("down.0", "mid.0", "up.1"))
    assert resolved.layers == (("down.0", PRESETS["direct"]), ("up.1", ld))
    assert [resolved.for_layer(p).name for p in ("down.0", "mid.0", "up.1")] == ["direct", "freeloc", "longdiff"]
    with pytest.raises(ValueError, match="resolve the plan"):
        plan.for_layer("up.1")
    with pytest.raises(ValueError, match="MethodPlan names temporal layer 3, but this model has 3"):
        MethodPlan(layers=((3, ld),)).resolve(("a", "b", "c"))
    with pytest.raises(ValueError, match="unknown temporal layer 'up.9'"):
        MethodPlan(layers=(("up.9", ld),)).resolve(("a",))
    assert as_plan("longdiff").for_layer("anything") is ld


POSITIONS = [Identity(), Clip(), Clip(5), Interpolate(), Group(), Group(7), GroupShift(), GroupShift(5), VRPR(),
             VRPR(5, 9, 3, 5)]


@pytest.mark.parametrize("part", POSITIONS, ids=repr)
def test_position_parts_one_formula_numpy_jnp_traced_and_profile(part):
    """Every part's maps: NumPy, eager jnp and jnp traced under jit agree (exactly for integer maps; the
    fractional Interpolate map to float32 rounding: NumPy divides in float64), depend on j - i alone (the
    profile over the 2N-1 distances), and a closed-form plane cover is exact."""
    for n in (9, 16, 17, 40, 129):
        want = part.maps(n, 16, np)
        for got in (part.maps(n, 16), jax.jit(lambda: part.maps(n, 16))()):
            assert got.dtype == want.dtype
            np.testing.assert_allclose(np.asarray(got), want, rtol=1.2e-7, atol=0)
        profile = part.profile(n, 16)
        d = np.arange(n)[None, :] - np.arange(n)[:, None]
        np.testing.assert_array_equal(profile[:, d + n - 1], want)
        if n <= 16:  # at most the native length: every part is the model's own positions
            np.testing.assert_array_equal(want, d[None])
        planes = part.planes(n, 16)
        if planes is not None:
            i, j = np.arange(n)[:, None], np.arange(n)[None, :]
            covered = np.zeros(want.shape, bool)
            for s, c in planes:
                covered |= want == (j // s - i // s + c)
            assert covered.all(), (n, planes)


def test_preset_maps_equal_the_contract_functions():
    np.testing.assert_array_equal(PRESETS["longdiff"].positions.maps(128, 16, np), positions.group_shift(128, 16))
    np.testing.assert_array_equal(PRESETS["freeloc"].positions.maps(64, 16, np)[0],
                                  positions.vrpr(64, 10, 14, 2, 8, 15))
    np.testing.assert_array_equal(PRESETS["clip"].positions.maps(40, 16, np)[0], positions.clip(40, 15))
    np.testing.assert_array_equal(PRESETS["interpolate"].positions.maps(40, 16, np)[0],
                                  positions.interpolate(40, 16))
    np.testing.assert_array_equal(np.asarray(PRESETS["freeloc"].mask.static(64)),
                                  masks.tiered(64, ((8, 1), (24, 4)), 1))
    np.testing.assert_array_equal(np.asarray(PRESETS["sliding-window"].mask.static(30)), masks.window(30, 8))
    np.testing.assert_array_equal(np.asarray(masks.local_window(30, 8, jnp)), masks.local_window(30, 8))


def test_parse_method_specs_and_probe_files(tmp_path):
    assert parse_method("longdiff") is PRESETS["longdiff"]
    m = parse_method("longdiff:num_groups=8:window=4")
    assert m == Method("longdiff[num_groups=8,window=4]", positions=GroupShift(8), mask=IFS(window=4))
    assert parse_method(" longdiff : window = 4, num_groups=8 ") == m  # ',' separates too; canonical name
    f = parse_method("freeloc:w1=12:tiers=((8,1),(32,4))")
    assert f.positions == VRPR(12, 14, 2, 8) and f.mask.tiers == ((8, 1), (32, 4))
    assert f.name == "freeloc[w1=12,tiers=((8,1),(32,4))]"
    g = parse_method("freelong:d_s=1")
    assert isinstance(g.merge.d_s, float) and g.merge.d_s == 1.0
    w = parse_method("sliding-window:mask=ifs:num_segments=None")
    assert w.mask == IFS() and w.name == "sliding-window[mask=ifs,num_segments=None]"
    fn = parse_method("freenoise:stride=8")  # one key sets every part that has the field
    assert fn.merge.stride == 8 and fn.noise.stride == 8
    assert parse_method("freenoise:merge.stride=8").noise.stride == 4
    for spec, message in [("longdiff:group_size=8", "unknown Method field.*'group_size'"),
                          ("longdiff:window=4.5", "window must be an integer"),
                          ("longdiff:window", "expected KEY=VALUE"),
                          ("longdiff:window=4:window=2", "given twice"),
                          ("longdif:window=4", "unknown method 'longdif'"),
                          ("longdiff:mask=diagonal", "Method.mask must be one of"),
                          ("freeloc:tiers=(8,1)", "tiers must be a tuple of"),
                          ("freeloc:w1=(1,2", "unbalanced parentheses"),
                          ("freenoise:mask=ifs", "cannot be combined")]:
        with pytest.raises(ValueError, match=message):
            parse_method(spec)
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"routes": {"a/attn1": "freeloc", "a/attn2": "direct", "b/attn1": "vrpr"}}))
    plan = parse_method(str(probe))
    assert plan.for_layer("a/attn1") == PRESETS["freeloc"] and plan.for_layer("a/attn2") == PRESETS["direct"]
    assert plan.for_layer("b/attn1").positions == VRPR() and plan.for_layer("b/attn1").mask is None
    with pytest.raises(ValueError, match="does not exist"):
        parse_method(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(ValueError, match="not a probe result"):
        parse_method(str(tmp_path / "bad.json"))
