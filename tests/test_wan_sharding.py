"""Frame-axis (sequence) sharding of the Wan DiT on 8 host CPU devices: tokens split by whole latent frames,
self-attention context-parallel (all-to-all over heads where the frames axis divides the heads, the compiler's
partitioning otherwise), sampled sharded == unsharded.

Tolerances: the attention under the all-to-all is the same per-head computation as without a mesh (bit for bit;
LongDiff's averaged maps within 1e-6 of the output's scale); whole sampled latents, float32, max |sharded -
unsharded| / max |unsharded| <= 1e-5 (measured about 2e-6: the rest of the network is partitioned by XLA, which
changes reduction orders).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxlongvid as jlv
from jaxlongvid import sharding
from jaxlongvid.methods import IFS, FreeLongBlend, GroupShift, Method, Tiered, VRPR
from jaxlongvid.models.wan import WanTransformer, frame_encoding, self_attention, token_keyframes
from tiny_wan import CONFIG, N0, PROMPTS, tiny_wan_pipeline

FRAMES = 8  # latent frames (pixel space: = video frames), 2 N0
GRID = (FRAMES, 4, 4)
RTOL = 1e-5


@pytest.fixture(scope="module")
def pipe():
    assert len(jax.devices()) >= 8, "tests/conftest.py should give 8 host devices"
    return tiny_wan_pipeline()


@functools.cache
def unsharded(method: str) -> np.ndarray:
    return jlv.sample(tiny_wan_pipeline(), PROMPTS[0], num_frames=FRAMES, method=method, seed=1, progress=False,
                      output="latents")


def relative(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def run_compiled(fn, *args):
    """``jit(fn)(*args)`` and the text of its compiled program (one compilation)."""
    program = jax.jit(fn).lower(*args).compile()
    return program(*args), program.as_text()


# ---- the plan -------------------------------------------------------------------------------------------------------
def test_sequence_parallel_plan():
    plan = lambda mesh, *a: _under(mesh, lambda: sharding.sequence_parallel(*a))
    assert plan(None, 4, 128, 2) == sharding.SequenceParallel()  # no mesh
    assert plan(sharding.make_mesh(1, 8), 4, 128, 8).kind == "none"  # no frames split
    assert plan(sharding.make_mesh(4, 2), 4, 128, 2) == sharding.SequenceParallel("heads", 4)
    assert plan(sharding.make_mesh(4, 2), 4, 128, 2, "xla") == sharding.SequenceParallel("xla", 4, "asked for")
    heads = plan(sharding.make_mesh(8, 1), 4, 128, 2)
    assert heads.kind == "xla" and heads.reason == "4 heads do not split over the 8 devices of the 'frames' axis"
    batch = plan(sharding.make_mesh(4, 2), 4, 128, 1)
    assert batch.kind == "xla" and "a batch of 1 does not split over the 2 devices of the 'data' axis" in batch.reason
    assert "6 tokens do not split" in plan(sharding.make_mesh(4, 2), 4, 6, 2).reason
    with pytest.raises(ValueError, match="context_parallel='heads' cannot split this attention: 4 heads do not"):
        plan(sharding.make_mesh(8, 1), 4, 128, 2, "heads")
    with pytest.raises(ValueError, match="context_parallel must be one of"):
        plan(None, 4, 128, 2, "ring")


def _under(mesh, fn):
    if mesh is None:
        return fn()
    with jax.set_mesh(mesh):
        return fn()


# ---- the context-parallel attention -----------------------------------------------------------------------------
ATTENTION_METHODS = [
    Method("direct"),
    Method("longdiff", positions=GroupShift(), mask=IFS(window=1)),
    Method("tiered-vrpr", positions=VRPR(2, 4, 2, 2), mask=Tiered(((2, 1), (6, 2)), 1)),
    Method("freelong", merge=FreeLongBlend(local_window=1)),
]


@pytest.mark.parametrize("method", ATTENTION_METHODS, ids=lambda m: m.name)
def test_attention_over_heads_equals_unsharded(method):
    """``sharding.attend_over_heads`` around Wan's self-attention on a (frames 4, data 2) mesh: two all-to-alls
    in the program, the same output as without a mesh."""
    keys = jax.random.split(jax.random.key(3), 4)
    s = int(np.prod(GRID))
    q, k, v = (jax.random.normal(key, (2, s, CONFIG.num_heads, CONFIG.head_dim)) for key in keys[:3])
    encoding = frame_encoding(CONFIG)
    extras = ()
    if method.needs_keyframes:
        features = jax.random.normal(keys[3], (2, s, 8))
        extras = (token_keyframes(features, GRID, method, N0),)
    attend = lambda q, k, v, *kf: self_attention(q, k, v, GRID, method, encoding, *kf)
    want = np.asarray(jax.jit(attend)(q, k, v, *extras))
    mesh = sharding.make_mesh(4, 2)
    tokens = sharding.named(mesh, P(sharding.DATA, sharding.FRAMES))
    args = [jax.device_put(x, tokens) for x in (q, k, v)] + [jax.device_put(x, sharding.named(mesh, P(sharding.DATA)))
                                                             for x in extras]
    parallel = lambda *a: sharding.attend_over_heads(attend, *a)
    with jax.set_mesh(mesh):
        got, program = run_compiled(parallel, *args)
    assert got.sharding.spec == P(sharding.DATA, sharding.FRAMES)
    assert {shard.data.shape for shard in got.addressable_shards} == {(1, s // 4, CONFIG.num_heads, CONFIG.head_dim)}
    assert program.count("all-to-all(") == 4  # q, k, v to heads; the output back to tokens
    err = relative(got, want)
    print(f"{method.name}: max rel diff {err:.1e}")
    # the same per-head computation: bit for bit, except LongDiff's plane / slot-average path, measured 2e-7 off
    # with 1 head per device against 4 in one program (float32 rounding; where it enters was not traced)
    assert err == 0.0 if method.name != "longdiff" else err <= 1e-6, err
    if method.name != "direct":  # the method acted
        assert relative(jax.jit(lambda *a: self_attention(*a[:3], GRID, Method("direct"), encoding))(q, k, v),
                        want) > 1e-3


def test_transformer_plans_once_and_shards_its_output(pipe):
    """Under a mesh the DiT's blocks run the planned attention: all-to-all where 4 heads split over 4 frame
    devices, none where they do not (8 devices: the compiler's partitioning) or where "xla" is asked for;
    latents in and out split over (data, frames); the output equals the unsharded model's."""
    params = pipe.params["unet"]
    keys = jax.random.split(jax.random.key(4), 2)
    x = jax.random.normal(keys[0], (2, FRAMES, 8, 8, 3))
    t = jnp.asarray([900.0, 400.0])
    ctx = jax.random.normal(keys[1], (2, 5, CONFIG.text_dim))
    apply = lambda model: (lambda p, x, t, c: model.apply({"params": p}, x, t, c))
    want = np.asarray(jax.jit(apply(WanTransformer(CONFIG, "freeloc")))(params, x, t, ctx))
    for mesh_shape, choice, all_to_all in [((4, 2), "auto", True), ((8, 1), "auto", False), ((4, 2), "xla", False)]:
        mesh = sharding.make_mesh(*mesh_shape)
        fn = apply(WanTransformer(CONFIG, "freeloc", context_parallel=choice))
        with jax.set_mesh(mesh):
            got, program = run_compiled(fn, params, x, t, ctx)
        assert ("all-to-all(" in program) == all_to_all, (mesh_shape, choice)
        assert got.sharding.is_equivalent_to(sharding.named(mesh, P(sharding.DATA, sharding.FRAMES)), 5)
        assert relative(got, want) <= RTOL, (mesh_shape, choice, relative(got, want))
    with jax.set_mesh(sharding.make_mesh(8, 1)), pytest.raises(ValueError, match="4 heads do not split over the 8"):
        jax.jit(apply(WanTransformer(CONFIG, context_parallel="heads")))(params, x, t, ctx)


# ---- sampled videos ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,mesh_shape", [
    ("direct", (4, 2)),  # all-to-all over heads, guidance pair over data
    ("longdiff", (4, 2)),  # GROUP+SHIFT maps and IFS keyframes (an extra of the all-to-all)
    ("freeloc", (4, 2)),  # tiered mask, VRPR
    ("freeloc", (8, 1)),  # 4 heads over 8 frame devices: the compiler's partitioning
])
def test_sampled_sharded_equals_unsharded(pipe, method, mesh_shape):
    single = unsharded(method)
    sharded = jlv.sample(pipe, PROMPTS[0], num_frames=FRAMES, method=method, seed=1, progress=False,
                         output="latents", mesh=sharding.make_mesh(*mesh_shape))
    assert sharded.shape == single.shape == (FRAMES, 8, 8, 3)
    err = relative(sharded, single)
    print(f"wan {method} on {mesh_shape}: max rel diff {err:.1e}")
    assert err <= RTOL, err
    if method != "direct":
        assert relative(single, unsharded("direct")) > 1e-4  # the method changed the video


def test_frames_not_divisible_by_the_mesh(pipe, no_tracing):
    with pytest.raises(ValueError, match=r"num_frames=6 is not divisible by the mesh's 'frames' axis \(4 devices\)"):
        jlv.sample(pipe, PROMPTS[0], num_frames=6, mesh=sharding.make_mesh(4, 2), progress=False)


# ---- the multi-GPU script, tiny on the host devices ----------------------------------------------------------------
def test_multi_gpu_check_wan_step_runs_tiny(capsys):
    """benchmarks/multi_gpu_check.py --wan tiny: one guided DiT step on 1 device and on each layout of the 8
    host devices, with the plan it ran, the all-to-alls it compiled and its difference to one device."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import multi_gpu_check

    assert multi_gpu_check.main(["--wan", "tiny", "--frames", "29", "--height", "32", "--width", "32", "--dtype",
                                 "float32", "--text-len", "4", "--repeats", "1", "--methods", "direct",
                                 "--context-parallel", "auto"]) == 0
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| direct |")]
    table = {(r[1], r[2]): r for r in rows}
    assert set(table) == {("1 device", "auto"), ("frames=8", "auto"), ("frames=4 x data=2", "auto")}
    assert table["frames=4 x data=2", "auto"][3] == "heads"
    assert int(table["frames=4 x data=2", "auto"][8]) >= 4 * 2  # q, k, v and the output in each of 2 blocks
    assert table["frames=8", "auto"][3] == "xla (4 heads do not split over the 8 devices of the 'frames' axis)"
    assert all(float(r[9]) <= RTOL for r in rows) and float(table["1 device", "auto"][9]) == 0.0
