"""Whole-model kernel plan, frame chunking and bfloat16 weights (issue 14): the plan per backend and choice,
chunked == unchunked UNets, and cast weights giving bit-identical outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlongvid.models.layers import KernelPlan, frame_steps, plan_kernels
from jaxlongvid.models.unet3d import UNet3D, UNet3DConfig, init_shapes
from jaxlongvid.pipeline import cast_params

# one level (so a single attention module plus the middle block's): few modules, quick to compile
LAVIE_STYLE = UNet3DConfig(family="custom", in_channels=3, out_channels=3, block_channels=(32,),
                           layers_per_block=1, attention_levels=(True,), attention_heads=(1,),
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
    assert plan_kernels("auto", "gpu", bf16, 1) == KernelPlan("cudnn", "auto", 1)
    assert plan_kernels("auto", "gpu", jnp.float32, 1) == KernelPlan(None, "auto", 1)  # cuDNN needs half types
    assert plan_kernels("auto", "cpu", bf16, 1) == KernelPlan(None, "auto", 1)
    assert plan_kernels("auto", "tpu", bf16, 1) == KernelPlan(None, "auto", 1)
    assert plan_kernels("xla", "gpu", bf16, 1) == KernelPlan(None, None, 1)
    assert plan_kernels("cudnn", "gpu", bf16, 1) == KernelPlan("cudnn", "cudnn", 1)
    assert plan_kernels("pallas", "gpu", bf16, 1) == KernelPlan("cudnn", "pallas", 1)
    assert plan_kernels("pallas", "cpu", bf16, 1) == KernelPlan(None, "pallas", 1)
    assert plan_kernels("auto", "cpu", bf16).chunk_bytes == 256 * 2 ** 20
    assert plan_kernels("auto", "gpu", bf16).chunk_bytes == 8 * 2 ** 30
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


@pytest.mark.parametrize("cfg", [LAVIE_STYLE, VC2_STYLE], ids=["lavie_layout", "videocrafter2_layout"])
def test_chunked_model_equals_unchunked(cfg):
    """Forcing every per-frame part (spatial + cross attention, feed-forward) into frame chunks changes nothing
    beyond float rounding, with the same parameter tree. (The chunks lie outside temporal attention, so one
    method covers them all.)"""
    params = random_params(init_shapes(cfg))
    args = inputs(cfg, frames=4, batch=1)
    whole = UNet3D(cfg, "direct", chunk_bytes=2 ** 40)
    chunked = UNet3D(cfg, "direct", chunk_bytes=4096)  # every block splits its 4 frames
    lowered = {m: jax.jit(m.apply).lower({"params": params}, *args) for m in (whole, chunked)}
    ref, out = (lowered[m].compile()({"params": params}, *args) for m in (whole, chunked))
    scale = float(jnp.max(jnp.abs(ref)))
    assert float(jnp.max(jnp.abs(out - ref))) <= 1e-5 * scale
    shapes = jax.eval_shape(chunked.init, jax.random.key(0), *args)["params"]
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(params)
    # the chunking really happened: the chunked program holds loops the unchunked one does not
    loops = lambda m: lowered[m].as_text().count("stablehlo.while")
    assert loops(chunked) > loops(whole)


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


def test_pallas_runs_a_whole_model():
    """"pallas" works for a whole model (it raised in spatial attention before; on a CPU spatial attention maps
    to XLA, and direct's temporal attention has no mapped positions for the kernel) and agrees with "auto"
    (on a CPU: the "xla" plan, see test_plan_per_backend_and_choice)."""
    cfg = LAVIE_STYLE
    params = random_params(init_shapes(cfg))
    args = inputs(cfg, frames=4, batch=1)
    ref = jax.jit(UNet3D(cfg, "direct").apply)({"params": params}, *args)
    out = jax.jit(UNet3D(cfg, "direct", attention_implementation="pallas").apply)({"params": params}, *args)
    assert float(jnp.max(jnp.abs(out - ref))) <= 1e-5 * float(jnp.max(jnp.abs(ref)))


def test_unet_step_benchmark_runs_tiny(capsys):
    """benchmarks/unet_step.py in its tiny CPU mode, one timed step, so the script cannot rot: a row per method
    with a positive time, direct's ratio 1.00, and a FLOP count equal to the model's dots and convs."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "unet_step.py"
    spec = importlib.util.spec_from_file_location("unet_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--config", "tiny", "--frames", "4", "--methods", "direct", "--repeats", "1",
                       "--warmup", "0", "--dtype", "float32", "--height", "16", "--width", "16"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("     4 ")]
    assert [r[1] for r in rows] == ["direct"]
    assert float(rows[0][2]) > 0 and rows[0][3] == "1.00" and float(rows[0][5]) > 0  # s/step, ratio, TFLOP
    # the counted FLOPs: one dense layer's dot is 2 * rows * in * out
    x = jnp.ones((3, 5, 7))
    closed = jax.make_jaxpr(lambda a, w: a @ w)(x, jnp.ones((7, 11)))
    assert bench.jaxpr_flops(closed) == 2 * 3 * 5 * 7 * 11
    scanned = jax.make_jaxpr(lambda a, w: jax.lax.map(lambda y: y @ w, a))(x, jnp.ones((7, 11)))
    assert bench.jaxpr_flops(scanned) == 2 * 3 * 5 * 7 * 11
