"""UNet converters: real full-size key manifests, configs, torch / safetensors readers, bad input, streaming,
and every long-video method on every converted tiny model at 128 frames."""

from __future__ import annotations

import functools
import json
import shutil
import tracemalloc
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from convert.readers import CheckpointError
from convert.tree import flat_shapes
from convert.unet import (convert_lavie_unet, convert_modelscope_unet, convert_state, convert_videocrafter_unet,
                          detect_family, lavie_config, lavie_rules, modelscope_config, modelscope_rules,
                          open_checkpoint, plan_conversion, videocrafter_config, videocrafter_rules)
from jaxlongvid.methods import PRESETS
from jaxlongvid.models.unet3d import UNet3D, UNet3DConfig, count_parameters, init_shapes, temporal_layer_names

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny"
LAVIE = TINY / "lavie"
VC1 = TINY / "videocrafter1"
VC2 = TINY / "videocrafter2"


class NotAWeight:  # pickled into a checkpoint: loading it would need arbitrary code
    pass


def manifest(name: str) -> dict:
    return json.loads((FIXTURES / "manifests" / f"{name}.json").read_text())


# ---- the released architectures --------------------------------------------------------------------------------
MANIFESTS = {
    "lavie_base_unet": (UNet3DConfig.lavie, lavie_rules, lavie_config),
    "videocrafter1_t2v_512_unet": (UNet3DConfig.videocrafter1, lambda c: videocrafter_rules(c, 1),
                                   lambda kw: videocrafter_config(kw, 1)),
    "videocrafter2_t2v_512_unet": (UNet3DConfig.videocrafter2, lambda c: videocrafter_rules(c, 2),
                                   lambda kw: videocrafter_config(kw, 2)),
}


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_maps_onto_the_preset(name):
    """Every key of the real checkpoint maps to one leaf of the preset's model (shapes after the transposes);
    no leaf is left without a key. Only LaVie's 16 shared rotary constants are dropped."""
    preset, rules, from_kwargs = MANIFESTS[name]
    m = manifest(name)
    config = preset()
    assert from_kwargs(m["constructor_config"]) == config  # the preset is the released constructor call
    shapes = {k: tuple(v[0]) for k, v in m["keys"].items()}
    expected = init_shapes(config)
    plan = plan_conversion(shapes, rules(config), expected, name)  # raises on any unmapped key or leaf
    assert set(plan) == set(shapes)
    dropped = sorted(k for k, (path, _) in plan.items() if path is None)
    assert dropped == sorted(k for k in shapes if k.endswith("rotary_emb.freqs"))
    assert len(dropped) == (16 if name.startswith("lavie") else 0)
    assert len(plan) - len(dropped) == len(flat_shapes(expected))
    assert count_parameters(expected) == m["num_elements"] - 16 * len(dropped)


def test_modelscope_real_architecture_keys():
    """diffusers' UNet3DConditionModel defaults (the ModelScope 1.7B / ZeroScope v2 architecture), built on
    the meta device for its key list."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        model = diffusers.UNet3DConditionModel()
    config = UNet3DConfig.modelscope()
    assert modelscope_config(dict(model.config)) == config
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = init_shapes(config)
    plan = plan_conversion(shapes, modelscope_rules(config), expected, "modelscope meta")
    assert set(plan) == set(shapes) and all(path is not None for path, _ in plan.values())
    assert count_parameters(expected) == sum(int(np.prod(s)) for s in shapes.values())


def test_detect_family():
    assert detect_family(load_file(LAVIE / "model.safetensors")) == "lavie"
    assert detect_family(load_file(VC1 / "model.safetensors")) == "videocrafter1"
    assert detect_family(manifest("videocrafter2_t2v_512_unet")["keys"]) == "videocrafter2"
    assert detect_family(["encoder.conv_in.weight"]) is None


def test_temporal_layer_order():
    names = temporal_layer_names(UNet3DConfig.videocrafter1())
    assert names[:3] == ("transformer_in/transformer_blocks_0/attn1", "transformer_in/transformer_blocks_0/attn2",
                         "down_blocks_0/temp_attentions_0/transformer_blocks_0/attn1")
    lavie = temporal_layer_names(UNet3DConfig.lavie())
    assert len(lavie) == 16 and lavie[6] == "mid_block/attentions_0/transformer_blocks_0/attn_temp"


# ---- readers, configs, dtypes, memory ----------------------------------------------------------------------------
def test_pt_and_safetensors_agree():
    cfg_a, a = convert_lavie_unet(LAVIE / "lavie_tiny.pt", LAVIE / "config.json")
    cfg_b, b = convert_lavie_unet(LAVIE / "model.safetensors", LAVIE / "config.json")
    assert cfg_a == cfg_b
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert x.dtype == np.float32 and np.array_equal(x, y)


def test_kernel_layouts():
    cfg, params = convert_videocrafter_unet(VC1 / "model.safetensors", 1, VC1 / "config.json")
    sd = load_file(VC1 / "model.safetensors")
    p = "model.diffusion_model."
    np.testing.assert_array_equal(params["conv_in"]["kernel"], sd[p + "input_blocks.0.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["transformer_in"]["proj_in"]["kernel"],
                                  sd[p + "init_attn.0.proj_in.weight"][:, :, 0].T)  # Conv1d k=1
    attn = params["down_blocks_0"]["temp_attentions_0"]["transformer_blocks_0"]["attn2"]
    np.testing.assert_array_equal(attn["to_q"]["kernel"], sd[p + "input_blocks.1.2.transformer_blocks.0.attn2.to_q.weight"].T)
    np.testing.assert_array_equal(attn["rel_v"], sd[p + "input_blocks.1.2.transformer_blocks.0.attn2.relative_position_v.embeddings_table"])
    cfg2, params2 = convert_videocrafter_unet(VC2 / "model.ckpt", 2, VC2 / "config.json")
    conv = params2["up_blocks_0"]["resnets_1"]["temp_conv"]["conv4"]["kernel"]
    assert conv.shape == (3, 1, 1, 32, 32)  # Conv3d [o, i, 3, 1, 1] -> [3, 1, 1, i, o]


def test_config_sources(tmp_path):
    kwargs = json.loads((VC2 / "config.json").read_text())["constructor_kwargs"]
    yaml = pytest.importorskip("yaml")
    inference = tmp_path / "inference_t2v_512_v2.0.yaml"
    inference.write_text(yaml.safe_dump({"model": {"params": {"unet_config": {"params": kwargs}}}}))
    plain = tmp_path / "kwargs.json"
    plain.write_text(json.dumps(kwargs))
    configs = {convert_videocrafter_unet(VC2 / "model.ckpt", 2, c)[0]
               for c in (inference, plain, kwargs, VC2 / "config.json")}
    assert len(configs) == 1
    cfg = configs.pop()
    assert cfg.family == "videocrafter2" and cfg.temporal_conv and cfg.fps_conditioning and cfg.rel_distance == 0
    assert convert_videocrafter_unet(VC2 / "model.ckpt", 2, cfg.to_dict())[0] == cfg  # our own config dict


def test_fp16_state_dict_is_read_as_float32():
    state = {k: v.astype(np.float16) for k, v in load_file(LAVIE / "model.safetensors").items()}
    _, params = convert_lavie_unet(state, LAVIE / "config.json")
    kernel = params["conv_in"]["kernel"]
    assert kernel.dtype == np.float32
    np.testing.assert_array_equal(kernel, state["conv_in.weight"].astype(np.float32).transpose(2, 3, 1, 0))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_conversion_streams(suffix):
    """Peak traced host memory while converting stays near the output size (one checkpoint tensor at a time),
    well below the two full copies a load-everything-then-convert approach holds."""
    path = LAVIE / ("model.safetensors" if suffix == ".safetensors" else "lavie_tiny.pt")
    cfg = lavie_config(json.loads((LAVIE / "config.json").read_text())["constructor_kwargs"])
    expected = init_shapes(cfg)
    tracemalloc.start()
    try:
        params = convert_state(open_checkpoint(path), lavie_rules(cfg), expected)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    largest = max(x.nbytes for x in jax.tree_util.tree_leaves(params))
    assert peak < total + 4 * largest + (1 << 20), (peak, total, largest)


# ---- bad input -------------------------------------------------------------------------------------------------------
def test_wrong_family_is_named():
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a LaVie UNet checkpoint.*VideoCrafter1"):
        convert_lavie_unet(VC1 / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lavie_tiny\.pt: not a VideoCrafter1 UNet.*looks like a LaVie"):
        convert_videocrafter_unet(LAVIE / "lavie_tiny.pt", 1)
    with pytest.raises(CheckpointError, match=r"model\.ckpt: not a VideoCrafter1 UNet.*VideoCrafter2.*temopral_conv"):
        convert_videocrafter_unet(VC2 / "model.ckpt", 1)
    with pytest.raises(CheckpointError, match=r"temporal_conv=True does not match version 1"):
        convert_videocrafter_unet(VC2 / "model.ckpt", 1, VC2 / "config.json")
    with pytest.raises(CheckpointError, match=r"not a ModelScope UNet.*LaVie"):
        convert_modelscope_unet(LAVIE / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"LaVie UNet of another architecture: pass its original constructor"):
        convert_lavie_unet(LAVIE / "model.safetensors")  # the tiny checkpoint against the full-size preset


def test_truncated_files(tmp_path):
    for name in ("lavie_tiny.pt", "model.safetensors"):
        data = (LAVIE / name).read_bytes()
        broken = tmp_path / name
        broken.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=str(broken)):
            convert_lavie_unet(broken, LAVIE / "config.json")


def test_pickle_needing_code_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    state = {k: torch.from_numpy(v) for k, v in load_file(LAVIE / "model.safetensors").items()}
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": state, "extra": NotAWeight()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused to load"):
        convert_lavie_unet(path, LAVIE / "config.json")


def test_unused_and_missing_keys_are_listed():
    state = load_file(LAVIE / "model.safetensors")
    extra = {**state, "down_blocks.0.resnets.0.mystery.weight": np.zeros(3, np.float32)}
    with pytest.raises(CheckpointError, match=r"1 checkpoint keys match no LaVie UNet parameter: .*mystery"):
        convert_lavie_unet(extra, LAVIE / "config.json")
    fewer = {k: v for k, v in state.items() if k != "conv_out.bias"}
    with pytest.raises(CheckpointError, match=r"1 model parameters have no checkpoint key: conv_out/bias"):
        convert_lavie_unet(fewer, LAVIE / "config.json")
    wrong = {**state, "conv_out.bias": np.zeros(5, np.float32)}
    with pytest.raises(CheckpointError, match=r"shape mismatch: conv_out/bias"):
        convert_lavie_unet(wrong, LAVIE / "config.json")
    key = "mid_block.attentions.0.transformer_blocks.0.attn_temp.rotary_emb.freqs"
    with pytest.raises(CheckpointError, match=r"rotary freqs .* differ"):
        convert_lavie_unet({**state, key: state[key] * 2}, LAVIE / "config.json")


def test_bad_configs_and_paths(tmp_path):
    kwargs = json.loads((LAVIE / "config.json").read_text())["constructor_kwargs"]
    with pytest.raises(CheckpointError, match=r"use_first_frame=True"):
        lavie_config({**kwargs, "use_first_frame": True})
    with pytest.raises(CheckpointError, match=r"unknown constructor arguments \['wings'\]"):
        lavie_config({**kwargs, "wings": 2})
    with pytest.raises(CheckpointError, match=r"use_causal_attention=True"):
        videocrafter_config({**json.loads((VC1 / "config.json").read_text())["constructor_kwargs"],
                             "use_causal_attention": True}, 1)
    with pytest.raises(CheckpointError, match="no such file"):
        convert_lavie_unet(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="no weights file"):
        convert_modelscope_unet(tmp_path)
    with pytest.raises(ValueError, match="version must be 1 or 2"):
        convert_videocrafter_unet(VC1 / "model.safetensors", 3)
    unet_dir = tmp_path / "unet"
    unet_dir.mkdir()
    shutil.copy(LAVIE / "model.safetensors", unet_dir / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="not a ModelScope UNet"):
        convert_modelscope_unet(unet_dir)


# ---- every method on every converted tiny model at 128 frames ---------------------------------------------------
@functools.cache
def tiny_models() -> dict:
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    modelscope = diffusers.UNet3DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))
    return {
        "lavie": convert_lavie_unet(LAVIE / "model.safetensors", LAVIE / "config.json"),
        "videocrafter1": convert_videocrafter_unet(VC1 / "model.safetensors", 1, VC1 / "config.json"),
        "videocrafter2": convert_videocrafter_unet(VC2 / "model.ckpt", 2, VC2 / "config.json"),
        "modelscope": convert_modelscope_unet(modelscope.state_dict(), dict(modelscope.config)),
    }


FRAMES = 128
REAL_RUN = {"lavie": "longdiff", "videocrafter1": "freeloc", "videocrafter2": "freelong", "modelscope": "freenoise"}


def _inputs(cfg: UNet3DConfig):
    key_x, key_c = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (1, FRAMES, 2, 2, cfg.in_channels))
    context = jax.random.normal(key_c, (1, 4, cfg.cross_attention_dim))
    fps = jnp.array([24]) if cfg.fps_conditioning else None
    return x, jnp.array([500]), context, fps


@pytest.mark.parametrize("family", sorted(REAL_RUN))
def test_every_method_at_128_frames(family):
    """All presets traced at 128 frames (abstract evaluation: shapes, static maps, masks, merges); one preset
    per family really runs."""
    cfg, params = tiny_models()[family]
    args = _inputs(cfg)
    for name in PRESETS:
        out = jax.eval_shape(UNet3D(cfg, method=name).apply, {"params": params}, *args)
        assert out.shape == (1, FRAMES, 2, 2, cfg.out_channels), name
    out = jax.jit(UNet3D(cfg, method=REAL_RUN[family]).apply)({"params": params}, *args)
    assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.std(out)) > 0
