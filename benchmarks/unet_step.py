"""One denoiser step of a full-size UNet per method and frame count: s/step, ratio to direct, MFU, compile time,
memory and the kernels that ran.

The step is ``jaxlongvid.sampling.guided_output``, what every step of ``jaxlongvid.sample`` runs: one
classifier-free-guidance model call on the (negative, prompt) pair (model batch 2), then the guidance combine.
Weights are random (no download): the parameter shapes come from ``jax.eval_shape`` of the model and are drawn on
the device, dense / conv weights directly in the compute dtype as ``sample`` casts them (``cast_params``).

Per row: median seconds of ``--repeats`` timed calls after ``--warmup`` untimed ones (each ``block_until_ready``);
the ratio to ``direct`` at the same frame count; MFU = model FLOPs / s / ``--peak-tflops``, where the model FLOPs
are counted from the program: the multiply-adds of every ``dot_general`` and convolution in the jaxpr of the
``direct`` step on the XLA path (2 FLOPs each; scans counted once per iteration), the same figure for every
method, so a method's MFU is the useful fraction of its time; compile seconds (lower + compile); memory: the
process's peak bytes in use so far (``memory_stats``; it never goes down, so rows run in increasing frame
order) and the compiled program's own need (arguments + outputs + temporaries, ``memory_analysis``); the kernel
plan (``plan_kernels``) and the fused-attention (cuDNN) and Triton / Pallas custom calls in the compiled program.
A row that fails (out of memory, or anything else) prints one ``SKIP`` line with the first line of the error.

On one H100 (peak dense bf16 989 TFLOP/s; an H200 has the same):

    python benchmarks/unet_step.py --config lavie videocrafter2 --frames 16 128 256 512 1024

Tiny on a CPU (tests/test_model_speed.py runs this for one step):

    python benchmarks/unet_step.py --config tiny --frames 16 --methods direct longdiff --repeats 1 --warmup 0
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxlongvid.bench.timing import time_compiled
from jaxlongvid.methods import PRESETS
from jaxlongvid.models.layers import IMPLEMENTATIONS, plan_kernels
from jaxlongvid.models.unet3d import UNet3DConfig, init_shapes
from jaxlongvid.pipeline import PipelineConfig, cast_params, load_config
from jaxlongvid.sampling import guided_output

H100_BF16_TFLOPS = 989.0
CONTEXT_TOKENS = 77  # CLIP / OpenCLIP context length of the full-size models


def unet_config(name: str) -> tuple[UNet3DConfig, int, tuple[int, int]]:
    """The UNet config, the image pixels per latent pixel and the default (height, width) in pixels."""
    if name == "tiny":
        config = load_config("tiny")
        return config.unet, config.latent_factor, (config.height, config.width)
    return getattr(UNet3DConfig, name)(), 8, (320, 512)


def random_params(config: UNet3DConfig, dtype, seed: int = 0):
    """Random weights of the model's shape tree, drawn on the device: kernels ~ N(0, 1 / fan_in), norm scales 1,
    other leaves ~ N(0, 0.02); then ``cast_params`` to the compute dtype."""
    key = jax.random.key(seed)

    def draw(i, path, s):
        name, k = path[-1].key, jax.random.fold_in(key, i)
        if name == "kernel":
            return jax.random.normal(k, s.shape, jnp.float32) / np.sqrt(np.prod(s.shape[:-1]))
        if name == "scale":
            return jnp.ones(s.shape, jnp.float32)
        return 0.02 * jax.random.normal(k, s.shape, jnp.float32)

    leaves, tree = jax.tree_util.tree_flatten_with_path(init_shapes(config))
    params = jax.tree_util.tree_unflatten(tree, [draw(i, path, s) for i, (path, s) in enumerate(leaves)])
    return cast_params(params, dtype)


def pipeline_config(config: UNet3DConfig, dtype: str, implementation: str) -> PipelineConfig:
    """A denoiser-only pipeline config (no VAE, no text encoder) for ``guided_output``."""
    return PipelineConfig(family=config.family, unet=config, text=None, vae=None, missing=("vae", "text"),
                          dtype=dtype, attention_implementation=implementation)


def step_fn(pipe_config: PipelineConfig, method: str):
    def step(params, x, context):
        return guided_output(pipe_config, method, params, x, jnp.int32(500), context, None, 7.5, True)

    return jax.jit(step)


def step_inputs(config: UNet3DConfig, frames: int, h: int, w: int):
    x = jax.random.normal(jax.random.key(1), (1, frames, h, w, config.in_channels), jnp.float32)
    context = jax.random.normal(jax.random.key(2), (2, CONTEXT_TOKENS, config.cross_attention_dim), jnp.float32)
    return x, context


# ---- FLOPs counted from the program -------------------------------------------------------------------------
def _eqn_flops(eqn) -> float:
    if eqn.primitive.name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        out = eqn.outvars[0].aval.shape
        return 2.0 * np.prod(out, dtype=np.float64) * np.prod([lhs[d] for d in contract], dtype=np.float64)
    if eqn.primitive.name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial) dims
        per_output = np.prod([rhs[d] for d in spec[1:]], dtype=np.float64)  # in / groups x kernel window
        return 2.0 * np.prod(eqn.outvars[0].aval.shape, dtype=np.float64) * per_output
    return 0.0


def jaxpr_flops(jaxpr) -> float:
    """Multiply-add FLOPs (x2) of the dots and convolutions of a closed jaxpr, sub-jaxprs included (a scan's
    body once per iteration)."""
    total = 0.0
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        total += _eqn_flops(eqn)
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                    total += times * jaxpr_flops(sub)
    return total


def model_flops(config: UNet3DConfig, dtype: str, params, x, context) -> float:
    """FLOPs of one ``direct`` step on the XLA path, frames unchunked (traced only, nothing compiled)."""
    pipe = pipeline_config(config, dtype, "xla")
    step = lambda p, x_, c: guided_output(pipe, "direct", p, x_, jnp.int32(500), c, None, 7.5, True)
    return jaxpr_flops(jax.make_jaxpr(step)(params, x, context))


# ---- one row ------------------------------------------------------------------------------------------------
def custom_calls(hlo: str) -> str:
    fmha = hlo.count('custom_call_target="__cudnn$fmha')
    triton = hlo.count('custom_call_target="__gpu$xla.gpu.triton')
    return f"cudnn-fmha={fmha} triton={triton}"


def gib(n) -> str:
    return "-" if n is None else f"{n / 2 ** 30:.1f}"


def run_row(fn, params, x, context, repeats: int, warmup: int) -> dict:
    row = time_compiled(fn, params, x, context, repeats=repeats, warmup=warmup)
    return dict(row, kernels=custom_calls(row.pop("hlo")))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", nargs="+", default=["lavie"], choices=["lavie", "videocrafter1",
                        "videocrafter2", "modelscope", "tiny"])
    parser.add_argument("--frames", nargs="+", type=int, default=[16, 128])
    parser.add_argument("--methods", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--height", type=int, help="pixels (default: the config's 320, tiny 32)")
    parser.add_argument("--width", type=int, help="pixels (default: the config's 512, tiny 32)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--implementation", default="auto", choices=IMPLEMENTATIONS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS,
                        help="the device's dense peak at --dtype (H100 / H200 bf16: 989)")
    args = parser.parse_args(argv)
    methods = ["direct"] + [m for m in args.methods if m != "direct"]  # direct first: the ratio's base

    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, dtype {args.dtype}, "
          f"implementation {args.implementation}: {plan_kernels(args.implementation, jax.default_backend(), args.dtype)}")
    print("MFU: model FLOPs (dots + convs of the direct step, counted from its jaxpr) / s / "
          f"{args.peak_tflops:g} TFLOP/s; memory GiB: process peak so far / compiled program's need")
    for name in args.config:
        config, factor, (height, width) = unet_config(name)
        height, width = args.height or height, args.width or width
        h, w = height // factor, width // factor
        params = random_params(config, args.dtype)
        print(f"\n{name}: {sum(p.size for p in jax.tree_util.tree_leaves(params)) / 1e6:.0f}M parameters, "
              f"{height}x{width} (latent {h}x{w}), batch 2 (one guided prompt)")
        print(f"{'frames':>6} {'method':<16} {'s/step':>8} {'vs direct':>9} {'MFU':>6} {'TFLOP':>7} "
              f"{'compile s':>9} {'peak':>6} {'need':>6}  kernels")
        for frames in sorted(args.frames):
            x, context = step_inputs(config, frames, h, w)
            flops = model_flops(config, args.dtype, params, x, context)
            base = None
            for method in methods:
                fn = step_fn(pipeline_config(config, args.dtype, args.implementation), method)
                try:
                    row = run_row(fn, params, x, context, args.repeats, args.warmup)
                except Exception as e:  # out of memory, or a compile / runtime failure: report and go on
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                    print(f"{frames:>6} {method:<16} SKIP {type(e).__name__}: {first}", flush=True)
                    continue
                s = row["seconds"]
                base = s if method == "direct" else base
                ratio = f"{s / base:.2f}" if base else "-"
                mfu = flops / s / (args.peak_tflops * 1e12)
                print(f"{frames:>6} {method:<16} {s:>8.3f} {ratio:>9} {100 * mfu:>5.1f}% {flops / 1e12:>7.4g} "
                      f"{row['compile_s']:>9.1f} {gib(row['peak']):>6} {gib(row['need']):>6}  {row['kernels']}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
