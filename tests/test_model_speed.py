"""Whole-model kernel plan, frame chunking and bfloat16 weights (issue 14): the plan per backend and choice,
chunked == unchunked UNets, and cast weights giving bit-identical outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlongvid.models.layers import KernelPlan, frame_steps, plan_kernels
from jaxlongvid.models.unet3d import UNet3D, UNet3DConfig, init_shapes
from jaxlongvid.pipeline import cast_params

LAVIE_STYLE = UNet3DConfig(family="custom", in_channels=3, out_channels=3, block_channels=(32, 64),
                           layers_per_block=1, attention_levels=(True, True), attention_heads=(1, 2),
                           cross_attention_dim=16, norm_groups=8)
VC2_STYLE = LAVIE_STYLE.replace(temporal_layout="transformer", frame_pooled_resnet_norm=False, temporal_in=True,
                                temporal_in_heads=2, temporal_in_head_dim=16, temporal_conv=True, rope_dim=0,
                                t5_buckets=0)


def random_params(shapes, seed=0):
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        if name == "kernel":
            return (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
        if name == "scale":
            return (1 + 0.1 * rng.normal(size=s.shape)).astype(np.float32)
        return (0.1 * rng.normal(size=s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def inputs(cfg, frames=8, batch=2, size=8):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(batch, frames, size, size, cfg.in_channels)).astype(np.float32)
    context = rng.normal(size=(batch, 5, cfg.cross_attention_dim)).astype(np.float32)
    return x, jnp.array([3, 700][:batch]), context


def test_plan_per_backend_and_choice():
    bf16 = jnp.bfloat16
    assert plan_kernels("auto", "gpu", bf16, 1) == KernelPlan("cudnn", "cudnn", 1)
    assert plan_kernels("auto", "gpu", jnp.float32, 1) == KernelPlan(None, None, 1)  # cuDNN needs half types
    assert plan_kernels("auto", "cpu", bf16, 1) == KernelPlan(None, None, 1)
    assert plan_kernels("auto", "tpu", bf16, 1) == KernelPlan(None, None, 1)
    assert plan_kernels("xla", "gpu", bf16, 1) == KernelPlan(None, None, 1)
    assert plan_kernels("cudnn", "gpu", bf16, 1) == KernelPlan("cudnn", "cudnn", 1)
    assert plan_kernels("pallas", "gpu", bf16, 1) == KernelPlan("cudnn", "pallas", 1)
    assert plan_kernels("pallas", "cpu", bf16, 1) == KernelPlan(None, "pallas", 1)
    assert plan_kernels("auto", "cpu", bf16).chunk_bytes == 256 * 2 ** 20
    assert plan_kernels("auto", "gpu", bf16).chunk_bytes == 4 * 2 ** 30
    with pytest.raises(ValueError, match="attention_implementation must be one of"):
        plan_kernels("flash", "gpu", bf16)


def test_frame_steps():
    assert frame_steps(128, 10, None) == 1
    assert frame_steps(128, 10, 1280) == 1
    assert frame_steps(128, 10, 1279) == 2
    assert frame_steps(128, 10, 300) == 8  # 16 frames x 10 <= 300; 32 x 10 is not
    assert frame_steps(12, 10, 35) == 4  # divisors only: 3 frames per chunk
    assert frame_steps(7, 10, 25) == 7  # a prime count goes frame by frame
    assert frame_steps(8, 100, 50) == 8  # one frame over the bound still runs, one at a time


@pytest.mark.parametrize("cfg,method", [(LAVIE_STYLE, "longdiff"), (VC2_STYLE, "freenoise")])
def test_chunked_model_equals_unchunked(cfg, method):
    """Forcing every per-frame part (spatial + cross attention, feed-forward) into frame chunks changes nothing
    beyond float rounding, with the same parameter tree."""
    params = random_params(init_shapes(cfg))
    args = inputs(cfg)
    whole = UNet3D(cfg, method, chunk_bytes=2 ** 40)
    chunked = UNet3D(cfg, method, chunk_bytes=4096)  # every block splits its 8 frames
    ref = jax.jit(whole.apply)({"params": params}, *args)
    out = jax.jit(chunked.apply)({"params": params}, *args)
    scale = float(jnp.max(jnp.abs(ref)))
    assert float(jnp.max(jnp.abs(out - ref))) <= 1e-5 * scale
    shapes = jax.eval_shape(chunked.init, jax.random.key(0), *args)["params"]
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(params)
    # the chunking really happened: the chunked program holds a loop the unchunked one does not
    text = lambda m: jax.jit(m.apply).lower({"params": params}, *args).as_text()
    assert text(chunked).count("stablehlo.while") > text(whole).count("stablehlo.while")


def test_cast_params_bf16_is_bit_exact():
    """Dense / conv weights cast to bfloat16 once give the same bfloat16 model output as float32 weights cast
    at every use; normalisation parameters and the T5 table stay float32."""
    cfg = LAVIE_STYLE
    params = random_params(init_shapes(cfg))
    cast = cast_params(params, jnp.bfloat16)
    block = cast["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]
    assert block["attn1"]["to_q"]["kernel"].dtype == jnp.bfloat16
    assert block["ff"]["proj"]["bias"].dtype == jnp.bfloat16
    assert block["norm1"]["scale"].dtype == block["norm1"]["bias"].dtype == np.float32
    assert block["attn_temp"]["t5_bias"].dtype == np.float32
    assert cast["down_blocks_0"]["resnets_0"]["norm1"]["bias"].dtype == np.float32
    apply = jax.jit(UNet3D(cfg, "direct", dtype=jnp.bfloat16).apply)
    args = inputs(cfg, frames=4)
    np.testing.assert_array_equal(np.asarray(apply({"params": cast}, *args)),
                                  np.asarray(apply({"params": params}, *args)))


@pytest.mark.parametrize("choice", ["xla", "pallas"])
def test_every_choice_runs_a_whole_model(choice):
    """An explicit implementation works for the whole model (on a CPU "pallas" maps spatial attention to XLA and
    runs the temporal kernel interpreted) and agrees with "auto"."""
    cfg = LAVIE_STYLE
    params = random_params(init_shapes(cfg))
    args = inputs(cfg, frames=4, batch=1)
    ref = jax.jit(UNet3D(cfg, "direct").apply)({"params": params}, *args)
    out = jax.jit(UNet3D(cfg, "direct", attention_implementation=choice).apply)({"params": params}, *args)
    assert float(jnp.max(jnp.abs(out - ref))) <= 1e-5 * float(jnp.max(jnp.abs(ref)))
