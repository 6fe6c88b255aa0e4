"""Lowering (and optionally compile) time and program size of one denoiser call against the frame count.

Maps and masks are built in the program from iotas, so neither should grow with N^2. Prints, per method and
frame count: lowering seconds, StableHLO text size, the largest captured constant and, with --compile, the
compile seconds. Runs on any backend (CPU: the tiny model; on a GPU pass --model with a converted pipeline or a
full-size UNet config via --config, shapes only, no weights).

  python benchmarks/lowering_scale.py --methods direct,longdiff,freeloc --frames 128,256,512,1024
  python benchmarks/lowering_scale.py --config lavie --latent 40x64 --batch 2 --dtype bfloat16 --compile \
      --methods direct,longdiff --frames 128,512,1024   # 320x512 pixels, classifier-free guidance batch
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from jaxlongvid.bench.lowering import constant_sizes, lower_denoiser
from jaxlongvid.models.unet3d import UNet3DConfig
from jaxlongvid.pipeline import load_config


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="pipeline directory or 'tiny' (default)")
    parser.add_argument("--config", choices=["lavie", "videocrafter2"],
                        help="use this full-size UNet config (random weights, shapes only) in the model's pipeline")
    parser.add_argument("--methods", default="direct,longdiff,freeloc,freenoise,freelong")
    parser.add_argument("--frames", default="128,256,512,1024")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--latent", help="latent HxW (default: the pipeline's image size over its VAE factor; "
                                          "needed with --config, e.g. 40x64 for 320x512 pixels)")
    parser.add_argument("--dtype", help="compute dtype (default: the pipeline's)")
    parser.add_argument("--compile", action="store_true", help="also compile (prints compile seconds)")
    args = parser.parse_args()
    config = load_config(args.model)
    if args.config:  # the UNet alone: the pipeline's other parts are not used
        config = dataclasses.replace(config, unet=getattr(UNet3DConfig, args.config)(), vae=None,
                                     missing=tuple(sorted({*config.missing, "vae"})))
    latent = tuple(int(x) for x in args.latent.split("x")) if args.latent else None
    if args.dtype:
        config = dataclasses.replace(config, dtype=args.dtype)
    print(f"{'method':<12} {'frames':>6} {'lower s':>8} {'HLO MB':>8} {'largest const':>14} {'compile s':>10}")
    for method in args.methods.split(","):
        for frames in (int(f) for f in args.frames.split(",")):
            lowered, seconds = lower_denoiser(config, method, frames, args.batch, latent)
            text = lowered.as_text()
            largest = max(constant_sizes(text), default=0)
            compile_s = ""
            if args.compile:
                start = time.perf_counter()
                lowered.compile()
                compile_s = f"{time.perf_counter() - start:.1f}"
            print(f"{method:<12} {frames:>6} {seconds:8.2f} {len(text) / 2**20:8.2f} {largest:>14,} {compile_s:>10}",
                  flush=True)


if __name__ == "__main__":
    main()
