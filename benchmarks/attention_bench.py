"""Temporal-attention time of every method relative to ``direct``, per path and per mapped-RoPE formulation.

LaVie-sized: 2 videos x 40 x 64 latent pixels = 5120 sequences of N frames, 8 heads x 40 dims, RoPE on 32 dims
plus the T5 bias (LaVie's temporal attention). Prints a table of median milliseconds (and the ratio to
``direct`` on the same path) for N = 128 and one larger case, on three paths: ``jnp`` (implementation=None),
``cudnn`` (jax.nn.dot_product_attention where the RoPE is a rotation of absolute positions) and ``pallas`` (the
plane-cover Pallas kernel where the RoPE is mapped; the jnp path elsewhere). Run on a GPU:

    python benchmarks/attention_bench.py --frames 128 256 --repeats 10

Methods whose RoPE runs under a mapped (non-linear) position map are timed once per ``--variants`` entry,
side by side in one process (calls interleaved round-robin): ``CHOICE[@CHUNK_MIB][/AVERAGE]`` with CHOICE
``auto`` (what the library picks, see ``jaxlongvid.attention.plan.make_plan``), ``planes``, ``per_value`` or
``per_frequency`` (the formulation used before the other two existed), optionally temporal_attention's
``chunk_bytes`` in MiB (``per_frequency@1024`` is the code path and chunk of the library before the per-value
formulation) and its ``map_average`` (``auto/per_map``: one softmax per map, as before the slot average; it
matters only where several maps are averaged). Other methods do not depend on it and are timed once. On a CPU,
use fewer sequences and float32:

    python benchmarks/attention_bench.py --frames 128 --sequences 64 --dtype float32 --paths jnp --repeats 5 \
        --methods direct,longdiff,clip,freeloc --variants auto auto/per_map per_frequency
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlongvid.attention import Encoding, info_of_array, make_plan, temporal_attention
from jaxlongvid.methods import PRESETS


def bench_interleaved(fns, args, repeats):
    """Median milliseconds of each function, called round-robin so that load from other processes falls on all
    of them alike."""
    for fn in fns:
        jax.block_until_ready(fn(*args))  # compile + warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            t.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def parse_variant(text):
    text, _, average = text.partition("/")
    choice, _, chunk = text.partition("@")
    return choice, int(chunk) if chunk else None, average or "auto"


def resolve(maps, enc, choice, chunk_mib, average, implementation):
    """The computation a variant runs: (RoPE path, chunk where it matters, map average where it matters), None
    where it cannot run."""
    info = info_of_array(maps)
    try:  # the library's own plan (shapes only matter for the chunk, which the variant sets)
        plan = make_plan(info, enc, 1, 1, 40, "float32", (False, False), implementation, None, choice,
                         average if average in ("slots", "per_map") else "auto")
    except ValueError:  # planes or per_value under a fractional map
        return None
    average = plan.average if len(maps) > 1 else "one map"
    if plan.kernel == "pallas":
        return "pallas kernel", None, average  # the kernel computes the plane cover whatever the choice, no chunks
    if not plan.mapped:
        return plan.rope, None, average
    return plan.rope, chunk_mib, average


def label(resolved):
    """A variant's computation as printed: the RoPE path, and the map average where several maps are averaged."""
    if resolved is None:
        return "n/a"
    rope, _, average = resolved
    return rope if average in (None, "one map") else f"{rope}, {average}"


def check(shape, dtype, enc, method, kf, spatial, impl, key):
    """Relative L2 error of ``impl``'s output against the jnp path in float32 ("highest"), fresh inputs."""
    kq, kk, kv, kt = jax.random.split(key, 4)
    q, k, v = (jax.random.normal(x, shape, jnp.float32) for x in (kq, kk, kv))
    t5 = jax.random.normal(kt, (enc.t5_buckets, shape[-2]), jnp.float32)
    common = dict(encoding=enc, method=method, t5_table=t5, keyframes=kf, spatial_shape=spatial)
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(lambda q, k, v: temporal_attention(q, k, v, **common))(q, k, v)
    cast = [x.astype(dtype) for x in (q, k, v)]
    out = jax.jit(lambda q, k, v: temporal_attention(q, k, v, implementation=impl, **common))(*cast)
    out = out.astype(jnp.float32)
    err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    finite = bool(jnp.isfinite(out).all())
    print(f"check {impl} {method.name} {dtype} vs jnp float32: rel L2 error {err:.2e}, all finite {finite}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--videos", type=int, default=2)
    ap.add_argument("--height", type=int, default=40)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--sequences", type=int, default=None,
                    help="one video of 1 x SEQUENCES pixels instead of videos x height x width (small CPU runs)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--methods", default="direct,freenoise,freelong,sliding-window,longdiff,longdiff-no-pm,"
                                         "longdiff-no-ifs,clip,interpolate,group-only,freeloc")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--paths", default="jnp,cudnn,pallas",
                    help="jnp, cudnn, xla (jax.nn.dot_product_attention) and/or pallas (the plane kernel where "
                         "RoPE is mapped, else jnp; interpreted, so very slow, on a CPU)")
    ap.add_argument("--variants", nargs="+", default=["auto", "per_frequency"],
                    help="mapped-RoPE variants timed side by side: CHOICE[@CHUNK_MIB][/AVERAGE], CHOICE one of "
                         "auto, planes, per_value, per_frequency; CHUNK_MIB temporal_attention's chunk_bytes in MiB "
                         "(default: the library's); AVERAGE its map_average, auto, slots or per_map")
    ap.add_argument("--check", action="store_true",
                    help="before timing, compare each non-jnp path's output with the jnp path in float32 at the "
                         "highest matmul precision, on fresh inputs: prints ||out - ref|| / ||ref||")
    args = ap.parse_args()
    dtype = jnp.dtype(args.dtype)
    videos, height, width = (1, 1, args.sequences) if args.sequences else (args.videos, args.height, args.width)
    variants = [parse_variant(v) for v in args.variants]
    enc = Encoding(rope_dim=32, t5_buckets=32, native_frames=16)
    print(f"device: {jax.devices()[0].device_kind}  dtype: {dtype}  sequences: {videos}x{height}x{width}  "
          f"heads {args.heads} x {args.dim}")
    rows = []
    for n in args.frames:
        key = jax.random.key(n)
        shape = (videos, height * width, n, args.heads, args.dim)
        q, k, v = (jax.random.normal(kk, shape, dtype) for kk in jax.random.split(key, 3))
        t5 = jax.random.normal(key, (32, args.heads), jnp.float32)
        for path in args.paths.split(","):
            impl = None if path == "jnp" else path
            base = None
            for name in args.methods.split(","):
                method = PRESETS[name]
                kf = None
                if method.needs_keyframes:
                    segs = method.mask.segments(n, 16)
                    kf = jnp.broadcast_to((jnp.arange(segs) * (n // segs))[None, None], (videos, 1, segs))
                maps = method.positions.maps(n, enc.native_frames, np)
                # variants that resolve to the same computation are timed once
                resolved = [resolve(maps, enc, *variant, impl) for variant in variants]
                distinct = sorted({r for r in resolved if r is not None}, key=str)
                fns = []
                for rope, chunk_mib, average in distinct:
                    choice = next(c for (c, _, _), r in zip(variants, resolved) if r == (rope, chunk_mib, average))
                    chunk = {} if chunk_mib is None else {"chunk_bytes": chunk_mib << 20}
                    chunk["map_average"] = average if average in ("slots", "per_map") else "auto"

                    @jax.jit
                    def run(q, k, v, t5, kf, method=method, impl=impl, choice=choice, chunk=chunk):
                        return temporal_attention(q, k, v, encoding=enc, method=method, t5_table=t5, keyframes=kf,
                                                  spatial_shape=(height, width), implementation=impl,
                                                  mapped_rope=choice, **chunk)
                    fns.append(run)
                if args.check and impl is not None:
                    check(q.shape, dtype, enc, method, kf, (height, width), impl, jax.random.fold_in(key, 7))
                try:
                    timed = dict(zip(distinct, bench_interleaved(fns, (q, k, v, t5, kf), args.repeats)))
                except Exception as e:  # report, keep going (e.g. out of memory)
                    print(f"N={n} {path} {name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    timed = {}
                cells = [(label(r), timed.get(r, float("nan"))) for r in resolved]
                ms = cells[0][1]
                base = ms if name == "direct" else base
                ratio = ms / base if base else float("nan")
                rows.append((n, path, name, ratio, cells))
                text = "  ".join(f"{v}={r}:{t:9.2f} ms" for v, (r, t) in zip(args.variants, cells))
                print(f"N={n:4d} {path:6s} {name:16s} x{ratio:6.2f}  {text}", flush=True)
    header = " | ".join(f"{v} ms (RoPE path)" for v in args.variants)
    print(f"\n| N | path | method | {header} | {args.variants[0]} vs direct |\n|---|---|---|"
          + "---|" * (len(variants) + 1))
    for n, path, name, ratio, cells in rows:
        text = " | ".join(f"{t:.2f} ({r})" for r, t in cells)
        print(f"| {n} | {path} | {name} | {text} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
