"""Multi-GPU check: the same computation on one device and with the frame axis sharded over every device.

Sampling (a UNet pipeline, or any pipeline directory):

    python benchmarks/multi_gpu_check.py --frames 128 --methods direct,freenoise,freelong,longdiff,freeloc \
        --precisions highest,default

prints, per method and matmul precision (``sample(precision=...)``), the wall time of each layout (compile
included, then a second timed call) and the max absolute difference of the uint8 frames against the
single-device result at that precision.

One Wan DiT step (``--wan SIZE``): the classifier-free-guidance step of ``benchmarks/wan_methods.py`` (the denoiser
on the guidance pair, random weights) on one device, then on every layout of all devices -- frames over all of
them, and frames over half with the guidance pair over ``data`` -- with the self-attention context-parallel as
``sharding.sequence_parallel`` plans it (``auto``: all-to-all over heads where the frames axis divides the heads)
and with the compiler's own partitioning (``xla``) for comparison:

    python benchmarks/multi_gpu_check.py --wan 1.3b --frames 157 --methods direct,freeloc-wan

157 video frames are 40 latent frames, which 2, 4 and 8 devices split (Wan's ``1 + 4k`` counts give ``k + 1``
latent frames: 81 -> 21 and 321 -> 81 split over none of them; 317 -> 80 does). It prints per row the plan
(``heads`` or ``xla``, with the reason where ``auto`` fell back), seconds per step (median of ``--repeats``), the
ratio to one device, compile seconds, the peak bytes on device 0, the all-to-alls in the compiled program and the
max relative difference of the step's output against one device. On a CPU with forced host devices, a tiny DiT
of 4 heads in float32 (what the test runs):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/multi_gpu_check.py --wan tiny \
        --frames 29 --height 32 --width 32 --dtype float32 --text-len 4 --repeats 1 --methods direct,freeloc
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wan_methods import random_params  # noqa: E402
from wan_step import latent_grid  # noqa: E402

import jaxlongvid as jlv  # noqa: E402
from jaxlongvid import sharding  # noqa: E402
from jaxlongvid.bench.timing import time_compiled  # noqa: E402
from jaxlongvid.methods import get_method  # noqa: E402
from jaxlongvid.models.wan import WanConfig, WanTransformer  # noqa: E402
from jaxlongvid.sharding import make_mesh  # noqa: E402

WAN_SIZES = {"1.3b": WanConfig.wan_1_3b(), "14b": WanConfig.wan_14b(),
             "tiny": WanConfig(num_heads=4, head_dim=32, ffn_dim=64, num_layers=2, text_dim=64, native_frames=2)}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def layouts(n: int, pair: bool = True) -> dict:
    """Name -> mesh: one device, frames over all ``n``, and (for a guidance ``pair``) frames over ``n / 2`` with
    the pair over data 2."""
    out = {"1 device": make_mesh(1, 1, devices=jax.devices()[:1])}
    if n > 1:
        out[f"frames={n}"] = make_mesh(n, 1)
    if pair and n % 2 == 0 and n > 2:
        out[f"frames={n // 2} x data=2"] = make_mesh(n // 2, 2)
    return out


# ---- sampling --------------------------------------------------------------------------------------------------------
def sample_check(args) -> None:
    pipe = jlv.load(args.model)
    print("| method | precision | layout | first call s | second call s | max abs diff vs 1 device |")
    print("|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        for precision in args.precisions.split(","):
            ref = None
            for name, mesh in layouts(jax.device_count(), pipe.config.guidance_scale > 1.0).items():
                run = lambda: jlv.sample(pipe, args.prompt, num_frames=args.frames, method=method, seed=0,
                                         num_inference_steps=args.steps, progress=False, precision=precision,
                                         mesh=mesh)
                video, first = timed(run)
                _, second = timed(run)
                ref = video if ref is None else ref
                diff = int(np.abs(video.astype(np.int16) - ref.astype(np.int16)).max())
                print(f"| {method} | {precision} | {name} | {first:.1f} | {second:.2f} | {diff} |", flush=True)
                if args.out and name != "1 device":
                    from jaxlongvid.video import save_contact_sheet
                    save_contact_sheet(video, f"{args.out}/{method}_{precision}_{args.frames}.png", every=8)


# ---- one Wan DiT step ------------------------------------------------------------------------------------------------
def wan_step_fn(config: WanConfig, method, dtype, implementation, context_parallel: str):
    """The guided step, its latents split over frames and the pair over ``data`` under the active mesh."""
    model = WanTransformer(config, method=method, dtype=dtype, attention_implementation=implementation,
                           context_parallel=context_parallel)

    @jax.jit
    def step(params, x, context):
        pair = sharding.constrain(jnp.concatenate([x, x]), sharding.VIDEO)
        out = model.apply({"params": params}, pair, jnp.full((2,), 999.0), context)
        uncond, cond = jnp.split(out.astype(jnp.float32), 2)
        return sharding.constrain(uncond + 5.0 * (cond - uncond), P(None, sharding.FRAMES))

    return step


def wan_rows(config: WanConfig, grid, method, args, dtype, implementation) -> list[dict]:
    """One row per (layout, context parallelism) for ``method``; the first is one device."""
    pt, ph, pw = config.patch_size
    tokens = (grid[0] // pt) * (grid[1] // ph) * (grid[2] // pw)
    keys = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(keys[0], (1,) + tuple(grid) + (config.in_channels,), jnp.float32)
    context = jax.random.normal(keys[1], (2, args.text_len, config.text_dim), jnp.float32).astype(dtype)
    params = random_params(config, dtype, grid, args.text_len)
    rows = []
    for name, mesh in layouts(jax.device_count()).items():
        frames = sharding.axis_size(mesh, sharding.FRAMES)
        for choice in (("auto",) if frames == 1 else args.context_parallel.split(",")):
            row = dict(layout=name, choice=choice)
            if grid[0] % frames:
                rows.append(dict(row, skip=f"{grid[0]} latent frames do not split over {frames} devices"))
                continue
            with jax.set_mesh(mesh):
                plan = sharding.sequence_parallel(config.num_heads, tokens, 2, choice)
                placed = [jax.device_put(a, sharding.named(mesh, spec)) for a, spec in
                          ((params, P()), (x, P(None, sharding.FRAMES)), (context, P()))]
                step = wan_step_fn(config, method, dtype, implementation, choice)
                timing = time_compiled(step, *placed, repeats=args.repeats, warmup=1)
            rows.append(dict(row, plan=plan, **timing))
    return rows


def wan_check(args) -> None:
    config = WAN_SIZES[args.wan]
    dtype = jnp.dtype(args.dtype)
    implementation = {"auto": "cudnn" if jax.default_backend() == "gpu" else None, "xla": None}.get(
        args.attention, args.attention)
    grid = latent_grid(args.frames, args.height, args.width)
    n = jax.device_count()
    print(f"Wan {args.wan} ({config.num_heads} heads): {args.frames} frames {args.height}x{args.width} -> latent "
          f"{grid}, CFG pair, {args.dtype}, attention {implementation or 'xla'}; {n} x {jax.devices()[0].device_kind}")
    print("| method | layout | context parallel | plan | s/step | x 1 device | compile s | peak GiB (device 0) "
          "| all-to-alls | max rel diff vs 1 device |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.methods.split(","):
        rows = wan_rows(config, grid, get_method(name), args, dtype, implementation)
        ref = np.asarray(rows[0]["output"], np.float64)
        for row in rows:
            head = f"| {name} | {row['layout']} | {row['choice']} |"
            if "skip" in row:
                print(f"{head} SKIP: {row['skip']} | | | | | | |", flush=True)
                continue
            plan = row["plan"]
            kind = plan.kind + (f" ({plan.reason})" if plan.kind == "xla" and plan.reason != "asked for" else "")
            diff = np.max(np.abs(np.asarray(row["output"], np.float64) - ref)) / np.max(np.abs(ref))
            peak = "-" if row["peak"] is None else f"{row['peak'] / 2 ** 30:.1f}"
            print(f"{head} {kind} | {row['seconds']:.4f} | {row['seconds'] / rows[0]['seconds']:.2f} | "
                  f"{row['compile_s']:.1f} | {peak} | {row['hlo'].count('all-to-all(')} | {diff:.1e} |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--frames", type=int, default=None, help="video frames (default: 128; with --wan, 157)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--methods", default=None, help="comma separated (default: direct,freenoise,freelong,"
                    "longdiff,freeloc; with --wan, direct,freeloc)")
    ap.add_argument("--prompt", default="a red circle moving right on a black background")
    ap.add_argument("--precisions", default="highest", help="comma-separated: default, high, highest")
    ap.add_argument("--out", default=None, help="folder for contact sheets of the sharded results")
    ap.add_argument("--wan", choices=sorted(WAN_SIZES), help="check one Wan DiT step of this size instead")
    ap.add_argument("--height", type=int, default=480, help="with --wan")
    ap.add_argument("--width", type=int, default=832, help="with --wan")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="with --wan")
    ap.add_argument("--text-len", type=int, default=512, help="with --wan")
    ap.add_argument("--attention", default="auto", help="with --wan: auto (cudnn on GPU, else xla), cudnn or xla")
    ap.add_argument("--repeats", type=int, default=3, help="with --wan")
    ap.add_argument("--context-parallel", default="auto,xla", help="with --wan: the sharded layouts' choices "
                    "(sharding.sequence_parallel: auto, heads, xla), comma separated")
    args = ap.parse_args(argv)
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}")
    if args.wan:
        args.frames = args.frames or 157
        args.methods = args.methods or "direct,freeloc"
        wan_check(args)
    else:
        args.frames = args.frames or 128
        args.methods = args.methods or "direct,freenoise,freelong,longdiff,freeloc"
        sample_check(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
