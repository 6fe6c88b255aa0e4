"""Multi-GPU check: the same seed sampled on one device and with the frame axis sharded over every device.

    python benchmarks/multi_gpu_check.py --frames 128 --methods direct,freenoise,freelong,longdiff,freeloc \
        --precisions highest,default

Prints, per method and matmul precision (``sample(precision=...)``), the wall time of each layout (compile
included, then a second timed call) and the max absolute difference of the uint8 frames against the
single-device result at that precision.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import jaxlongvid as jlv
from jaxlongvid.sharding import make_mesh


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--frames", type=int, default=128)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--methods", default="direct,freenoise,freelong,longdiff,freeloc")
    ap.add_argument("--prompt", default="a red circle moving right on a black background")
    ap.add_argument("--precisions", default="highest", help="comma-separated: default, high, highest")
    ap.add_argument("--out", default=None, help="folder for contact sheets of the sharded results")
    args = ap.parse_args()
    pipe = jlv.load(args.model)
    n = jax.device_count()
    print(f"devices: {n} x {jax.devices()[0].device_kind}")
    layouts = {"1 device": dict(mesh=make_mesh(1, 1, devices=jax.devices()[:1])),
               f"frames={n}": dict(mesh=make_mesh(n, 1))}
    if n % 2 == 0 and n > 2:
        layouts[f"frames={n // 2} x data=2"] = dict(mesh=make_mesh(n // 2, 2))
    print("| method | precision | layout | first call s | second call s | max abs diff vs 1 device |")
    print("|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        for precision in args.precisions.split(","):
            ref = None
            for name, kw in layouts.items():
                run = lambda: jlv.sample(pipe, args.prompt, num_frames=args.frames, method=method, seed=0,
                                         num_inference_steps=args.steps, progress=False, precision=precision,
                                         **kw)
                video, first = timed(run)
                _, second = timed(run)
                ref = video if ref is None else ref
                diff = int(np.abs(video.astype(np.int16) - ref.astype(np.int16)).max())
                print(f"| {method} | {precision} | {name} | {first:.1f} | {second:.2f} | {diff} |", flush=True)
                if args.out and name != "1 device":
                    from jaxlongvid.video import save_contact_sheet
                    save_contact_sheet(video, f"{args.out}/{method}_{precision}_{args.frames}.png", every=8)


if __name__ == "__main__":
    main()
