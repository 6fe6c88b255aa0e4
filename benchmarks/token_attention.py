"""One Wan self-attention call (token level, 3D RoPE's frame part mapped by the method) under each method and
attention implementation: median milliseconds, the ratio to the first implementation's ``direct`` at the same
length, and the largest difference of each output from the first implementation's output for the same method
(relative to its largest entry; a check of the kernels on the device, in the compute dtype).

The layer is Wan2.1-1.3B's (12 heads x 128, frame RoPE on 44 dims) at 480x832 (30 x 52 = 1,560 tokens per latent
frame) on the guidance pair (2 sequences); q, k, v random, IFS keyframes evenly spaced. Implementations: ``cudnn``
(one fused call for ``direct`` and ``riflex``, one per query latent frame for methods that map or mask:
``attention.kernels.fused``), ``pallas`` (the block-sparse kernel, ``attention.kernels.sparse``), ``xla`` (as
``cudnn`` through XLA), ``jnp`` (the core's jnp path over token maps: small grids only). On one
H100 / H200 (21 / 41 / 81 latent frames = 81 / 161 / 321 video frames):

    python benchmarks/token_attention.py --latent 21,41,81 --attention cudnn,pallas

``--frames-call-gib`` sets how many gathered keys and values one step of the per-frame path may hold
(``kernels.fused.FRAMES_CALL_BYTES``; 0: one query frame per call), to time the grouping:

    python benchmarks/token_attention.py --latent 81 --attention cudnn --methods direct,freeloc,longdiff \\
        --frames-call-gib 4

On a CPU, tiny and in float32 (the kernel interpreted; what the test runs):

    python benchmarks/token_attention.py --latent 6 --rows 2 --cols 3 --heads 2 --dim 24 --dtype float32 \\
        --attention jnp,pallas --repeats 1
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxlongvid.attention import Encoding, temporal_attention
from jaxlongvid.attention.kernels import fused
from jaxlongvid.bench.timing import time_compiled
from jaxlongvid.methods import get_method
from jaxlongvid.models.wan import rope_split

METHODS = ("direct", "freeloc", "longdiff", "riflex", "sliding-window", "interpolate")
NATIVE = 21  # Wan2.1's native latent frames


def attention_fn(method, encoding: Encoding, tokens_per_frame: int, implementation):
    return jax.jit(lambda q, k, v, kf: temporal_attention(
        q, k, v, encoding=encoding, method=method, keyframes=kf if method.needs_keyframes else None,
        tokens_per_frame=tokens_per_frame, implementation=implementation))


def keyframes_of(method, frames: int):
    """Evenly spaced keyframes ``[2, n]`` for IFS methods (a placeholder ``[2, 1]`` otherwise)."""
    n = method.mask.segments(frames, NATIVE) if method.needs_keyframes else 1
    return jnp.tile(jnp.linspace(0, frames - 1, n).astype(jnp.int32)[None], (2, 1))


def relative_gap(out, first) -> float:
    out, first = np.asarray(out, np.float32), np.asarray(first, np.float32)
    return float(np.max(np.abs(out - first)) / np.max(np.abs(first)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latent", default="21,41,81", help="latent frame counts, comma separated")
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--cols", type=int, default=52)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--attention", default="cudnn,pallas", help="comma separated: cudnn, pallas, xla, jnp")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--frames-call-gib", type=float, default=None,
                        help="bytes (GiB) of keys and values per step of the per-frame path (default: the module's)")
    args = parser.parse_args(argv)
    if args.frames_call_gib is not None:
        fused.FRAMES_CALL_BYTES = int(args.frames_call_gib * (1 << 30))

    dtype = jnp.dtype(args.dtype)
    t = args.rows * args.cols
    encoding = Encoding(rope_dim=rope_split(args.dim)[0], native_frames=NATIVE)
    implementations = [a.strip() for a in args.attention.split(",")]
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    print(f"Wan self-attention, {args.heads} heads x {args.dim}, {t} tokens per latent frame, 2 sequences, "
          f"{args.dtype}, {fused.FRAMES_CALL_BYTES / (1 << 30):g} GiB per per-frame step, "
          f"device {jax.devices()[0].device_kind}; gap: max |out - first attention's| / max |first|")
    print(f"{'latent':>6} {'tokens':>7} {'method':<14} {'attention':<9} {'ms':>9} {'x direct':>8} {'compile s':>9} "
          f"{'gap':>8}")
    for frames in sorted(int(f) for f in args.latent.split(",")):
        keys = jax.random.split(jax.random.key(frames), 3)
        q, k, v = (jax.random.normal(key, (2, frames * t, args.heads, args.dim), dtype) for key in keys)
        direct = None
        for name in names:
            method = get_method(name)
            kf = keyframes_of(method, frames)
            first = None
            for which, implementation in enumerate(implementations):
                head = f"{frames:>6} {frames * t:>7} {name:<14} {implementation:<9}"
                try:
                    fn = attention_fn(method, encoding, t, None if implementation == "jnp" else implementation)
                    row = time_compiled(fn, q, k, v, kf, repeats=args.repeats)
                    out = fn(q, k, v, kf)
                except Exception as e:  # noqa: BLE001 -- one row's failure (OOM, a kernel that does not build)
                    line = (str(e).strip().splitlines() or [""])[0][:160]
                    print(f"{head} SKIP {type(e).__name__}: {line}", flush=True)
                    continue
                first = out if which == 0 else first
                if name == "direct" and which == 0:
                    direct = row["seconds"]
                ratio = f"{row['seconds'] / direct:8.2f}" if direct else f"{'-':>8}"
                gap = f"{relative_gap(out, first):8.1e}" if first is not None else f"{'-':>8}"
                print(f"{head} {row['seconds'] * 1e3:9.2f} {ratio} {row['compile_s']:9.1f} {gap}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
