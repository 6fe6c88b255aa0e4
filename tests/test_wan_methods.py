"""Long-video methods on the Wan DiT: token-level 3D-RoPE attention under a method's frame maps and masks against a
float64 NumPy reference that rotates every channel pair of every token pair explicitly, the whole tiny transformer
against the same model whose self-attention is that reference, and the identities (methods inside their dense
range, RIFLEx and FreeLOC's plan at the native length equal direct).

Tolerances: attention max |out - ref| / max |ref| <= 1e-5 (float32 vs float64); whole network 1e-4.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from jaxlongvid.attention import Encoding, info_of_positions, temporal_attention
from jaxlongvid.methods import (IFS, PLAN_PRESETS, PRESETS, VRPR, Clip, FreeLongBlend, FreeNoiseWindows, Group,
                                GroupShift, Identity, Interpolate, Method, MethodPlan, RIFLEx, Tiered, Window,
                                intrinsic_frequency, parse_method, vrpr_setting)
from jaxlongvid.keyframes import select_keyframes
from jaxlongvid.models import wan
from jaxlongvid.models.wan import (WanConfig, WanTransformer, frame_encoding, rope_split, self_attention,
                                   temporal_layer_names, token_keyframes)

ATTENTION_RTOL = 1e-5
NETWORK_RTOL = 1e-4
N0 = 4  # the tiny model's native latent frames
CONFIG = WanConfig(patch_size=(1, 2, 2), num_heads=2, head_dim=24, in_channels=4, out_channels=4, text_dim=8,
                   freq_dim=16, ffn_dim=16, num_layers=2, native_frames=N0)  # RoPE parts 8 / 8 / 8
GRID = (9, 2, 2)  # 9 latent frames (> 2 N0) of 2 x 2 tokens
TINY_FRESH = Method("freeloc-tiny", positions=VRPR(2, 4, 2, 2), mask=Tiered(((2, 1), (6, 2)), 1))
METHODS = [
    PRESETS["direct"],
    Method("clip", positions=Clip(), mask=IFS(window=2, num_segments=2)),
    Method("interpolate", positions=Interpolate(), mask=IFS(window=1)),
    Method("group", positions=Group()),
    Method("longdiff", positions=GroupShift(), mask=IFS(window=2)),
    TINY_FRESH,
    Method("vrpr-per-length", positions=VRPR(None, None, None, None)),
    Method("window", mask=Window(2)),
    PRESETS["riflex"],
    Method("riflex-k2-tiered", positions=RIFLEx(k=2), mask=Tiered(((3, 1),), 2)),
]


# ---- the float64 reference ---------------------------------------------------------------------------------------
def reference_frame_mask(method: Method, f: int, keyframes) -> np.ndarray:
    """bool [B or 1, f, f] written out from the papers' rules (not from ``masks.py``)."""
    i, j = np.meshgrid(np.arange(f), np.arange(f), indexing="ij")
    a = np.abs(j - i)
    mask = method.mask
    if mask is None:
        return np.ones((1, f, f), bool)
    if isinstance(mask, Window):
        return (a <= mask.radius)[None]
    if isinstance(mask, IFS):
        return np.stack([(a <= mask.window) | np.isin(j, row) for row in np.asarray(keyframes)])  # [B, f, f]
    if isinstance(mask, Tiered):
        keep = np.zeros((f, f), bool)
        for x in range(f):
            for y in range(f):
                tier = next((t for t in mask.tiers if a[x, y] <= t[0]), None)
                keep[x, y] = (tier is not None and a[x, y] % tier[1] == 0) or y < mask.sink_frames
        return keep[None]
    raise AssertionError(mask)


def reference_frame_freqs(method: Method, f: int, fw: int, theta: float) -> np.ndarray:
    """The frame RoPE frequencies; RIFLEx beyond N0: component k (its ``k`` or the one whose period
    round(2 pi / freq) is closest to N0) set to 0.9 * 2 pi / f."""
    freqs = 1.0 / theta ** (np.arange(0, fw, 2, dtype=np.float64) / fw)
    if isinstance(method.positions, RIFLEx) and f > N0:
        k = method.positions.k or 1 + int(np.argmin(np.abs(np.rint(2 * np.pi / freqs) - N0)))
        freqs[k - 1] = 0.9 * 2 * np.pi / f
    return freqs


def reference_attention(q, k, v, grid, method: Method, keyframes=None, theta: float = 10000.0,
                        extra_frame_mask=None) -> np.ndarray:
    """float64 ``[B, S, H, D]``: for every token pair (a, b) each channel pair of k_b is rotated by its own
    relative angle -- frame pairs by ``P[f_a, f_b] * freq``, height and width pairs by ``(y_b - y_a) * freq`` and
    ``(x_b - x_a) * freq`` -- and dotted with q_a; softmax per map (masked keys -inf), probabilities averaged
    over the maps."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    f, h, w = grid
    d = q.shape[-1]
    fw, hw, ww = rope_split(d)
    fa, ya, xa = np.unravel_index(np.arange(f * h * w), grid)
    maps = np.asarray(method.positions.maps(f, N0, np), np.float64)  # [M, f, f]
    frame_mask = reference_frame_mask(method, f, keyframes)
    if extra_frame_mask is not None:
        frame_mask = frame_mask & extra_frame_mask
    mask = frame_mask[:, fa][:, :, fa]  # [B or 1, S, S]: token blocks
    frame_freqs = reference_frame_freqs(method, f, fw, theta)
    axis_freqs = lambda width: 1.0 / theta ** (np.arange(0, width, 2, dtype=np.float64) / width)
    spatial = np.concatenate([(ya[None, :] - ya[:, None])[..., None] * axis_freqs(hw),
                              (xa[None, :] - xa[:, None])[..., None] * axis_freqs(ww)], -1)  # [S, S, (hw+ww)/2]
    probs = 0.0
    for pmap in maps:
        frame = pmap[fa][:, fa][..., None] * frame_freqs  # [S, S, fw/2]
        angle = np.concatenate([frame, spatial], -1)  # [S, S, d/2]
        cos, sin = np.cos(angle)[None, :, :, None], np.sin(angle)[None, :, :, None]  # [1, S, S, 1, d/2]
        ka, kb = k[:, None, :, :, 0::2], k[:, None, :, :, 1::2]  # [B, 1, S, H, d/2]
        rotated = np.stack([ka * cos - kb * sin, kb * cos + ka * sin], -1).reshape(ka.shape[:1] + angle.shape[:2]
                                                                                    + k.shape[-2:])
        logits = np.einsum("bihd,bijhd->bhij", q, rotated) / np.sqrt(d)
        logits = np.where(mask[:, None], logits, -np.inf)
        e = np.exp(logits - logits.max(-1, keepdims=True))
        probs = probs + e / e.sum(-1, keepdims=True) / len(maps)
    return np.einsum("bhij,bjhd->bihd", probs, v)


def relative_error(out, ref) -> float:
    return float(np.max(np.abs(np.asarray(out, np.float64) - ref)) / np.max(np.abs(ref)))


def random_qkv(seed: int, grid=GRID, batch: int = 2):
    s = int(np.prod(grid))
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return [jax.random.normal(key, (batch, s, CONFIG.num_heads, CONFIG.head_dim)) for key in keys]


# ---- token-level attention ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("implementation", [None, "xla", "pallas"], ids=["jnp", "by-query-frame", "block-sparse"])
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_token_attention_matches_reference(method, implementation):
    """The jnp path over token maps, the fused path one query frame at a time (``attend_fused_frames``), and the
    block-sparse Pallas kernel (``kernels.sparse``, interpreted)."""
    q, k, v = random_qkv(1)
    keyframes = None
    if method.needs_keyframes:
        segments = method.mask.segments(GRID[0], N0)
        keyframes = jnp.asarray(np.stack([np.arange(segments) * 2, np.arange(segments) * 2 + 1]) % GRID[0])
    with jax.default_matmul_precision("highest"):
        out = self_attention(q, k, v, GRID, method, frame_encoding(CONFIG), keyframes, implementation)
    err = relative_error(out, reference_attention(q, k, v, GRID, method, keyframes))
    assert err < ATTENTION_RTOL, (method.name, err)


@pytest.mark.parametrize("budget", ["one frame", "a remainder"])
def test_query_frames_in_groups_equal_one_step_over_all(monkeypatch, budget):
    """``attend_fused_frames`` with a byte budget of one query frame per step, and of groups that leave a remainder
    of the 9 frames, gives what one step over all frames gives."""
    from jaxlongvid.attention.kernels import fused

    q, k, v = random_qkv(5)
    method = PRESETS["freeloc"]  # a mask: the gathered path
    run = lambda: np.asarray(self_attention(q, k, v, GRID, method, frame_encoding(CONFIG), None, "xla"))
    whole = run()
    groups, lax_map = [], jax.lax.map
    monkeypatch.setattr(jax.lax, "map", lambda f, xs, batch_size: groups.append(batch_size) or lax_map(
        f, xs, batch_size=batch_size))
    monkeypatch.setattr(fused, "FRAMES_CALL_BYTES", 0 if budget == "one frame" else 120_000)
    grouped = run()
    assert len(groups) == 1 and (groups[0] == 1 if budget == "one frame" else GRID[0] % groups[0] != 0), groups
    np.testing.assert_allclose(grouped, whole, rtol=0, atol=1e-6 * np.abs(whole).max())


def test_methods_inside_their_dense_range_equal_direct_exactly():
    """Tiers whose dense tier covers every distance, and RIFLEx at the native length, are direct bit for bit;
    VRPR under a window inside its dense range |d| < W1 (all visible distances unchanged) equals direct + window."""
    q, k, v = random_qkv(2)
    enc = frame_encoding(CONFIG)
    run = lambda method, grid=GRID, x=(q, k, v): np.asarray(self_attention(*x, grid, method, enc))
    direct = run(PRESETS["direct"])
    np.testing.assert_array_equal(run(Method("dense-tiers", mask=Tiered(((8, 1), (24, 4)), 1))), direct)
    native = (4, 2, 2)
    small = random_qkv(3, native)
    np.testing.assert_array_equal(run(PRESETS["riflex"], native, small), run(PRESETS["direct"], native, small))
    windowed = run(Method("w", mask=Window(2)))
    vrpr = run(Method("vw", positions=VRPR(3, 5, 2, 2), mask=Window(2)))
    np.testing.assert_allclose(vrpr, windowed, rtol=0, atol=1e-6 * np.abs(windowed).max())
    assert relative_error(run(Method("v", positions=VRPR(3, 5, 2, 2))), direct.astype(np.float64)) > 1e-3


def test_riflex_lowers_the_intrinsic_frequency():
    """Wan2.1's frame RoPE (44 channels, theta 1e4): periods 6, 10, 14, 22, 34 ... latent frames; the one closest
    to the 21 native frames is k = 4, lowered to 0.9 * 2 pi / N beyond N0."""
    enc = frame_encoding(WanConfig.wan_1_3b())
    assert enc.rope_dim == 44 and intrinsic_frequency(enc.rope_freqs(), 21) == 4
    long = RIFLEx().encoding_at(enc, 81, 21).rope_freqs()
    expected = enc.rope_freqs()
    expected[3] = 0.9 * 2 * np.pi / 81
    np.testing.assert_array_equal(long, expected)
    assert RIFLEx().encoding_at(enc, 21, 21) == enc
    with pytest.raises(ValueError, match="RIFLEx.k=30 exceeds the 22 RoPE frequencies"):
        RIFLEx(k=30).encoding_at(enc, 81, 21)


def test_token_keyframes_score_each_latent_frame_from_its_tokens():
    features = jax.random.normal(jax.random.PRNGKey(4), (2, int(np.prod(GRID)), 5))
    method = Method("ifs", mask=IFS(num_segments=3))
    got = np.asarray(jax.jit(token_keyframes, static_argnums=(1, 2, 3))(features, GRID, method, N0))
    t = GRID[1] * GRID[2]
    for b in range(2):
        frames = np.stack([np.asarray(features[b, f * t:(f + 1) * t]) for f in range(GRID[0])])  # [f, hw, C]
        np.testing.assert_array_equal(got[b], np.asarray(select_keyframes(frames, 3)))


# ---- the block-sparse kernel and splash attention -----------------------------------------------------------------
ODD_GRID = (6, 3, 7)  # 21 tokens per frame: with 16-token blocks, two per frame, the second holding 5 real tokens


@pytest.mark.parametrize("method", [TINY_FRESH, METHODS[4], METHODS[2]], ids=lambda m: m.name)
def test_block_sparse_kernel_odd_tokens_several_blocks_per_frame(method, monkeypatch):
    """21 tokens per frame in 16-token blocks (a frame's second block mostly padding), tiered and IFS (traced)
    masks, GROUP+SHIFT's maps and fractional ones, against the float64 reference."""
    from jaxlongvid.attention.kernels import sparse

    monkeypatch.setattr(sparse, "BLOCK", 16)
    assert sparse.block_of(21) == 16
    q, k, v = random_qkv(3, ODD_GRID)
    keyframes = jnp.asarray([[0, 5], [4, 1]])[:, :method.mask.segments(ODD_GRID[0], N0)] \
        if method.needs_keyframes else None
    out = jax.jit(lambda q, k, v, kf: self_attention(q, k, v, ODD_GRID, method, frame_encoding(CONFIG), kf,
                                                     "pallas"))(q, k, v, keyframes)
    err = relative_error(out, reference_attention(q, k, v, ODD_GRID, method, keyframes))
    assert err < ATTENTION_RTOL, err


def test_block_sparse_kernel_rows_that_see_no_key_and_unused_slots():
    """A per-sequence frame mask with rows of every length up to the bound (unused list slots) and one query
    frame that sees no key frame: its tokens are NaN, as on the jnp path, and every other token equals it."""
    from jaxlongvid.attention.kernels.sparse import sparse_forward

    f, t = 6, 5
    rng = np.random.default_rng(4)
    frame_mask = rng.random((2, f, f)) < 0.4
    frame_mask[:, np.arange(f), np.arange(f)] = True
    frame_mask[0, 2] = False  # batch 0, query frame 2: no key frame at all
    q, k, v = (jnp.asarray(rng.standard_normal((2, f * t, 2, 24)), jnp.float32) for _ in range(3))
    positions = GroupShift()
    enc = frame_encoding(CONFIG)
    info, bound = info_of_positions(positions, f, N0), int(frame_mask.sum(-1).max())
    got = jax.jit(lambda q, k, v, m: sparse_forward(q, k, v, positions.maps(f, N0), info, m, enc, t, bound,
                                                    interpret=True))(q, k, v, jnp.asarray(frame_mask))
    token_mask = jnp.asarray(np.repeat(np.repeat(frame_mask, t, 1), t, 2))
    core = lambda q, k, v, m: temporal_attention(q, k, v, encoding=enc, method=Method("g", positions=positions),
                                                 mask=m, tokens_per_frame=t)
    with jax.default_matmul_precision("highest"):
        want = jax.jit(core)(q, k, v, token_mask)
    nan = np.isnan(np.asarray(got))
    np.testing.assert_array_equal(nan, np.isnan(np.asarray(want)))
    assert nan[0, 2 * t:3 * t].all() and nan.sum() == t * got.shape[-2] * got.shape[-1]
    assert relative_error(np.where(nan, 0.0, got), np.where(nan, 0.0, np.asarray(want, np.float64))) < 2e-6


def test_block_sparse_kernel_gradient_is_the_fused_paths():
    """Under grad the kernel's backward pass is the per-query-frame fused path's: equal to the jnp path's."""
    method = METHODS[4]  # GROUP+SHIFT with IFS
    q, k, v = random_qkv(6)
    keyframes = jnp.asarray([[0, 4], [3, 8]])

    def grads(implementation):
        loss = lambda q, k, v: jnp.sum(jnp.sin(self_attention(q, k, v, GRID, method, frame_encoding(CONFIG),
                                                              keyframes, implementation)))
        with jax.default_matmul_precision("highest"):
            return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for got, want in zip(grads("pallas"), grads(None)):
        assert relative_error(got, np.asarray(want, np.float64)) < ATTENTION_RTOL


def test_block_sparse_kernel_lowers_to_triton_for_gpus():
    """No GPU here: the kernel lowers for CUDA through Triton at Wan's head (128 = 44 frame + 84 other dims) with
    1,560 tokens per frame and an IFS mask, not that it runs."""
    from jaxlongvid.attention.kernels.sparse import sparse_forward

    if jax.default_backend() == "gpu":  # cross-lowering asks Pallas for an abstract GPU there (seen on an H100)
        pytest.skip("on a GPU the block-sparse tests above run the kernel through Triton")
    method, f, t = PRESETS["longdiff"], 41, 1560
    enc = Encoding(rope_dim=44, native_frames=21)
    shape = jax.ShapeDtypeStruct((2, f * t, 12, 128), jnp.bfloat16)
    forward = lambda q, k, v, kf: sparse_forward(
        q, k, v, method.positions.maps(f, 21), info_of_positions(method.positions, f, 21),
        method.mask.with_keyframes(f, kf), enc, t, method.mask.most_visible(f, 21), interpret=False)
    lowered = jax.jit(forward).trace(shape, shape, shape, jax.ShapeDtypeStruct((2, 2), jnp.int32))
    assert "__gpu$xla.gpu.triton" in lowered.lower(lowering_platforms=("cuda",)).as_text()


SPLASH_GRID = (9, 4, 8)  # 288 tokens, padded to 384: 3 x 3 splash blocks of 128


@pytest.mark.parametrize("method", [Method("tiered", mask=Tiered(((1, 1), (6, 3)), 0)),
                                    Method("window", mask=Window(1)),
                                    Method("riflex-window", positions=RIFLEx(), mask=Window(2))], ids=lambda m: m.name)
def test_splash_attention_interpreted_matches_reference(method):
    """Splash attention (interpreted) with the frame mask as its block-sparse mask and absolute frame RoPE."""
    from jaxlongvid.attention.kernels.splash import splash_forward

    q, k, v = random_qkv(7, SPLASH_GRID, batch=1)
    f, t = SPLASH_GRID[0], SPLASH_GRID[1] * SPLASH_GRID[2]
    enc = method.positions.encoding_at(frame_encoding(CONFIG), f, N0)
    rotated = lambda x: wan.spatial_rotation(x, SPLASH_GRID, enc)
    out = jax.jit(lambda q, k, v: splash_forward(rotated(q), rotated(k), v, method.mask.static(f, np), 1.0, enc, t,
                                                 interpret=True, block=128))(q, k, v)
    err = relative_error(out, reference_attention(q, k, v, SPLASH_GRID, method))
    assert err < ATTENTION_RTOL, err


def test_splash_attention_gradient_equals_jnp_path():
    """Splash's own backward kernels (interpreted) against the gradient of the jnp path over token maps."""
    from jaxlongvid.attention.kernels.splash import splash_forward

    method, grid = Method("window", mask=Window(2)), (9, 4, 4)
    q, k, v = random_qkv(8, grid, batch=1)
    f, t = grid[0], grid[1] * grid[2]
    enc = frame_encoding(CONFIG)
    splash = lambda q, k, v: splash_forward(q, k, v, method.mask.static(f, np), 1.0, enc, t, interpret=True,
                                            block=128)
    core = lambda q, k, v: temporal_attention(q, k, v, encoding=enc, method=method, tokens_per_frame=t)
    grads = lambda fn: jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v))), argnums=(0, 1, 2)))(q, k, v)
    with jax.default_matmul_precision("highest"):
        for got, want in zip(grads(splash), grads(core)):
            assert relative_error(got, np.asarray(want, np.float64)) < 2e-6


def test_splash_mask_is_the_frame_mask_in_token_blocks_and_skips_hidden_blocks():
    """The frame mask as splash's mask: exactly the token blocks (padded keys hidden, padded query rows see the
    real keys), and splash's block map marks a block empty exactly where no token pair in it is kept."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_masks
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_mask_info import process_mask

    from jaxlongvid.attention.kernels.splash import FrameBlockMask, padded_length

    f, t = 9, 32
    frame_mask = reference_frame_mask(Method("w", mask=Window(1)), f, None)[0]
    padded, block = padded_length(f * t, 128)
    assert (padded, block) == (384, 128)
    mask = FrameBlockMask(frame_mask, t, padded)
    dense = np.ones((padded, padded), bool)
    dense[:, f * t:] = False
    dense[:f * t, :f * t] = np.repeat(np.repeat(frame_mask, t, 0), t, 1)
    np.testing.assert_array_equal(mask[:, :], dense)
    np.testing.assert_array_equal(mask[128:256, 0:128], dense[128:256, 0:128])
    info, _ = process_mask(splash_masks.MultiHeadMask([mask]), (block, block))
    blocks = dense.reshape(3, block, 3, block).transpose(0, 2, 1, 3)
    kept = np.where(blocks.all((-1, -2)), 2, np.where(blocks.any((-1, -2)), 1, 0))  # full / partial / empty
    np.testing.assert_array_equal(np.asarray(info.block_mask)[0], kept)
    assert kept[0, 2] == 0 and kept[2, 0] == 1  # frames 0-3 see no token of frame 8; padded rows see them all


def test_splash_attention_lowers_for_tpus():
    """No TPU here: splash attention with a tiered frame mask over Wan's head lowers for TPUs, not that it runs."""
    from jaxlongvid.attention.kernels.splash import splash_forward

    f, t = 21, 64
    enc = Encoding(rope_dim=44, native_frames=21)
    shape = jax.ShapeDtypeStruct((2, f * t, 4, 128), jnp.bfloat16)
    forward = lambda q, k, v: splash_forward(q, k, v, Tiered().static(f, np), 1.0, enc, t, interpret=False)
    assert "tpu_custom_call" in jax.jit(forward).trace(shape, shape, shape).lower(lowering_platforms=("tpu",)).as_text()


def test_token_kernel_plan_per_backend(monkeypatch):
    """``plan.token_kernel``: "pallas" takes the block-sparse kernel on GPUs and CPUs, splash on TPUs where the
    mask is static and RoPE absolute; "auto" on GPUs takes one fused call per query frame for methods that act
    (``SPARSE_AUTO_ON_GPU`` off) or, with the knob on, the block-sparse kernel; ``fused_implementation`` resolves
    "auto" for the per-frame path."""
    from jaxlongvid.attention import plan as plans
    from jaxlongvid.attention.plan import SPARSE_AUTO_ON_GPU, token_kernel

    enc = frame_encoding(CONFIG)
    vrpr, direct = (info_of_positions(p, 9, N0) for p in (VRPR(2, 4, 2, 2), PRESETS["direct"].positions))
    plan = lambda info, implementation, backend, static=True, frame_mask=True, token_mask=False: token_kernel(
        info, enc, frame_mask, static, token_mask, implementation, backend)
    assert plan(vrpr, "pallas", "gpu") == plan(vrpr, "pallas", "cpu") == plan(direct, "pallas", "gpu") == "sparse"
    assert plan(direct, "pallas", "tpu") == plan(direct, "auto", "tpu") == "splash"
    assert plan(direct, "pallas", "tpu", static=False) == plan(vrpr, "pallas", "tpu") == "tokens"  # IFS; mapped
    # "auto" on GPUs never expands a method's maps to tokens (at Wan's 4x: [126k x 126k] per map)
    assert plan(vrpr, "auto", "gpu") == plan(direct, "auto", "gpu") == ("sparse" if SPARSE_AUTO_ON_GPU else "frames")
    assert plan(vrpr, "auto", "cpu") == "tokens"  # the jnp path, chunked on CPUs
    assert plan(direct, "auto", "gpu", frame_mask=False) == "tokens"  # cuDNN's one fused call, knob or not
    assert plan(vrpr, "cudnn", "gpu") == plan(direct, "xla", "cpu") == "frames"
    assert plan(direct, "cudnn", "gpu", frame_mask=False) == plan(vrpr, None, "gpu") == "tokens"
    assert plan(vrpr, "pallas", "gpu", token_mask=True) == "tokens"
    t5 = Encoding(rope_dim=8, t5_buckets=8, native_frames=N0)
    assert token_kernel(vrpr, t5, True, True, False, "pallas", "gpu") == "tokens"
    with pytest.raises(ValueError, match="implementation must be one of"):
        plan(vrpr, "flash", "gpu")
    fused = plans.fused_implementation
    assert fused("auto", "bfloat16", 128, "gpu") == fused("cudnn", "float32", 128, "cpu") == "cudnn"
    assert fused("auto", "float32", 128, "gpu") == fused("auto", "bfloat16", 12, "gpu") == "xla"
    assert fused("auto", "bfloat16", 128, "cpu") == fused("xla", "bfloat16", 128, "gpu") == "xla"
    monkeypatch.setattr(plans, "SPARSE_AUTO_ON_GPU", True)
    assert plan(vrpr, "auto", "gpu") == "sparse" and plan(direct, "auto", "gpu", frame_mask=False) == "tokens"
    assert plan(direct, "auto", "gpu") == "sparse"  # a frame mask: the method acts


# ---- the whole transformer ---------------------------------------------------------------------------------------
def reference_self_attention(q, k, v, grid, method, encoding, keyframes=None, implementation=None):
    """``wan.self_attention`` replaced by the float64 reference (through a host callback)."""
    def host(q, k, v, keyframes):
        return reference_attention(q, k, v, grid, method, keyframes if method.needs_keyframes else None,
                                   encoding.rope_theta).astype(np.float32)

    keyframes = jnp.zeros((q.shape[0], 1), jnp.int32) if keyframes is None else keyframes
    return jax.pure_callback(host, jax.ShapeDtypeStruct(v.shape, jnp.float32), q, k, v, keyframes)


@functools.cache
def tiny_model():
    x = jax.random.normal(jax.random.PRNGKey(5), (1, GRID[0], 4, 4, CONFIG.in_channels))
    t = jnp.asarray([700.0])
    ctx = jax.random.normal(jax.random.PRNGKey(6), (1, 3, CONFIG.text_dim))
    shapes = jax.eval_shape(WanTransformer(CONFIG).init, jax.random.PRNGKey(7), x, t, ctx)["params"]
    rng = np.random.default_rng(8)  # every parameter random (norm scales, tables, biases included)
    params = jax.tree.map(lambda p: 0.3 * rng.standard_normal(p.shape).astype(np.float32), shapes)
    return params, x, t, ctx


def run_model(method, x=None, implementation=None):
    params, x0, t, ctx = tiny_model()
    x = x0 if x is None else x
    model = WanTransformer(CONFIG, method, attention_implementation=implementation)
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(model.apply)({"params": params}, x, t, ctx))


PLAN = MethodPlan(default=Method("longdiff", positions=GroupShift(), mask=IFS(window=2)), layers=((1, TINY_FRESH),))


@pytest.mark.parametrize("method", [METHODS[2], TINY_FRESH, PLAN], ids=["interpolate-ifs", "vrpr-tiered", "plan"])
def test_transformer_matches_reference_attention(method, monkeypatch):
    out = run_model(method)
    monkeypatch.setattr(wan, "self_attention", reference_self_attention)
    ref = run_model(method).astype(np.float64)
    err = relative_error(out, ref)
    assert err < NETWORK_RTOL, err
    monkeypatch.undo()
    assert relative_error(run_model("direct"), ref) > 1e-3  # the method changed the output


@pytest.mark.parametrize("implementation", ["xla", "pallas"], ids=["by-query-frame", "block-sparse"])
def test_transformer_fused_and_sparse_paths_equal_jnp_path(implementation):
    """The tiny model under a per-block plan with a fused implementation (one call per query frame) or the
    block-sparse kernel (cross attention then XLA on a CPU) against the jnp path over token maps."""
    ref = run_model(PLAN).astype(np.float64)
    assert relative_error(run_model(PLAN, implementation=implementation), ref) < NETWORK_RTOL
    assert wan.cross_implementation(implementation, jnp.bfloat16, "gpu") == {"xla": "xla", "pallas": "cudnn"}[
        implementation]
    assert wan.cross_implementation("pallas", jnp.float32, "gpu") is None  # cuDNN takes half precision only
    assert wan.cross_implementation("auto", jnp.bfloat16, "gpu") == "cudnn"  # the model's default
    assert wan.cross_implementation("auto", jnp.bfloat16, "cpu") is None
    assert wan.WanTransformer(CONFIG).attention_implementation == "auto"  # pipelines build it with the default


def test_freeloc_plan_at_native_length_equals_direct_exactly():
    params, x, t, ctx = tiny_model()
    native = x[:, :N0]
    plan = MethodPlan(default=Method("vrpr", positions=VRPR(None, None, None, None)),
                      layers=((0, Method("tsa", positions=VRPR(None, None, None, None), mask=Tiered())),))
    np.testing.assert_array_equal(run_model(plan, native), run_model("direct", native))


def test_freeloc_wan_plan_is_freeloc_published_assignment():
    """Westlake-AGI-Lab/FreeLOC's Wan2.1-1.3B routing: TSA + VRPR on 17 blocks, VRPR on the other 13, and VRPR at
    its published setting per length (41 latent frames: 12/20/2/8, 81: 10/14/2/8)."""
    names = temporal_layer_names(WanConfig.wan_1_3b())
    plan = PLAN_PRESETS["freeloc-wan"].resolve(names)
    tsa = [i for i, name in enumerate(names) if isinstance(plan.for_layer(name).mask, Tiered)]
    assert tsa == [0, 1, 4, 6, 7, 9, 10, 11, 13, 14, 15, 16, 18, 22, 23, 24, 25]
    vrpr = [i for i, name in enumerate(names) if plan.for_layer(name).mask is None]
    assert vrpr == [2, 3, 5, 8, 12, 17, 19, 20, 21, 26, 27, 28, 29]
    assert all(isinstance(plan.for_layer(n).positions, VRPR) for n in names)
    assert vrpr_setting(41, 21) == (12, 20, 2, 8) and vrpr_setting(81, 21) == (10, 14, 2, 8)
    assert vrpr_setting(161, 21) == (10, 14, 2, 8) and vrpr_setting(30, 21) == (12, 20, 2, 8)
    assert parse_method("freeloc-wan") is PLAN_PRESETS["freeloc-wan"]
    assert parse_method("riflex:k=5").positions == RIFLEx(5)
    with pytest.raises(ValueError, match="'freeloc-wan' is a plan of several methods"):
        parse_method("freeloc-wan:window=3")
    with pytest.raises(ValueError, match="names temporal layer 4, but this model has 2"):
        WanTransformer(CONFIG, "freeloc-wan").apply({"params": tiny_model()[0]}, *tiny_model()[1:])


def reference_freenoise(q, k, v, grid, method: Method) -> np.ndarray:
    """FreeNoise over latent frames: windows [i S, i S + W) (and one ending at f), each attending within its own
    frames' tokens; every frame's outputs weighted 1, 2, .., 2, 1 over its window positions and normalised."""
    f, h, w = grid
    t, size, stride = h * w, method.merge.window, method.merge.stride
    starts = list(range(0, f - size + 1, stride))
    starts += [f - size] if starts[-1] + size < f else []
    total, weight = np.zeros(q.shape[:1] + (f, t) + v.shape[2:]), np.zeros(f)
    for start in starts:
        tokens = slice(start * t, (start + size) * t)
        out = reference_attention(q[:, tokens], k[:, tokens], v[:, tokens], (size, h, w), method)
        for p in range(size):
            wp = min(p + 1, size - p)
            total[:, start + p] += wp * out[:, p * t:(p + 1) * t]
            weight[start + p] += wp
    return (total / weight[None, :, None, None, None]).reshape(v.shape)


def reference_freelong(q, k, v, grid, method: Method) -> np.ndarray:
    """FreeLong over latent frames: global attention and local attention (each frame sees 2 r + 1 consecutive
    frames, shifted inward at the ends, at exact distances), blended per channel over (frames, h, w) by the
    Gaussian low-pass."""
    f, h, w = grid
    r = method.merge.local_window
    width = min(2 * r + 1, f)
    local = np.zeros((f, f), bool)
    for i in range(f):
        start = min(max(i - r, 0), f - width)
        local[i, start:start + width] = True
    glob = reference_attention(q, k, v, grid, method)
    loc = reference_attention(q, k, v, grid, method.replace(positions=Identity()), extra_frame_mask=local)
    video = lambda x, b: x[b].reshape(f, h, w, -1)
    return np.stack([reference.freelong_blend(video(glob, b), video(loc, b), method.merge.d_t, method.merge.d_s)
                     for b in range(q.shape[0])]).reshape(v.shape)


@pytest.mark.parametrize("implementation", [None, "xla", "pallas"], ids=["jnp", "by-query-frame", "block-sparse"])
@pytest.mark.parametrize("method", [Method("freenoise", merge=FreeNoiseWindows(4, 2)),
                                    Method("freenoise-vrpr", positions=VRPR(1, 2, 1, 1), merge=FreeNoiseWindows(5, 3)),
                                    Method("freelong", merge=FreeLongBlend(local_window=2)),
                                    Method("freelong-group", positions=GroupShift(), merge=FreeLongBlend(1))],
                         ids=lambda m: m.name)
def test_merges_over_latent_frames_match_reference(method, implementation):
    q, k, v = random_qkv(9)
    with jax.default_matmul_precision("highest"):
        out = jax.jit(lambda q, k, v: self_attention(q, k, v, GRID, method, frame_encoding(CONFIG), None,
                                                     implementation))(q, k, v)
    merge = reference_freenoise if isinstance(method.merge, FreeNoiseWindows) else reference_freelong
    err = relative_error(out, merge(q, k, v, GRID, method))
    assert err < ATTENTION_RTOL, (method.name, err)


def test_transformer_with_freenoise_matches_reference(monkeypatch):
    """The whole tiny model under FreeNoise windows; the reference model's self-attention is reference_freenoise."""
    method = Method("freenoise", merge=FreeNoiseWindows(4, 2))
    out = run_model(method)

    def reference_merge(q, k, v, grid, method, encoding, keyframes=None, implementation=None):
        host = lambda q, k, v: reference_freenoise(q, k, v, grid, method).astype(np.float32)
        return jax.pure_callback(host, jax.ShapeDtypeStruct(v.shape, jnp.float32), q, k, v)

    monkeypatch.setattr(wan, "self_attention", reference_merge)
    assert relative_error(out, run_model(method).astype(np.float64)) < NETWORK_RTOL
