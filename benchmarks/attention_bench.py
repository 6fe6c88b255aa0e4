"""Temporal-attention time of every method relative to ``direct``, jnp path and fused (cuDNN) path.

LaVie-sized: 2 videos x 40 x 64 latent pixels = 5120 sequences of N frames, 8 heads x 40 dims, RoPE on 32 dims
plus the T5 bias (LaVie's temporal attention). Prints a table of median milliseconds (and the ratio to
``direct`` on the same path) for N = 128 and one larger case. Run on a GPU:

    python benchmarks/attention_bench.py --frames 128 256 --repeats 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlongvid.attention import Encoding, temporal_attention
from jaxlongvid.methods import PRESETS


def bench_one(fn, args, repeats):
    out = fn(*args)
    jax.block_until_ready(out)  # compile + warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--videos", type=int, default=2)
    ap.add_argument("--height", type=int, default=40)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--methods", default="direct,freenoise,freelong,sliding-window,longdiff,longdiff-no-pm,"
                                         "longdiff-no-ifs,clip,interpolate,group-only,freeloc")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--paths", default="jnp,cudnn")
    args = ap.parse_args()
    dtype = jnp.dtype(args.dtype)
    enc = Encoding(rope_dim=32, t5_buckets=32, native_frames=16)
    print(f"device: {jax.devices()[0].device_kind}  dtype: {dtype}  sequences: "
          f"{args.videos}x{args.height}x{args.width}  heads {args.heads} x {args.dim}")
    rows = []
    for n in args.frames:
        key = jax.random.key(n)
        shape = (args.videos, args.height * args.width, n, args.heads, args.dim)
        q, k, v = (jax.random.normal(kk, shape, dtype) for kk in jax.random.split(key, 3))
        t5 = jax.random.normal(key, (32, args.heads), jnp.float32)
        for path in args.paths.split(","):
            impl = None if path == "jnp" else path
            base = None
            for name in args.methods.split(","):
                method = PRESETS[name]
                segs = method.segments(n, 16)
                kf = jnp.broadcast_to((jnp.arange(segs) * (n // segs))[None, None], (args.videos, 1, segs)) \
                    if method.needs_keyframes else None

                @jax.jit
                def run(q, k, v, t5, kf, method=method, impl=impl):
                    return temporal_attention(q, k, v, encoding=enc, method=method, t5_table=t5, keyframes=kf,
                                              spatial_shape=(args.height, args.width), implementation=impl)

                try:
                    ms = bench_one(run, (q, k, v, t5, kf), args.repeats)
                except Exception as e:  # report, keep going (e.g. out of memory)
                    print(f"N={n} {path} {name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    continue
                base = ms if name == "direct" else base
                ratio = ms / base if base else float("nan")
                rows.append((n, path, name, ms, ratio))
                print(f"N={n:4d} {path:6s} {name:16s} {ms:9.2f} ms  x{ratio:5.2f}", flush=True)
    print("\n| N | path | method | median ms | vs direct |\n|---|---|---|---|---|")
    for n, path, name, ms, ratio in rows:
        print(f"| {n} | {path} | {name} | {ms:.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
