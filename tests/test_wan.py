"""The Wan DiT against diffusers' ``WanTransformer3DModel`` (tiny, random, built here) and the original Wan code
(``tests/fixtures/wan``), plus the 3D RoPE against a float64 NumPy reference and the full-size key layouts.

Errors are max |out - ref| / max |ref| in float32 on CPU: 5.2e-7 and 6.2e-7 against diffusers (3 and 4 frames),
3.5e-6 against the original code (its timestep sinusoid and RoPE run in float64, the port's in float32).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.readers import CheckpointError
from convert.wan import convert_transformer, init_shapes
from jaxlongvid.models.wan import WanConfig, WanTransformer, apply_rope, rope_rotation, rope_split

torch = pytest.importorskip("torch")
FIXTURES = Path(__file__).parent / "fixtures"
NETWORK_RTOL = 1e-4

# odd head count, head dim 12 (RoPE parts 4 / 4 / 4), two blocks, rope table of 4 frames
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=10, freq_dim=16, ffn_dim=20, num_layers=2, rope_max_seq_len=4)


def diffusers_model(seed: int = 0, **changes):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**dict(TINY, **changes)).eval()
    with torch.no_grad():  # every parameter random (norm scales, tables, biases included)
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


@functools.cache
def tiny_pair():
    model = diffusers_model()
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    config = WanConfig.from_diffusers(dict(model.config))
    return model, config, convert_transformer(state, config)


def run_torch(model, x, t, ctx) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(np.transpose(x, (0, 4, 1, 2, 3))), torch.from_numpy(t),
                    torch.from_numpy(ctx), return_dict=False)[0]
    return np.transpose(out.numpy(), (0, 2, 3, 4, 1))


def run_jax(config, params, x, t, ctx) -> np.ndarray:
    with jax.default_matmul_precision("highest"):
        return np.asarray(WanTransformer(config).apply({"params": params}, x, t, ctx))


def rel_err(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_rope_rotation_matches_numpy_reference():
    # float64 reference written from the definition: each axis part rotates pair k by pos * theta^(-2k/part)
    grid, d = (3, 2, 5), 20
    t_dim, h_dim, w_dim = rope_split(d)
    assert (t_dim, h_dim, w_dim) == (8, 6, 6) and rope_split(128) == (44, 42, 42)
    ref = np.zeros((3, 2, 5, d // 2))
    for f in range(3):
        for h in range(2):
            for w in range(5):
                row = []
                for pos, part in ((f, t_dim), (h, h_dim), (w, w_dim)):
                    row += [pos * 10000.0 ** (-2 * k / part) for k in range(part // 2)]
                ref[f, h, w] = row
    x = np.random.default_rng(0).standard_normal((1, 30, 2, d)).astype(np.float32)
    cos, sin = rope_rotation(grid, d)  # per-axis tables broadcast in the program: the same float32 values
    np.testing.assert_array_equal(cos, np.cos(ref).reshape(-1, d // 2).astype(np.float32))
    np.testing.assert_array_equal(sin, np.sin(ref).reshape(-1, d // 2).astype(np.float32))
    hw_cos, _ = rope_rotation(grid, d, axes=(1, 2))
    np.testing.assert_array_equal(hw_cos, np.asarray(cos)[:, t_dim // 2:])
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    z = x.astype(np.float64).reshape(1, 30, 2, d // 2, 2)
    zc = (z[..., 0] + 1j * z[..., 1]) * np.exp(1j * ref.reshape(1, 30, 1, d // 2))
    want = np.stack([zc.real, zc.imag], -1).reshape(x.shape)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("frames", [3, 4])
def test_denoiser_matches_diffusers(frames):
    model, config, params = tiny_pair()
    rng = np.random.default_rng(frames)
    x = rng.standard_normal((2, frames, 4, 6, 4)).astype(np.float32)
    t = np.array([999.0, 137.0], np.float32)
    ctx = rng.standard_normal((2, 7, 10)).astype(np.float32)
    err = rel_err(run_jax(config, params, x, t, ctx), run_torch(model, x, t, ctx))
    assert err < NETWORK_RTOL, err


def test_frames_past_rope_table():
    """6 latent frames with a 4-position table: the originals stop; the port continues the same formula, i.e.
    equals diffusers built with a longer table (the table is not a parameter, so the weights are the same)."""
    model, config, params = tiny_pair()
    longer = diffusers_model(rope_max_seq_len=64)
    longer.load_state_dict(model.state_dict())
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 6, 4, 4, 4)).astype(np.float32)
    t, ctx = np.array([500.0], np.float32), rng.standard_normal((1, 3, 10)).astype(np.float32)
    with pytest.raises(RuntimeError):  # the 4-row table cannot cover 6 frames
        run_torch(model, x, t, ctx)
    err = rel_err(run_jax(config, params, x, t, ctx), run_torch(longer, x, t, ctx))
    assert err < NETWORK_RTOL, err


def test_config_from_diffusers_rejects_image_models():
    with pytest.raises(ValueError, match="image_dim=1280"):
        WanConfig.from_diffusers(dict(TINY, image_dim=1280))


def test_wrong_checkpoint_is_refused_with_the_layout_it_looks_like():
    model, config, _ = tiny_pair()
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="look like a diffusers WanTransformer3DModel"):
        convert_transformer(state, config, layout="original")
    with pytest.raises(CheckpointError, match="model parameters have no checkpoint key"):
        convert_transformer(state, config.replace(num_layers=3))


def test_bad_latents_are_refused():
    _, config, params = tiny_pair()
    ctx = np.zeros((1, 2, 10), np.float32)
    with pytest.raises(ValueError, match="not divisible by patch"):
        run_jax(config, params, np.zeros((1, 2, 3, 4, 4), np.float32), np.zeros(1, np.float32), ctx)
    with pytest.raises(ValueError, match="unknown method 'nonesuch'"):
        WanTransformer(config, method="nonesuch").apply({"params": params}, np.zeros((1, 2, 4, 4, 4)),
                                                        np.zeros(1), ctx)


def test_denoiser_matches_original_wan_code():
    """Tiny random WanModel run by the original code (tests/fixtures/wan/README.md), original key layout."""
    folder = FIXTURES / "wan" / "original_tiny"
    config = WanConfig.from_original(json.loads((folder / "config.json").read_text()))
    params = convert_transformer(folder / "diffusion_pytorch_model.safetensors", config, layout="original")
    io = np.load(folder / "io.npz")
    x = np.transpose(io["x"], (0, 2, 3, 4, 1))
    got = run_jax(config, params, x, io["t"], io["context"])
    err = rel_err(got, np.transpose(io["out"], (0, 2, 3, 4, 1)))
    assert err < NETWORK_RTOL, err


@pytest.mark.parametrize("size,config", [("1.3b", WanConfig.wan_1_3b()), ("14b", WanConfig.wan_14b())])
@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_full_size_key_layouts(size, config, layout):
    """Every key of the released 1.3B / 14B transformers (tests/fixtures/manifests/wan2.1_*, names and shapes of
    the models built on the meta device) maps onto the preset's eval_shape tree, leaf by leaf."""
    from convert.rules import plan_conversion
    from convert.wan import LAYOUT_RULES

    manifest = json.loads((FIXTURES / "manifests" / f"wan2.1_t2v_{size}_{layout}.json").read_text())
    shapes = {k: tuple(v[0]) for k, v in manifest["keys"].items()}
    if layout == "diffusers":
        assert WanConfig.from_diffusers(manifest["constructor_config"]) == config
    else:
        assert WanConfig.from_original(manifest["constructor_config"]) == config
    plan = plan_conversion(shapes, LAYOUT_RULES[layout], init_shapes(config), manifest["source"])
    assert len(plan) == manifest["num_keys"]
    n = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(init_shapes(config)))
    assert n == manifest["num_elements"]


def test_sharded_diffusers_folder_converts_exactly(tmp_path):
    """save_pretrained with small shards (safetensors + index.json): the folder converts to the same params."""
    from convert.wan import convert_transformer_folder

    model, config, params = tiny_pair()
    model.save_pretrained(tmp_path / "transformer", max_shard_size="20KB")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    got_config, got = convert_transformer_folder(tmp_path / "transformer")
    assert got_config == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, params)


def test_frames_sharded_equals_unsharded():
    """Tokens split over a (frames=4, data=2) mesh of 8 host devices (the model's declared constraints; XLA
    gathers keys for attention) give the unsharded output."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxlongvid import sharding

    _, config, params = tiny_pair()
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 4, 4, 6, 4)).astype(np.float32)
    t, ctx = np.array([999.0, 3.0], np.float32), rng.standard_normal((2, 5, 10)).astype(np.float32)
    want = run_jax(config, params, x, t, ctx)
    mesh = sharding.make_mesh(frames=4, data=2)
    apply = jax.jit(lambda p, x, t, c: WanTransformer(config).apply({"params": p}, x, t, c))
    with jax.set_mesh(mesh), jax.default_matmul_precision("highest"):
        xs = jax.device_put(x, NamedSharding(mesh, P(sharding.DATA, sharding.FRAMES)))
        got = apply(params, xs, t, ctx)
    assert len(got.sharding.device_set) == 8
    assert rel_err(np.asarray(got), want) < 1e-5
