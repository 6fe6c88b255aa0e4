"""FreeLOC layer probing on tiny random one-level UNet3Ds (LaVie-style: RoPE on 8 of 16 head dims + T5 bias;
VideoCrafter1-style: relative K/V tables; VideoCrafter2-style: no temporal position encoding), native length 4
frames, 8x8 pixels, and on a tiny random Wan DiT (``tiny_wan.py``: token-level 3D-RoPE self-attention, native 4
latent frames of 4 x 4 tokens). Inputs share shapes (batch 2: one guided prompt) so each program compiles once.

References are float64 NumPy computed from the q and k that the layer's ``to_q`` / ``to_k`` produce (Wan: its
``norm_q`` / ``norm_k``; captured with Flax's ``capture_intermediates``, independently of the statistics the layer
sows) and its T5 table.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxlongvid import probing
from jaxlongvid.methods import PRESETS, VRPR, Method, MethodPlan
from jaxlongvid.models import text as text_lib
from jaxlongvid.models import wan
from jaxlongvid.models.tokenizers import WordTokenizer
from jaxlongvid.models.unet3d import UNet3DConfig, init_shapes, temporal_layer_names
from jaxlongvid.pipeline import Pipeline, PipelineConfig, build_denoiser
from jaxlongvid.positions import t5_bucket
from jaxlongvid.schedulers import SchedulerConfig
from tiny_wan import CONFIG as WAN, tiny_wan_pipeline

N0 = 4  # native frames of the test models
SIZE = 8
CTX_DIM = 16
PROMPTS = ["a red circle moving left", "a blue square bouncing"]
BATCH = 2

LAVIE = UNet3DConfig.lavie().replace(
    family="custom", in_channels=3, out_channels=3, block_channels=(32,), layers_per_block=1,
    attention_levels=(True,), attention_heads=(2,), cross_attention_dim=CTX_DIM, norm_groups=8, rope_dim=8,
    t5_buckets=8, t5_max_distance=16, native_frames=N0)
VC1 = UNet3DConfig.videocrafter1().replace(
    family="custom", in_channels=3, out_channels=3, block_channels=(16,), layers_per_block=1,
    attention_levels=(True,), attention_heads=(2,), cross_attention_dim=CTX_DIM, norm_groups=8,
    temporal_in_heads=2, temporal_in_head_dim=8, rel_distance=N0, native_frames=N0)
VC2 = VC1.replace(temporal_conv=True, fps_conditioning=True, rel_distance=0)


def random_params(config, seed=0, std=0.2, q_k_t5_std=1.0):
    """Normal weights; larger ones for the temporal q/k projections and T5 tables so attention is not uniform."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        sharp = any(getattr(p, "key", None) in ("to_q", "to_k", "t5_bias") for p in path) and "attn_temp" in str(path)
        return ((q_k_t5_std if sharp else std) * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, init_shapes(config))


def pipeline_for(config, seed=0) -> Pipeline:
    """A pixel-space pipeline around ``config`` with a random 1-layer text encoder (context width 16)."""
    tokenizer = WordTokenizer.from_texts(PROMPTS, context_length=8)
    text = dataclasses.replace(text_lib.TextConfig.tiny(tokenizer.vocab_size, 8), width=CTX_DIM, num_heads=2,
                               mlp_dim=32, num_layers=1)
    rng = np.random.default_rng(seed + 1)
    text_params = jax.tree_util.tree_map(
        lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32),
        jax.eval_shape(text_lib.TextEncoder(text).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    pc = PipelineConfig(family="custom", unet=config, text=text, scheduler=SchedulerConfig.lavie(), num_frames=N0,
                        num_inference_steps=2, guidance_scale=3.0, height=SIZE, width=SIZE)
    return Pipeline(pc, {"unet": random_params(config, seed), "text": text_params}, tokenizer)


def model_input(frames, seed=0, batch=BATCH, t=500):
    keys = jax.random.split(jax.random.key(seed), 2)
    x = jax.random.normal(keys[0], (batch, frames, SIZE, SIZE, 3))
    context = jax.random.normal(keys[1], (batch, 8, CTX_DIM))
    return probing.ProbeInput(x, jnp.full((batch,), t, jnp.int32), context)


@pytest.fixture(scope="module")
def lavie():
    pipe = pipeline_for(LAVIE)
    return build_denoiser(pipe.config), pipe.params["unet"], pipe


# ---- NumPy references -----------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0)
def _projections(model, params, x, timesteps, context):
    _, state = model.apply({"params": params}, x, timesteps, context,
                           capture_intermediates=lambda mdl, method: mdl.name in ("to_q", "to_k"),
                           mutable=["intermediates"])
    return state["intermediates"]


@functools.partial(jax.jit, static_argnums=0)
def plain_apply(model, params, x, timesteps, context):
    return model.apply({"params": params}, x, timesteps, context)


def captured_qk(model, params, inputs, layer):
    """The layer's q, k ``[B, hw, N, heads, dim]`` (float64) from its ``to_q`` / ``to_k`` outputs."""
    flat = traverse_util.flatten_dict(_projections(model, params, *inputs[:3]), sep="/")
    heads = params_at(params, layer)["t5_bias"].shape[1]
    split = lambda y: np.asarray(y, np.float64).reshape(y.shape[:-1] + (heads, -1))
    return split(flat[f"{layer}/to_q/__call__"][0]), split(flat[f"{layer}/to_k/__call__"][0])


def params_at(params, layer):
    for part in layer.split("/"):
        params = params[part]
    return params


def np_logits(q, k, pmap, config, t5_table):
    """``q_i . R(theta P_ij) k_j / sqrt(dim) + t5[bucket(P_ij)]`` ``[B, hw, heads, N, N]``: RoPE on the first
    ``rope_dim`` dims as interleaved pairs, ``R(a) = [[cos a, -sin a], [sin a, cos a]]``."""
    r = config.rope_dim
    freqs = 10000.0 ** (-np.arange(0, r, 2) / r)
    ang = np.asarray(pmap, np.float64)[..., None] * freqs  # [N, N, K]
    cos, sin = np.cos(ang), np.sin(ang)
    qa, qb, ka, kb = q[..., 0:r:2], q[..., 1:r:2], k[..., 0:r:2], k[..., 1:r:2]
    pair = lambda x, y, w: np.einsum("bpihk,bpjhk,ijk->bphij", x, y, w)
    rope = pair(qa, ka, cos) - pair(qa, kb, sin) + pair(qb, kb, cos) + pair(qb, ka, sin)
    rest = np.einsum("bpihd,bpjhd->bphij", q[..., r:], k[..., r:])
    bias = np.asarray(t5_table, np.float64)[t5_bucket(pmap, config.t5_buckets, config.t5_max_distance)]
    return (rope + rest) / math.sqrt(q.shape[-1]) + np.moveaxis(bias, -1, 0)


def np_absolute_rope_logits(q, k, config):
    """The unmodified model's content logits: q rotated by its frame index, k by its own (LaVie's way)."""
    r = config.rope_dim
    freqs = 10000.0 ** (-np.arange(0, r, 2) / r)
    ang = np.arange(q.shape[2])[:, None] * freqs  # [N, K]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rot(x):
        a, b = x[..., 0:r:2], x[..., 1:r:2]
        out = x.copy()
        out[..., 0:r:2], out[..., 1:r:2] = a * cos - b * sin, b * cos + a * sin
        return out

    return np.einsum("bpihd,bpjhd->bphij", rot(q), rot(k)) / math.sqrt(q.shape[-1])


# ---- (a) position sensitivity against NumPy -------------------------------------------------------------------------
def test_position_sensitivity_matches_numpy(lavie):
    model, params, _ = lavie
    names = temporal_layer_names(LAVIE)
    inputs = model_input(N0, seed=1)
    scores = probing.position_sensitivity(model, params, [inputs])
    assert list(scores) == list(names)
    for layer in (names[0], names[-1]):
        q, k = captured_qk(model, params, inputs, layer)
        d = np.arange(N0)[None, :] - np.arange(N0)[:, None]
        t5 = params_at(params, layer)["t5_bias"]
        ori, shifted = np_logits(q, k, d, LAVIE, t5), np_logits(q, k, d + np.sign(d) * N0, LAVIE, t5)
        # the reference's relative rotation agrees with LaVie's absolute rotation at the model's own positions
        no_bias = np_logits(q, k, d, LAVIE, np.zeros_like(t5))
        np.testing.assert_allclose(no_bias, np_absolute_rope_logits(q, k, LAVIE), rtol=1e-12, atol=1e-12)
        expected = np.linalg.norm(shifted - ori) / np.linalg.norm(ori)
        assert expected > 0.05  # the shift moves these logits substantially
        np.testing.assert_allclose(scores[layer], expected, rtol=1e-6)  # measured <= 1e-7


@pytest.mark.parametrize("config, zero", [(VC2, True), (VC1, False)], ids=["videocrafter2", "videocrafter1"])
def test_position_sensitivity_without_and_with_relative_tables(config, zero):
    params = random_params(config, seed=3)
    model = build_denoiser(pipeline_for(config).config)
    scores = probing.position_sensitivity(model, params, [model_input(N0, seed=2)])
    assert list(scores) == list(temporal_layer_names(config))
    if zero:  # no temporal position encoding: the logits cannot depend on positions at all
        assert all(s == 0.0 for s in scores.values()), scores
    else:  # relative K tables: clamped rows change for every d != 0
        assert all(s > 1e-3 for s in scores.values()), scores


def test_position_sensitivity_needs_the_native_length(lavie):
    model, params, _ = lavie
    with pytest.raises(ValueError, match="native length"):
        probing.position_sensitivity(model, params, [model_input(4 * N0)])


# ---- (c) context sensitivity ----------------------------------------------------------------------------------------
def test_context_sensitivity(lavie):
    model, params, _ = lavie
    native, long = model_input(N0, seed=4), model_input(4 * N0, seed=4)
    same = probing.context_sensitivity(model, params, [native], [native])
    assert all(s == 0.0 for s in same.values()), same
    raw = probing.context_sensitivity(model, params, [native], [long])
    assert list(raw) == list(temporal_layer_names(LAVIE))
    assert all(0 < s < math.log(4 * N0) for s in raw.values()), raw  # more keys, more entropy (<= log N)
    # normalised: each query's entropy / log(visible keys) (all keys visible under direct)
    norm = probing.context_sensitivity(model, params, [native], [long], normalize=True)
    h_native = probing.layer_statistics(model, params, native)[1]
    h_long = probing.layer_statistics(model, params, long)[1]
    for name in raw:
        a, b = h_native[name][probing.ENTROPY], h_long[name][probing.ENTROPY]
        np.testing.assert_allclose(raw[name], b.mean() - a.mean(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(norm[name], b.mean() / math.log(4 * N0) - a.mean() / math.log(N0), rtol=1e-6,
                                   atol=1e-7)


# ---- (e) the sown statistics ----------------------------------------------------------------------------------------
def test_sown_statistics_per_layer(lavie):
    model, params, _ = lavie
    inputs = model_input(N0, seed=5)
    out, stats = probing.layer_statistics(model, params, inputs)
    names = temporal_layer_names(LAVIE)
    assert list(stats) == list(names) and len(stats) == 4
    for name in names:
        heads = params_at(params, name)["t5_bias"].shape[1]
        assert stats[name][probing.ENTROPY].shape == (BATCH, heads, N0)
        assert stats[name][probing.LOGITS_SQ].shape == stats[name][probing.SHIFT_CHANGE_SQ].shape == (BATCH, heads)
    # one layer's entropy against NumPy softmax of the reference logits
    q, k = captured_qk(model, params, inputs, names[1])
    d = np.arange(N0)[None, :] - np.arange(N0)[:, None]
    logits = np_logits(q, k, d, LAVIE, params_at(params, names[1])["t5_bias"])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    entropy = -(p * np.log(p)).sum(-1).mean(axis=1)  # [B, heads, N]
    np.testing.assert_allclose(stats[names[1]][probing.ENTROPY], entropy, rtol=0, atol=2e-6)  # measured 5e-7
    # at the long length only the entropy is recorded; the output is the model's own (same up to XLA fusion)
    long = model_input(4 * N0, seed=6)
    out, long_stats = probing.layer_statistics(model, params, long)
    assert all(set(s) == {probing.ENTROPY} for s in long_stats.values())
    np.testing.assert_allclose(np.asarray(out), np.asarray(plain_apply(model, params, *long[:3])), rtol=1e-5,
                               atol=1e-6)


def test_window_merges_cannot_be_probed(lavie):
    _, params, pipe = lavie
    model = build_denoiser(pipe.config, "freenoise")
    with pytest.raises(ValueError, match="merge windows or spectra"):
        probing.layer_statistics(model, params, model_input(N0))


# ---- (d) routing ----------------------------------------------------------------------------------------------------
def test_plan_from_scores_routes_and_runs(lavie):
    model, params, _ = lavie
    names = temporal_layer_names(LAVIE)
    context = dict(zip(names, [0.9, 0.1, 0.05, 0.7]))
    position = dict(zip(names, [0.1, 0.8, 0.3, 0.9]))
    scores = {"context": context, "position": position}
    plan = probing.plan_from_scores(scores)  # medians: context 0.4, position 0.55
    vrpr = Method("vrpr", positions=PRESETS["freeloc"].positions)
    expected = {names[0]: PRESETS["freeloc"], names[3]: PRESETS["freeloc"], names[1]: vrpr}
    for name in names:
        assert plan.for_layer(name) == expected.get(name, PRESETS["direct"]), name
    assert vrpr.mask is None and vrpr.positions == VRPR()
    # explicit thresholds and methods
    plan2 = probing.plan_from_scores(scores, 0.8, 0.25, vrpr_method="clip", default="sliding-window")
    routed = [plan2.for_layer(n).name for n in names]
    assert routed == ["freeloc", "clip", "clip", "clip"]
    # the plan runs through the UNet (names match) and changes the long video against direct
    x = model_input(4 * N0, seed=6)
    run = lambda method: np.asarray(plain_apply(build_denoiser(pipeline_for(LAVIE).config, method), params, *x[:3]))
    planned, direct = run(plan), run("direct")
    assert planned.shape == direct.shape and np.all(np.isfinite(planned))
    assert np.max(np.abs(planned - direct)) > 1e-3


def test_plan_from_scores_rejects_bad_scores():
    good = {"context": {"a": 1.0, "b": 0.0}, "position": {"a": 0.0, "b": 1.0}}
    assert isinstance(probing.plan_from_scores(good), MethodPlan)
    with pytest.raises(ValueError, match="exactly the keys"):
        probing.plan_from_scores({"context": good["context"]})
    with pytest.raises(ValueError, match="different layers"):
        probing.plan_from_scores({"context": {"a": 1.0}, "position": {"b": 1.0}})
    with pytest.raises(ValueError, match="not numbers"):
        probing.plan_from_scores({"context": {"a": math.nan}, "position": {"a": 0.0}})
    with pytest.raises(TypeError, match="one Method"):
        probing.plan_from_scores(good, tsa_method=MethodPlan())


# ---- the whole probe on a pipeline ----------------------------------------------------------------------------------
def test_probe_pipeline_end_to_end(lavie):
    _, _, pipe = lavie
    scores = probing.probe(pipe, PROMPTS[:1], num_steps=2)  # guided (scale 3): uncond + cond halves recorded
    names = list(temporal_layer_names(LAVIE))
    assert list(scores["context"]) == names and list(scores["position"]) == names
    assert all(s > 0 for s in scores["context"].values()) and all(s > 0 for s in scores["position"].values())
    again = probing.probe(pipe, PROMPTS[:1], num_steps=2)
    assert again == scores  # deterministic for a seed
    native_only = probing.probe(pipe, PROMPTS[:1], num_steps=2, long_frames=N0)
    assert all(s == 0.0 for s in native_only["context"].values())
    assert native_only["position"] == scores["position"]  # the native run is the same
    plan = probing.plan_from_scores(scores)
    assert sum(1 for n in names if plan.for_layer(n).name == "freeloc") == 2  # above the median
    with pytest.raises(ValueError, match="long_frames"):
        probing.probe(pipe, PROMPTS, long_frames=N0 - 1)
    with pytest.raises(ValueError, match="multiples"):
        probing.probe(pipe, PROMPTS, height=0)


def test_command_line_hook(lavie, tmp_path, capsys):
    import argparse
    import json

    from jaxlongvid.pipeline import save

    _, _, pipe = lavie
    model_dir = save(pipe, str(tmp_path / "model"))
    parser = argparse.ArgumentParser()
    probing.add_arguments(parser)
    out = tmp_path / "scores.json"
    args = parser.parse_args(["--model", model_dir, "--prompt", PROMPTS[0], "--steps", "2", "--out", str(out)])
    assert probing.run_from_args(args) == 0
    written = json.loads(out.read_text())
    assert written["scores"] == probing.probe(pipe, PROMPTS[:1], num_steps=2)
    plan = probing.plan_from_scores(written["scores"])
    names = temporal_layer_names(LAVIE)
    assert written["routes"] == {n: plan.for_layer(n).name for n in names}
    printed = capsys.readouterr().out
    assert all(n in printed for n in names)


# ---- the probe on a DiT: the Wan transformer's block self-attentions --------------------------------------------
@pytest.fixture(scope="module")
def wan_pipe():
    return tiny_wan_pipeline()


def wan_input(frames, seed=0):
    keys = jax.random.split(jax.random.key(seed), 2)
    x = jax.random.normal(keys[0], (BATCH, frames, SIZE, SIZE, 3))
    return probing.ProbeInput(x, jnp.asarray([800.0, 800.0]), jax.random.normal(keys[1], (BATCH, 8, WAN.text_dim)))


@functools.partial(jax.jit, static_argnums=0)
def _wan_qk(model, params, x, timesteps, context):
    _, state = model.apply({"params": params}, x, timesteps, context,
                           capture_intermediates=lambda mdl, method: mdl.name in ("norm_q", "norm_k"),
                           mutable=["intermediates"])
    return state["intermediates"]


def np_wan_logits(q, k, grid, frame_map):
    """float64 ``[B, heads, S, S]``: ``q_a . R(angle_ab) k_b / sqrt(d)`` with every channel pair of k_b turned by
    its own relative angle: frame pairs by ``frame_map[f_a, f_b] * freq``, height and width pairs by the row and
    column differences (Wan's 3D RoPE written out per token pair)."""
    fw, hw, ww = wan.rope_split(q.shape[-1])
    fa, ya, xa = np.unravel_index(np.arange(int(np.prod(grid))), grid)
    freqs = lambda width: 1.0 / 10000.0 ** (np.arange(0, width, 2, dtype=np.float64) / width)
    angle = np.concatenate([np.asarray(frame_map, np.float64)[fa][:, fa][..., None] * freqs(fw),
                            (ya[None, :] - ya[:, None])[..., None] * freqs(hw),
                            (xa[None, :] - xa[:, None])[..., None] * freqs(ww)], -1)  # [S, S, d / 2]
    cos, sin = np.cos(angle), np.sin(angle)
    k0, k1 = k[..., 0::2], k[..., 1::2]  # [B, S, H, d / 2]
    q0, q1 = q[..., 0::2], q[..., 1::2]
    pair = lambda x, y, w: np.einsum("bahk,bjhk,ajk->bhaj", x, y, w)
    logits = pair(q0, k0, cos) - pair(q0, k1, sin) + pair(q1, k0, sin) + pair(q1, k1, cos)
    return logits / math.sqrt(q.shape[-1])


def test_wan_statistics_match_numpy(wan_pipe):
    """Each block's attn1 sows the token-level statistics: entropy per query token averaged over its frame's tokens,
    and the full 3D-RoPE logits' norms with only the frame distance shifted."""
    model, params = build_denoiser(wan_pipe.config), wan_pipe.params["unet"]
    inputs = wan_input(N0, seed=1)
    _, stats = probing.layer_statistics(model, params, inputs)
    names = wan.temporal_layer_names(WAN)
    assert list(stats) == list(names) == ["blocks_0/attn1", "blocks_1/attn1"]
    for name in names:
        assert stats[name][probing.ENTROPY].shape == (BATCH, WAN.num_heads, N0)
        assert stats[name][probing.LOGITS_SQ].shape == stats[name][probing.SHIFT_CHANGE_SQ].shape == (BATCH,
                                                                                                      WAN.num_heads)
    flat = traverse_util.flatten_dict(_wan_qk(model, params, *inputs[:3]), sep="/")
    grid = (N0, SIZE // 2, SIZE // 2)
    for name in names:
        q, k = (np.asarray(flat[f"{name}/{n}/__call__"][0], np.float64).reshape(BATCH, -1, WAN.num_heads,
                                                                                 WAN.head_dim)
                for n in ("norm_q", "norm_k"))
        d = np.arange(N0)[None, :] - np.arange(N0)[:, None]
        ori, shifted = np_wan_logits(q, k, grid, d), np_wan_logits(q, k, grid, d + np.sign(d) * N0)
        p = np.exp(ori - ori.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        entropy = -(p * np.log(p)).sum(-1).reshape(BATCH, WAN.num_heads, N0, -1).mean(-1)  # [B, heads, frames]
        np.testing.assert_allclose(stats[name][probing.ENTROPY], entropy, rtol=0, atol=2e-6)
        np.testing.assert_allclose(stats[name][probing.LOGITS_SQ], np.square(ori).sum((2, 3)), rtol=1e-5)
        np.testing.assert_allclose(stats[name][probing.SHIFT_CHANGE_SQ], np.square(shifted - ori).sum((2, 3)),
                                   rtol=1e-5)
        assert np.linalg.norm(shifted - ori) / np.linalg.norm(ori) > 0.05  # the shift moves these logits


def test_wan_probe_to_plan(wan_pipe, tmp_path, capsys):
    """``jaxlongvid probe`` on a saved Wan pipeline (flow-matching UniPC trajectory, guided) gives per-block scores,
    and the plan from them -- and from its JSON file -- routes the blocks and runs through the transformer."""
    from jaxlongvid import cli
    from jaxlongvid.methods import parse_method
    from jaxlongvid.pipeline import save

    out = tmp_path / "wan_probe.json"
    assert cli.main(["probe", "--model", save(wan_pipe, str(tmp_path / "wan")), "--prompt", PROMPTS[0], "--steps",
                     "2", "--out", str(out)]) == 0
    assert "blocks_1/attn1" in capsys.readouterr().out
    scores = json.loads(out.read_text())["scores"]  # probing.probe's (test_command_line_hook)
    names = list(wan.temporal_layer_names(WAN))
    assert list(scores["context"]) == names and list(scores["position"]) == names
    assert all(0 < s < math.log(4) for s in scores["context"].values()), scores  # 4x the keys: <= log 4 more
    assert all(s > 0 for s in scores["position"].values()), scores
    plan = probing.plan_from_scores(scores)  # median of two: the higher context score gets TSA + VRPR
    routes = [plan.for_layer(n).name for n in names]
    top = max(names, key=scores["context"].get)
    assert routes[names.index(top)] == "freeloc" and routes.count("freeloc") == 1, routes
    x = wan_input(4 * N0, seed=3)
    run = lambda method: np.asarray(plain_apply(build_denoiser(wan_pipe.config, method), wan_pipe.params["unet"],
                                                *x[:3]))
    planned, direct = run(plan), run("direct")
    assert np.all(np.isfinite(planned)) and np.max(np.abs(planned - direct)) > 1e-3
    from_file = parse_method(str(out)).resolve(names)
    assert [from_file.for_layer(n).name for n in names] == routes
