"""Is a long video still, or slowed down? Samples two prompts the tiny model animates reliably (bouncing,
circling) natively (16 frames) and at 128 frames with several methods, tracks the object with ShapesBench's
detector and prints its mean speed (pixels per frame), the span it covers and its travel per 8-frame window.

    python benchmarks/motion_speed.py
"""
import numpy as np, jaxlongvid as jlv
from jaxlongvid.bench import detect
from jaxlongvid.tiny import data
pipe = jlv.load("tiny")
prompts = ["a yellow diamond bouncing on a black background", "a cyan triangle circling on a striped background"]
for frames, method in [(16, "direct"), (128, "direct"), (128, "longdiff"), (128, "longdiff-no-ifs"), (128, "interpolate")]:
    vids = np.asarray(jlv.sample(pipe, prompts, num_frames=frames, method=method, seed=0, progress=False))
    for p, v in zip(prompts, vids):
        pos = detect.track(v, data.parse_prompt(p).objects[0].colour).positions
        path = detect.unwrapped_path(pos, 32)
        step = np.linalg.norm(np.diff(path, axis=0), axis=1)
        span = path.max(0) - path.min(0)
        # speed per 8-frame window: is motion spread out (slow) or bunched (still then jumps)?
        w = np.add.reduceat(step, np.arange(0, len(step), 8)) if len(step) > 8 else step
        print(f"{method:16s} {frames:4d}f {p.split()[2]:9s} mean speed {step.mean():.3f} px/frame  span {span.round(1)}  "
              f"per-8-frame travel min/median/max {w.min():.2f}/{np.median(w):.2f}/{w.max():.2f}", flush=True)
