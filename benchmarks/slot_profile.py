"""Where LongDiff's time goes on the jnp path: each stage of the slot average timed alone, on one chunk.

The chunk is the one ``temporal_attention`` takes on the device (``ACCELERATOR_CHUNK_BYTES`` on a GPU), of the
attention benchmark's shapes (8 heads x 40, RoPE 32 + T5, IFS mask). Stages, each a jitted function whose outputs
are materialised as in the library: the direct attention of the chunk; LongDiff's whole attention; the masked
logits of its 2 slots (3 RoPE planes, the plain dims, T5 bias, IFS mask); the slot average from those logits;
within it, the per-map softmax sums Z_m(i) as the library computes them (a contraction over keys batched over
query rows) and as a broadcast product reduced in place; and the product of the probabilities with v. Run on a
GPU:

    python benchmarks/slot_profile.py --frames 128 --repeats 10

On a GPU it then prints the top kernels of one direct and one LongDiff call, from a profiler trace.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from attention_bench import bench_interleaved  # this directory
from jaxlongvid import attention
from jaxlongvid.attention import Encoding, temporal_attention
from jaxlongvid.attention.average import mask_logits, row_einsum
from jaxlongvid.attention.core import method_mask
from jaxlongvid.attention.plan import ACCELERATOR_CHUNK_BYTES
from jaxlongvid.methods import PRESETS


def top_kernels(fn, args, count):
    """The GPU kernels of one call of ``fn`` by total time: [(milliseconds, calls, name)], from a profiler trace."""
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            jax.block_until_ready(fn(*args))
        with gzip.open(glob.glob(f"{logdir}/**/perfetto_trace.json.gz", recursive=True)[0]) as f:
            events = json.load(f)["traceEvents"]
    devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
               and "GPU" in str(e.get("args", {}).get("name", ""))}
    if not devices:
        raise RuntimeError("the profiler trace holds no GPU process")
    total, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in devices:
            total[e["name"]] += e["dur"] / 1e3
            calls[e["name"]] += 1
    return [(ms, calls[name], name) for name, ms in total.most_common(count)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kernels", type=int, default=15, help="print this many of LongDiff's top GPU kernels")
    ap.add_argument("--sequences", type=int, default=None, help="chunk size (default: the library's chunk)")
    args = ap.parse_args()
    n, heads, dim = args.frames, 8, 40
    enc = Encoding(rope_dim=32, t5_buckets=32, native_frames=16)
    method = PRESETS["longdiff"]
    maps = method.positions.maps(n, enc.native_frames, np)
    info = attention.info_of_array(maps)
    rope = attention.rope_path(maps, enc)
    slots, sel = attention.map_slots(maps)
    planes = len(attention.plane_cover(slots)[0]) + 2 * len(slots)
    chunk = args.sequences or ACCELERATOR_CHUNK_BYTES // (4 * heads * n * n * planes)
    dtype = jnp.dtype(args.dtype)
    key = jax.random.key(0)
    q, k, v = (jax.random.normal(kk, (chunk, n, heads, dim), dtype) for kk in jax.random.split(key, 3))
    t5 = jax.random.normal(key, (32, heads), jnp.float32)
    segs = method.mask.segments(n, enc.native_frames)
    kf = jnp.broadcast_to(jnp.arange(segs) * (n // segs), (chunk, segs))
    mask = method_mask(method, n, kf, None)  # [chunk, N, N]

    def attend(name):
        return jax.jit(lambda q, k, v: temporal_attention(q, k, v, encoding=enc, method=name, t5_table=t5,
                                                          keyframes=kf if name == "longdiff" else None))

    @jax.jit
    def logits(q, k):
        return [mask_logits(x, mask) for x in attention.logits(q, k, jnp.asarray(slots), info, enc, t5, None, rope)]

    @jax.jit
    def average(logits):
        return attention.slot_average(logits, jnp.asarray(slots), jnp.asarray(sel), enc)[0]

    exps = jax.jit(lambda logits: [jnp.exp(x - jnp.max(x, -1, keepdims=True)) for x in logits])
    chosen = [(sel == s).astype(np.float32) for s in range(len(slots))]  # [M, N, N]

    @jax.jit
    def sums_contracted(exps):
        return sum(row_einsum("...ij,mij->...im", e, c) for e, c in zip(exps, chosen))

    @jax.jit
    def sums_broadcast(exps):
        return jnp.sum(sum(e[..., None, :] * np.swapaxes(c, 0, 1) for e, c in zip(exps, chosen)), axis=-1)

    pv = jax.jit(lambda p, v: jnp.einsum("...hij,...jhd->...ihd", p.astype(v.dtype), v, preferred_element_type=jnp.float32))

    x = logits(q, k)
    e = exps(x)
    p = average(x)
    stages = [("direct attention", attend("direct"), (q, k, v)),
              ("longdiff attention", attend("longdiff"), (q, k, v)),
              ("  masked slot logits", logits, (q, k)),
              ("  slot average from the logits", average, (x,)),
              ("    exps", exps, (x,)),
              ("    sums Z_m, contracted (library)", sums_contracted, (e,)),
              ("    sums Z_m, broadcast-reduced", sums_broadcast, (e,)),
              ("  probabilities x v", pv, (p, v))]
    print(f"device: {jax.devices()[0].device_kind}  dtype: {dtype}  chunk: {chunk} sequences x {n} frames, "
          f"{heads} heads x {dim}; {len(maps)} maps, {len(slots)} slots, "
          f"{len(attention.plane_cover(slots)[0])} planes")
    err = jnp.max(jnp.abs(sums_contracted(e) - sums_broadcast(e)) / sums_contracted(e))
    print(f"sums: contracted vs broadcast, max relative difference {float(err):.2e}")
    times = [bench_interleaved([fn], a, args.repeats)[0] for _, fn, a in stages]
    for (name, _, _), ms in zip(stages, times):
        print(f"{name:36s} {ms:9.3f} ms  x{ms / times[0]:5.2f} direct")
    if jax.default_backend() == "gpu" and args.kernels:
        for name in ("direct", "longdiff"):
            kernels = top_kernels(attend(name), (q, k, v), args.kernels)
            print(f"\n{name}: top GPU kernels of one call (ms, calls, name)")
            for ms, calls, kernel in kernels:
                print(f"{ms:9.3f} {calls:4d}  {kernel[:110]}")


if __name__ == "__main__":
    main()
