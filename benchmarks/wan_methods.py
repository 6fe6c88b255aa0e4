"""Long-video methods on the Wan2.1 DiT: one classifier-free-guidance step per method and length.

The step is the denoiser on the guidance pair (batch 2, 512 text tokens) and the guidance combination, with random
weights (speed does not depend on them), as ``benchmarks/wan_step.py`` times it, here under each method: seconds per
step (median), the ratio to ``direct`` at the same length, compile seconds, the process's peak bytes in use so far
(``memory_stats``; it never goes down, so lengths run in increasing order) and the compiled program's own need
(arguments + outputs + temporaries, ``memory_analysis``). A method is any name ``get_method`` takes: ``freeloc-wan``
is FreeLOC's published layer assignment for the 30-block 1.3B model (tiered sparse attention + VRPR on 17 blocks,
VRPR alone on 13), ``freeloc`` the tiered Method on every block. On a GPU the attention implementation is cuDNN:
``direct`` and ``riflex`` are one fused call per layer, methods that map positions or mask frames one fused call per
group of query latent frames over the key frames each keeps (``attention.kernels.fused.attend_fused_frames``),
merges a call per window / branch. A row that fails (out of memory, a bad method name) prints one ``SKIP`` line with
the first line of the error.

On one H100 / H200 (the issue's setting: 1.3B, 480x832, 81 / 161 / 321 frames = 21 / 41 / 81 latent frames,
bfloat16):

    python benchmarks/wan_methods.py

The block-sparse Pallas kernel (``attention_implementation="pallas"``: ``attention.kernels.sparse``, only the key
frames each query frame keeps, mapped frame RoPE inside the kernel) beside cuDNN, each method under both; ``x
direct`` is against the first attention's ``direct`` at the same length:

    python benchmarks/wan_methods.py --attention cudnn,pallas

On a CPU, a tiny model in float32 (what the test runs; native length 2 latent frames so every method acts):

    python benchmarks/wan_methods.py --size tiny --height 32 --width 32 --frames 9 --dtype float32 --repeats 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wan_step import latent_grid  # noqa: E402

from jaxlongvid.bench.timing import time_compiled  # noqa: E402
from jaxlongvid.methods import get_method  # noqa: E402
from jaxlongvid.models.wan import WanConfig, WanTransformer  # noqa: E402

SIZES = {"1.3b": WanConfig.wan_1_3b(),
         "tiny": WanConfig(num_heads=3, head_dim=32, ffn_dim=64, num_layers=2, text_dim=64, native_frames=2)}
METHODS = ("direct", "freeloc-wan", "freeloc", "longdiff", "riflex", "freenoise", "freelong")


def random_params(config: WanConfig, dtype, grid, text_len: int):
    """Random weights (normal, 0.02) in ``dtype``, drawn on the device from the model's shapes."""
    model = WanTransformer(config)
    pt, ph, pw = config.patch_size
    small = jnp.zeros((1, pt, ph, pw, config.in_channels)), jnp.zeros((1,)), jnp.zeros((1, 1, config.text_dim))
    shapes = jax.eval_shape(model.init, jax.random.key(0), *small)["params"]
    leaves, tree = jax.tree_util.tree_flatten(shapes)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    draw = jax.jit(lambda key, shape: 0.02 * jax.random.normal(key, shape, dtype), static_argnums=1)
    return jax.tree_util.tree_unflatten(tree, [draw(key, leaf.shape) for key, leaf in zip(keys, leaves)])


def step_fn(config: WanConfig, method, dtype, implementation):
    model = WanTransformer(config, method=method, dtype=dtype, attention_implementation=implementation)

    @jax.jit
    def step(params, x, context):
        out = model.apply({"params": params}, jnp.concatenate([x, x]), jnp.full((2,), 999.0), context)
        uncond, cond = jnp.split(out, 2)
        return uncond + 5.0 * (cond - uncond)

    return step


def run_row(step, params, x, context, repeats: int) -> dict:
    return time_compiled(step, params, x, context, repeats=repeats, warmup=1)


def gib(n) -> str:
    return "-" if n is None else f"{n / 2 ** 30:.1f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1.3b")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames", default="81,161,321", help="video frame counts (4k + 1), comma separated")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--attention", default="auto",
                        help="comma-separated: auto (cudnn on GPU, else xla), cudnn, xla, pallas (block-sparse kernel)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    config = SIZES[args.size]
    dtype = jnp.dtype(args.dtype)
    named = {"auto": "cudnn" if jax.default_backend() == "gpu" else None, "xla": None}
    implementations = [named.get(a.strip(), a.strip()) for a in args.attention.split(",")]
    frame_counts = sorted(int(f) for f in args.frames.split(","))
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    print(f"Wan {args.size} (native {config.native_frames} latent frames), {args.height}x{args.width}, CFG pair, "
          f"{args.dtype}, device {jax.devices()[0].device_kind}; "
          f"memory GiB: process peak so far / compiled program's need")
    print(f"{'frames':>6} {'latent':>6} {'tokens':>7} {'attention':<9} {'method':<12} {'s/step':>9} {'x direct':>8} "
          f"{'compile s':>9} {'peak':>6} {'need':>6}")
    params = None
    for frames in frame_counts:
        grid = latent_grid(frames, args.height, args.width)
        pt, ph, pw = config.patch_size
        tokens = (grid[0] // pt) * (grid[1] // ph) * (grid[2] // pw)
        if params is None:
            params = random_params(config, dtype, grid, args.text_len)
        keys = jax.random.split(jax.random.key(1), 2)
        x = jax.random.normal(keys[0], (1,) + tuple(grid) + (config.in_channels,), jnp.float32)
        context = jax.random.normal(keys[1], (2, args.text_len, config.text_dim), jnp.float32).astype(dtype)
        direct = None
        for which, implementation in enumerate(implementations):
            for name in names:
                head = f"{frames:>6} {grid[0]:>6} {tokens:>7} {implementation or 'xla':<9} {name:<12}"
                try:
                    row = run_row(step_fn(config, get_method(name), dtype, implementation), params, x,
                                  context, args.repeats)
                except Exception as e:  # noqa: BLE001 -- one row's failure (OOM, a refused method) is reported
                    first = (str(e).strip().splitlines() or [""])[0][:160]
                    print(f"{head} SKIP {type(e).__name__}: {first}", flush=True)
                    continue
                if name == "direct" and which == 0:
                    direct = row["seconds"]
                ratio = f"{row['seconds'] / direct:8.2f}" if direct else f"{'-':>8}"
                print(f"{head} {row['seconds']:9.4f} {ratio} {row['compile_s']:9.1f} {gib(row['peak']):>6} "
                      f"{gib(row['need']):>6}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
